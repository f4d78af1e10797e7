"""The same posts in every metadata form danbooru2023 users hold, made from one HakuBooru DB.

- `dump_tables(db, out_dir)`: HakuBooru's tables as parquet, one file per SQLite table named
  after it (post.parquet, tag.parquet, posttagrelation.parquet), columns and values as in
  the DB (integer rating 0..3, tag type 0..4, tags only in the relation table); rows can be
  shuffled to show a reader does not rely on the file order;
- `write_duckdb(tables_dir, path)`: those parquet tables imported into a DuckDB file;
- `danbooru_records(jsonl)` / `write_jsonl` / `write_danbooru_parquet`: Danbooru API records
  (from the sample's posts.jsonl) rewritten with tags listed in a scrambled order, dates in
  the ` UTC` style of the older exports, as JSON lines or as a Danbooru-field parquet.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("post", "tag", "posttagrelation")
TAG_FIELDS = tuple(f"tag_string_{c}" for c in ("general", "artist", "character", "copyright", "meta"))


def _sql_table(con: sqlite3.Connection, table: str) -> pa.Table:
    cur = con.execute(f'SELECT * FROM "{table}" ORDER BY rowid')
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    types = {r[1]: r[2].upper() for r in con.execute(f'PRAGMA table_info("{table}")')}
    columns = {}
    for k, name in enumerate(names):
        values = [r[k] for r in rows]
        kind = pa.int64() if types[name] == "INTEGER" else pa.string()
        want = int if kind == pa.int64() else str
        # a value of another type (SQLite is dynamically typed; the sample plants some) cannot
        # sit in a typed parquet column: it becomes null, and its record is still rejected
        columns[name] = pa.array([v if isinstance(v, want) else None for v in values], type=kind)
    return pa.table(columns)


def dump_tables(db: str | Path, out_dir: str | Path, *, shuffle_seed: int | None = None,
                row_group_size: int | None = None) -> Path:
    """Write the DB's post, tag and posttagrelation tables as <table>.parquet under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        present = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in TABLES:
            if table not in present:
                continue
            data = _sql_table(con, table)
            if shuffle_seed is not None and data.num_rows > 1:
                order = list(range(data.num_rows))
                random.Random(shuffle_seed).shuffle(order)
                data = data.take(pa.array(order))
            pq.write_table(data, out_dir / f"{table}.parquet", row_group_size=row_group_size)
    finally:
        con.close()
    return out_dir


def write_duckdb(tables_dir: str | Path, path: str | Path) -> Path:
    """The parquet tables of tables_dir as tables of a new DuckDB database file."""
    import duckdb

    path = Path(path)
    if path.exists():
        path.unlink()
    con = duckdb.connect(str(path))
    try:
        for table in TABLES:
            src = Path(tables_dir) / f"{table}.parquet"
            if src.is_file():
                con.execute(f"CREATE TABLE \"{table}\" AS SELECT * FROM read_parquet(?)", [str(src)])
    finally:
        con.close()
    return path


def utc_style(created_at: str) -> str:
    """`2010-12-31T23:30:00.000-05:00` -> `2011-01-01 04:30:00.000 UTC` (older exports' style)."""
    when = dt.datetime.fromisoformat(created_at).astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d} UTC"


def danbooru_records(jsonl: str | Path, *, seed: int = 0, utc_dates: bool = False) -> list[dict]:
    """The well-formed records of a Danbooru JSON lines file, tags in a scrambled order."""
    rng = random.Random(seed)
    records = []
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "tag_string_general" not in rec:
            continue
        for field in TAG_FIELDS:
            tags = rec[field].split()
            rng.shuffle(tags)
            rec[field] = " ".join(tags)
        if utc_dates:
            rec["created_at"] = utc_style(rec["created_at"])
        records.append(rec)
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


def write_danbooru_parquet(path: str | Path, records: list[dict], *, tag_lists: bool = False) -> Path:
    """A Danbooru-field parquet; tag_lists: tags as list columns instead of strings."""
    rows = [{**r, **({f: r[f].split() for f in TAG_FIELDS} if tag_lists else {})} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return Path(path)
