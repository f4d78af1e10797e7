"""prepare(): read -> select -> filter -> quality -> captions -> buckets -> outputs -> report,
one small function per stage.

Same inputs + recipe + seed give byte-identical meta.json, buckets.json, selection.parquet,
rejects.csv and bucket histogram on any machine (manifest.json differs only in timings,
paths and versions). The old manifest.json is removed before anything is written and the
new one is written last, with the sha256 of every other output: a directory with a
manifest is complete and consistent; an interrupted run leaves none.

A run that would produce nothing is an error raised before anything is written (an earlier
output directory stays as it was): a source none of whose records is usable, or an empty
final dataset. The message gives the most common reject reasons with an example each.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kxl_common.errors import KxlError
from kxl_common.atomic import write_json
from kxl_prep import __version__
from kxl_prep import outputs as out
from kxl_prep.buckets import BucketAssigner, BucketGrid, histogram
from kxl_prep.captions import CaptionBuilder, TagSource, iter_captions
from kxl_prep.quality import compute_thresholds, load_thresholds, parse_thresholds, quality_levels
from kxl_prep.recipe import DataRecipe, load_recipe
from kxl_prep.reject_summary import check_sources, format_reasons, top_reasons
from kxl_prep.report import dataset_counts, write_report
from kxl_prep.schema import POSTS_COLUMNS, RATINGS
from kxl_prep.select import FilteredSelection, SelectContext, select_and_filter
from kxl_prep.tokens import (DEFAULT_WARN_SHARE, BudgetSpec, TokenCounter, TokenizerUnavailable, budget_warning,
                             check_max_token_length)


class PrepError(KxlError, ValueError):
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


def _warn_loudly(text: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: {text}\n{bar}\n", file=sys.stderr, flush=True)


def _empty_dataset_message(out_dir: Path, n_posts: int, sel, filter_counts: dict, rejects) -> str:
    selected = int(sum(g["selected"] for g in sel.groups))
    lines = [f"nothing written to {out_dir}: the dataset would be empty "
             f"({n_posts:,} posts read, {selected:,} selected, 0 kept after the filters)"]
    for g in sel.groups:
        lines.append(f"  {g.get('range')}: available {g.get('available', 0):,}, selected {g.get('selected', 0):,}")
    for name, f in filter_counts.items():
        if f.get("removed"):
            lines.append(f"  filter {name} removed {f['removed']:,}")
    reasons, more = top_reasons(rejects)
    if reasons:
        lines.append(f"{len(rejects):,} source records were rejected; most common reasons:")
        lines.append(format_reasons(reasons, more))
    return "\n".join(lines)


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


@dataclass
class _Read:
    """The read stage: the posts table (index 0..n-1) and what the sources said."""

    posts: pd.DataFrame | None
    rejects: pd.DataFrame | None
    source_stats: dict
    inputs: list
    warnings: list[str]


@dataclass
class _Kept:
    """The scalar columns of the posts kept by selection and filters, one entry per image;
    their tags stay in the posts table, read chunk by chunk for the captions."""

    positions: np.ndarray  # rows of the posts table
    ids: np.ndarray
    width: np.ndarray
    height: np.ndarray
    year: np.ndarray  # -1 where unknown
    values: np.ndarray  # the quality column
    rating: pa.Array
    rating_code: np.ndarray
    exts: pa.Array
    md5: pa.Array

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Quality:
    table: dict
    pinned_from: str | None
    levels: np.ndarray


@dataclass
class _Buckets:
    assigner: BucketAssigner
    width: np.ndarray
    height: np.ndarray
    histogram: list[dict]


def _apply_options(recipe: DataRecipe, seed: int | None, fill_after_filter: bool | None,
                   count_scale: float, reject_warn_share: float, max_token_length: int | None = None) -> DataRecipe:
    """The recipe with the command line's overrides; bad options raise before anything is read."""
    if max_token_length is not None:
        try:
            check_max_token_length(max_token_length, "--max-token-length")
        except ValueError as exc:
            raise PrepError(str(exc)) from None
        recipe = recipe.replace(captions=dataclasses.replace(recipe.captions, max_token_length=int(max_token_length)))
    if seed is not None:
        if seed < 0:
            raise PrepError(f"seed must be >= 0, got {seed}")
        recipe = recipe.replace(seed=int(seed))
    if fill_after_filter is not None:
        apply = "before-sampling" if fill_after_filter else "after-sampling"
        recipe = recipe.replace(filters=dataclasses.replace(recipe.filters, apply=apply))
    if not count_scale > 0:
        raise PrepError(f"count_scale must be > 0, got {count_scale}")
    if not 0 <= reject_warn_share <= 1:
        raise PrepError(f"reject_warn_share must be in [0, 1], got {reject_warn_share}")
    return recipe


