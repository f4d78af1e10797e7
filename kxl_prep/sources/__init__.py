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
.jsonl/.json/.jsonl.gz/.json.gz/.ndjson Danbooru JSON lines or a JSON array; a .parquet of
Danbooru's post fields (tag_string_* columns); HakuBooru's tables as parquet (a folder
holding post.parquet, tag.parquet, posttagrelation.parquet, or one of those files: the set
is read once however many of its files are named), or the same tables in a DuckDB file
(.duckdb/.ddb, or a .db with DuckDB's header; needs the optional duckdb package). The two
parquet kinds are told apart by their columns; any other parquet is refused with the
columns each kind needs.
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
import pyarrow.parquet as pq

from kxl_prep.schema import REJECTS_SCHEMA, empty_rejects
from kxl_prep.sources.danbooru import detect_old_safe, read_danbooru
from kxl_prep.sources.errors import SourceError
from kxl_prep.sources.hakubooru_db import read_hakubooru_db
from kxl_prep.sources.hakubooru_duckdb import is_duckdb_file, read_hakubooru_duckdb
from kxl_prep.sources.hakubooru_parquet import (POST_FILE, RELATION_COLUMNS_NEEDED, RELATION_FILE, TAG_COLUMNS_NEEDED,
                                                TAG_FILE, read_hakubooru_parquet, table_kind)
from kxl_prep.sources.records import TABLE_SCHEMA, TAG_DTYPE, TAG_LIST_TYPE, Normalized, to_pandas

__all__ = ["ReadResult", "SourceError", "read_posts", "detect_format", "detect_old_safe", "empty_table",
           "TAG_DTYPE", "TAG_LIST_TYPE"]

SQLITE_MAGIC = b"SQLite format 3\x00"
PARQUET_MAGIC = b"PAR1"


@dataclass
class ReadResult:
    posts: pd.DataFrame
    rejects: pd.DataFrame
    stats: dict = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """'sqlite', 'json', 'parquet' (Danbooru fields), 'hakubooru-parquet' or 'duckdb' (HakuBooru's tables)."""
    return _resolve(Path(path))[0]


DANBOORU_PARQUET_COLUMNS = ("id", "created_at", "rating", "image_width", "image_height", "file_ext",
                            "fav_count", "tag_string_general", "...")
HAKUBOORU_POST_COLUMNS = ("id", "created_at", "rating (0..3)", "image_width", "image_height", "file_ext",
                          "fav_count", "...")


def _resolve(path: Path) -> tuple[str, Path]:
    """(format, what to read): for HakuBooru's parquet tables, their post table."""
    if path.is_dir():
        if (path / POST_FILE).is_file():
            return "hakubooru-parquet", path / POST_FILE
        held = sorted(p.name for p in path.iterdir())
        shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
        raise SourceError(
            f"{path}: a folder source must hold HakuBooru's tables as parquet ({POST_FILE}, {TAG_FILE}, "
            f"{RELATION_FILE}); it holds {shown or 'nothing'}. Pass a .db, .jsonl or .parquet file instead.")
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    name = path.name.lower()
    with open(path, "rb") as fh:
        head = fh.read(16)
    if is_duckdb_file(head):  # DuckDB files are often named .db too
        return "duckdb", path
    if name.endswith((".db", ".sqlite", ".sqlite3")):
        return "sqlite", path
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "json", path
    if name.endswith(".parquet"):
        return _parquet_kind(path)
    if name.endswith((".duckdb", ".ddb")):
        raise SourceError(f"{path}: named like a DuckDB database, but its header is not DuckDB's")
    if head.startswith(SQLITE_MAGIC):
        return "sqlite", path
    if head.startswith(PARQUET_MAGIC):
        return _parquet_kind(path)
    if head[:2] == b"\x1f\x8b" or head.lstrip()[:1] in (b"{", b"["):
        return "json", path
    raise SourceError(f"{path}: unknown format (expected SQLite, JSON lines or parquet)")


def _parquet_kind(path: Path) -> tuple[str, Path]:
    """Danbooru-field parquet or one of HakuBooru's tables, by the columns."""
    try:
        columns = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path}: not a readable parquet file: {exc}") from exc
    if "id" in columns and any(c.startswith("tag_string") for c in columns):
        return "parquet", path
    kind = table_kind(columns)
    if kind == "post":
        return "hakubooru-parquet", path
    if kind in ("tag", "relation"):
        post = path.parent / POST_FILE
        if post.is_file():
            return "hakubooru-parquet", post
        raise SourceError(f"{path}: HakuBooru's {kind} table, but no {POST_FILE} beside it; pass the folder "
                          f"holding {POST_FILE}, {TAG_FILE} and {RELATION_FILE}")
    shown = ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")
    raise SourceError(
        f"{path}: unknown parquet table (columns: {shown}). Expected Danbooru's post fields "
        f"({', '.join(DANBOORU_PARQUET_COLUMNS)}), or HakuBooru's tables: {POST_FILE} "
        f"({', '.join(HAKUBOORU_POST_COLUMNS)}), {TAG_FILE} ({', '.join(TAG_COLUMNS_NEEDED)}), "
        f"{RELATION_FILE} ({', '.join(RELATION_COLUMNS_NEEDED)})")


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
    read_tables: dict[Path, str] = {}  # HakuBooru parquet post table -> the source it was read as
    for p in paths:
        p = Path(p)
        fmt, target = _resolve(p)
        if fmt == "hakubooru-parquet":
            key = target.resolve()
            if key in read_tables:  # another file of a table set already read
                stats["sources"][str(p)] = {"format": fmt, "skipped": f"same tables as {read_tables[key]}"}
                continue
            read_tables[key] = str(p)
        if fmt == "sqlite":
            parts, st = read_hakubooru_db(p, id_ranges=id_ranges, progress=progress)
        elif fmt == "hakubooru-parquet":
            parts, st = read_hakubooru_parquet(target, id_ranges=id_ranges, progress=progress)
        elif fmt == "duckdb":
            parts, st = read_hakubooru_duckdb(target, id_ranges=id_ranges, progress=progress)
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
