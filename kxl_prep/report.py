"""What a prepared dataset holds: the manifest's counts, and the human-readable report
(bucket histogram CSV + PNG, report.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kxl_common.figures import save_figure
from kxl_common.atomic import write_text
from kxl_prep.captions import year_labels
from kxl_prep.recipe import DataRecipe
from kxl_prep.schema import RATINGS

BUCKETS_CSV = "bucket_histogram.csv"
BUCKETS_PNG = "bucket_histogram.png"
REPORT_MD = "report.md"
TOKENS_PNG = "caption_tokens.png"


def _label_counts(codes: np.ndarray, labels: list[str]) -> dict[str, int]:
    return {labels[i]: int(c) for i, c in enumerate(np.bincount(codes, minlength=len(labels)))}


def dataset_counts(recipe: DataRecipe, *, posts_read: int, rejects: int, groups: list[dict],
                   kept_group: np.ndarray, filter_counts: dict, rating_code: np.ndarray,
                   levels: np.ndarray, year: np.ndarray) -> dict[str, Any]:
    """The manifest's `counts`: posts read, rejects, selected and kept per id range, what each
    filter removed, and the images per rating, quality level (overall and per rating) and
    year tag. groups: the selector's per-range info; kept_group, rating_code, levels, year:
    one entry per image (year -1 where unknown)."""
    kept_per_group = np.bincount(kept_group, minlength=len(groups))
    labels = list(recipe.quality.labels)
    year_names = list(recipe.captions.year.labels)
    has_year = year >= 0
    year_counts = _label_counts(year_labels(year[has_year], recipe.captions), year_names)
    if (~has_year).any():
        year_counts["(no year)"] = int((~has_year).sum())
    return {
        "posts_read": posts_read,
        "rejects": rejects,
        "selected": int(sum(g["selected"] for g in groups)),
        "images": len(rating_code),
        "per_range": [{**info, "kept": int(kept_per_group[g])} for g, info in enumerate(groups)],
        "filters": filter_counts,
        "rating": _label_counts(rating_code, list(RATINGS)),
        "quality": _label_counts(levels, labels),
        "quality_by_rating": {r: _label_counts(levels[rating_code == code], labels) for code, r in enumerate(RATINGS)},
        "year": year_counts,
    }


def write_bucket_csv(path: Path, hist: list[dict]) -> None:
    lines = ["bucket_w,bucket_h,aspect,images,share"]
    lines += [f"{r['w']},{r['h']},{r['aspect']:.4f},{r['count']},{r['share']:.6f}" for r in hist]
    write_text(path, "\n".join(lines) + "\n")


def write_bucket_png(path: Path, hist: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(hist, key=lambda r: r["w"] / r["h"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5), dpi=100)
    ax.bar(range(len(rows)), [r["count"] for r in rows], color="#4a7fb5")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['w']}x{r['h']}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("images")
    ax.set_xlabel("bucket (w x h), by aspect ratio")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def write_token_png(path: Path, tokens: dict, title: str) -> None:
    """Captions per token length (content tokens as sd-scripts' CLIP tokenizer counts them), with
    sd-scripts' three budgets marked and the counted one in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = tokens["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(8.0, 4.5), dpi=100)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7fb5")
    budget = tokens["max_token_length"]
    for limit in (75, 150, 225):
        chosen = limit == budget
        ax.axvline(limit + 1, color="#c0392b" if chosen else "#888888", linestyle="-" if chosen else "--",
                   linewidth=1.5 if chosen else 1.0,
                   label=f"max_token_length {limit}" + (" (this dataset)" if chosen else ""))
    ax.set_xlabel("content tokens per caption (CLIP BPE, no tag dropped)")
    ax.set_ylabel("sampled captions" if tokens["sampled"] else "captions")
    cut = tokens["suffix_cut"]
    ax.set_title(f"{title}\n{100 * cut['share']:.2f}% over {budget} tokens: suffix cut")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def _percent(share: dict, sampled: bool) -> str:
    text = f"{share['count']:,} ({100 * share['share']:.2f}%)"
    if sampled:
        lo, hi = share["ci95"]
        text += f", 95% interval {100 * lo:.2f}%..{100 * hi:.2f}%"
    return text


def _token_section(tokens: dict | None) -> list[str]:
    if not tokens:
        return []
    head = ["## Caption tokens", ""]
    if not tokens.get("counted"):
        return head + [f"Not counted against max_token_length {tokens['max_token_length']}: {tokens.get('skipped')}", ""]
    budget, sampled = tokens["max_token_length"], tokens["sampled"]
    what = (f"a seeded sample of {tokens['counted']:,} of {tokens['captions']:,} captions (seed {tokens['sample_seed']})"
            if sampled else f"all {tokens['counted']:,} captions")
    length = tokens["length"]
    return head + [
        f"Counted: {what}, with the CLIP tokenizer sd-scripts uses, on the text its process_caption builds "
        f"(tags joined by ', ', no tag dropped: the worst case; shuffling changes no count). sd-scripts keeps "
        f"the first max_token_length = **{budget}** content tokens and drops the rest; the suffix (quality, "
        f"year, meta, rating) comes last.",
        "",
        _table(["captions", "count"], [
            [f"over {budget} tokens: end of the suffix cut", _percent(tokens["suffix_cut"], sampled)],
            ["whole suffix past the budget", _percent(tokens["suffix_wholly_lost"], sampled)],
            [f"over {budget} after one draw of {tokens['with_dropout']['tag_dropout_rate']:g} tag dropout",
             _percent(tokens["with_dropout"], sampled)],
        ]),
        "",
        _table(["tokens", "mean", *length["percentiles"], "max"],
               [["per caption", f"{length['mean']:.1f}", *(f"{v:g}" for v in length["percentiles"].values()),
                 length["max"]]]),
        "",
        _table(["max_token_length", "captions over it"], [[k, f"{v:,}"] for k, v in length["over"].items()]),
        "",
        f"Plot: {TOKENS_PNG}.",
        "",
    ]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _thresholds(values) -> str:
    return "(no posts)" if values is None else ", ".join(f"{v:.4g}" for v in values)


def render_report(manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    parts = [
        f"# Data prep report: {manifest['recipe']['name']}",
        "",
        f"seed {manifest['seed']}, filters applied {manifest['options']['filters_apply']}, "
        f"{counts['posts_read']:,} posts read, {counts['rejects']:,} rejects, "
        f"{counts['selected']:,} selected, **{counts['images']:,} images**"
        + (f" after `kxl-prep export` ({counts['images_prepared']:,} prepared, "
           f"{counts['images_prepared'] - counts['images']:,} not exported: export_rejects.parquet)"
           if "images_prepared" in counts else "") + ".",
        "",
        "## Per id range",
        _table(
            ["range", "available", "requested", "selected", "kept"],
            [[g["range"], g["available"], g["requested"] if g["requested"] is not None else "all",
              g["selected"], g.get("kept", "")] for g in counts["per_range"]],
        ),
        "",
        "## Filters",
        _table(
            ["filter", "matched", "removed"],
            [[k, v["matched"], v["removed"]] for k, v in counts["filters"].items()],
        ),
        "",
        "## Ratings and quality",
        _table(
            ["rating", "images", "thresholds (" + ", ".join(f"p{p:g}" for p in manifest["quality"]["percentiles"]) + ")"],
            [[r, counts["rating"].get(r, 0), _thresholds(manifest["quality"]["thresholds"].get(r))]
             for r in counts["rating"]],
        ),
        "",
        _table(["quality", "images"], [[k, v] for k, v in counts["quality"].items()]),
        "",
        "## Captions",
        f"posts with an empty prefix: {manifest['captions']['empty_prefix']:,}; with no general tag: "
        f"{manifest['captions']['empty_middle']:,}",
        "",
        _table(["tags dropped because", "count"], [[k, v] for k, v in manifest["captions"]["dropped_tags"].items()]),
        "",
        "## Years",
        _table(["year tag", "images"], [[k, v] for k, v in counts["year"].items()]),
        "",
        *_token_section(manifest.get("tokens")),
        "## Buckets",
        f"{len(manifest['buckets']['histogram'])} buckets in use; see {BUCKETS_CSV} and {BUCKETS_PNG}.",
        "",
        _table(
            ["bucket", "aspect", "images", "share"],
            [[f"{r['w']}x{r['h']}", f"{r['aspect']:.4f}", r["count"], f"{100 * r['share']:.2f}%"]
             for r in manifest["buckets"]["histogram"]],
        ),
        "",
    ]
    return "\n".join(parts)


def write_report(out_dir: Path, manifest: dict[str, Any]) -> list[str]:
    hist = manifest["buckets"]["histogram"]
    write_bucket_csv(out_dir / BUCKETS_CSV, hist)
    write_bucket_png(out_dir / BUCKETS_PNG, hist, f"{manifest['recipe']['name']}: images per bucket")
    files = [BUCKETS_CSV, BUCKETS_PNG, REPORT_MD]
    if manifest.get("tokens", {}).get("counted"):
        write_token_png(out_dir / TOKENS_PNG, manifest["tokens"], f"{manifest['recipe']['name']}: caption tokens")
        files.append(TOKENS_PNG)
    text = render_report(manifest)
    details = manifest.get("selection_details")
    if details and details.get("method") == "tags":
        from kxl_prep.tags.report import TAG_SELECTION_PNG, format_tag_report, plot_tag_report

        plot_tag_report(details, out_dir / TAG_SELECTION_PNG)
        text += f"\n## Tag selection\n\n```\n{format_tag_report(details)}\n```\n\nPlot: {TAG_SELECTION_PNG}\n"
        files.append(TAG_SELECTION_PNG)
    write_text(out_dir / REPORT_MD, text)
    return files
