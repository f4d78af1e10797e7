"""What a tag selection did: counts per rule, overlaps, final counts per rule/rating/year, plot.

`build_tag_report` returns a JSON-ready dict (recorded in the manifest); `format_tag_report`
renders it as text for `--dry-run`; `plot_tag_report` draws it to a PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kxl_common.figures import save_figure
from kxl_prep.schema import RATINGS
from kxl_prep.tags.select import TagSelectionResult

TAG_SELECTION_PNG = "tag_selection.png"


def _factor(values: np.ndarray, first: list[str]) -> tuple[np.ndarray, list[str]]:
    """Codes into a label list that starts with `first` (other values sorted after it)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    names = ["(none)" if (u is None or u != u) else str(u) for u in uniques]
    labels = list(first) + sorted(set(names) - set(first))
    remap = np.array([labels.index(n) for n in names], dtype=np.int64)
    return (remap[codes] if len(codes) else codes.astype(np.int64)), labels


def _counts(codes: np.ndarray, labels: list[str]) -> dict[str, int]:
    return dict(zip(labels, (int(c) for c in np.bincount(codes, minlength=len(labels)))))


def _overlap(masks: list[np.ndarray]) -> list[list[int]]:
    """|A and B| for every pair of rule masks (diagonal: |A|)."""
    if not masks:
        return []
    m = np.stack(masks, axis=1)
    hit = np.flatnonzero(m.any(axis=1))
    sub = m[hit].astype(np.int64)
    return (sub.T @ sub).tolist()


def build_tag_report(
    posts: pd.DataFrame, result: TagSelectionResult, kept_rows: np.ndarray | None = None
) -> dict[str, Any]:
    """`kept_rows`: the selected rows that survive the filters run after the selection
    (deleted, banned, restricted, not a still image); None = all of them."""
    rows = result.rows
    final_mask = np.zeros(result.n_posts, dtype=bool)
    if kept_rows is None:
        final_mask[rows] = True
    else:
        kept_rows = np.asarray(kept_rows, dtype=np.int64)
        selected = np.zeros(result.n_posts, dtype=bool)
        selected[rows] = True
        outside = int((~selected[kept_rows]).sum())
        if outside:
            raise ValueError(f"kept_rows holds {outside} row(s) that the tag selection did not select")
        final_mask[kept_rows] = True
    final_rows = np.flatnonzero(final_mask)
    # Rating and year codes of the final posts only (a 10^6-row subset, not the source).
    rating_codes, rating_labels = _factor(posts["rating"].take(final_rows).astype(object).to_numpy(), list(RATINGS))
    years = pd.to_numeric(posts["year"].take(final_rows)).fillna(-1).to_numpy(dtype=np.int64)
    year_values = np.unique(years)
    year_codes = np.searchsorted(year_values, years)
    year_labels = ["(no year)" if y < 0 else str(int(y)) for y in year_values]
    rating_of = np.full(result.n_posts, -1, dtype=np.int64)
    year_of = np.full(result.n_posts, -1, dtype=np.int64)
    rating_of[final_rows] = rating_codes
    year_of[final_rows] = year_codes

    names = [o.name for o in result.rules]
    selected_by = np.zeros(result.n_posts, dtype=np.int32)
    for o in result.rules:
        selected_by += o.sampled
    rules = []
    for rule, o in zip(result.spec.rules, result.rules):
        final = o.sampled & final_mask
        fr = np.flatnonzero(final)
        rules.append(
            {
                "name": o.name,
                "kind": rule.kind(),
                "cap": rule.cap,
                "matched": int(o.matched.sum()),
                "excluded": int((o.matched & result.excluded).sum()),
                "eligible": int(o.eligible.sum()),
                "sampled": int(o.sampled.sum()),
                "final": int(len(fr)),
                "final_only_this_rule": int((selected_by[fr] == 1).sum()),
                "final_by_rating": _counts(rating_of[fr], rating_labels),
                "final_by_year": _counts(year_of[fr], year_labels),
            }
        )
    by_rating_year = np.bincount(
        rating_codes * len(year_labels) + year_codes, minlength=len(rating_labels) * len(year_labels)
    ).reshape(len(rating_labels), len(year_labels))
    return {
        "method": "tags",
        "spec": result.spec.to_manifest(),
        "source_posts": int(result.n_posts),
        "excluded_posts": int(result.excluded.sum()),
        "rules": rules,
        "overlap": {
            "rules": names,
            "matched": _overlap([o.matched for o in result.rules]),
            "sampled": _overlap([o.sampled for o in result.rules]),
        },
        "selected": int(len(rows)),  # the union, before the filters
        "final": int(len(final_rows)),
        "removed_by_filters": int(len(rows) - len(final_rows)),
        "final_by_rating": _counts(rating_codes, rating_labels),
        "final_by_year": _counts(year_codes, year_labels),
        "final_by_rating_year": {
            r: dict(zip(year_labels, (int(c) for c in by_rating_year[i]))) for i, r in enumerate(rating_labels)
        },
    }


