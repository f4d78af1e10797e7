"""Validate raw post fields (one Python list per field) into POSTS_SCHEMA columns.

Every source reader gathers its records into `RawPosts` (lists, one value per record, as
read) and calls `normalize`. A record with a malformed field becomes one reject row naming
the record, the first bad field (in the order of FIELD_ORDER) and the reason; it never stops
the run. Restricted posts (no md5 / file_url) are NOT malformed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kxl_prep.schema import POSTS_SCHEMA, RATINGS, TAG_COLUMNS

# ISO 8601 date, optional time (seconds, fraction), optional zone; "T" or a space between
# date and time. Zones: an offset (+09:00, -0500, +08), "Z", or " UTC" (the style of the
# older danbooru20xx exports: "2013-03-21 23:01:00.000 UTC"); no zone means UTC. Hours,
# minutes and seconds are range-checked here; the calendar date in _dates.
DATE_RE = (r"^\d{4}-\d{2}-\d{2}"
           r"([T ]([01]\d|2[0-3]):[0-5]\d(:([0-5]\d|60)(\.\d+)?)?)?"
           r"(Z| UTC|[+-]([01]\d|2[0-3])(:?[0-5]\d)?)?$")

# The post fields every reader gathers, spelled once: RawPosts field -> its name in the
# source records (Danbooru's API records and HakuBooru's post table use the same names).
SOURCE_FIELDS = {
    "id": "id", "created_at": "created_at", "rating": "rating", "fav_count": "fav_count",
    "score": "score", "width": "image_width", "height": "image_height", "file_ext": "file_ext",
    "file_size": "file_size", "md5": "md5", "file_url": "file_url",
    "is_deleted": "is_deleted", "is_banned": "is_banned",
}
INT_FIELDS = ("width", "height", "file_size", "fav_count", "score")
NON_NEGATIVE = ("width", "height", "file_size", "fav_count")
# which bad field a reject names when a record has several (the fields and "tags")
FIELD_ORDER = ("id", "created_at", "rating", "width", "height", "file_size", "fav_count",
               "score", "file_ext", "md5", "file_url", "is_deleted", "is_banned", "tags")

RATING_WORDS = {r: r for r in RATINGS}
TEXT = pa.large_string()


@dataclass
class RawPosts:
    """Fields as read, one list entry per record (those of SOURCE_FIELDS, in its order).
    `labels` name records that lack an id."""

    labels: list[str]
    id: list
    created_at: list
    rating: list
    fav_count: list
    score: list
    width: list
    height: list
    file_ext: list
    file_size: list
    md5: list
    file_url: list
    is_deleted: list
    is_banned: list
    # tags: either lists of names per category, or errors found while reading them
    # TAG_COLUMNS -> list of name lists, or a pyarrow ListArray of strings
    tags: dict[str, object] = field(default_factory=dict)
    tag_errors: dict[int, str] = field(default_factory=dict)  # record index -> reason
    # records that could not be read at all (bad JSON...): index -> (field, reason)
    record_errors: dict[int, tuple[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def raw_posts(labels: list[str], values: dict[str, Sequence]) -> RawPosts:
    """RawPosts from one list per field, keyed by the field's name in the source records."""
    return RawPosts(labels=labels, **{name: values[src] for name, src in SOURCE_FIELDS.items()})


@dataclass
class Normalized:
    posts: pa.Table  # TABLE_SCHEMA
    rejects: list[tuple[str, str, str]]  # (record, field, reason)


def _types(values) -> set:
    """The set of value types (a C-speed scan, no Python call per value)."""
    return set(map(type, values))


def _int_column(values: list) -> tuple[np.ndarray, dict[int, str]]:
    """int64 array (0 where bad) and {index: reason} for values that are not integers."""
    try:
        if _types(values) <= {int}:
            return np.fromiter(values, dtype=np.int64, count=len(values)), {}
    except OverflowError:
        pass
    out = np.zeros(len(values), dtype=np.int64)
    bad: dict[int, str] = {}
    for i, v in enumerate(values):
        if type(v) is int and -(2**63) <= v < 2**63:
            out[i] = v
        elif isinstance(v, float) and v.is_integer():
            out[i] = int(v)
        elif v is None:
            bad[i] = "missing"
        else:
            bad[i] = f"not an integer: {v!r}"
    return out, bad


def _bool_column(values: list) -> tuple[np.ndarray, dict[int, str]]:
    """True/False/0/1 (missing counts as False: Danbooru omits nothing, other sources may)."""
    if _types(values) <= {bool}:
        return np.fromiter(values, dtype=bool, count=len(values)), {}
    out = np.zeros(len(values), dtype=bool)
    bad: dict[int, str] = {}
    for i, v in enumerate(values):
        if v is None or v is False or v == 0 and type(v) is int:
            continue
        if v is True or (type(v) is int and v == 1):
            out[i] = True
        elif isinstance(v, str) and v.lower() in ("true", "false", "t", "f", "0", "1"):
            out[i] = v.lower() in ("true", "t", "1")
        else:
            bad[i] = f"not a boolean: {v!r}"
    return out, bad


