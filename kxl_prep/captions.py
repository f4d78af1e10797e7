"""Epsilon captions: `prefix ||| general tags ||| suffix`.

- prefix (fixed at train time): people-count tags (1girl ... multiple_others, in the
  recipe's order), then character, copyright and artist tags;
- middle (shuffled and tag-dropped by sd-scripts): the other general tags;
- suffix (fixed): quality tag, year tag, meta tags (noise dropped), rating tag(s).

Tags inside a section are joined with ", "; underscores become spaces except in names of
`keep_underscores_max_len` characters or fewer (emoticons); the result is trimmed and a
tag left blank is dropped. Tags in `drop_tags`
(`banned_artist`) are never written, whatever their category. A tag containing the keep
separator itself would break the sections and is dropped (and counted).

Layout rule (always two separators, so sd-scripts finds the three sections in every case):
the tokens [prefix, "|||", middle, "|||", suffix] joined by single spaces, empty sections
left out: "1girl ||| smile ||| masterpiece, newest, safe", "||| smile ||| ...", "1girl ||| |||
...". sd-scripts' process_caption splits on the first and second "|||" and drops empty
tokens, so an empty section yields no tag.

Everything is vectorized with pyarrow compute over chunks of rows: no per-row Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from kxl_prep.recipe import CaptionSpec
from kxl_prep.schema import RATINGS, TAG_COLUMNS

STR = pa.large_string()
CHUNK_ROWS = 131_072


@dataclass
class CaptionStats:
    dropped_tags: dict[str, int] = field(default_factory=dict)  # reason -> count
    empty_prefix: int = 0
    empty_middle: int = 0

    def add(self, reason: str, count: int) -> None:
        if count:
            self.dropped_tags[reason] = self.dropped_tags.get(reason, 0) + int(count)

    def to_dict(self) -> dict:
        return {
            "dropped_tags": dict(sorted(self.dropped_tags.items())),
            "empty_prefix": self.empty_prefix,
            "empty_middle": self.empty_middle,
        }


def display_tag(name: str, keep_max_len: int = 3) -> str:
    """One tag as written in captions (the scalar form of the vectorized rule)."""
    return (name if len(name) <= keep_max_len else name.replace("_", " ")).strip()


def rating_text(spec: CaptionSpec) -> list[str]:
    return [", ".join(spec.rating.for_rating(r)) for r in RATINGS]


def year_labels(years: np.ndarray, spec: CaptionSpec) -> np.ndarray:
    """Index into spec.year.labels per year (year <= edges[i] -> i)."""
    return np.searchsorted(np.asarray(spec.year.edges), years, side="left").astype(np.int8)


class _Flat:
    """A list column cut into (row, value) pairs: the form every rule works on."""

    def __init__(self, parent: np.ndarray, values: pa.Array):
        self.parent = parent
        self.values = values

    @classmethod
    def of(cls, column: pa.Array) -> "_Flat":
        values = pc.list_flatten(column)
        parent = pc.list_parent_indices(column).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(parent, values.cast(STR))

    @classmethod
    def one_per_row(cls, values: pa.Array, rows: np.ndarray) -> "_Flat":
        return cls(rows.astype(np.int64), values.cast(STR))

    def keep(self, mask: np.ndarray) -> "_Flat":
        return _Flat(self.parent[mask], self.values.filter(pa.array(mask)))

    def map_values(self, fn) -> "_Flat":
        return _Flat(self.parent, fn(self.values))


def _merge(parts: Iterable[_Flat]) -> _Flat:
    """Row-wise concatenation: row r gets part 0's values of r, then part 1's, ..."""
    parts = [p for p in parts if len(p.parent)]
    if not parts:
        return _Flat(np.empty(0, np.int64), pa.array([], STR))
    parent = np.concatenate([p.parent for p in parts])
    values = pa.concat_arrays([p.values for p in parts])
    order = np.argsort(parent, kind="stable")  # keeps part order, then order within a part
    return _Flat(parent[order], values.take(pa.array(order)))


def _join(flat: _Flat, n_rows: int, sep: str) -> pa.Array:
    """Join each row's values with `sep` ("" for a row with none)."""
    counts = np.bincount(flat.parent, minlength=n_rows)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), flat.values)
    return pc.binary_join(lists, pa.scalar(sep, STR))


