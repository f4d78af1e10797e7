"""prepare(): posts -> selection -> filters -> quality -> captions -> buckets -> outputs.

Same inputs + recipe + seed give byte-identical meta.json, buckets.json, selection.parquet,
rejects.csv and bucket histogram on any machine (manifest.json differs only in timings,
paths and versions). The old manifest.json is removed before anything is written and the
new one is written last, with the sha256 of every other output: a directory with a
manifest is complete and consistent; an interrupted run leaves none.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kxl_common.atomic import write_json
from kxl_prep import __version__
from kxl_prep import outputs as out
from kxl_prep.buckets import BucketAssigner, BucketGrid, histogram
from kxl_prep.captions import CaptionBuilder, TagSource, iter_captions, year_labels
from kxl_prep.quality import compute_thresholds, load_thresholds, parse_thresholds, quality_levels
from kxl_prep.recipe import DataRecipe, load_recipe
from kxl_prep.report import write_report
from kxl_prep.schema import POSTS_COLUMNS, RATINGS
from kxl_prep.select import FILTER_COLUMNS, SelectContext, apply_filters, select, selector_columns


class PrepError(ValueError):
    """Bad input: the message names the record, the field and the reason."""


def _bad_rows(ids: np.ndarray, mask: np.ndarray, field: str, reason: str, values=None) -> None:
    bad = np.flatnonzero(mask)
    if len(bad) == 0:
        return
    shown = []
    for i in bad[:5]:
        shown.append(f"record {ids[i]}" + (f" ({field}={values[i]!r})" if values is not None else ""))
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise PrepError(f"{', '.join(shown)}{more}: field {field!r}: {reason}")


def _validate_posts(posts: pd.DataFrame) -> None:
    missing = [c for c in POSTS_COLUMNS if c not in posts.columns]
    if missing:
        raise PrepError(f"posts table lacks column(s) {missing} (see kxl_prep.schema.POSTS_SCHEMA)")
    ids = posts["id"]
    if ids.isna().any():
        raise PrepError(f"row {int(np.flatnonzero(ids.isna().to_numpy())[0])}: field 'id': missing")
    dup = ids.duplicated(keep=False).to_numpy()
    _bad_rows(ids.to_numpy(), dup, "id", "the same id appears in more than one row")


def _strings(column: pd.Series) -> pa.Array:
    """A text column as an Arrow array (no Python str per row)."""
    return pa.array(column, type=pa.string(), from_pandas=True)


def _validate_kept(sub: pd.DataFrame, rating: pa.Array, rating_code: np.ndarray, ext: pa.Array) -> None:
    """Fields every image in the dataset needs, checked on the kept rows only."""
    ids = sub["id"].to_numpy()
    bad = rating_code < 0
    _bad_rows(ids, bad, "rating", f"not one of {list(RATINGS)}", rating.to_pylist() if bad.any() else None)
    for field in ("width", "height"):
        col = pd.to_numeric(sub[field], errors="coerce")
        vals = col.to_numpy(dtype=float, na_value=np.nan)
        _bad_rows(ids, ~(vals > 0), field, "missing or not a positive number of pixels", vals)
    fav = pd.to_numeric(sub["fav_count"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    _bad_rows(ids, np.isnan(fav), "fav_count", "missing", fav)
    good = pc.fill_null(pc.match_substring_regex(ext, "^[a-z0-9]+$"), False).to_numpy(zero_copy_only=False)
    _bad_rows(ids, ~good, "file_ext", "expected a lower-case extension without a dot", ext.to_pylist() if not good.all() else None)


def _image_keys(ids: np.ndarray, exts: pa.Array) -> pa.Array:
    """`<id>.<ext>`, as the exported files are named."""
    return pc.binary_join_element_wise(pc.cast(pa.array(ids), pa.string()), exts, ".")


@contextmanager
def _timer(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def _read_sources(sources: Any, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame | None, dict, list]:
    """Accepts paths (read with kxl_prep.sources), a ReadResult-like object or a DataFrame."""
    if isinstance(sources, pd.DataFrame):
        return sources, None, {}, []
    if hasattr(sources, "posts"):
        return sources.posts, getattr(sources, "rejects", None), dict(getattr(sources, "stats", {}) or {}), []
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = [Path(p) for p in sources]
    from kxl_prep.sources import read_posts  # the readers are only needed for files

    result = read_posts(paths, progress=progress)
    inputs = []
    for p in paths:
        try:
            inputs.append({"path": str(p), "bytes": p.stat().st_size if p.is_file() else None})
        except OSError:
            inputs.append({"path": str(p), "bytes": None})
    return result.posts, result.rejects, dict(getattr(result, "stats", {}) or {}), inputs


def _resolve_recipe(recipe: DataRecipe | str | Path | None) -> DataRecipe:
    if isinstance(recipe, DataRecipe):
        return recipe
    return load_recipe(recipe)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    def ver(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "unknown"

    return {
        "kxl_prep": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "click": ver("click"),
    }


def prepare(
    sources: Any,
    out_dir: str | Path,
    *,
    recipe: DataRecipe | str | Path | None = None,
    seed: int | None = None,
    fill_after_filter: bool | None = None,
    thresholds: str | Path | dict | None = None,
    image_dir: str | Path | None = None,
    count_scale: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare one dataset directory and return its manifest.

    sources: file paths for kxl_prep.sources.read_posts, a ReadResult, or a posts DataFrame.
    recipe: a DataRecipe, a recipe file / shipped name, or None for epsilon-rev1.
    seed: overrides the recipe's seed. fill_after_filter: True fills the quotas from posts
    that pass the filters (recipe `filters.apply = "before-sampling"`). thresholds: pinned
    quality thresholds (file path or {rating: [...]}) instead of computing them.
    image_dir: where the images are/will be (dataset.toml); default <out>/<recipe image_dir>.
    count_scale: multiplies quota counts (to run a full-size recipe on a small sample).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    recipe = _resolve_recipe(recipe)
    if seed is not None:
        if seed < 0:
            raise PrepError(f"seed must be >= 0, got {seed}")
        recipe = recipe.replace(seed=int(seed))
    if fill_after_filter is not None:
        apply = "before-sampling" if fill_after_filter else "after-sampling"
        recipe = recipe.replace(filters=dataclasses.replace(recipe.filters, apply=apply))
    if not count_scale > 0:
        raise PrepError(f"count_scale must be > 0, got {count_scale}")

    with _timer(timings, "read"):
        posts, rejects, source_stats, inputs = _read_sources(sources, progress)
    _validate_posts(posts)
    posts = posts.reset_index(drop=True)
    n_posts = len(posts)

    # -- selection and filters ----------------------------------------------------------------
    ctx = SelectContext(seed=recipe.seed, count_scale=count_scale, recipe_path=recipe.source, progress=progress)
    with _timer(timings, "select"):
        if recipe.filters.apply == "after-sampling":
            sel = select(posts, recipe.selection, ctx)
            flags = posts[list(FILTER_COLUMNS)].take(sel.positions)  # not the tag columns
            keep, filter_counts = apply_filters(flags, recipe.filters)
            kept_pos, kept_group = sel.positions[keep], sel.group[keep]
        else:
            passing, filter_counts = apply_filters(posts[list(FILTER_COLUMNS)], recipe.filters)
            base = np.flatnonzero(passing)
            needed = selector_columns(recipe.selection)
            eligible = posts if needed is None else posts[list(needed)]
            sel = select(eligible.take(base).reset_index(drop=True), recipe.selection, ctx)
            kept_pos, kept_group = base[sel.positions], sel.group
        per_range = []
        kept_per_group = np.bincount(kept_group, minlength=len(sel.groups))
        for g, info in enumerate(sel.groups):
            per_range.append({**info, "kept": int(kept_per_group[g])})
        # Selector-specific report (e.g. tag rules: overlaps, final per rule/rating/year).
        after = recipe.filters.apply == "after-sampling"
        selection_details = sel.details(kept_pos if after else sel.positions) if sel.details else None
        # the scalar columns of the kept posts; tags stay in `posts`, read chunk by chunk
        needed = ["id", "file_ext", "width", "height", "rating", "year", "fav_count", "md5"]
        needed += [recipe.quality.column] if recipe.quality.column not in needed else []
        sub = posts[needed].take(kept_pos).reset_index(drop=True)
    rating = _strings(sub["rating"])
    rating_code = pc.fill_null(pc.index_in(rating, value_set=pa.array(RATINGS)), -1).to_numpy(zero_copy_only=False)
    rating_code = rating_code.astype(np.int64)
    exts = _strings(sub["file_ext"])
    _validate_kept(sub, rating, rating_code, exts)
    n = len(sub)

    ids = sub["id"].to_numpy(dtype=np.int64)
    width = sub["width"].to_numpy(dtype=np.int64)
    height = sub["height"].to_numpy(dtype=np.int64)
    year = pd.to_numeric(sub["year"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
    values = pd.to_numeric(sub[recipe.quality.column]).to_numpy(dtype=np.float64)

    # -- quality --------------------------------------------------------------------------------
    with _timer(timings, "quality"):
        pinned_from = None
        if thresholds is None:
            table = compute_thresholds(values, rating_code, recipe.quality)
        elif isinstance(thresholds, dict):
            table, pinned_from = parse_thresholds(thresholds, recipe.quality), "(given)"
        else:
            table, pinned_from = load_thresholds(thresholds, recipe.quality), str(thresholds)
        levels = quality_levels(values, rating_code, table, recipe.quality)

    with _timer(timings, "buckets"):
        assigner = BucketAssigner(BucketGrid.from_spec(recipe.buckets))
        bucket_w, bucket_h = assigner.assign(width, height)
        hist = histogram(bucket_w, bucket_h)

    # -- captions, streamed into the outputs ----------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / out.MANIFEST_JSON
    if manifest_path.exists():
        manifest_path.unlink()  # no manifest while the outputs are being replaced
    if image_dir is None:
        image_dir = Path(recipe.dataset.image_dir)
        image_dir = image_dir if image_dir.is_absolute() else out_dir / image_dir
    image_dir = Path(image_dir).resolve()
    with _timer(timings, "captions_and_write"):
        md5 = _strings(sub["md5"])
        builder = CaptionBuilder(recipe.captions, recipe.quality.labels)
        chunks = iter_captions(
            TagSource(posts), kept_pos, levels, rating_code, year, builder, progress=progress
        )
        with out.DatasetWriter(out_dir, n, grid=assigner.grid) as writer:
            for start, stop, captions in chunks:
                writer.write(
                    {
                        "id": ids[start:stop],
                        "image_key": _image_keys(ids[start:stop], exts[start:stop]),
                        "file_ext": exts[start:stop],
                        "width": width[start:stop].astype(np.int32),
                        "height": height[start:stop].astype(np.int32),
                        "bucket_w": bucket_w[start:stop],
                        "bucket_h": bucket_h[start:stop],
                        "md5": md5[start:stop],
                        "rating": rating[start:stop],
                        "caption": captions,
                    }
                )
        caption_stats = builder.stats
        del posts
        n_rejects = out.write_rejects(out_dir / out.REJECTS_CSV, rejects)
        config = out.dataset_config(recipe, (out_dir / out.META_JSON).resolve(), image_dir)
        out.write_dataset_toml(out_dir / out.DATASET_TOML, config)

    labels = list(recipe.quality.labels)
    quality_counts = {labels[i]: int(c) for i, c in enumerate(np.bincount(levels, minlength=len(labels)))}
    quality_by_rating = {}
    for code, r in enumerate(RATINGS):
        lv = levels[rating_code == code]
        quality_by_rating[r] = {labels[i]: int(c) for i, c in enumerate(np.bincount(lv, minlength=len(labels)))}
    year_names = list(recipe.captions.year.labels)
    has_year = year >= 0

    year_counts = {
        year_names[i]: int(c)
        for i, c in enumerate(np.bincount(year_labels(year[has_year], recipe.captions), minlength=len(year_names)))
    }
    if (~has_year).any():
        year_counts["(no year)"] = int((~has_year).sum())

    manifest: dict[str, Any] = {
        "kind": "kxl-prep dataset",
        "created_by": f"kxl_prep {__version__}",
        "inputs": inputs,
        "recipe": {"name": recipe.name, "source": recipe.source, "sha256": recipe.digest(), "resolved": recipe.to_dict()},
        "seed": recipe.seed,
        "options": {
            "filters_apply": recipe.filters.apply,
            "count_scale": count_scale,
            "thresholds_pinned_from": pinned_from,
        },
        "versions": _versions(),
        "source_stats": source_stats,
        "counts": {
            "posts_read": n_posts,
            "rejects": n_rejects,
            "selected": int(sum(g["selected"] for g in sel.groups)),
            "images": n,
            "per_range": per_range,
            "filters": filter_counts,
            "rating": {r: int(c) for r, c in zip(RATINGS, np.bincount(rating_code, minlength=len(RATINGS)))},
            "quality": quality_counts,
            "quality_by_rating": quality_by_rating,
            "year": year_counts,
        },
        "selection_details": selection_details,
        "quality": {
            "column": recipe.quality.column,
            "percentiles": list(recipe.quality.percentiles),
            "labels": labels,
            "thresholds": table,
            "pinned_from": pinned_from,
        },
        "captions": caption_stats.to_dict(),
        "buckets": {
            "resolution": list(recipe.buckets.resolution),
            "min_reso": recipe.buckets.min_reso,
            "max_reso": recipe.buckets.max_reso,
            "step": recipe.buckets.step,
            "candidates": len(assigner.resos),
            "histogram": hist,
        },
        "paths": {"out_dir": str(out_dir.resolve()), "image_dir": str(image_dir)},
    }
    with _timer(timings, "report"):
        report_files = write_report(out_dir, manifest)
    with _timer(timings, "checksums"):
        names = [out.META_JSON, out.BUCKETS_JSON, out.SELECTION_PARQUET, out.REJECTS_CSV, out.DATASET_TOML,
                 out.TRAIN_RECORDS]
        manifest["outputs"] = out.describe_outputs(out_dir, names + report_files)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    manifest["timings_s"] = timings
    write_json(manifest_path, manifest)
    return manifest
