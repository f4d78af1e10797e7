"""`kxl fetch metadata`: HakuBooru's post / tag tables, in a form `kxl-prep prepare` reads as is.

Repositories (datasets on the hub):
- KBlueLeaf/danbooru2023-sqlite: the SQLite database the Epsilon card names. The file name
  `danbooru2023.db` is what HakuBooru's example loads (./data/danbooru2023.db); that it is the
  file's name in this repository is an assumption, so the file is picked from the listing:
  `danbooru2023.db` if present, else the only SQLite file there.
- KBlueLeaf/danbooru2023-metadata-database (gated): the same tables as SQLite (.db, with and
  without indexes), as parquet (one file per table, named after it: post.parquet, tag.parquet,
  posttagrelation.parquet) and as DuckDB (.duckdb, with and without indexes), per its card.
  Only `danbooru2023.db` is a name seen in public code; the others are found by those rules.
Where a rule finds several candidates (e.g. the with- and without-index files), the fetch
stops and lists them; `--file` picks one.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from kxl_prep.sources.hakubooru_parquet import POST_FILE, RELATION_FILE, TAG_FILE

from .hub import FetchError, Placement, Snapshot

SQLITE_REPO = "KBlueLeaf/danbooru2023-sqlite"
DATABASE_REPO = "KBlueLeaf/danbooru2023-metadata-database"
DEFAULT_REPO = {"sqlite": SQLITE_REPO, "parquet": DATABASE_REPO, "duckdb": DATABASE_REPO}
SUFFIXES = {"sqlite": (".db", ".sqlite", ".sqlite3"), "duckdb": (".duckdb", ".ddb")}
PREFERRED = {"sqlite": "danbooru2023.db", "duckdb": "danbooru2023.duckdb"}
TABLE_FILES = (POST_FILE, TAG_FILE, RELATION_FILE)


def _name(path: str) -> str:
    return PurePosixPath(path).name


def _one(snap: Snapshot, candidates: list[str], what: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FetchError(f"{snap.label}: no {what} in the repository "
                         f"(it holds {_listing(snap)}); pick files with --file")
    raise FetchError(f"{snap.label}: several {what}: {', '.join(sorted(candidates))}; pick one with --file")


def _listing(snap: Snapshot) -> str:
    names = sorted(snap.files)
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "nothing"


def plan(snap: Snapshot, form: str, files: tuple[str, ...] = ()) -> list[Placement]:
    """The repository files of `form` to fetch, each placed under its own name."""
    if files:
        missing = [f for f in files if f not in snap.files]
        if missing:
            raise FetchError(f"{snap.label}: no file {', '.join(missing)} (it holds {_listing(snap)})")
        chosen = list(files)
    elif form == "parquet":
        chosen = [_one(snap, [p for p in snap.files if _name(p) == table], table) for table in TABLE_FILES]
    else:
        candidates = [p for p in snap.files if p.lower().endswith(SUFFIXES[form])]
        preferred = [p for p in candidates if _name(p) == PREFERRED[form]]
        chosen = [_one(snap, preferred or candidates, f"{form} database file")]
    names = [_name(p) for p in chosen]
    if len(set(names)) != len(names):
        raise FetchError(f"{snap.label}: files with the same name would overwrite each other: {', '.join(chosen)}")
    return [Placement(snap.files[p], _name(p)) for p in chosen]


def prepare_input(target: Path, form: str, placements: list[Placement]) -> Path:
    """What to pass to `kxl-prep prepare`: the folder for parquet tables, else the database file."""
    names = {p.name for p in placements}
    if form == "parquet" or POST_FILE in names:
        return target
    return target / placements[0].name