def _contains_any(values: pa.Array, needles: Iterable[str]) -> np.ndarray:
    mask = np.zeros(len(values), dtype=bool)
    for needle in needles:
        mask |= pc.match_substring(values, needle).to_numpy(zero_copy_only=False)
    return mask


class CaptionBuilder:
    def __init__(self, spec: CaptionSpec, quality_labels: Iterable[str]):
        self.spec = spec
        self.quality_labels = pa.array(list(quality_labels), STR)
        self.year_labels = pa.array(list(spec.year.labels), STR)
        self.rating_tags = [list(spec.rating.for_rating(r)) for r in RATINGS]
        self.people = pa.array(list(spec.people_count_tags), STR)
        self.drop = pa.array(list(spec.drop_tags), STR)
        self.stats = CaptionStats()

    # -- tag rules ---------------------------------------------------------------------------
    def _clean(self, flat: _Flat) -> _Flat:
        """Drop empty names, `drop_tags` and names holding the keep separator."""
        empty = pc.equal(pc.utf8_length(self._display(flat.values)), 0).to_numpy(zero_copy_only=False)
        dropped = pc.is_in(flat.values, value_set=self.drop).to_numpy(zero_copy_only=False)
        has_sep = pc.match_substring(flat.values, self.spec.keep_tokens_separator).to_numpy(
            zero_copy_only=False
        )
        self.stats.add("empty_name", empty.sum())
        self.stats.add("drop_tags", (dropped & ~empty).sum())
        self.stats.add("contains_keep_separator", (has_sep & ~dropped & ~empty).sum())
        return flat.keep(~(empty | dropped | has_sep))

    def _display(self, values: pa.Array) -> pa.Array:
        """Underscores -> spaces (names longer than keep_underscores_max_len), trimmed."""
        spaced = pc.replace_substring(values, "_", " ")
        longer = pc.greater(pc.utf8_length(values), self.spec.keep_underscores_max_len)
        return pc.utf8_trim_whitespace(pc.if_else(longer, spaced, values))

    # -- one chunk ---------------------------------------------------------------------------
    def build_chunk(
        self,
        tags: dict[str, pa.Array],
        quality_level: np.ndarray,
        rating_code: np.ndarray,
        year: np.ndarray,
    ) -> pa.Array:
        n = len(quality_level)
        general = self._clean(_Flat.of(tags["tags_general"]))
        rank = pc.index_in(general.values, value_set=self.people)
        is_people = rank.is_valid().to_numpy(zero_copy_only=False)
        people = general.keep(is_people)
        people_rank = rank.filter(pa.array(is_people)).to_numpy(zero_copy_only=False)
        order = np.lexsort((people_rank, people.parent))
        people = _Flat(people.parent[order], people.values.take(pa.array(order)))
        middle = general.keep(~is_people)

        character = self._clean(_Flat.of(tags["tags_character"]))
        copyright_ = self._clean(_Flat.of(tags["tags_copyright"]))
        artist = self._clean(_Flat.of(tags["tags_artist"]))
        meta = self._clean(_Flat.of(tags["tags_meta"]))
        noise = _contains_any(meta.values, self.spec.meta_noise)
        self.stats.add("meta_noise", noise.sum())
        meta = meta.keep(~noise)

        rows = np.arange(n, dtype=np.int64)
        quality = _Flat.one_per_row(self.quality_labels.take(pa.array(quality_level)), rows)
        has_year = year >= 0
        year_idx = year_labels(year[has_year], self.spec)
        year_flat = _Flat.one_per_row(self.year_labels.take(pa.array(year_idx)), rows[has_year])
        rating_parts = []
        for slot in range(max(len(t) for t in self.rating_tags)):
            codes = [c for c, t in enumerate(self.rating_tags) if len(t) > slot]
            sel = np.isin(rating_code, codes)
            names = pa.array([t[slot] if len(t) > slot else "" for t in self.rating_tags], STR)
            rating_parts.append(_Flat.one_per_row(names.take(pa.array(rating_code[sel])), rows[sel]))
        rating = _merge(rating_parts)

        prefix = _merge(
            [people.map_values(self._display), *(f.map_values(self._display) for f in (character, copyright_, artist))]
        )
        middle = middle.map_values(self._display)
        suffix = _merge([quality, year_flat, meta.map_values(self._display), rating])

        p = _join(prefix, n, ", ")
        m = _join(middle, n, ", ")
        s = _join(suffix, n, ", ")
        self.stats.empty_prefix += int(pc.sum(pc.equal(p, "")).as_py() or 0)
        self.stats.empty_middle += int(pc.sum(pc.equal(m, "")).as_py() or 0)
        return _layout(p, m, s, self.spec.keep_tokens_separator)