def _read(sources: Any, out_dir: Path, reject_warn_share: float, progress: bool) -> _Read:
    """Read the sources; a source with no usable record stops the run, a high reject share warns."""
    posts, rejects, source_stats, inputs = _read_sources(sources, progress)
    errors, warnings = check_sources(source_stats, rejects, reject_warn_share)
    if errors:
        raise PrepError(f"nothing written to {out_dir}:\n" + "\n".join(errors))
    for text in warnings:
        _warn_loudly(text)
    _validate_posts(posts)
    return _Read(posts.reset_index(drop=True), rejects, source_stats, inputs, warnings)


def _kept_posts(posts: pd.DataFrame, chosen: FilteredSelection, recipe: DataRecipe) -> _Kept:
    """The kept posts' scalar columns, checked (every image needs a rating, a size, an extension)."""
    needed = ["id", "file_ext", "width", "height", "rating", "year", "fav_count", "md5"]
    needed += [recipe.quality.column] if recipe.quality.column not in needed else []
    sub = posts[needed].take(chosen.positions).reset_index(drop=True)
    rating = _strings(sub["rating"])
    rating_code = pc.fill_null(pc.index_in(rating, value_set=pa.array(RATINGS)), -1).to_numpy(zero_copy_only=False)
    rating_code = rating_code.astype(np.int64)
    exts = _strings(sub["file_ext"])
    _validate_kept(sub, rating, rating_code, exts)
    return _Kept(
        positions=chosen.positions,
        ids=sub["id"].to_numpy(dtype=np.int64),
        width=sub["width"].to_numpy(dtype=np.int64),
        height=sub["height"].to_numpy(dtype=np.int64),
        year=pd.to_numeric(sub["year"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64),
        values=pd.to_numeric(sub[recipe.quality.column]).to_numpy(dtype=np.float64),
        rating=rating, rating_code=rating_code, exts=exts, md5=_strings(sub["md5"]),
    )


def _quality(kept: _Kept, recipe: DataRecipe, thresholds: str | Path | dict | None) -> _Quality:
    """Per-rating percentile thresholds of the quality column (or pinned ones) -> a level per image."""
    pinned_from = None
    if thresholds is None:
        table = compute_thresholds(kept.values, kept.rating_code, recipe.quality)
    elif isinstance(thresholds, dict):
        table, pinned_from = parse_thresholds(thresholds, recipe.quality), "(given)"
    else:
        table, pinned_from = load_thresholds(thresholds, recipe.quality), str(thresholds)
    return _Quality(table, pinned_from, quality_levels(kept.values, kept.rating_code, table, recipe.quality))


def _captions(posts: pd.DataFrame, kept: _Kept, quality: _Quality, recipe: DataRecipe, progress: bool):
    """The caption builder and its chunks (lazy: built while the outputs are written)."""
    builder = CaptionBuilder(recipe.captions, recipe.quality.labels)
    chunks = iter_captions(TagSource(posts), kept.positions, quality.levels, kept.rating_code, kept.year,
                           builder, progress=progress)
    return builder, chunks


def _token_counter(n: int, recipe: DataRecipe, sample: int, warn_share: float) -> TokenCounter | str:
    """The counter of caption tokens against the budget, or why there is none (the CLIP vocabulary
    or the tokenizer library is missing: the dataset is still written, with a loud warning)."""
    spec = BudgetSpec(max_token_length=recipe.captions.max_token_length, sample=sample, seed=recipe.seed,
                      tag_dropout_rate=recipe.dataset.caption_tag_dropout_rate,
                      separator=recipe.captions.keep_tokens_separator, warn_share=warn_share)
    try:
        return TokenCounter(n, spec)
    except TokenizerUnavailable as exc:
        return str(exc)


def _counted(chunks, counter: TokenCounter | str):
    """The caption chunks, passed on after the counter has seen them."""
    for start, stop, captions in chunks:
        if not isinstance(counter, str):
            counter.add(start, captions)
        yield start, stop, captions


def _token_summary(counter: TokenCounter | str, recipe: DataRecipe, warnings: list[str]) -> dict:
    """manifest["tokens"]; the loud warning (stderr and manifest["warnings"]) when too many captions
    lose their suffix, or when nothing could be counted."""
    if isinstance(counter, str):
        summary = {"max_token_length": recipe.captions.max_token_length, "counted": 0, "skipped": counter}
        text = f"caption tokens not counted against max_token_length {recipe.captions.max_token_length}: {counter}"
    else:
        summary = counter.result()
        text = budget_warning(summary)
    if text:
        _warn_loudly(text)
        warnings.append(text)
    return summary


def _buckets(kept: _Kept, recipe: DataRecipe) -> _Buckets:
    assigner = BucketAssigner(BucketGrid.from_spec(recipe.buckets))
    bucket_w, bucket_h = assigner.assign(kept.width, kept.height)
    return _Buckets(assigner, bucket_w, bucket_h, histogram(bucket_w, bucket_h))


def _image_dir(out_dir: Path, image_dir: str | Path | None, recipe: DataRecipe) -> Path:
    if image_dir is None:
        image_dir = Path(recipe.dataset.image_dir)
        image_dir = image_dir if image_dir.is_absolute() else out_dir / image_dir
    return Path(image_dir).resolve()


def _write_outputs(out_dir: Path, kept: _Kept, buckets: _Buckets, chunks, rejects: pd.DataFrame | None,
                   recipe: DataRecipe, image_dir: Path) -> int:
    """meta.json, buckets.json, selection.parquet and train_records.arrow (captions streamed in), rejects.csv and
    dataset.toml; the old manifest is removed first. Returns the number of rejects written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / out.MANIFEST_JSON
    if manifest_path.exists():
        manifest_path.unlink()  # no manifest while the outputs are being replaced
    ids, exts = kept.ids, kept.exts
    with out.DatasetWriter(out_dir, len(kept), grid=buckets.assigner.grid) as writer:
        for start, stop, captions in chunks:
            writer.write(
                {
                    "id": ids[start:stop],
                    "image_key": _image_keys(ids[start:stop], exts[start:stop]),
                    "file_ext": exts[start:stop],
                    "width": kept.width[start:stop].astype(np.int32),
                    "height": kept.height[start:stop].astype(np.int32),
                    "bucket_w": buckets.width[start:stop],
                    "bucket_h": buckets.height[start:stop],
                    "md5": kept.md5[start:stop],
                    "rating": kept.rating[start:stop],
                    "caption": captions,
                }
            )
    n_rejects = out.write_rejects(out_dir / out.REJECTS_CSV, rejects)
    config = out.dataset_config(recipe, (out_dir / out.META_JSON).resolve(), image_dir)
    out.write_dataset_toml(out_dir / out.DATASET_TOML, config)
    return n_rejects


def _manifest(recipe: DataRecipe, read: _Read, counts: dict, chosen: FilteredSelection, quality: _Quality, caption_stats,
              buckets: _Buckets, *, count_scale: float, out_dir: Path, image_dir: Path) -> dict[str, Any]:
    return {
        "kind": "kxl-prep dataset",
        "created_by": f"kxl_prep {__version__}",
        "inputs": read.inputs,
        "recipe": {"name": recipe.name, "source": recipe.source, "sha256": recipe.digest(), "resolved": recipe.to_dict()},
        "seed": recipe.seed,
        "options": {
            "filters_apply": recipe.filters.apply,
            "count_scale": count_scale,
            "thresholds_pinned_from": quality.pinned_from,
        },
        "versions": _versions(),
        "source_stats": read.source_stats,
        "counts": counts,
        "selection_details": chosen.details,  # e.g. tag rules: overlaps, final per rule/rating/year
        "warnings": read.warnings,
        "quality": {
            "column": recipe.quality.column,
            "percentiles": list(recipe.quality.percentiles),
            "labels": list(recipe.quality.labels),
            "thresholds": quality.table,
            "pinned_from": quality.pinned_from,
        },
        "captions": caption_stats.to_dict(),
        "buckets": {
            "resolution": list(recipe.buckets.resolution),
            "min_reso": recipe.buckets.min_reso,
            "max_reso": recipe.buckets.max_reso,
            "step": recipe.buckets.step,
            "candidates": len(buckets.assigner.resos),
            "histogram": buckets.histogram,
        },
        "paths": {"out_dir": str(out_dir.resolve()), "image_dir": str(image_dir)},
    }


def _write_report(out_dir: Path, manifest: dict[str, Any], timings: dict, t_start: float) -> None:
    """report.md and the bucket plots, then manifest.json last, with every output's sha256."""
    with _timer(timings, "report"):
        report_files = write_report(out_dir, manifest)
    with _timer(timings, "checksums"):
        names = [out.META_JSON, out.BUCKETS_JSON, out.SELECTION_PARQUET, out.REJECTS_CSV, out.DATASET_TOML,
                 out.TRAIN_RECORDS]
        manifest["outputs"] = out.describe_outputs(out_dir, names + report_files)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    manifest["timings_s"] = timings
    write_json(out_dir / out.MANIFEST_JSON, manifest)


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
    reject_warn_share: float = 0.01,
    max_token_length: int | None = None,
    token_sample: int = 0,
    token_warn_share: float = DEFAULT_WARN_SHARE,
) -> dict[str, Any]:
    """Prepare one dataset directory and return its manifest.

    sources: file paths for kxl_prep.sources.read_posts, a ReadResult, or a posts DataFrame.
    recipe: a DataRecipe, a recipe file / shipped name, or None for epsilon-rev1.
    seed: overrides the recipe's seed. fill_after_filter: True fills the quotas from posts
    that pass the filters (recipe `filters.apply = "before-sampling"`). thresholds: pinned
    quality thresholds (file path or {rating: [...]}) instead of computing them.
    image_dir: where the images are/will be (dataset.toml); default <out>/<recipe image_dir>.
    count_scale: multiplies quota counts (to run a full-size recipe on a small sample).
    reject_warn_share: a source rejecting more than this share of its records gets a loud
    warning on stderr (and in manifest["warnings"]) with its most common reasons.
    max_token_length: overrides the recipe's captions.max_token_length, the token budget the
    captions are counted against (kxl_prep.tokens; it must equal the training recipe's).
    token_sample: count a seeded sample of this many captions (0: every caption).
    token_warn_share: warn loudly when more than this share of the captions lose (part of) their
    suffix at that budget.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    recipe = _apply_options(_resolve_recipe(recipe), seed, fill_after_filter, count_scale, reject_warn_share,
                            max_token_length)
    if token_sample < 0:
        raise PrepError(f"token_sample must be >= 0 (0: every caption), got {token_sample}")
    if not 0 <= token_warn_share <= 1:
        raise PrepError(f"token_warn_share must be in [0, 1], got {token_warn_share}")

    with _timer(timings, "read"):
        read = _read(sources, out_dir, reject_warn_share, progress)
    with _timer(timings, "select"):  # select + filter
        ctx = SelectContext(seed=recipe.seed, count_scale=count_scale, recipe_path=recipe.source, progress=progress)
        chosen = select_and_filter(read.posts, recipe.selection, recipe.filters, ctx)
        kept = _kept_posts(read.posts, chosen, recipe)
    if len(kept) == 0:
        raise PrepError(_empty_dataset_message(out_dir, len(read.posts), chosen.selection, chosen.filter_counts,
                                               read.rejects))
    with _timer(timings, "quality"):
        quality = _quality(kept, recipe, thresholds)
    builder, chunks = _captions(read.posts, kept, quality, recipe, progress)
    counter = _token_counter(len(kept), recipe, token_sample, token_warn_share)
    chunks = _counted(chunks, counter)
    with _timer(timings, "buckets"):
        buckets = _buckets(kept, recipe)
    image_dir = _image_dir(out_dir, image_dir, recipe)
    posts_read = len(read.posts)
    with _timer(timings, "captions_and_write"):
        n_rejects = _write_outputs(out_dir, kept, buckets, chunks, read.rejects, recipe, image_dir)
    read.posts = None  # the tags are written: free the table
    tokens = _token_summary(counter, recipe, read.warnings)
    timings["caption_tokens"] = tokens.get("seconds", 0.0)
    counts = dataset_counts(recipe, posts_read=posts_read, rejects=n_rejects, groups=chosen.selection.groups,
                            kept_group=chosen.group, filter_counts=chosen.filter_counts,
                            rating_code=kept.rating_code, levels=quality.levels, year=kept.year)
    manifest = _manifest(recipe, read, counts, chosen, quality, builder.stats, buckets,
                         count_scale=count_scale, out_dir=out_dir, image_dir=image_dir)
    manifest["tokens"] = tokens
    _write_report(out_dir, manifest, timings, t_start)
    return manifest
