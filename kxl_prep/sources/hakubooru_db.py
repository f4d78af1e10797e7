"""HakuBooru's danbooru2023 SQLite metadata DB -> the normalized post table.

Schema (hakubooru 0.0.3 peewee models): `post` (rating 0..3 = general, sensitive,
questionable, explicit), `tag` (type 0 general, 1 artist, 2 character, 3 copyright, 4 meta:
NOT Danbooru's numbering) and the tags of a post in one of two forms:
  * relation: rows of `posttagrelation(post_id, tag_id)`;
  * text:     `tag_list` TEXT on the post row, `$<tag id in base 36>#` per tag (HakuBooru's
              TagListField); without `tag_list`, the `tag_list_<category>` columns are joined.
When the posttagrelation table has rows it is used, otherwise the text columns. In both forms
a tag's category comes from the tag table, and within a category tags are ordered by name
(Danbooru's tag_string order), so both forms give the same table.

Speed: posts are read in id windows of ~100k; the tag ids of a window come as one string per
post (SQLite's group_concat or the text column), are parsed in one vectorized pass, sorted by
(post, category, name) as integer keys and become Arrow list arrays (no Python object per
tag or per post).
"""
from __future__ import annotations

import gc
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from kxl_prep.schema import TAG_CATEGORIES, TAG_COLUMNS
from kxl_prep.sources.errors import SourceError
from kxl_prep.sources.records import SOURCE_FIELDS, Normalized, normalize, rating_codes, raw_posts
from kxl_prep.sources.tokens import parse_token_lists

N_CATEGORIES = len(TAG_COLUMNS)
POST_FIELDS = tuple(SOURCE_FIELDS.values())  # the post table's columns read, in SELECT order
TEXT_LIST_RE = r"^(\$[0-9a-zA-Z]+#)*$"
RELATION_LIST_RE = r"^[0-9]+(,[0-9]+)*$"


class TagTable:
    """The tag table as arrays: tag id -> rank, where ranks order tags by (type, name)."""

    def __init__(self, t: pa.Table):
        """t: the tag table's id (int64), name (string) and type (int64) columns."""
        t = pa.table({"id": pc.cast(t["id"], pa.int64()), "name": pc.cast(t["name"], pa.string()),
                      "type": pc.fill_null(pc.cast(t["type"], pa.int64()), -1)}).combine_chunks()
        valid_type = pc.and_(pc.greater_equal(t["type"], 0), pc.less(t["type"], N_CATEGORIES))
        order = pc.sort_indices(t, sort_keys=[("type", "ascending"), ("name", "ascending")])
        t = t.take(order)
        self.n = t.num_rows
        tag_ids = t["id"].to_numpy()
        self.max_id = int(tag_ids.max()) if self.n else 0
        # rank_of[id] = rank, -1 unknown id, -2 tag with an unknown type
        self.rank_of = np.full(self.max_id + 2, -1, dtype=np.int64)
        self.rank_of[tag_ids] = np.arange(self.n)
        bad_type = ~valid_type.take(order).to_numpy(zero_copy_only=False)
        self.rank_of[tag_ids[bad_type]] = -2
        self.type_by_rank = np.clip(t["type"].to_numpy(), 0, N_CATEGORIES - 1).astype(np.int8)
        self.names = t["name"].combine_chunks()  # name by rank
        self.type_of_id = dict(zip(tag_ids[bad_type].tolist(),
                                   t["type"].to_numpy()[bad_type].tolist()))

    @classmethod
    def from_sqlite(cls, con: sqlite3.Connection) -> "TagTable":
        rows = con.execute('SELECT "id", "name", "type" FROM "tag"').fetchall()
        ids, names, types = (list(c) for c in zip(*rows)) if rows else ([], [], [])
        return cls(pa.table({"id": pa.array(ids, pa.int64()), "name": pa.array(names, pa.string()),
                             "type": pa.array(types, pa.int64())}))

    def lists(self, n_posts: int, post_idx: np.ndarray, tag_ids: np.ndarray,
              errors: dict[int, str]) -> dict[str, pa.ListArray]:
        """Per-category name lists for posts 0..n_posts-1 from (post index, tag id) pairs.

        Unknown tag ids (or tags of an unknown type) record an error for their post.
        """
        in_range = (tag_ids >= 0) & (tag_ids <= self.max_id)
        if in_range.all():
            rank = self.rank_of[tag_ids]
        else:
            rank = np.full(len(tag_ids), -1, dtype=np.int64)
            rank[in_range] = self.rank_of[tag_ids[in_range]]
        del in_range
        bad = rank < 0
        if bad.any():
            for p, tid, r in zip(post_idx[bad].tolist(), tag_ids[bad].tolist(), rank[bad].tolist()):
                if p not in errors:
                    errors[p] = (f"unknown tag id {tid}" if r == -1 else
                                 f"tag id {tid} has unknown type {self.type_of_id.get(tid)}")
            post_idx, rank = post_idx[~bad], rank[~bad]
        del tag_ids, bad
        # post_idx arrives grouped by post, so a stable (run-aware) sort is the fast one
        key = post_idx * np.int64(max(self.n, 1))
        key += rank
        del post_idx, rank
        key.sort(kind="stable")
        if len(key) > 1:
            dup = key[1:] == key[:-1]
            if dup.any():  # a tag twice on a post counts once
                key = key[np.concatenate(([True], ~dup))]
            del dup
        post_idx = (key // max(self.n, 1)).astype(np.int32)
        key -= post_idx.astype(np.int64) * max(self.n, 1)
        rank = key.astype(np.int32)
        del key
        cat = self.type_by_rank[rank]
        # tags per (post, category), then the entries regrouped category by category (a
        # stable sort of 5 small values keeps each category's (post, name) order)
        counts = np.bincount(post_idx.astype(np.int64) * N_CATEGORIES + cat,
                             minlength=n_posts * N_CATEGORIES).reshape(n_posts, N_CATEGORIES)
        by_cat = rank[np.argsort(cat, kind="stable")]
        starts = np.concatenate(([0], np.cumsum(counts.sum(axis=0))))
        out = {}
        for c, col in enumerate(TAG_COLUMNS):
            offsets = np.zeros(n_posts + 1, dtype=np.int32)
            np.cumsum(counts[:, c], out=offsets[1:])
            # every window shares one dictionary: the tag table's names
            values = pa.DictionaryArray.from_arrays(pa.array(by_cat[starts[c]:starts[c + 1]]), self.names)
            out[col] = pa.ListArray.from_arrays(pa.array(offsets), values)
        return out


def _tables(con: sqlite3.Connection) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]