def _text_column(values: list, lower: bool = False) -> tuple[pa.Array, dict[int, str]]:
    """Strings, '' and None become null."""
    bad: dict[int, str] = {}
    if not _types(values) <= {str, type(None)}:
        fixed = []
        for i, v in enumerate(values):
            if v is None or isinstance(v, str):
                fixed.append(v)
            else:
                bad[i] = f"not a string: {v!r}"
                fixed.append(None)
        values = fixed
    arr = pa.array(values, type=TEXT)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, TEXT), arr)
    if lower:
        arr = pc.utf8_lower(arr)
    return arr, bad


def _dates(values: list) -> tuple[pa.Array, np.ndarray, dict[int, str]]:
    """created_at as text and its year in the record's own offset (the first 4 digits)."""
    arr, bad = _text_column(values)
    ok = pc.fill_null(pc.match_substring_regex(arr, DATE_RE), False).to_numpy(zero_copy_only=False)
    safe = pc.if_else(pa.array(ok), arr, pa.scalar("1970-01-01", TEXT))
    year = pc.cast(pc.utf8_slice_codeunits(safe, 0, 4), pa.int32()).to_numpy()
    month = pc.cast(pc.utf8_slice_codeunits(safe, 5, 7), pa.int32()).to_numpy()
    day = pc.cast(pc.utf8_slice_codeunits(safe, 8, 10), pa.int32()).to_numpy()
    month_ok = (month >= 1) & (month <= 12)
    mdays = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 1, 12) - 1]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    mdays = mdays + ((month == 2) & leap)
    valid = ok & month_ok & (day >= 1) & (day <= mdays) & (year >= 1000)
    if ok.all() and valid.all():
        return arr, year.astype(np.int16), bad
    texts = arr.to_pylist()
    for i in np.flatnonzero(~valid).tolist():
        if i in bad:
            continue
        v = texts[i]
        bad[i] = "missing" if v is None else f"not an ISO 8601 date: {v!r}"
    return arr, np.where(valid, year, 0).astype(np.int16), bad


def normalize(raw: RawPosts, rating_of: Callable[[list], tuple[list, dict[int, str]]]) -> Normalized:
    """Validate `raw` into the normalized table; `rating_of` maps raw ratings to RATINGS."""
    n = len(raw)
    problems: dict[str, dict[int, str]] = {}
    ids, problems["id"] = _int_column(raw.id)
    for i in np.flatnonzero(ids <= 0).tolist():
        problems["id"].setdefault(i, f"not a positive id: {ids[i]}")
    created, year, problems["created_at"] = _dates(raw.created_at)
    ratings, problems["rating"] = rating_of(raw.rating)
    ints = {}
    for name in INT_FIELDS:
        ints[name], problems[name] = _int_column(getattr(raw, name))
        if name in NON_NEGATIVE:
            for i in np.flatnonzero(ints[name] < 0).tolist():
                problems[name].setdefault(i, f"negative: {int(ints[name][i])}")
    file_ext, problems["file_ext"] = _text_column(raw.file_ext, lower=True)
    file_ext = pc.utf8_ltrim(file_ext, ".")
    md5, problems["md5"] = _text_column(raw.md5)
    file_url, problems["file_url"] = _text_column(raw.file_url)
    deleted, problems["is_deleted"] = _bool_column(raw.is_deleted)
    banned, problems["is_banned"] = _bool_column(raw.is_banned)
    problems["tags"] = raw.tag_errors

    first_bad: dict[int, tuple[str, str]] = dict(raw.record_errors)
    for name in FIELD_ORDER:
        for i, reason in problems.get(name, {}).items():
            if i not in first_bad:
                first_bad[i] = (SOURCE_FIELDS.get(name, name), reason)
    rejects = []
    for i in sorted(first_bad):
        label = raw.labels[i] if i in problems["id"] or i in raw.record_errors else str(raw.id[i])
        rejects.append((label, *first_bad[i]))

    keep = np.ones(n, dtype=bool)
    if first_bad:
        keep[list(first_bad)] = False
    columns = {
        "id": ids,
        "created_at": created,
        "year": year,
        "rating": pa.array(ratings, type=TEXT),
        "fav_count": ints["fav_count"],
        "score": ints["score"],
        "width": ints["width"].astype(np.int32),
        "height": ints["height"].astype(np.int32),
        "file_ext": file_ext,
        "file_size": ints["file_size"],
        "md5": md5,
        "file_url": file_url,
        "is_deleted": deleted,
        "is_banned": banned,
    }
    for col in TAG_COLUMNS:
        columns[col] = tag_array(raw.tags.get(col), n)
    table = pa.table(columns, schema=TABLE_SCHEMA)
    if not keep.all():
        table = table.filter(pa.array(keep))
    return Normalized(posts=table, rejects=rejects)