def _layout(p: pa.Array, m: pa.Array, s: pa.Array, sep: str) -> pa.Array:
    """[p, sep, m, sep, s] joined by single spaces, empty sections left out."""
    empty = pa.scalar("", STR)
    join = lambda *xs: pc.binary_join_element_wise(*xs, empty)  # noqa: E731
    head = pc.if_else(pc.equal(p, ""), empty, join(p, pa.scalar(" ", STR)))
    mid = pc.if_else(pc.equal(m, ""), empty, join(pa.scalar(" ", STR), m))
    tail = pc.if_else(pc.equal(s, ""), empty, join(pa.scalar(" ", STR), s))
    sep = pa.scalar(sep, STR)
    return join(head, sep, mid, pa.scalar(" ", STR), sep, tail)


class TagSource:
    """The five tags_* list columns of a post table, read a chunk of rows at a time by
    position (only the chunk is ever copied). Accepts pandas columns backed by Arrow
    (ArrowDtype: no copy), pandas object columns of lists, or a pyarrow Table."""

    def __init__(self, posts: "pd.DataFrame | pa.Table"):
        self.columns: dict = {}
        for name in TAG_COLUMNS:
            col = posts.column(name) if isinstance(posts, pa.Table) else posts[name]
            if isinstance(col, pd.Series) and isinstance(col.dtype, pd.ArrowDtype):
                col = col.array.__arrow_array__()
            self.columns[name] = col

    def take(self, positions: np.ndarray) -> dict[str, pa.Array]:
        out = {}
        for name, col in self.columns.items():
            if isinstance(col, (pa.Array, pa.ChunkedArray)):
                taken = col.take(pa.array(positions))
                out[name] = taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken
            else:
                out[name] = pa.array(col.iloc[positions], type=pa.list_(pa.string()), from_pandas=True)
        return out


def iter_captions(
    source: TagSource,
    positions: np.ndarray,
    quality_level: np.ndarray,
    rating_code: np.ndarray,
    year: np.ndarray,
    builder: CaptionBuilder,
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = True,
) -> Iterator[tuple[int, int, pa.Array]]:
    """(start, stop, captions) for the posts at `positions`, chunk_rows at a time.

    quality_level: index into the quality labels; rating_code: index into RATINGS; year:
    the upload year, or -1 where unknown (then no year tag). All aligned with positions.
    """
    n = len(positions)
    with tqdm(total=n, desc="captions", unit="post", disable=not progress) as bar:
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            tags = source.take(positions[start:stop])
            caps = builder.build_chunk(
                tags, quality_level[start:stop], rating_code[start:stop], np.asarray(year[start:stop])
            )
            yield start, stop, caps
            bar.update(stop - start)


def build_captions(
    tags: "pa.Table | pd.DataFrame",
    quality_level: np.ndarray,
    rating_code: np.ndarray,
    year: np.ndarray,
    spec: CaptionSpec,
    quality_labels: Iterable[str],
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = True,
) -> tuple[pa.ChunkedArray, CaptionStats]:
    """Captions for every row of `tags` (the five tags_* list columns), in memory."""
    builder = CaptionBuilder(spec, quality_labels)
    n = tags.num_rows if isinstance(tags, pa.Table) else len(tags)
    chunks = [
        caps
        for _, _, caps in iter_captions(
            TagSource(tags), np.arange(n), quality_level, rating_code, year, builder,
            chunk_rows=chunk_rows, progress=progress,
        )
    ]
    return pa.chunked_array(chunks, type=STR), builder.stats