def format_tag_report(report: dict[str, Any]) -> str:
    lines = [
        f"tag selection over {report['source_posts']:,} posts (seed {report['spec']['seed']}); "
        f"{report['excluded_posts']:,} hit by the exclusions",
        "",
        f"{'rule':<24}{'kind':<22}{'cap':>10}{'matched':>12}{'excluded':>10}{'eligible':>12}"
        f"{'sampled':>12}{'final':>12}{'only':>10}",
    ]
    for r in report["rules"]:
        cap = "-" if r["cap"] is None else f"{r['cap']:,}"
        lines.append(
            f"{r['name'][:23]:<24}{r['kind'][:21]:<22}{cap:>10}{r['matched']:>12,}{r['excluded']:>10,}"
            f"{r['eligible']:>12,}{r['sampled']:>12,}{r['final']:>12,}{r['final_only_this_rule']:>10,}"
        )
    names = report["overlap"]["rules"]
    if len(names) > 1:
        lines += ["", "overlap between rules (posts matched by both):"]
        width = max(12, *(len(n) + 2 for n in names))
        lines.append(" " * width + "".join(f"{n[:width - 1]:>{width}}" for n in names))
        for name, row in zip(names, report["overlap"]["matched"]):
            lines.append(f"{name[:width - 1]:<{width}}" + "".join(f"{v:>{width},}" for v in row))
    lines += [
        "",
        f"selected (union, no duplicates): {report['selected']:,}; removed by the filters: "
        f"{report['removed_by_filters']:,}; final: {report['final']:,}",
        "final per rating: " + ", ".join(f"{k} {v:,}" for k, v in report["final_by_rating"].items()),
        "final per year:   " + ", ".join(f"{k} {v:,}" for k, v in report["final_by_year"].items()),
    ]
    return "\n".join(lines)


def plot_tag_report(report: dict[str, Any], path: str | Path) -> None:
    """Four panels: counts per rule, overlap matrix, final per year by rating, final per
    rule by rating. Written atomically as PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    rules = report["rules"]
    names = [r["name"] for r in rules]
    fig = Figure(figsize=(14, 10), constrained_layout=True)
    (ax_rules, ax_overlap), (ax_year, ax_rating) = fig.subplots(2, 2)

    x = np.arange(len(rules))
    stages = ("matched", "eligible", "sampled", "final")
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        ax_rules.bar(x + (i - 1.5) * width, [r[stage] for r in rules], width, label=stage)
    ax_rules.set_xticks(x, names, rotation=20, ha="right")
    positive = [r[s] for r in rules for s in stages if r[s] > 0]
    if positive and max(positive) > 50 * min(positive):  # 10^6-post rules beside 10^4-post ones
        ax_rules.set_yscale("log")
    ax_rules.set_ylabel("posts")
    ax_rules.set_title("posts per rule")
    ax_rules.legend()

    matrix = np.array(report["overlap"]["matched"], dtype=float) if rules else np.zeros((0, 0))
    ax_overlap.imshow(matrix if matrix.size else np.zeros((1, 1)), cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        dark = v > 0.6 * matrix.max()
        ax_overlap.text(j, i, f"{int(v):,}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax_overlap.set_xticks(x, names, rotation=20, ha="right")
    ax_overlap.set_yticks(x, names)
    ax_overlap.set_title("overlap between rules (posts matched by both)")

    years = list(report["final_by_year"])
    bottom = np.zeros(len(years))
    year_by_rating = report["final_by_rating_year"]
    for rating in RATINGS:
        counts = np.array([year_by_rating.get(rating, {}).get(y, 0) for y in years], dtype=float)
        ax_year.bar(years, counts, bottom=bottom, label=rating)
        bottom += counts
    ax_year.set_title(f"final selection per year ({report['final']:,} posts)")
    ax_year.tick_params(axis="x", rotation=45)
    ax_year.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)

    bottom = np.zeros(len(rules))
    for rating in RATINGS:
        counts = np.array([r["final_by_rating"].get(rating, 0) for r in rules], dtype=float)
        ax_rating.bar(x, counts, bottom=bottom, label=rating)
        bottom += counts
    ax_rating.set_xticks(x, names, rotation=20, ha="right")
    ax_rating.set_title("final posts per rule, by rating (a post may count for several rules)")
    ax_rating.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)

    save_figure(fig, path, dpi=100)
