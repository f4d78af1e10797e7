"""`kxl eval report A B`: two scored models side by side.

- overall score of each with a bootstrap confidence interval (characters resampled), and
  the paired difference B - A over the characters both scored (its own interval);
- the characters whose score moved by at least `min_delta` (worse / better), largest first;
- report_grid.png: the same prompts and seeds from both models (the largest moves first,
  then the card's style prompts);
- report_plot.png: per-character score of A against B, and the histogram of B - A;
- report.json and report.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kxl_common.figures import save_figure
from kxl_common.atomic import write_json, write_text

from .errors import EvalError
from .generate import image_path
from .score import load_score

REPORT_JSON, REPORT_MD, GRID_PNG, PLOT_PNG = "report.json", "report.md", "report_grid.png", "report_plot.png"


def bootstrap_ci(values: np.ndarray, *, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(reps, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _side(score: dict, per: pd.DataFrame, reps: int, level: float) -> dict:
    s = per["score"].dropna().to_numpy()
    lo, hi = bootstrap_ci(s, reps=reps, level=level)
    return {"generated": score["generated"], "model": score.get("model"), "characters": int(len(s)),
            "score": float(s.mean()) if len(s) else None, "ci": [lo, hi],
            "mean_difference": score["overall"]["mean_difference"],
            "control_shuffled_references": score.get("control_shuffled_references")}


def compare_scores(a_dir: Path, b_dir: Path, *, min_delta: float = 0.25, top: int = 20, reps: int = 2000,
                   level: float = 0.95) -> tuple[dict, pd.DataFrame]:
    sa, pa_ = load_score(a_dir)
    sb, pb = load_score(b_dir)
    if sa.get("ccip", {}).get("threshold") != sb.get("ccip", {}).get("threshold"):
        raise EvalError(f"{a_dir} and {b_dir} were scored with different CCIP models / thresholds")
    both = pa_.merge(pb, on="id", suffixes=("_a", "_b"))
    both = both[both["score_a"].notna() & both["score_b"].notna()].copy()
    both["delta"] = both["score_b"] - both["score_a"]
    d = both["delta"].to_numpy()
    lo, hi = bootstrap_ci(d, reps=reps, level=level, seed=1)
    order = both.reindex(both["delta"].abs().sort_values(ascending=False).index)
    cols = ["id", "character_a", "score_a", "score_b", "delta", "images_a", "references_a"]

    def listed(frame: pd.DataFrame) -> list[dict]:
        out = frame[cols].head(top).rename(columns={"character_a": "character", "images_a": "images",
                                                    "references_a": "references"})
        return json.loads(out.to_json(orient="records"))

    report = {
        "kind": "kxl eval report",
        "a": _side(sa, pa_, reps, level),
        "b": _side(sb, pb, reps, level),
        "paired": {"characters": int(len(d)), "mean_delta_b_minus_a": float(d.mean()) if len(d) else None,
                   "ci": [lo, hi], "level": level, "bootstrap_reps": reps},
        "min_delta": min_delta,
        "worse_in_b": listed(order[order["delta"] <= -min_delta]),
        "better_in_b": listed(order[order["delta"] >= min_delta]),
        "ccip": sa.get("ccip"),
    }
    return report, order


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def format_markdown(r: dict) -> str:
    lv = int(round(r["paired"]["level"] * 100))
    lines = ["# kxl eval report", "",
             f"| model | characters | score | {lv}% CI | mean difference | control (shuffled refs) |",
             "|---|---|---|---|---|---|"]
    for key in ("a", "b"):
        s = r[key]
        ctrl = (s.get("control_shuffled_references") or {}).get("score")
        lines.append(f"| {key.upper()}: `{s['generated']}` | {s['characters']} | {_fmt(s['score'])} | "
                     f"{_fmt(s['ci'][0])} .. {_fmt(s['ci'][1])} | {_fmt(s['mean_difference'])} | {_fmt(ctrl)} |")
    p = r["paired"]
    lines += ["", f"Paired over {p['characters']} characters: B - A = {_fmt(p['mean_delta_b_minus_a'])} "
                  f"({lv}% CI {_fmt(p['ci'][0])} .. {_fmt(p['ci'][1])}).", ""]
    for title, key in (("Much worse in B", "worse_in_b"), ("Much better in B", "better_in_b")):
        lines += [f"## {title} (|delta| >= {r['min_delta']})", ""]
        if not r[key]:
            lines += ["none", ""]
            continue
        lines += ["| character | A | B | delta |", "|---|---|---|---|"]
        lines += [f"| {x['character']} | {_fmt(x['score_a'])} | {_fmt(x['score_b'])} | {_fmt(x['delta'])} |"
                  for x in r[key]]
        lines.append("")
    lines += [f"Grid: {GRID_PNG}; plot: {PLOT_PNG}.", ""]
    return "\n".join(lines)


def plot_scores(order: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    ax1.scatter(order["score_a"], order["score_b"], s=8, alpha=0.6)
    ax1.plot([0, 1], [0, 1], color="grey", lw=1)
    ax1.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="score A", ylabel="score B",
            title="per-character CCIP score")
    ax2.hist(order["delta"], bins=np.linspace(-1, 1, 41))
    ax2.set(xlabel="score B - score A", ylabel="characters", title="change per character")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def grid(order: pd.DataFrame, a_gen: Path, b_gen: Path, path: Path, prompts_by_id: dict, *, rows: int = 8,
         styles: list | None = None) -> int:
    """Rows of (A, B) images of the same prompt and seed: up to `rows` characters (largest
    moves first), then the style prompts (first seed each); returns how many rows it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    pairs = []
    for pid, char, delta in zip(order["id"], order["character_a"], order["delta"]):
        for seed in prompts_by_id.get(pid, []):
            ia, ib = image_path(a_gen, pid, seed), image_path(b_gen, pid, seed)
            if ia.is_file() and ib.is_file():
                pairs.append((f"{char} seed {seed} (B-A {delta:+.2f})", ia, ib))
                break
        if len(pairs) >= rows:
            break
    for style in styles or []:
        ia, ib = image_path(a_gen, style.id, style.seeds[0]), image_path(b_gen, style.id, style.seeds[0])
        if ia.is_file() and ib.is_file():
            pairs.append((f"{style.id} seed {style.seeds[0]}", ia, ib))
    if not pairs:
        return 0
    fig, axes = plt.subplots(len(pairs), 2, figsize=(6, 3 * len(pairs)), squeeze=False)
    for r, (label, ia, ib) in enumerate(pairs):
        for c, (img, side) in enumerate(((ia, "A"), (ib, "B"))):
            ax = axes[r][c]
            ax.imshow(Image.open(img).convert("RGB"))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{side}: {label}" if c == 0 else side, fontsize=8, loc="left" if c == 0 else "center")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return len(pairs)


def run_report(a_dir: Path, b_dir: Path, out_dir: Path, *, min_delta: float = 0.25, top: int = 20,
               grid_rows: int = 8, reps: int = 2000) -> dict:
    from .prompts import read_prompt_file

    report, order = compare_scores(a_dir, b_dir, min_delta=min_delta, top=top, reps=reps)
    if report["paired"]["characters"] == 0:
        raise EvalError(f"{a_dir} and {b_dir} share no scored character")
    out_dir = Path(out_dir)
    a_gen, b_gen = Path(report["a"]["generated"]), Path(report["b"]["generated"])
    header = json.loads((a_gen / "generate.json").read_text(encoding="utf-8"))
    items = read_prompt_file(Path(header["prompt_file"]))
    prompts = {p.id: p.seeds for p in items}
    report["grid_rows"] = grid(order, a_gen, b_gen, out_dir / GRID_PNG, prompts, rows=grid_rows,
                               styles=[p for p in items if p.kind == "style"])
    plot_scores(order, out_dir / PLOT_PNG)
    write_json(out_dir / REPORT_JSON, report)
    write_text(out_dir / REPORT_MD, format_markdown(report))
    return report
