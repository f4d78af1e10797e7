"""Which posts go in: pluggable selectors and the post filters.

A selector is a function `(posts, params, ctx) -> Selection` (kxl_prep.selector_base)
registered under a name; the data recipe's `[selection] method = "<name>"` picks it and the
other keys of that table are its params. Shipped, all registered at the end of this module:
"quota" (seeded quotas per id range, the Epsilon rev1 rule), "all" and "tags" (the rev2 tag
rules, kxl_prep.tags). Others can be added with `register_selector`.

Determinism: "quota" draws each id range with kxl_prep.selector_base.sample_positions (raw
PCG64 words from SeedSequence([seed, range index])): the k-th smallest id of a range gets the
k-th word and the posts with the smallest words are kept (ties by id). Same ids + seed -> same
sample on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from kxl_prep.recipe import FilterSpec, RecipeError
# SelectContext, Selection and sample_positions are also what selector authors import from here.
from kxl_prep.selector_base import SelectContext, Selection, Selector, sample_positions  # noqa: F401
from kxl_prep.tags import selector as tags


SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, columns: tuple[str, ...] | None = None) -> Callable[[Selector], Selector]:
    """Register a selector. `columns`: the only post columns it reads (None: any), so the
    pipeline can hand it a narrow table when it must copy rows (filters before sampling)."""

    def deco(fn: Selector) -> Selector:
        fn.columns = columns
        SELECTORS[name] = fn
        return fn

    return deco


def selector_columns(spec: dict[str, Any]) -> tuple[str, ...] | None:
    fn = SELECTORS.get(spec.get("method"))
    return getattr(fn, "columns", None) if fn is not None else None


def select(posts: pd.DataFrame, spec: dict[str, Any], ctx: SelectContext) -> Selection:
    """Run the selector the recipe names. `posts` must have unique ids."""
    method = spec.get("method")
    if method not in SELECTORS:
        raise RecipeError(
            f"selection.method: unknown selector {method!r}; available: {sorted(SELECTORS)}"
        )
    params = {k: v for k, v in spec.items() if k != "method"}
    return SELECTORS[method](posts, params, ctx)


@dataclass(frozen=True)
class IdRange:
    id_min: int
    id_max: int | None  # exclusive; None = no upper bound
    count: int | None  # None = every post in the range

    @property
    def label(self) -> str:
        hi = "inf" if self.id_max is None else str(self.id_max)
        return f"[{self.id_min}, {hi})"


def parse_ranges(params: dict[str, Any]) -> list[IdRange]:
    unknown = sorted(set(params) - {"ranges"})
    if unknown:
        raise RecipeError(f"selection (quota): unknown key(s) {unknown}; known: ['ranges']")
    raw = params.get("ranges")
    if not isinstance(raw, list) or not raw:
        raise RecipeError("selection.ranges: a non-empty list of {id_min, id_max, count} tables")
    ranges = []
    for i, item in enumerate(raw):
        where = f"selection.ranges[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{where}: expected a table")
        extra = sorted(set(item) - {"id_min", "id_max", "count"})
        if extra:
            raise RecipeError(f"{where}: unknown key(s) {extra}; known: id_min, id_max, count")
        id_min = item.get("id_min", 0)
        id_max = item.get("id_max")
        count = item.get("count")
        for key, value in (("id_min", id_min), ("id_max", id_max), ("count", count)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise RecipeError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
        if id_max is not None and id_max <= id_min:
            raise RecipeError(f"{where}: id_max ({id_max}) must be greater than id_min ({id_min})")
        ranges.append(IdRange(id_min, id_max, count))
    ordered = sorted(ranges, key=lambda r: r.id_min)
    for a, b in zip(ordered, ordered[1:]):
        if a.id_max is None or a.id_max > b.id_min:
            raise RecipeError(f"selection.ranges: {a.label} and {b.label} overlap")
    return ranges


def quota_selector(posts: pd.DataFrame, params: dict, ctx: SelectContext) -> Selection:
    """`count` posts drawn without replacement from each id range (all of it when no count)."""
    ranges = parse_ranges(params)
    ids = posts["id"].to_numpy(dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    positions, groups, group_of = [], [], []
    for index, rng in enumerate(ranges):
        lo = np.searchsorted(sorted_ids, rng.id_min, side="left")
        hi = len(sorted_ids) if rng.id_max is None else np.searchsorted(sorted_ids, rng.id_max, side="left")
        available = int(hi - lo)
        requested = None if rng.count is None else int(round(rng.count * ctx.count_scale))
        take = available if requested is None else min(requested, available)
        chosen = order[lo + sample_positions(available, take, ctx.seed, index)]
        positions.append(chosen)
        group_of.append(np.full(len(chosen), index, dtype=np.int32))
        groups.append(
            {
                "range": rng.label,
                "id_min": rng.id_min,
                "id_max": rng.id_max,
                "requested": requested,
                "available": available,
                "selected": int(take),
                "short": 0 if requested is None else max(0, requested - available),
            }
        )
    return _finish(positions, group_of, groups, ids)


def all_selector(posts: pd.DataFrame, params: dict, ctx: SelectContext) -> Selection:
    """Every post (filters still apply)."""
    if params:
        raise RecipeError(f"selection (all): takes no keys, got {sorted(params)}")
    ids = posts["id"].to_numpy(dtype=np.int64)
    n = len(ids)
    groups = [{"range": "all", "requested": None, "available": n, "selected": n, "short": 0}]
    return _finish([np.arange(n, dtype=np.int64)], [np.zeros(n, dtype=np.int32)], groups, ids)


def _finish(positions: list, group_of: list, groups: list, ids: np.ndarray) -> Selection:
    pos = np.concatenate(positions) if positions else np.empty(0, np.int64)
    grp = np.concatenate(group_of) if group_of else np.empty(0, np.int32)
    by_id = np.argsort(ids[pos], kind="stable")
    return Selection(pos[by_id].astype(np.int64), grp[by_id], groups)


# ---- filters -------------------------------------------------------------------------------

FILTER_NAMES = ("deleted", "banned", "restricted", "not_still_image")
FILTER_COLUMNS = ("is_deleted", "is_banned", "md5", "file_url", "file_ext")


def filter_masks(posts: pd.DataFrame, spec: FilterSpec) -> dict[str, np.ndarray]:
    """For each enabled filter, a bool mask of the posts it would remove."""
    masks: dict[str, np.ndarray] = {}
    if spec.deleted:
        masks["deleted"] = posts["is_deleted"].fillna(False).to_numpy(dtype=bool)
    if spec.banned:
        masks["banned"] = posts["is_banned"].fillna(False).to_numpy(dtype=bool)
    if spec.restricted:
        masks["restricted"] = (posts["md5"].isna() | posts["file_url"].isna()).to_numpy(dtype=bool)
    ext = posts["file_ext"].astype(object)
    allowed = set(spec.allowed_ext)
    masks["not_still_image"] = ~ext.isin(allowed).to_numpy(dtype=bool)
    return masks


def apply_filters(posts: pd.DataFrame, spec: FilterSpec) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """Keep-mask plus per filter: `matched` (posts it hits on its own) and `removed` (posts it
    removed that no earlier filter had, in the order deleted, banned, restricted, extension;
    the `removed` counts add up to the total dropped)."""
    masks = filter_masks(posts, spec)
    gone = np.zeros(len(posts), dtype=bool)
    counts = {}
    for name in FILTER_NAMES:
        if name not in masks:
            continue
        mask = masks[name]
        counts[name] = {"matched": int(mask.sum()), "removed": int((mask & ~gone).sum())}
        gone |= mask
    return ~gone, counts


@dataclass
class FilteredSelection:
    """The posts that go in: the selection and the filters, in the recipe's order."""
    selection: Selection
    positions: np.ndarray  # int64 row positions of the kept posts into the posts table, by id
    group: np.ndarray  # int32 group of each kept post (into selection.groups)
    filter_counts: dict[str, dict[str, int]]
    details: dict[str, Any] | None  # the selector's report (Selection.details) of what it kept