# Tag names are dictionary-encoded: a post's ~30 tags cost 4 bytes each instead of a copy of
# every name (7.6M posts: ~1 GB instead of ~3.4 GB). Elements still read as lists of str.
TAG_LIST_TYPE = pa.list_(pa.dictionary(pa.int32(), pa.string()))
TAG_DTYPE = pd.ArrowDtype(TAG_LIST_TYPE)
# POSTS_SCHEMA with the tag type above, and text as large_string: what pandas' `str` dtype
# holds, so the conversion to pandas takes the buffers as they are instead of copying them.
TABLE_SCHEMA = pa.schema([
    pa.field(f.name, TAG_LIST_TYPE) if f.name in TAG_COLUMNS
    else pa.field(f.name, TEXT) if f.type == pa.string() else f
    for f in POSTS_SCHEMA
])


def tag_array(lists, n: int) -> pa.Array:
    """One tag column as list<dictionary<int32, string>> from name lists or a ListArray.

    Lists already of TAG_LIST_TYPE are taken as they are (the HakuBooru readers order them
    themselves); any other list is put in Danbooru's tag_string order: sorted by name (byte
    order, as Danbooru sorts), a name twice on a post kept once. So a JSON record that lists
    its tags in another order captions exactly like the same post read from the database.
    """
    if lists is None:
        lists = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    elif not isinstance(lists, pa.Array):
        lists = pa.array(lists, type=pa.list_(pa.string()))
    if lists.type == TAG_LIST_TYPE:
        return lists
    return sorted_tag_lists(lists)


def sorted_tag_lists(lists: pa.ListArray) -> pa.ListArray:
    """Each list sorted by name and without repeats, dictionary-encoded (vectorized)."""
    if lists.offset or lists.null_count:
        lists = pa.array(lists.to_pylist(), type=pa.list_(pa.string()))  # rare: a sliced or null list
    offsets = lists.offsets.to_numpy()
    values = lists.flatten().cast(pa.string())
    encoded = pc.dictionary_encode(values)
    names = encoded.dictionary
    n_names = max(len(names), 1)
    # rank of each distinct name in byte order, then one integer key per (list, name)
    by_rank = pc.sort_indices(names).to_numpy().astype(np.int32)  # rank -> dictionary index
    rank = np.empty(len(names), dtype=np.int64)
    rank[by_rank] = np.arange(len(names))
    parent = np.repeat(np.arange(len(lists), dtype=np.int64), np.diff(offsets))
    key = parent * n_names + rank[encoded.indices.to_numpy()]
    key.sort()
    if len(key) > 1:
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    counts = np.bincount(key // n_names, minlength=len(lists))
    new_offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(counts, out=new_offsets[1:])
    dict_values = pa.DictionaryArray.from_arrays(pa.array(by_rank[key % n_names]), names)
    return pa.ListArray.from_arrays(pa.array(new_offsets), dict_values)


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """The posts table as pandas: tag columns ArrowDtype (zero copy), the rest as POSTS_SCHEMA."""
    tags = {col: table.column(col) for col in TAG_COLUMNS}
    df = table.drop_columns(list(TAG_COLUMNS)).to_pandas()
    for col in TAG_COLUMNS:
        df[col] = pd.Series(pd.arrays.ArrowExtensionArray(tags[col]), dtype=TAG_DTYPE, index=df.index)
    return df[list(POSTS_SCHEMA.names)]


def rating_words_or_letters(values: Sequence, old_s_is_safe: bool | None) -> tuple[list, dict[int, str]]:
    """Danbooru ratings: g/s/q/e or full words; with old_s_is_safe, `s` means general.

    old_s_is_safe=None leaves `s` as "s", for the caller to resolve once the file is read.
    """
    s_means = {True: "general", False: "sensitive", None: "s"}[old_s_is_safe]
    letters = {"g": "general", "s": s_means, "q": "questionable", "e": "explicit",
               "safe": "general", **RATING_WORDS}
    out: list = []
    bad: dict[int, str] = {}
    for i, v in enumerate(values):
        r = letters.get(v.lower()) if isinstance(v, str) else None
        if r is None:
            bad[i] = "missing" if v is None else f"unknown rating: {v!r}"[:120]
        out.append(r)
    return out, bad


_RATING_OBJECTS = np.array(RATINGS, dtype=object)


def rating_codes(values: Sequence) -> tuple[list, dict[int, str]]:
    """HakuBooru's DB stores ratings as 0..3 = general, sensitive, questionable, explicit."""
    bad: dict[int, str] = {}
    if _types(values) <= {int}:
        codes = np.fromiter(values, dtype=np.int64, count=len(values))
        if ((codes >= 0) & (codes < 4)).all():
            return _RATING_OBJECTS[codes].tolist(), bad
    out: list = []
    for i, v in enumerate(values):
        if type(v) is int and 0 <= v < 4:
            out.append(RATINGS[v])
        elif isinstance(v, str) and v.lower() in RATING_WORDS:
            out.append(v.lower())
        else:
            bad[i] = "missing" if v is None else f"unknown rating: {v!r}"
            out.append(None)
    return out, bad
