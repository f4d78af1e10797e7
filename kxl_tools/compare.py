"""Module-by-module agreement of two weight deltas (LoKr files or checkpoints minus a base).

B is the reference (say, the released file): for deltas a and b of one module,
  rel_fro    = ||a - b||_F / ||b||_F
  cosine     = <a, b> / (||a||_F ||b||_F)
  norm_ratio = ||a||_F / ||b||_F
Block and overall totals use the same formulas on the concatenation of the block's modules;
a module present on one side only counts there with a zero delta on the other side. Sums
are reduced per chunk in float64 (see pair_sums); the difference
is taken element-wise, so identical inputs give exactly 0.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .keys import BLOCKS, block_of
from .sources import CheckpointDeltas, NetworkDeltas, OneTensorCache, SourceError, open_file

CHUNK = 1 << 20  # values per reduction chunk


@dataclass
class Thresholds:
    same_rel: float = 0.01  # SAME: overall rel. Frobenius at most this
    close_cosine: float = 0.90  # CLOSE: overall cosine at least this ...
    close_ratio: float = 1.25  # ... and norm ratio within [1/close_ratio, close_ratio]
    related_cosine: float = 0.50  # RELATED: overall cosine at least this


@dataclass
class Sums:
    a2: float = 0.0
    b2: float = 0.0
    ab: float = 0.0
    d2: float = 0.0
    numel: int = 0

    def add(self, other: "Sums") -> None:
        self.a2 += other.a2
        self.b2 += other.b2
        self.ab += other.ab
        self.d2 += other.d2
        self.numel += other.numel

    def metrics(self) -> dict:
        na, nb = math.sqrt(self.a2), math.sqrt(self.b2)
        if nb > 0:
            rel = math.sqrt(self.d2) / nb
        else:
            rel = 0.0 if self.d2 == 0 else math.inf
        cos = self.ab / (na * nb) if na > 0 and nb > 0 else None
        if cos is not None:
            cos = max(-1.0, min(1.0, cos))
        return {
            "rel_fro": rel,
            "cosine": cos,
            "norm_ratio": na / nb if nb > 0 else None,
            "norm_a": na,
            "norm_b": nb,
            "norm_diff": math.sqrt(self.d2),
        }


def pair_sums(a: torch.Tensor | None, b: torch.Tensor | None, a2: float | None = None, b2: float | None = None,
              cross: bool = True) -> Sums:
    """Sums of a^2, b^2, a*b, (a-b)^2 (a missing side is zero).

    Each chunk is widened to float64 before it is reduced: float32 dot products are off by
    about 1e-7 in a way that depends on the CPU's vector width, which is too coarse for a
    cosine of two parallel tensors to read as 1. The difference is taken
    element-wise (never as a2 + b2 - 2ab), so identical inputs give exactly 0.
    `a2` / `b2`: squared norms already known (a tensor compared several times), not recomputed;
    `cross=False` skips a*b (ab stays 0) when only the difference is wanted.
    """
    s = Sums()
    ref = a if a is not None else b
    fa = a.reshape(-1) if a is not None else None
    fb = b.reshape(-1) if b is not None else None
    n = ref.numel()
    s.numel = n
    for i in range(0, n, CHUNK):
        x = fa[i:i + CHUNK].to(torch.float64) if fa is not None else None
        y = fb[i:i + CHUNK].to(torch.float64) if fb is not None else None
        if x is not None and a2 is None:
            s.a2 += float(torch.dot(x, x))
        if y is not None and b2 is None:
            s.b2 += float(torch.dot(y, y))
        if x is not None and y is not None:
            if cross:
                s.ab += float(torch.dot(x, y))
            d = x - y
            s.d2 += float(torch.dot(d, d))
    if a2 is not None:
        s.a2 = a2 if a is not None else 0.0
    if b2 is not None:
        s.b2 = b2 if b is not None else 0.0
    if a is None:
        s.d2 = s.b2
    elif b is None:
        s.d2 = s.a2
    return s


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _order(names: set[str], sources) -> list[str]:
    """Checkpoint file order when a checkpoint is involved (sequential reads), else by block."""
    for src in sources:
        if isinstance(src, CheckpointDeltas):
            pos = {n: i for i, n in enumerate(src.index.parts)}
            return sorted(names, key=lambda n: (pos.get(n, math.inf), _natural(n)))
    return sorted(names, key=lambda n: (BLOCKS.index(block_of(n)), _natural(n)))


def verdict(total: dict, blocks: dict, counts: dict, th: Thresholds) -> dict:
    rel, cos, ratio = total["rel_fro"], total["cosine"], total["norm_ratio"]
    if counts["both"] == 0:
        level = "NO OVERLAP"
    elif rel <= th.same_rel:
        level = "SAME"
    elif cos is not None and cos >= th.close_cosine and ratio is not None and 1 / th.close_ratio <= ratio <= th.close_ratio:
        level = "CLOSE"
    elif cos is not None and cos >= th.related_cosine:
        level = "RELATED"
    else:
        level = "DIFFERENT"
    worst = [(b, m["cosine"]) for b, m in blocks.items() if m["cosine"] is not None]
    worst_txt = ""
    if worst:
        wb, wc = min(worst, key=lambda t: t[1])
        worst_txt = f"; lowest block cosine {wb} {wc:.4f}"

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    line = (
        f"verdict: {level}: overall rel. Frobenius {f(rel, '.4g')} (SAME if <= {th.same_rel:g}), "
        f"cosine {f(cos, '.4f')} and norm ratio {f(ratio, '.3f')} (CLOSE if cosine >= {th.close_cosine:g} "
        f"and ratio in [{1 / th.close_ratio:.2f}, {th.close_ratio:.2f}]; RELATED if cosine >= {th.related_cosine:g}); "
        f"{counts['both']} modules on both sides, {counts['only_a']} only in A, {counts['only_b']} only in B{worst_txt}"
    )
    return {"level": level, "line": line}


def compare_sources(src_a, src_b, thresholds: Thresholds | None = None, progress: bool = True) -> dict:
    th = thresholds or Thresholds()
    names_a, names_b = set(src_a.names()), set(src_b.names())
    names = _order(names_a | names_b, (src_a, src_b))
    modules = []
    block_sums: dict[str, Sums] = {}
    block_counts: dict[str, dict[str, int]] = {}
    total = Sums()
    counts = {"both": 0, "only_a": 0, "only_b": 0, "unchanged": 0, "mismatch": 0}
    only_a, only_b, mismatched = [], [], []
    for name in tqdm(names, desc="compare", unit="module", disable=not progress):
        da = src_a.delta(name) if name in names_a else None
        db = src_b.delta(name) if name in names_b else None
        if da is None and db is None:
            counts["unchanged"] += 1
            continue
        block = block_of(name)
        shape = list((da if da is not None else db).shape)
        if da is not None and db is not None and da.numel() != db.numel():
            counts["mismatch"] += 1
            mismatched.append({"name": name, "shape_a": list(da.shape), "shape_b": list(db.shape)})
            continue
        status = "both" if da is not None and db is not None else ("only_a" if da is not None else "only_b")
        s = pair_sums(da, db)
        del da, db
        counts[status] += 1
        (only_a if status == "only_a" else only_b if status == "only_b" else []).append(name)
        block_sums.setdefault(block, Sums()).add(s)
        bc = block_counts.setdefault(block, {"both": 0, "only_a": 0, "only_b": 0})
        bc[status] += 1
        total.add(s)
        modules.append({"name": name, "block": block, "shape": shape, "status": status, **s.metrics()})
    blocks = {
        b: {**block_counts[b], **block_sums[b].metrics()} for b in BLOCKS if b in block_sums
    }
    tot = total.metrics()
    report = {
        "a": _describe(src_a),
        "b": _describe(src_b),
        "reference": "b",
        "thresholds": asdict(th),
        "counts": counts,
        "total": tot,
        "blocks": blocks,
        "modules": modules,
        "only_a": only_a,
        "only_b": only_b,
        "mismatched": mismatched,
    }
    report["verdict"] = verdict(tot, blocks, counts, th)
    return report


def _describe(src) -> dict:
    d = {"path": src.label, "kind": src.kind}
    if isinstance(src, NetworkDeltas):
        d["lokr_modules"] = len(src.net.lokr_names())
        d["norm_modules"] = len(src.net.norm_names())
        d["unsupported_modules"] = src.unsupported
        if src.index is not None:
            d["not_in_checkpoint"] = [n for n in src.names() if n not in src.index]
    else:
        d["base"] = str(src.base.path) if src.base is not None else None
    return d


def open_sources(path_a, path_b, base=None):
    """Two delta sources; a checkpoint needs --base unless both sides are checkpoints."""
    kind_a, ra = open_file(path_a)
    kind_b, rb = open_file(path_b)
    base_reader = None
    if base is not None:
        kind_base, base_reader = open_file(base)
        if kind_base != "checkpoint":
            raise SourceError(f"--base {base}: must be an SDXL single-file checkpoint, got a {kind_base} file")
    elif "network" in (kind_a, kind_b) and "checkpoint" in (kind_a, kind_b):
        raise SourceError(
            "comparing a LoKr file with a full checkpoint needs --base BASE: the checkpoint becomes W - W_base"
        )
    from .keys import CheckpointIndex

    shapes_index = CheckpointIndex.from_reader(base_reader) if base_reader is not None else None
    shared = OneTensorCache(base_reader) if base_reader is not None else None

    def make(kind, reader):
        if kind == "checkpoint":
            return CheckpointDeltas(reader, base_reader, shared)
        idx = shapes_index
        if idx is None:
            for k, r in ((kind_a, ra), (kind_b, rb)):
                if k == "checkpoint":
                    idx = CheckpointIndex.from_reader(r)
        return NetworkDeltas(reader, idx)

    return make(kind_a, ra), make(kind_b, rb)


def format_table(report: dict, top: int = 20) -> str:
    """Per-block totals and the `top` modules with the largest rel. Frobenius difference."""

    def f(x, spec):
        width = int(re.match(r"\d*", spec).group() or 0)
        text = "n/a" if x is None else ("inf" if x == math.inf else format(x, spec))
        return text.rjust(width)

    lines = [f"A: {report['a']['path']} ({report['a']['kind']})", f"B: {report['b']['path']} ({report['b']['kind']}, reference)"]
    hdr = f"{'block':<12} {'both':>5} {'onlyA':>5} {'onlyB':>5} {'rel_fro':>10} {'cosine':>8} {'ratio':>7} {'|A|':>10} {'|B|':>10}"
    lines += ["", hdr, "-" * len(hdr)]
    rows = list(report["blocks"].items()) + [("TOTAL", {**report["total"], "both": report["counts"]["both"], "only_a": report["counts"]["only_a"], "only_b": report["counts"]["only_b"]})]
    for b, m in rows:
        lines.append(
            f"{b:<12} {m['both']:>5} {m['only_a']:>5} {m['only_b']:>5} {f(m['rel_fro'], '10.4g')} "
            f"{f(m['cosine'], '8.4f')} {f(m['norm_ratio'], '7.3f')} {f(m['norm_a'], '10.4g')} {f(m['norm_b'], '10.4g')}"
        )
    both = [m for m in report["modules"] if m["status"] == "both"]
    if both and top:
        worst = sorted(both, key=lambda m: -m["rel_fro"])[:top]
        lines += ["", f"{min(top, len(both))} of {len(both)} shared modules with the largest rel. Frobenius difference:"]
        for m in worst:
            lines.append(f"  {f(m['rel_fro'], '10.4g')} cos {f(m['cosine'], '8.4f')} ratio {f(m['norm_ratio'], '7.3f')}  {m['name']}")
    for side in ("only_a", "only_b"):
        names = report[side]
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            lines.append(f"only in {side[-1].upper()}: {shown}")
    if report["mismatched"]:
        lines.append(f"shape mismatch (not compared): {', '.join(m['name'] for m in report['mismatched'][:8])}")
    for side in ("a", "b"):
        uns = report[side].get("unsupported_modules")
        if uns:
            lines.append(f"{side.upper()}: {len(uns)} non-LoKr modules not compared (algorithms: {sorted(set(uns.values()))})")
        nic = report[side].get("not_in_checkpoint")
        if nic:
            lines.append(f"{side.upper()}: {len(nic)} LoKr modules name no tensor of the checkpoint (first: {nic[0]})")
    lines += ["", report["verdict"]["line"]]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Per-block agreement bars and per-module cosine / rel. Frobenius, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kxl_common.figures import save_figure

    th = report["thresholds"]
    blocks = report["blocks"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 11), constrained_layout=True)
    ax = axes[0]
    names = list(blocks)
    x = range(len(names))
    cos = [blocks[b]["cosine"] if blocks[b]["cosine"] is not None else 0 for b in names]
    rel = [min(blocks[b]["rel_fro"], 2.0) for b in names]
    w = 0.38
    ax.bar([i - w / 2 for i in x], cos, w, label="cosine")
    ax.bar([i + w / 2 for i in x], rel, w, label="rel. Frobenius (clipped at 2)")
    ax.axhline(th["close_cosine"], color="tab:blue", ls="--", lw=0.8, label=f"CLOSE cosine {th['close_cosine']:g}")
    ax.axhline(th["same_rel"], color="tab:orange", ls="--", lw=0.8, label=f"SAME rel. {th['same_rel']:g}")
    ax.set_xticks(list(x), names)
    ax.set_title(f"per-block agreement ({report['verdict']['level']})")
    ax.legend(fontsize=8)
    mods = [m for m in report["modules"] if m["status"] == "both"]
    colors = {b: plt.cm.tab10(i) for i, b in enumerate(BLOCKS)}
    for ax, key, label in ((axes[1], "cosine", "cosine"), (axes[2], "rel_fro", "rel. Frobenius")):
        for b in BLOCKS:
            pts = [(i, m[key]) for i, m in enumerate(mods) if m["block"] == b and m[key] is not None and math.isfinite(m[key])]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color=colors[b], label=b)
        ax.set_ylabel(label)
        ax.set_xlabel("module (checkpoint / block order)")
        if key == "rel_fro" and any(m[key] and m[key] > 0 for m in mods):
            ax.set_yscale("log")
        ax.legend(fontsize=7, markerscale=3, ncol=4)
    save_figure(fig, path, dpi=110)


def json_safe(obj):
    """Non-finite floats as strings ("inf"): strict JSON has no Infinity/NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def compare_files(path_a, path_b, base=None, thresholds: Thresholds | None = None, progress: bool = True) -> dict:
    a, b = open_sources(path_a, path_b, base)
    report = compare_sources(a, b, thresholds, progress)
    report["base"] = str(base) if base is not None else None
    return report