def select_and_filter(posts: pd.DataFrame, spec: dict[str, Any], filters: FilterSpec,
                      ctx: SelectContext) -> FilteredSelection:
    """Run the selector and the filters: filters after the sampling (`after-sampling`, rev1),
    or the selector draws only from posts that pass them (`before-sampling`)."""
    if filters.apply == "after-sampling":
        sel = select(posts, spec, ctx)
        flags = posts[list(FILTER_COLUMNS)].take(sel.positions)  # not the tag columns
        keep, filter_counts = apply_filters(flags, filters)
        kept_pos, kept_group = sel.positions[keep], sel.group[keep]
        seen = kept_pos  # positions in the table the selector saw
    else:
        passing, filter_counts = apply_filters(posts[list(FILTER_COLUMNS)], filters)
        base = np.flatnonzero(passing)
        needed = selector_columns(spec)
        eligible = posts if needed is None else posts[list(needed)]
        sel = select(eligible.take(base).reset_index(drop=True), spec, ctx)
        kept_pos, kept_group = base[sel.positions], sel.group
        seen = sel.positions
    # Selector-specific report (e.g. tag rules: overlaps, final per rule/rating/year).
    details = sel.details(seen) if sel.details else None
    return FilteredSelection(sel, kept_pos, kept_group, filter_counts, details)


# ---- the shipped selectors, registered in one place ----------------------------------------

register_selector("quota", columns=("id",))(quota_selector)
register_selector("all", columns=("id",))(all_selector)
register_selector(tags.METHOD, columns=tags.COLUMNS)(tags.tags_selector)
