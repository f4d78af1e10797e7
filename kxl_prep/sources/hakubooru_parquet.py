"""HakuBooru's danbooru2023 tables as parquet files -> the normalized post table.

The "danbooru2023 metadata database" is also published as one parquet file per SQLite
table, named after the table: `post.parquet`, `tag.parquet`, `posttagrelation.parquet`
(same columns as the SQLite tables: rating 0..3, tag type 0..4 in HakuBooru's numbering,
the tags of a post only in the relation table). A source is the folder holding them or its
`post.parquet` (the other tables are found beside it, by name).

The result is the SQLite reader's (kxl_prep.sources.hakubooru_db): the same posts in id
order, each category's tags sorted by name, the same rejects; only `stats["format"]`
differs. Posts are validated in windows of ~100k ids; the relation table is read once as
two integer columns (sorted by post id when the file is not).

Assumptions (the published files were not available to check): a `created_at` stored as a
parquet timestamp is written out as ISO 8601 text (a naive timestamp is UTC); when the
relation table is absent or empty, `tag_list` / `tag_list_<category>` text columns on the
post table are read as in the SQLite form.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from kxl_prep.schema import TAG_CATEGORIES
from kxl_prep.sources.errors import SourceError
from kxl_prep.sources.hakubooru_db import POST_FIELDS, TEXT_LIST_RE, TagTable, _drop_broken
from kxl_prep.sources.records import Normalized, normalize, rating_codes, raw_posts
from kxl_prep.sources.tokens import parse_token_lists

POST_FILE, TAG_FILE, RELATION_FILE = "post.parquet", "tag.parquet", "posttagrelation.parquet"
TAG_COLUMNS_NEEDED = ("id", "name", "type")
RELATION_COLUMNS_NEEDED = ("post_id", "tag_id")
TEXT_COLUMNS = ("tag_list",) + tuple(f"tag_list_{c}" for c in TAG_CATEGORIES)
BATCH_ROWS = 1_000_000
INT32_MAX = np.iinfo(np.int32).max


class TableSetError(SourceError):
    """The HakuBooru parquet tables are incomplete or malformed."""


def table_kind(columns: Sequence[str]) -> str | None:
    """Which HakuBooru table a parquet file holds, by its columns: post, tag, relation or None.

    A post table has HakuBooru's post columns and none of Danbooru's tag_string_* fields
    (those mark a Danbooru-field parquet, kxl_prep.sources.danbooru)."""
    cols = set(columns)
    if any(c.startswith("tag_string") for c in cols):
        return None
    if set(RELATION_COLUMNS_NEEDED) <= cols:
        return "relation"
    if {"id", "rating"} <= cols and ({"image_width", "created_at"} & cols):
        return "post"
    if set(TAG_COLUMNS_NEEDED) <= cols:
        return "tag"
    return None


class ParquetTables:
    """HakuBooru's tables as parquet files in one folder (the post table may have another name)."""

    kind = "hakubooru-parquet"

    def __init__(self, post_path: Path):
        self.post_path = post_path
        self.files = {"post": post_path, "tag": post_path.parent / TAG_FILE,
                      "posttagrelation": post_path.parent / RELATION_FILE}

    def has(self, table: str) -> bool:
        return self.files[table].is_file()

    def where(self, table: str) -> str:
        return str(self.files[table])

    def columns(self, table: str) -> list[str]:
        return pq.ParquetFile(self.files[table]).schema_arrow.names

    def num_rows(self, table: str) -> int:
        return pq.ParquetFile(self.files[table]).metadata.num_rows

    def batches(self, table: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
        yield from pq.ParquetFile(self.files[table]).iter_batches(batch_size=BATCH_ROWS, columns=columns)

    def schema(self, table: str, columns: list[str]) -> pa.Schema:
        schema = pq.ParquetFile(self.files[table]).schema_arrow
        return pa.schema([schema.field(c) for c in columns])


def _timestamps_as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """created_at stored as a timestamp: ISO 8601 text (with the offset when it has a zone)."""
    if pa.types.is_timestamp(col.type):
        fmt = "%Y-%m-%dT%H:%M:%S%z" if col.type.tz else "%Y-%m-%dT%H:%M:%S"
        return pc.strftime(col, format=fmt)
    if pa.types.is_date(col.type):
        return pc.strftime(col, format="%Y-%m-%d")
    return col


def _read_relation(tables, id_ranges, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(post_id, tag_id) arrays sorted by post id (stable: a post's rows keep their order).

    Filled batch by batch into arrays sized once (int32 while the ids fit, as danbooru's
    do): the ~230M rows of the full dump cost 1.8 GB, without a second copy."""
    n = tables.num_rows("posttagrelation")
    post_id, tag_id = np.empty(n, np.int32), np.empty(n, np.int32)
    filled = 0
    with tqdm(total=n, desc="reading posttagrelation", unit="row", disable=not progress) as bar:
        for batch in tables.batches("posttagrelation", list(RELATION_COLUMNS_NEEDED)):
            p = pc.cast(batch.column(0), pa.int64())
            t = pc.cast(batch.column(1), pa.int64())
            if p.null_count or t.null_count:
                ok = pc.and_(pc.is_valid(p), pc.is_valid(t))
                p, t = p.filter(ok), t.filter(ok)
            p, t = p.to_numpy(), t.to_numpy()
            if id_ranges is not None:
                keep = _in_ranges(p, id_ranges)
                p, t = p[keep], t[keep]
            if post_id.dtype == np.int32 and len(p) and (
                    max(p.max(), t.max()) > INT32_MAX or min(p.min(), t.min()) < -INT32_MAX):
                post_id, tag_id = post_id.astype(np.int64), tag_id.astype(np.int64)
            if filled + len(p) > len(post_id):  # more rows than announced
                post_id = np.concatenate((post_id[:filled], np.empty(len(p), post_id.dtype)))
                tag_id = np.concatenate((tag_id[:filled], np.empty(len(p), tag_id.dtype)))
            post_id[filled:filled + len(p)] = p
            tag_id[filled:filled + len(t)] = t
            filled += len(p)
            bar.update(batch.num_rows)
    post_id, tag_id = post_id[:filled], tag_id[:filled]
    if filled > 1 and (post_id[1:] < post_id[:-1]).any():
        order = np.argsort(post_id, kind="stable")
        post_id, tag_id = post_id[order], tag_id[order]
    return post_id, tag_id


def _in_ranges(ids: np.ndarray, id_ranges) -> np.ndarray:
    keep = np.zeros(len(ids), dtype=bool)
    for lo, hi in id_ranges:
        keep |= (ids >= lo) & (ids < hi)
    return keep


def _read_posts_table(tables, text_cols: list[str], id_ranges, progress: bool) -> pa.Table:
    present = set(tables.columns("post"))
    wanted = [c for c in POST_FIELDS if c in present] + text_cols
    parts = []
    with tqdm(total=tables.num_rows("post"), desc="reading post", unit="post", disable=not progress) as bar:
        for batch in tables.batches("post", wanted):
            table = pa.Table.from_batches([batch])
            if id_ranges is not None:
                ids = pc.fill_null(pc.cast(table["id"], pa.int64()), -1).to_numpy()
                table = table.filter(pa.array(_in_ranges(ids, id_ranges)))
            parts.append(table)
            bar.update(batch.num_rows)
    table = pa.concat_tables(parts) if parts else tables.schema("post", wanted).empty_table()
    # id order, as the SQLite reader gives (stable: a repeated id keeps the file's order)
    ids = _ids(table)
    if len(ids) > 1 and (np.diff(ids) < 0).any():
        table = table.take(pa.array(np.argsort(ids, kind="stable")))
    return table


def _ids(table: pa.Table) -> np.ndarray:
    """The id column as int64, a missing id sorting last (its record is rejected)."""
    col = table["id"]
    if not pa.types.is_integer(col.type):
        raise TableSetError(f"post table: column 'id' holds {col.type}, expected integers")
    return pc.fill_null(pc.cast(col, pa.int64()), np.iinfo(np.int64).max).to_numpy()


def read_hakubooru_parquet(source: str | Path, *, id_ranges: Sequence[tuple[int, int]] | None = None,
                           progress: bool = True, chunk_posts: int = 100_000) -> tuple[list[Normalized], dict]:
    """Read HakuBooru's parquet tables: `source` is their folder or its post table."""
    source = Path(source)
    post_path = source / POST_FILE if source.is_dir() else source
    if not post_path.is_file():
        raise TableSetError(f"{source}: no {POST_FILE} (HakuBooru's post table)")
    return read_hakubooru_tables(ParquetTables(post_path), id_ranges=id_ranges, progress=progress,
                                 chunk_posts=chunk_posts)


def read_hakubooru_tables(tables, *, id_ranges: Sequence[tuple[int, int]] | None = None,
                          progress: bool = True, chunk_posts: int = 100_000) -> tuple[list[Normalized], dict]:
    """HakuBooru's post, tag and posttagrelation tables from `tables` (ParquetTables or the
    DuckDB reader's) -> the normalized post table, as the SQLite reader gives it."""
    if not tables.has("tag"):
        raise TableSetError(f"{tables.where('post')}: HakuBooru's post table, but no {TAG_FILE} beside it "
                            f"(the tag names and categories live there)")
    missing = [c for c in TAG_COLUMNS_NEEDED if c not in tables.columns("tag")]
    if missing:
        raise TableSetError(f"{tables.where('tag')}: lacks column(s) {missing}; HakuBooru's tag table has "
                            f"{list(TAG_COLUMNS_NEEDED)} (type 0..4)")
    tag_batches = list(tables.batches("tag", list(TAG_COLUMNS_NEEDED)))
    tags = TagTable(pa.Table.from_batches(tag_batches) if tag_batches
                    else tables.schema("tag", list(TAG_COLUMNS_NEEDED)).empty_table())

    storage = "none"
    if tables.has("posttagrelation"):
        missing = [c for c in RELATION_COLUMNS_NEEDED if c not in tables.columns("posttagrelation")]
        if missing:
            raise TableSetError(f"{tables.where('posttagrelation')}: lacks column(s) {missing}; HakuBooru's "
                                f"relation table has {list(RELATION_COLUMNS_NEEDED)}")
        if tables.num_rows("posttagrelation") > 0:
            storage = "relation"
    post_cols = tables.columns("post")
    text_cols: list[str] = []
    if storage == "none":
        text_cols = ["tag_list"] if "tag_list" in post_cols else [c for c in TEXT_COLUMNS[1:] if c in post_cols]
        storage = "text" if text_cols else "none"

    posts = _read_posts_table(tables, text_cols, id_ranges, progress)
    rel_pid, rel_tid = (_read_relation(tables, id_ranges, progress) if storage == "relation"
                        else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    stats = {"format": tables.kind, "tag_storage": storage, "records": posts.num_rows,
             "accepted": 0, "rejected": 0, "tags_in_tag_table": tags.n,
             "tag_rows_of_unknown_posts": 0, "rating_scheme": "hakubooru 0..3 (g, s, q, e)",
             "pre_2022_s_safe": None}
    if storage == "relation" and posts.num_rows:
        known = _ids(posts)  # sorted
        distinct = rel_pid[np.concatenate(([True], rel_pid[1:] != rel_pid[:-1]))] if len(rel_pid) else rel_pid
        at = np.minimum(np.searchsorted(known, distinct), len(known) - 1)
        stats["tag_rows_of_unknown_posts"] = int((known[at] != distinct).sum())
    parts: list[Normalized] = []
    for lo in range(0, posts.num_rows, chunk_posts):
        part = _window(posts.slice(lo, chunk_posts), storage, text_cols, rel_pid, rel_tid, tags)
        parts.append(part)
        stats["accepted"] += part.posts.num_rows
        stats["rejected"] += len(part.rejects)
    return parts, stats


def _column(window: pa.Table, name: str) -> list:
    if name not in window.column_names:
        return [None] * window.num_rows  # an absent field: each record says what it lacks
    col = window[name]
    if name == "created_at":
        col = _timestamps_as_text(col)
    return col.to_pylist()


def _window(window: pa.Table, storage: str, text_cols: list[str], rel_pid: np.ndarray,
            rel_tid: np.ndarray, tags: TagTable) -> Normalized:
    cols = {name: _column(window, name) for name in POST_FIELDS}
    raw = raw_posts([f"id {i}" for i in cols["id"]], cols)
    n = window.num_rows
    ids = _ids(window)
    errors: dict[int, str] = {}
    if storage == "relation" and n:
        a, b = np.searchsorted(rel_pid, ids[0], "left"), np.searchsorted(rel_pid, ids[-1], "right")
        pid, tid = rel_pid[a:b], rel_tid[a:b]
        # ids are sorted: a relation row belongs to the first post with its id
        pos = np.minimum(np.searchsorted(ids, pid), n - 1)
        found = ids[pos] == pid
        raw.tags = tags.lists(n, pos[found], tid[found], errors)
    elif storage == "text" and n:
        text = window[text_cols[0]] if len(text_cols) == 1 else pc.binary_join_element_wise(
            *[pc.fill_null(window[c], "") for c in text_cols], "")
        strings = text.to_pylist()
        pos, strings, _ = _drop_broken(np.arange(n), strings, None, TEXT_LIST_RE, errors)
        values, counts = parse_token_lists(strings, 36)
        raw.tags = tags.lists(n, np.repeat(pos, counts), values, errors)
    raw.tag_errors = errors
    return normalize(raw, rating_codes)
