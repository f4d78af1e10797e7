"""Danbooru's own post records (API pages / official dumps as JSON lines, parquet exports).

Fields used: id, created_at, rating, fav_count, score, image_width, image_height, file_ext,
file_size, md5, file_url, is_deleted, is_banned and tag_string_general / _artist /
_character / _copyright / _meta (space separated; a parquet export may hold lists instead).
is_flagged / is_pending are ignored. Missing md5 / file_url (restricted posts) are kept.

Ratings: g/s/q/e or the full words. Before May 2022 Danbooru had no `g` and `s` meant SAFE.
`detect_old_safe` decides per file (rule in its docstring); old `s` is read as general.
"""
from __future__ import annotations

import gzip
import itertools
import json
import zlib
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from kxl_prep.schema import TAG_CATEGORIES, TAG_COLUMNS
from kxl_prep.sources.errors import SourceError
from kxl_prep.sources.records import SOURCE_FIELDS, Normalized, RawPosts, normalize, rating_words_or_letters, raw_posts

TAG_FIELDS = {col: f"tag_string_{cat}" for col, cat in zip(TAG_COLUMNS, TAG_CATEGORIES)}
RATING_SWITCH_DATE = "2022-05-01"  # Danbooru introduced g (general) and s = sensitive


class RatingEvidence:
    """What a file shows about its rating scheme, gathered chunk by chunk."""

    def __init__(self) -> None:
        self.letters: set[str] = set()
        self.newest = ""

    def update(self, ratings: list, created_at: list) -> None:
        self.letters |= {r.lower() for r in set(r for r in ratings if isinstance(r, str))}
        newest = max((c[:10] for c in created_at if isinstance(c, str)), default="")
        self.newest = max(self.newest, newest)

    def decide(self) -> tuple[bool, str]:
        """Is this file from before Danbooru's May 2022 rating change (`s` = safe)?

        Rule: the file holds at least one `s`, no `g` at all, and no record created on or
        after 2022-05-01 (date as written). A file of posts made after the change cannot be
        old, and a post-change file of any size holds `g` unless it was filtered to exclude
        general posts, which is why the date condition is needed too. The word `safe`
        always means general.
        """
        if "s" not in self.letters:
            return False, "no 's' rating in the file"
        if "g" in self.letters or "general" in self.letters:
            return False, "the file uses 'g' (current scheme: s = sensitive)"
        if self.newest >= RATING_SWITCH_DATE:
            return False, f"'s' without 'g', but records from {self.newest} postdate the May 2022 change"
        return True, f"'s' without any 'g' and every record before {RATING_SWITCH_DATE}: s = safe"


def detect_old_safe(ratings: list, created_at: list) -> tuple[bool, str]:
    """RatingEvidence.decide over one list of ratings and creation dates."""
    ev = RatingEvidence()
    ev.update(ratings, created_at)
    return ev.decide()


def _tag_value(v) -> tuple[list[str] | None, str | None]:
    if v is None:
        return [], None
    if isinstance(v, str):
        return v.split(), None
    if isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v):
        return list(v), None
    return None, f"broken tag list: {v!r}"[:120]


def _collect(records: Iterator[tuple[str, object, str | None]]) -> RawPosts:
    """records yields (label, record, None) or (label, None, why it could not be read)."""
    raw = raw_posts([], {src: [] for src in SOURCE_FIELDS.values()})
    raw.tags = {col: [] for col in TAG_COLUMNS}
    for label, rec, error in records:
        i = len(raw.labels)
        raw.labels.append(label)
        if error is None and not isinstance(rec, dict):
            error = f"not a JSON object: {rec!r}"[:120]
        if error is not None:
            raw.record_errors[i] = ("record", error)
            rec = {}
        for k, src in SOURCE_FIELDS.items():
            getattr(raw, k).append(rec.get(src))
        for col, src in TAG_FIELDS.items():
            tags, err = _tag_value(rec.get(src))
            raw.tags[col].append(tags if tags is not None else [])
            if err and i not in raw.tag_errors:
                raw.tag_errors[i] = err
    return raw


def _json_records(path: Path, progress: bool) -> Iterator[tuple[str, object, str | None]]:
    try:
        yield from _json_records_of(path, progress)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut or damaged .gz: the whole file, not a record
        raise SourceError(f"{path}: the compressed file is truncated or corrupt ({e}); download it again") from None


