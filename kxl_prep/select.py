"""Which posts go in: pluggable selectors and the post filters.

A selector is a function `(posts, params, ctx) -> Selection` registered under a name; the
data recipe's `[selection] method = "<name>"` picks it and the other keys of that table are
its params. Shipped: "quota" (seeded quotas per id range, the Epsilon rev1 rule) and "all".
Other selectors (e.g. tag-driven rules) register themselves with `register_selector`.

Determinism: sampling never uses numpy's Generator methods (whose streams may change between
numpy versions). It draws raw 64-bit words from PCG64 seeded by SeedSequence([seed, range
index]) (both stable by numpy's policy), gives the k-th smallest id of a range the k-th word,
and keeps the posts with the smallest words (ties by id). Same ids + seed -> same sample on
any machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from kxl_prep.recipe import FilterSpec, RecipeError


@dataclass
class SelectContext:
    seed: int
    # Multiplies every requested count (rounded to nearest): runs a recipe on a small sample.
    count_scale: float = 1.0
    # The recipe file, so a selector can resolve files named relative to it.
    recipe_path: str | None = None
    progress: bool = True


@dataclass
class Selection:
    positions: np.ndarray  # int64 row positions into the posts table, ascending by id
    group: np.ndarray  # int32 group index of each selected row (into `groups`)
    groups: list[dict[str, Any]] = field(default_factory=list)  # per group: label + counts
    # Optional selector-specific report for the manifest, given the kept row positions.
    details: Callable[[np.ndarray], dict[str, Any]] | None = None


Selector = Callable[[pd.DataFrame, dict, SelectContext], Selection]
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


def sample_positions(n: int, k: int, seed: int, stream: int) -> np.ndarray:
    """k distinct positions out of range(n), ascending; uniform, without replacement."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    bitgen = np.random.PCG64(np.random.SeedSequence([int(seed), int(stream)]))
    words = bitgen.random_raw(n)
    # the k smallest words, ties to the lower position: O(n) partition instead of a sort
    kth = np.partition(words, k - 1)[k - 1]
    below = np.flatnonzero(words < kth)
    at = np.flatnonzero(words == kth)
    chosen = np.concatenate([below, at[: k - len(below)]])
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


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


@register_selector("quota", columns=("id",))
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


@register_selector("all", columns=("id",))
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


# Selectors defined in their own modules register on import.
from kxl_prep import tag_select  # noqa: E402,F401  ("tags": kxl_prep.tag_rules)
