"""HakuBooru's danbooru2023 tables in a DuckDB database file -> the normalized post table.

The same tables as the SQLite DB and its parquet form (post, tag, posttagrelation), e.g. the
parquet files imported into DuckDB. Read through the parquet reader's code
(kxl_prep.sources.hakubooru_parquet.read_hakubooru_tables), so the result is the SQLite
reader's table. Needs the optional `duckdb` package (`pip install duckdb`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa

from kxl_prep.sources.errors import SourceError
from kxl_prep.sources.hakubooru_parquet import BATCH_ROWS, read_hakubooru_tables
from kxl_prep.sources.records import Normalized

DUCKDB_MAGIC = b"DUCK"  # at byte 8 of a DuckDB database file


def is_duckdb_file(head: bytes) -> bool:
    return head[8:12] == DUCKDB_MAGIC


class DuckDBTables:
    """Table access for read_hakubooru_tables, over a read-only DuckDB connection."""

    kind = "hakubooru-duckdb"

    def __init__(self, path: Path):
        try:
            import duckdb
        except ImportError as exc:
            raise SourceError(f"{path}: a DuckDB database; reading it needs the duckdb package "
                              f"(pip install duckdb)") from exc
        self.path = path
        self.con = duckdb.connect(str(path), read_only=True)
        self.tables = {r[0] for r in self.con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
        if "post" not in self.tables:
            self.close()
            raise SourceError(f"{path}: a DuckDB database without a 'post' table (tables: "
                              f"{', '.join(sorted(self.tables)) or 'none'}); expected HakuBooru's post, tag "
                              f"and posttagrelation tables")

    def has(self, table: str) -> bool:
        return table in self.tables

    def where(self, table: str) -> str:
        return f"{self.path} (table {table})"

    def columns(self, table: str) -> list[str]:
        return [r[0] for r in self.con.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            params=[table]).fetchall()]

    def num_rows(self, table: str) -> int:
        return int(self.con.sql(f'SELECT count(*) FROM "{table}"').fetchall()[0][0])

    def batches(self, table: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
        cols = ", ".join(f'"{c}"' for c in columns)
        yield from self.con.sql(f'SELECT {cols} FROM "{table}"').to_arrow_reader(BATCH_ROWS)

    def schema(self, table: str, columns: list[str]) -> pa.Schema:
        cols = ", ".join(f'"{c}"' for c in columns)
        return self.con.sql(f'SELECT {cols} FROM "{table}" LIMIT 0').to_arrow_table().schema

    def close(self) -> None:
        self.con.close()


def read_hakubooru_duckdb(path: str | Path, *, id_ranges: Sequence[tuple[int, int]] | None = None,
                          progress: bool = True, chunk_posts: int = 100_000) -> tuple[list[Normalized], dict]:
    tables = DuckDBTables(Path(path))
    try:
        return read_hakubooru_tables(tables, id_ranges=id_ranges, progress=progress, chunk_posts=chunk_posts)
    finally:
        tables.close()
