"""Read post metadata from any supported source into ONE normalized table.

    result = read_posts(["danbooru2023.db", "extra.jsonl"])
    result.posts    # pandas DataFrame, exactly kxl_prep.schema.POSTS_COLUMNS / POSTS_SCHEMA
                    # types; tag columns are pd.ArrowDtype(list<string>): each element reads
                    # as a Python list of str, and Arrow code gets them without a copy
    result.rejects  # DataFrame in REJECTS_SCHEMA: source, record, field, reason
    result.stats    # {"sources": {path: {...}}, "duplicates": n, ...}

Formats (by extension, else by content): .db/.sqlite/.sqlite3 HakuBooru SQLite;
.jsonl/.json/.jsonl.gz/.json.gz/.ndjson Danbooru JSON lines or a JSON array; .parquet.
Duplicate ids across (or within) sources: the first one read is kept, the others are
rejected with field "id", reason "duplicate ...".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from kxl_prep.schema import POSTS_COLUMNS, REJECTS_SCHEMA, TAG_COLUMNS, empty_posts
from kxl_prep.sources.danbooru import detect_old_safe, read_danbooru
from kxl_prep.sources.hakubooru_db import read_hakubooru_db
from kxl_prep.sources.records import TAG_DTYPE, Normalized, tag_series

__all__ = ["ReadResult", "read_posts", "detect_format", "detect_old_safe", "empty_table", "TAG_DTYPE"]

SQLITE_MAGIC = b"SQLite format 3\x00"
PARQUET_MAGIC = b"PAR1"


@dataclass
class ReadResult:
    posts: pd.DataFrame
    rejects: pd.DataFrame
    stats: dict = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """'sqlite', 'json' or 'parquet'."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".db", ".sqlite", ".sqlite3")):
        return "sqlite"
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head[:2] == b"\x1f\x8b" or head.lstrip()[:1] in (b"{", b"["):
        return "json"
    raise ValueError(f"{path}: unknown format (expected SQLite, JSON lines or parquet)")


def empty_table() -> pd.DataFrame:
    """An empty posts table with the dtypes read_posts gives (tags: ArrowDtype list<string>)."""
    df = empty_posts()
    for col in TAG_COLUMNS:
        df[col] = tag_series([], 0, None)
    return df


def empty_rejects() -> pd.DataFrame:
    return REJECTS_SCHEMA.empty_table().to_pandas()


def read_posts(paths: Sequence[str | Path], *, progress: bool = True,
               id_ranges: Sequence[tuple[int, int]] | None = None,
               rating_scheme: str = "auto") -> ReadResult:
    """Read every source in order into one table (see the module docstring).

    id_ranges: optional half-open [lo, hi) id ranges; only posts inside them are read (the
    SQLite reader skips the rest without reading it; other formats filter after reading).
    rating_scheme: for Danbooru records: "auto", "current" or "pre-2022" (s = safe).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames: list[pd.DataFrame] = []
    frame_sources: list[str] = []
    rejects: list[pd.DataFrame] = []
    stats: dict = {"sources": {}}
    for p in paths:
        p = Path(p)
        fmt = detect_format(p)
        if fmt == "sqlite":
            parts, st = read_hakubooru_db(p, id_ranges=id_ranges, progress=progress)
        else:
            parts, st = read_danbooru(p, fmt, progress=progress, rating_scheme=rating_scheme)
            if id_ranges is not None:
                parts = [_filter_ranges(part, id_ranges) for part in parts]
                st["accepted"] = sum(len(part.posts) for part in parts)
        stats["sources"][str(p)] = st
        for part in parts:
            frames.append(part.posts)
            frame_sources.append(str(p))
            if part.rejects:
                rejects.append(pd.DataFrame(
                    [(str(p), *r) for r in part.rejects], columns=list(REJECTS_SCHEMA.names)))
    posts = _concat(frames)
    codes = np.concatenate([np.full(len(f), k, dtype=np.int32) for k, f in enumerate(frames)]
                           ) if frames else np.zeros(0, dtype=np.int32)
    dup = posts["id"].duplicated(keep="first").to_numpy()
    stats["duplicates"] = int(dup.sum())
    if dup.any():
        ids = posts["id"].to_numpy()
        dup_ids = ids[dup]
        first = pd.Index(ids[~dup]).get_indexer(dup_ids)
        first_src = [frame_sources[c] for c in codes[~dup][first].tolist()]
        rejects.append(pd.DataFrame({
            "source": [frame_sources[c] for c in codes[dup].tolist()],
            "record": [str(i) for i in dup_ids.tolist()],
            "field": "id",
            "reason": [f"duplicate: id already read from {s}" for s in first_src],
        }))
        posts = posts[~dup].reset_index(drop=True)
    stats["posts"] = len(posts)
    stats["rejects"] = sum(len(r) for r in rejects)
    rej = pd.concat(rejects, ignore_index=True) if rejects else empty_rejects()
    rej = rej.astype(empty_rejects().dtypes.to_dict())
    return ReadResult(posts=posts, rejects=rej, stats=stats)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return empty_table()
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)[list(POSTS_COLUMNS)]
    return pd.concat(frames, ignore_index=True)[list(POSTS_COLUMNS)]


def _filter_ranges(part: Normalized, id_ranges) -> Normalized:
    ids = part.posts["id"]
    keep = pd.Series(False, index=part.posts.index)
    for lo, hi in id_ranges:
        keep |= (ids >= lo) & (ids < hi)
    return Normalized(posts=part.posts[keep].reset_index(drop=True), rejects=part.rejects)
