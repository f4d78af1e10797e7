"""Quality tags: fav_count percentiles computed within each rating.

thresholds[rating] = numpy.percentile(fav_count of that rating's posts, percentiles) (numpy's
default linear method), over the posts that end up in the dataset (selected and filtered). A
post gets labels[i] for the first i with fav_count > thresholds[i] (strictly greater), else
the last label. Thresholds can be pinned from a file: a previous manifest.json, or a JSON /
TOML table {rating: [t90, t75, ...]} or {rating: {"90": t90, ...}} (HakuBooru's layout).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kxl_prep.recipe import QualitySpec, RecipeError
from kxl_prep.schema import RATINGS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Thresholds = dict[str, "list[float] | None"]


def compute_thresholds(values: np.ndarray, rating_codes: np.ndarray, spec: QualitySpec) -> Thresholds:
    """Per rating (codes index RATINGS), the percentile thresholds; None for a rating with no post."""
    out: Thresholds = {}
    for code, rating in enumerate(RATINGS):
        vals = values[rating_codes == code]
        if len(vals) == 0:
            out[rating] = None
        else:
            out[rating] = [float(t) for t in np.percentile(vals, list(spec.percentiles))]
    return out


def quality_levels(
    values: np.ndarray, rating_codes: np.ndarray, thresholds: Thresholds, spec: QualitySpec
) -> np.ndarray:
    """Index into spec.labels for every post (int8)."""
    levels = np.full(len(values), len(spec.labels) - 1, dtype=np.int8)
    for code, rating in enumerate(RATINGS):
        rows = np.flatnonzero(rating_codes == code)
        if len(rows) == 0:
            continue
        table = thresholds.get(rating)
        if table is None:
            raise RecipeError(f"quality thresholds: none for rating {rating!r}, which has {len(rows)} posts")
        vals = values[rows]
        conditions = [vals > t for t in table]
        levels[rows] = np.select(conditions, np.arange(len(table), dtype=np.int8), default=len(table))
    return levels


def load_thresholds(path: str | Path, spec: QualitySpec) -> Thresholds:
    """Pinned thresholds from a manifest.json, a JSON file or a TOML file (see module doc)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path}: cannot read thresholds: {exc}") from exc
    if isinstance(data, dict) and "quality" in data and isinstance(data["quality"], dict):
        quality = data["quality"]  # a manifest.json of an earlier run
        if quality.get("percentiles") is not None and [float(p) for p in quality["percentiles"]] != [
            float(p) for p in spec.percentiles
        ]:
            raise RecipeError(
                f"{path}: thresholds were computed at percentiles {quality['percentiles']}, "
                f"the recipe uses {list(spec.percentiles)}"
            )
        data = quality.get("thresholds")
    return parse_thresholds(data, spec, where=str(path))


def parse_thresholds(data: Any, spec: QualitySpec, where: str = "thresholds") -> Thresholds:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a table {{rating: thresholds}}")
    unknown = sorted(set(data) - set(RATINGS))
    if unknown:
        raise RecipeError(f"{where}: unknown rating(s) {unknown}; ratings are {list(RATINGS)}")
    out: Thresholds = {}
    for rating in RATINGS:
        table = data.get(rating)
        if table is None:
            out[rating] = None
            continue
        if isinstance(table, dict):  # {"90": 27, "75": 16, ...}
            by_pct = {float(k): v for k, v in table.items()}
            missing = [p for p in spec.percentiles if float(p) not in by_pct]
            if missing:
                raise RecipeError(f"{where}.{rating}: no threshold for percentile(s) {missing}")
            table = [by_pct[float(p)] for p in spec.percentiles]
        if not isinstance(table, list) or len(table) != len(spec.percentiles):
            raise RecipeError(
                f"{where}.{rating}: expected {len(spec.percentiles)} thresholds "
                f"(percentiles {list(spec.percentiles)}), got {table!r}"
            )
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in table):
            raise RecipeError(f"{where}.{rating}: thresholds must be numbers, got {table!r}")
        out[rating] = [float(t) for t in table]
    return out
