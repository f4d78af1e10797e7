"""The one normalized post table every source is read into.

Each source reader (HakuBooru SQLite, Danbooru JSON lines, parquet) returns a pandas
DataFrame with exactly these columns and dtypes, plus a list of rejects. Everything
downstream (selection, captions, buckets, export) reads only this table.
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

RATINGS = ("general", "sensitive", "questionable", "explicit")
TAG_CATEGORIES = ("general", "artist", "character", "copyright", "meta")
TAG_COLUMNS = tuple(f"tags_{c}" for c in TAG_CATEGORIES)

# column -> pyarrow type. Tag names are Danbooru's (underscores kept, lower case). The
# readers hand the tag columns over dictionary-encoded (kxl_prep.sources.TAG_LIST_TYPE,
# list<dictionary<int32, string>>): each name is stored once, which keeps 7.6M posts within
# the memory budget; an element still reads as a list of str. Downstream code accepts both.
POSTS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("created_at", pa.string()),  # ISO 8601 text exactly as in the record, with its offset
        ("year", pa.int16()),  # year of created_at in the record's own offset
        ("rating", pa.string()),  # one of RATINGS
        ("fav_count", pa.int64()),
        ("score", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("file_ext", pa.string()),  # lower case, no dot; may be null
        ("file_size", pa.int64()),
        ("md5", pa.string()),  # null for restricted (gold-only) posts
        ("file_url", pa.string()),  # null for restricted posts
        ("is_deleted", pa.bool_()),
        ("is_banned", pa.bool_()),
        *[(col, pa.list_(pa.string())) for col in TAG_COLUMNS],
    ]
)
POSTS_COLUMNS = tuple(POSTS_SCHEMA.names)

# Rejects: one row per malformed record, never silently dropped.
REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # file the record came from
        ("record", pa.string()),  # record id as text, or "line N" / "row N" when the id is missing
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)


def empty_rejects() -> pd.DataFrame:
    return REJECTS_SCHEMA.empty_table().to_pandas()