def _json_records_of(path: Path, progress: bool) -> Iterator[tuple[str, object, str | None]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    # bytes, decoded line by line: one bad line is one reject, not a stopped run
    with opener(path, "rb") as fh:
        head = fh.read(4096)
        fh.seek(0)
        if head.lstrip().startswith(b"["):  # one JSON array (an API page)
            try:
                data = json.loads(fh.read())
            except ValueError as e:
                raise SourceError(f"{path}: not valid JSON: {e}") from e
            for k, rec in enumerate(data):
                yield f"record {k}", rec, None
            return
        for n, line in enumerate(tqdm(fh, desc=f"reading {path.name}", unit="line",
                                      disable=not progress, smoothing=0.1), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line), None
            except json.JSONDecodeError as e:
                if not line.endswith(b"\n") and line.lstrip().startswith(b"{"):
                    # the last line, cut mid-record: the file was truncated (a partial download)
                    raise SourceError(f"{path}: line {n} ends the file in the middle of a record "
                                      f"({e.msg}): the file looks truncated; download it again") from None
                yield f"line {n}", None, f"invalid JSON: {e.msg}"
            except UnicodeDecodeError:
                yield f"line {n}", None, "not UTF-8 text"


def _parquet_records(path: Path, progress: bool) -> Iterator[tuple[str, object, str | None]]:
    pf = pq.ParquetFile(path)
    wanted = [c for c in list(SOURCE_FIELDS.values()) + list(TAG_FIELDS.values())
              if c in pf.schema_arrow.names]
    row = 0
    with tqdm(total=pf.metadata.num_rows, desc=f"reading {path.name}", unit="row",
              disable=not progress) as bar:
        for batch in pf.iter_batches(batch_size=100_000, columns=wanted):
            for rec in batch.to_pylist():
                row += 1
                yield f"row {row}", rec, None
            bar.update(batch.num_rows)


CHUNK_RECORDS = 100_000  # records validated at a time: memory stays flat on full dumps


def read_danbooru(path: str | Path, fmt: str, *, progress: bool = True,
                  rating_scheme: str = "auto") -> tuple[list[Normalized], dict]:
    """Read Danbooru records from JSON (lines / array / .gz) or parquet.

    rating_scheme: "auto" (detect per file), "current" (s = sensitive) or "pre-2022" (s = safe).
    Records are validated in chunks; `s` stays undecided until the whole file is seen.
    """
    if rating_scheme not in ("auto", "current", "pre-2022"):
        raise ValueError(f"rating_scheme must be auto, current or pre-2022, not {rating_scheme!r}")
    path = Path(path)
    records = _json_records(path, progress) if fmt == "json" else _parquet_records(path, progress)
    evidence = RatingEvidence()
    parts: list[Normalized] = []
    n_records = 0
    while True:
        chunk = list(itertools.islice(records, CHUNK_RECORDS))
        if not chunk:
            break
        raw = _collect(chunk)
        del chunk
        evidence.update(raw.rating, raw.created_at)
        parts.append(normalize(raw, lambda values: rating_words_or_letters(values, None)))
        n_records += len(raw)
    if rating_scheme == "auto":
        old, why = evidence.decide()
    else:
        old, why = rating_scheme == "pre-2022", f"set by the caller: {rating_scheme}"
    parts = [_resolve_s(part, "general" if old else "sensitive") for part in parts]
    stats = {"format": "danbooru-jsonl" if fmt == "json" else "danbooru-parquet",
             "records": n_records, "accepted": sum(p.posts.num_rows for p in parts),
             "rejected": sum(len(p.rejects) for p in parts),
             "pre_2022_s_safe": old, "rating_scheme_rule": why}
    return parts, stats


def _resolve_s(part: Normalized, meaning: str) -> Normalized:
    """Replace the undecided rating `s` by what the file's scheme says it means."""
    i = part.posts.schema.get_field_index("rating")
    col = part.posts.column(i)
    fixed = pc.if_else(pc.equal(col, "s"), pa.scalar(meaning, col.type), col)
    return Normalized(posts=part.posts.set_column(i, "rating", fixed), rejects=part.rejects)
