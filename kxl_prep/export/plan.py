"""Selection x shard index -> work units (one per tar), and posts not found with a reason.

Reasons (`kind` or `kind:detail`): not_a_still_image:<ext>, restricted_no_md5,
shard_missing:original/data-NNNN.tar (the post's original/ tar is not downloaded),
beyond_original_range (an id past the original/ range, which the downloaded original/ tars
bound (index.original_id_bound): its file belongs in a recent/ or updates/ tar that is
missing or lacks it), not_in_shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pandas as pd

from kxl_common.shard import parse_shard, take_share
from kxl_prep.export.index import Shard, expected_original_shard, original_id_bound

STILL_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "avif"}


class PostTask(NamedTuple):  # a tuple: millions of them in a full-size plan
    id: int
    member: str
    offset: int
    size: int
    ext: str  # extension of the member in the tar


@dataclass
class Unit:
    shard: Shard
    posts: list[PostTask] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.shard.key


@dataclass
class Plan:
    units: list[Unit]  # every tar that holds at least one selected post, in a stable order
    not_found: pd.DataFrame  # id, reason
    n_selected: int

    def slice(self, k: int, n: int) -> list[Unit]:
        """Job k of n: every n-th unit from k. The n slices partition the units."""
        return take_share(self.units, (k, n))


def parse_shard_spec(spec: str | None) -> tuple[int, int]:
    """'K/N' (0-based, kxl_common.shard) -> (K, N); None -> (0, 1)."""
    return parse_shard(spec)


def _not_found_reason(row, original_shards: set[str], original_bound: int | None) -> str:
    ext = str(row.file_ext).lower() if isinstance(row.file_ext, str) else ""
    if ext and ext not in STILL_EXTS:
        return f"not_a_still_image:{ext}"
    if "md5" in row._fields and (row.md5 is None or (isinstance(row.md5, float) and pd.isna(row.md5))):
        return "restricted_no_md5"
    if original_shards:
        if original_bound is not None and int(row.id) >= original_bound:
            return "beyond_original_range"
        expected = expected_original_shard(int(row.id))
        if expected not in original_shards:
            return f"shard_missing:{expected}"
    return "not_in_shards"


def make_plan(selection: pd.DataFrame, shards: list[Shard], index: pd.DataFrame) -> Plan:
    """`index` has one row per id (duplicates already resolved)."""
    ids = selection["id"].astype("int64")
    if ids.duplicated().any():
        dup = ids[ids.duplicated()].iloc[0]
        raise ValueError(f"selection: post id {dup} appears more than once")
    joined = selection.merge(index, on="id", how="left", suffixes=("", "_tar"))
    found = joined[joined["shard"].notna()]
    missing = joined[joined["shard"].isna()]

    original_shards = {s.rel[s.rel.index("original/"):] for s in shards if s.kind == "original"}
    bound = original_id_bound(index, shards) if original_shards else None
    cols = [c for c in ("id", "file_ext", "md5") if c in missing.columns]
    reasons = [_not_found_reason(r, original_shards, bound) for r in missing[cols].itertuples(index=False)]
    not_found = pd.DataFrame({"id": missing["id"].astype("int64").to_numpy(), "reason": reasons})

    units: dict[int, Unit] = {}
    found = found.sort_values(["shard", "offset"], kind="stable")
    for shard_no, group in found.groupby("shard", sort=True):
        columns = (group["id"].astype("int64").tolist(), group["member"].tolist(),
                   group["offset"].astype("int64").tolist(), group["size"].astype("int64").tolist(),
                   group["ext"].tolist())
        units[int(shard_no)] = Unit(shards[int(shard_no)], list(map(PostTask._make, zip(*columns))))
    ordered = sorted(units.values(), key=lambda u: (u.shard.root_rank, u.shard.rel))
    return Plan(ordered, not_found, len(selection))