def detect_tag_storage(con: sqlite3.Connection) -> str:
    """'relation', 'text' or 'none' (no tags anywhere)."""
    tables = _tables(con)
    if "posttagrelation" in tables and con.execute(
            'SELECT 1 FROM "posttagrelation" LIMIT 1').fetchone() is not None:
        return "relation"
    cols = set(_columns(con, "post"))
    if "tag_list" in cols or any(f"tag_list_{c}" in cols for c in TAG_CATEGORIES):
        return "text"
    return "none"


def _text_expr(con: sqlite3.Connection) -> str:
    cols = _columns(con, "post")
    if "tag_list" in cols:
        return '"tag_list"'
    parts = [f'coalesce("{c}", \'\')' for c in cols if c.startswith("tag_list_")]
    return " || ".join(parts)


def _windows(lo: int, hi: int, n: int, chunk_posts: int,
             id_ranges: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Half-open id windows of about chunk_posts posts covering [lo, hi], cut to id_ranges."""
    if n == 0:
        return []
    width = max(1, int((hi - lo + 1) * chunk_posts / n))
    wins = [(a, min(a + width, hi + 1)) for a in range(lo, hi + 1, width)]
    if id_ranges is None:
        return wins
    out = []
    for a, b in wins:
        for ra, rb in sorted(id_ranges):
            x, y = max(a, ra), min(b, rb)
            if x < y:
                out.append((x, y))
    return out


class _Fetcher:
    """Runs the two queries of a window on a worker thread (one connection per thread).

    SQLite does its work with the GIL released, so fetching window k+1 overlaps the
    vectorized processing of window k on a 2-core machine.
    """

    def __init__(self, path: Path, storage: str, text_expr: str):
        self.path, self.storage, self.text_expr = path, storage, text_expr
        self.local = threading.local()
        self.connections: list[sqlite3.Connection] = []
        self.fields = ", ".join(f'"{f}"' for f in POST_FIELDS)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self.local, "con", None)
        if con is None:
            con = _connect(self.path)
            self.local.con = con
            self.connections.append(con)
        return con

    def __call__(self, window: tuple[int, int]):
        a, b = window
        con = self._con()
        rows = con.execute(
            f'SELECT {self.fields} FROM "post" WHERE "id" >= ? AND "id" < ? ORDER BY "id"', (a, b)
        ).fetchall()
        if self.storage == "relation":
            tag_rows = con.execute(
                'SELECT "post_id", count("tag_id"), group_concat("tag_id") FROM "posttagrelation" '
                'WHERE "post_id" >= ? AND "post_id" < ? GROUP BY "post_id" ORDER BY "post_id"',
                (a, b)).fetchall()
        elif self.storage == "text":
            tag_rows = con.execute(
                f'SELECT "id", {self.text_expr} FROM "post" WHERE "id" >= ? AND "id" < ? '
                'ORDER BY "id"', (a, b)).fetchall()
        else:
            tag_rows = []
        return rows, tag_rows

    def close(self) -> None:
        for con in self.connections:
            con.close()


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    con.execute("PRAGMA cache_size=-65536")
    con.execute("PRAGMA mmap_size=268435456")
    return con


def _place_tag_rows(ids: np.ndarray, tag_rows: list) -> tuple[np.ndarray, list, np.ndarray | None, int]:
    """Rows (post id, [count,] tag string) -> (position of the post in ids, tag string,
    count or None, number of unknown post ids)."""
    cols = list(zip(*tag_rows)) if tag_rows else [(), ()]
    pids = np.fromiter(cols[0], dtype=np.int64, count=len(tag_rows))
    strings = list(cols[-1])
    counts = np.fromiter(cols[1], dtype=np.int64, count=len(tag_rows)) if len(cols) == 3 else None
    if len(ids) == 0:
        return np.zeros(0, np.int64), [], None, len(pids)
    pos = np.searchsorted(ids, pids)
    found = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == pids)
    missing = int((~found).sum())
    if missing:
        pos = pos[found]
        strings = [s for s, f in zip(strings, found.tolist()) if f]
        counts = counts[found] if counts is not None else None
    return pos, strings, counts, missing


def read_hakubooru_db(path: str | Path, *, id_ranges: Sequence[tuple[int, int]] | None = None,
                      progress: bool = True, chunk_posts: int = 100_000) -> tuple[list[Normalized], dict]:
    """Read a HakuBooru SQLite DB; id_ranges (half-open [lo, hi) pairs) limits what is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    con = _connect(path)
    try:
        tables = _tables(con)
        for needed in ("post", "tag"):
            if needed not in tables:
                raise SourceError(f"{path}: no {needed!r} table: not a HakuBooru danbooru2023 DB")
        storage = detect_tag_storage(con)
        text_expr = _text_expr(con) if storage == "text" else ""
        tags = TagTable.from_sqlite(con)
        lo, hi, n = con.execute('SELECT min("id"), max("id"), count(*) FROM "post"').fetchone()
    finally:
        con.close()
    windows = _windows(lo or 0, hi or 0, n, chunk_posts, id_ranges)
    stats = {"format": "hakubooru-sqlite", "tag_storage": storage, "records": 0,
             "accepted": 0, "rejected": 0, "tags_in_tag_table": tags.n,
             # post ids (inside the windows read) that have tag rows but no post row
             "tag_rows_of_unknown_posts": 0, "rating_scheme": "hakubooru 0..3 (g, s, q, e)",
             "pre_2022_s_safe": None}  # not applicable: HakuBooru stores 0..3, not letters
    list_re = RELATION_LIST_RE if storage == "relation" else TEXT_LIST_RE
    parts: list[Normalized] = []
    fetch = _Fetcher(path, storage, text_expr)
    # the row tuples of a window are short-lived and never cyclic: spare the cyclic GC scans
    gc_was_enabled = gc.isenabled()
    gc.disable()
    bar = tqdm(total=n if id_ranges is None else None, desc=f"reading {path.name}",
               unit="post", disable=not progress, smoothing=0.1)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(fetch, windows[0]) if windows else None
            for k in range(len(windows)):
                rows, tag_rows = pending.result()
                pending = pool.submit(fetch, windows[k + 1]) if k + 1 < len(windows) else None
                if not rows:
                    continue
                part, missing = _window_table(rows, tag_rows, storage, list_re, tags)
                del rows, tag_rows
                parts.append(part)
                stats["tag_rows_of_unknown_posts"] += missing
                stats["records"] += len(part.posts) + len(part.rejects)
                stats["accepted"] += len(part.posts)
                stats["rejected"] += len(part.rejects)
                bar.update(len(part.posts) + len(part.rejects))
    finally:
        bar.close()
        fetch.close()
        if gc_was_enabled:
            gc.enable()
    return parts, stats


def _window_table(rows: list, tag_rows: list, storage: str, list_re: str,
                  tags: TagTable) -> tuple[Normalized, int]:
    cols = list(zip(*rows))
    ids = np.fromiter(cols[0], dtype=np.int64, count=len(cols[0]))
    raw = raw_posts([f"id {i}" for i in cols[0]], dict(zip(POST_FIELDS, cols)))
    errors: dict[int, str] = {}
    missing = 0
    if storage != "none":
        pos, strings, counts, missing = _place_tag_rows(ids, tag_rows)
        pos, strings, counts = _drop_broken(pos, strings, counts, list_re, errors)
        values, counts = parse_token_lists(strings, 10 if storage == "relation" else 36, counts)
        raw.tags = tags.lists(len(ids), np.repeat(pos, counts), values, errors)
    raw.tag_errors = errors
    return normalize(raw, rating_codes), missing


def _drop_broken(pos: np.ndarray, strings: list, counts: np.ndarray | None, pattern: str,
                 errors: dict[int, str]) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Keep well-formed tag strings; a malformed one marks its post (null counts as empty)."""
    arr = pa.array(strings, type=pa.string())
    ok = pc.fill_null(pc.match_substring_regex(arr, pattern), True).to_numpy(zero_copy_only=False)
    if ok.all():
        if arr.null_count:
            strings = [s if s is not None else "" for s in strings]
        return pos, strings, counts
    keep_str = []
    for p, s, good in zip(pos.tolist(), strings, ok.tolist()):
        if good:
            keep_str.append(s or "")
        else:
            errors.setdefault(p, f"broken tag list: {s[:60]!r}")
    return pos[ok], keep_str, counts[ok] if counts is not None else None
