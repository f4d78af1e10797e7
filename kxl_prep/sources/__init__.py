"""Read post metadata from any supported source into ONE normalized table.

    result = read_posts(["danbooru2023.db", "extra.jsonl"])
    result.posts    # pandas DataFrame, exactly kxl_prep.schema.POSTS_COLUMNS in that order,
                    # scalar columns as POSTS_SCHEMA converts to pandas; tag columns are
                    # pd.ArrowDtype(list<dictionary<int32, string>>) (TAG_DTYPE): each element
                    # reads as a Python list of str, Arrow code gets them without a copy, and
                    # names are stored once (cast flattened values to string for string kernels)
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
import pyarrow as pa

from kxl_prep.schema import REJECTS_SCHEMA, empty_rejects
from kxl_prep.sources.danbooru import detect_old_safe, read_danbooru
from kxl_prep.sources.hakubooru_db import read_hakubooru_db
from kxl_prep.sources.records import TABLE_SCHEMA, TAG_DTYPE, TAG_LIST_TYPE, Normalized, to_pandas

__all__ = ["ReadResult", "read_posts", "detect_format", "detect_old_safe", "empty_table", "TAG_DTYPE",
           "TAG_LIST_TYPE"]

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
    """An empty posts table with the dtypes read_posts gives."""
    return to_pandas(TABLE_SCHEMA.empty_table())


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
    tables: list[pa.Table] = []
    table_sources: list[str] = []
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
                st["accepted"] = sum(part.posts.num_rows for part in parts)
        stats["sources"][str(p)] = st
        for part in parts:
            tables.append(part.posts)
            table_sources.append(str(p))
            if part.rejects:
                rejects.append(pd.DataFrame(
                    [(str(p), *r) for r in part.rejects], columns=list(REJECTS_SCHEMA.names)))
        del parts
    # one table without copying the windows (Arrow chunks), then pandas once
    table = pa.concat_tables(tables) if tables else TABLE_SCHEMA.empty_table()
    codes = np.concatenate([np.full(t.num_rows, k, dtype=np.int32) for k, t in enumerate(tables)]
                           ) if tables else np.zeros(0, dtype=np.int32)
    del tables
    ids = table.column("id").to_numpy()
    dup = pd.Series(ids).duplicated(keep="first").to_numpy()
    stats["duplicates"] = int(dup.sum())
    if dup.any():
        dup_ids = ids[dup]
        first = pd.Index(ids[~dup]).get_indexer(dup_ids)
        first_src = [table_sources[c] for c in codes[~dup][first].tolist()]
        rejects.append(pd.DataFrame({
            "source": [table_sources[c] for c in codes[dup].tolist()],
            "record": [str(i) for i in dup_ids.tolist()],
            "field": "id",
            "reason": [f"duplicate: id already read from {s}" for s in first_src],
        }))
        table = table.filter(pa.array(~dup))
    posts = to_pandas(table)
    del table
    stats["posts"] = len(posts)
    stats["rejects"] = sum(len(r) for r in rejects)
    rej = pd.concat(rejects, ignore_index=True) if rejects else empty_rejects()
    rej = rej.astype(empty_rejects().dtypes.to_dict())
    return ReadResult(posts=posts, rejects=rej, stats=stats)


def _filter_ranges(part: Normalized, id_ranges) -> Normalized:
    ids = part.posts.column("id").to_numpy()
    keep = np.zeros(len(ids), dtype=bool)
    for lo, hi in id_ranges:
        keep |= (ids >= lo) & (ids < hi)
    return Normalized(posts=part.posts.filter(pa.array(keep)), rejects=part.rejects)
