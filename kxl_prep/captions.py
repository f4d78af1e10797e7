"""Epsilon captions: `prefix ||| general tags ||| suffix`.

- prefix (fixed at train time): people-count tags (1girl ... multiple_others, in the
  recipe's order), then character, copyright and artist tags;
- middle (shuffled and tag-dropped by sd-scripts): the other general tags;
- suffix (fixed): quality tag, year tag, meta tags (noise dropped), rating tag(s).

Tags inside a section are joined with ", "; underscores become spaces except in names of
`keep_underscores_max_len` characters or fewer (emoticons); the result is trimmed and a
tag left blank is dropped. Tags in `drop_tags`
(`banned_artist`) are never written, whatever their category. A tag containing the keep
separator or a line break would break the sections (sd-scripts reads only a caption's first
line) and is dropped (and counted).

Layout rule (always two separators, so sd-scripts finds the three sections in every case):
the tokens [prefix, "|||", middle, "|||", suffix] joined by single spaces, empty sections
left out: "1girl ||| smile ||| masterpiece, newest, safe", "||| smile ||| ...", "1girl ||| |||
...". sd-scripts' process_caption splits on the first and second "|||" and drops empty
tokens, so an empty section yields no tag.

Vectorized over chunks of rows: string rules run with pyarrow compute once per distinct tag
name of the chunk, posts are handled as integer codes with numpy; no per-post Python.
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


def year_labels(years: np.ndarray, spec: CaptionSpec) -> np.ndarray:
    """Index into spec.year.labels per year (year <= edges[i] -> i)."""
    return np.searchsorted(np.asarray(spec.year.edges), years, side="left").astype(np.int8)


CATEGORY_COLUMNS = ("tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta")


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise concatenation of (row, code) parts: row r gets part 0's codes of r, then
    part 1's, ... (a stable sort by row keeps the order inside each part)."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = np.concatenate([p[0] for p in parts])
    codes = np.concatenate([p[1] for p in parts])
    order = np.argsort(rows, kind="stable")
    return rows[order], codes[order]


def _join(rows: np.ndarray, codes: np.ndarray, table: pa.Array, n_rows: int, sep: str) -> pa.Array:
    """For each row, its codes' strings joined by `sep` ("" for a row without any)."""
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), table.take(pa.array(codes)))
    return pc.binary_join(lists, sep)


def _distinct_sorted(rows: np.ndarray) -> int:
    """Number of distinct values of a sorted array."""
    return int(len(rows) and np.count_nonzero(rows[1:] != rows[:-1]) + 1)


def _contains_any(values: pa.Array, needles: Iterable[str]) -> np.ndarray:
    mask = np.zeros(len(values), dtype=bool)
    for needle in needles:
        mask |= pc.match_substring(values, needle).to_numpy(zero_copy_only=False)
    return mask


class CaptionBuilder:
    """Builds one chunk of captions at a time.

    Every string rule runs once per DISTINCT tag name of the chunk (the chunk's tags are
    dictionary-encoded): the posts themselves are handled as integer codes with numpy, and
    strings are only materialized for the final joins.
    """

    def __init__(self, spec: CaptionSpec, quality_labels: Iterable[str]):
        self.spec = spec
        self.quality_labels = list(quality_labels)
        self.year_labels = list(spec.year.labels)
        self.rating_tags = [list(spec.rating.for_rating(r)) for r in RATINGS]
        self.rating_words = sorted({w for tags in self.rating_tags for w in tags})
        self.people = pa.array(list(spec.people_count_tags), pa.string())
        self.drop = pa.array(list(spec.drop_tags), pa.string())
        self.stats = CaptionStats()

    def _display(self, values: pa.Array) -> pa.Array:
        """Underscores -> spaces (names longer than keep_underscores_max_len), trimmed."""
        spaced = pc.replace_substring(values, "_", " ")
        longer = pc.greater(pc.utf8_length(values), self.spec.keep_underscores_max_len)
        return pc.utf8_trim_whitespace(pc.if_else(longer, spaced, values))

    def build_chunk(
        self,
        tags: dict[str, pa.Array],
        quality_level: np.ndarray,
        rating_code: np.ndarray,
        year: np.ndarray,
    ) -> pa.Array:
        n = len(quality_level)
        # -- every tag of the chunk as (row, code) per category, codes into `names` --------
        flats, values = {}, []
        for name in CATEGORY_COLUMNS:
            col = tags[name]
            flats[name] = pc.list_parent_indices(col).to_numpy(zero_copy_only=False).astype(np.int64)
            values.append(pc.fill_null(pc.list_flatten(col), "").cast(pa.string()))
        encoded = pc.dictionary_encode(pa.concat_arrays(values) if values else pa.array([], pa.string()))
        names = encoded.dictionary
        all_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        bounds = np.cumsum([0] + [len(v) for v in values])
        codes = {name: all_codes[bounds[i]: bounds[i + 1]] for i, name in enumerate(CATEGORY_COLUMNS)}

        # -- the rules, once per distinct name --------------------------------------------
        shown = self._display(names)
        empty = pc.equal(pc.utf8_length(shown), 0).to_numpy(zero_copy_only=False)
        dropped = pc.is_in(names, value_set=self.drop).to_numpy(zero_copy_only=False)
        has_sep = pc.match_substring(names, self.spec.keep_tokens_separator).to_numpy(zero_copy_only=False)
        # sd-scripts keeps only a caption's first line: a line break would cut the caption
        has_sep |= pc.match_substring_regex(names, "[\r\n]").to_numpy(zero_copy_only=False)
        noise = _contains_any(names, self.spec.meta_noise)
        rank = pc.fill_null(pc.index_in(names, value_set=self.people), -1).to_numpy(zero_copy_only=False)
        bad = empty | dropped | has_sep
        self.stats.add("empty_name", empty[all_codes].sum())
        self.stats.add("drop_tags", (dropped & ~empty)[all_codes].sum())
        self.stats.add("contains_separator_or_line_break", (has_sep & ~dropped & ~empty)[all_codes].sum())

        def kept(name: str, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            c = codes[name]
            keep = ~bad[c] if extra is None else ~(bad | extra)[c]
            return flats[name][keep], c[keep]

        general_rows, general_codes = kept("tags_general")
        general_rank = rank[general_codes]
        is_people = general_rank >= 0
        order = np.lexsort((general_rank[is_people], general_rows[is_people]))
        people = (general_rows[is_people][order], general_codes[is_people][order])
        middle = (general_rows[~is_people], general_codes[~is_people])
        meta_c = codes["tags_meta"]
        self.stats.add("meta_noise", (noise & ~bad)[meta_c].sum())
        meta = kept("tags_meta", noise)

        # -- suffix labels share the code space: appended after the chunk's names -------------
        base_q = len(names)
        base_y = base_q + len(self.quality_labels)
        base_r = base_y + len(self.year_labels)
        table = pa.concat_arrays(
            [shown, pa.array(self.quality_labels + self.year_labels + self.rating_words, pa.string())]
        )
        rows = np.arange(n, dtype=np.int64)
        quality = (rows, base_q + quality_level.astype(np.int64))
        has_year = year >= 0
        year_part = (rows[has_year], base_y + year_labels(year[has_year], self.spec).astype(np.int64))
        rating_parts = []
        for slot in range(max(len(t) for t in self.rating_tags)):
            word = np.array(
                [base_r + self.rating_words.index(t[slot]) if len(t) > slot else -1 for t in self.rating_tags]
            )[rating_code]
            rating_parts.append((rows[word >= 0], word[word >= 0]))

        prefix = _merge([people, kept("tags_character"), kept("tags_copyright"), kept("tags_artist")])
        suffix = _merge([quality, year_part, meta, _merge(rating_parts)])
        p = _join(*prefix, table, n, ", ")
        m = _join(*middle, table, n, ", ")
        s = _join(*suffix, table, n, ", ")
        self.stats.empty_prefix += n - _distinct_sorted(prefix[0])
        self.stats.empty_middle += n - _distinct_sorted(middle[0])
        return _layout(p, m, s, self.spec.keep_tokens_separator).cast(STR)


def _layout(p: pa.Array, m: pa.Array, s: pa.Array, sep: str) -> pa.Array:
    """[p, sep, m, sep, s] joined by single spaces, empty sections left out."""
    join = lambda *xs: pc.binary_join_element_wise(*xs, "")  # noqa: E731
    head = pc.if_else(pc.equal(p, ""), "", join(p, " "))
    mid = pc.if_else(pc.equal(m, ""), "", join(" ", m))
    tail = pc.if_else(pc.equal(s, ""), "", join(" ", s))
    return join(head, sep, mid, " ", sep, tail)


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
            if isinstance(col, pa.ChunkedArray):
                out[name] = _take_chunked(col, positions)
            elif isinstance(col, pa.Array):
                out[name] = col.take(pa.array(positions))
            else:
                out[name] = pa.array(col.iloc[positions], type=pa.list_(pa.string()), from_pandas=True)
        return out


def _take_chunked(column: pa.ChunkedArray, positions: np.ndarray) -> pa.Array:
    """column[positions] taking from each chunk separately (ChunkedArray.take would first
    concatenate the whole column: seconds and gigabytes per call at danbooru scale)."""
    if column.num_chunks == 1:
        return column.chunk(0).take(pa.array(positions))
    bounds = np.zeros(column.num_chunks + 1, dtype=np.int64)
    np.cumsum([len(c) for c in column.chunks], out=bounds[1:])
    which = np.searchsorted(bounds, positions, side="right") - 1
    ordered = bool(np.all(which[1:] >= which[:-1])) if len(which) > 1 else True
    order = np.arange(len(positions)) if ordered else np.argsort(which, kind="stable")
    sorted_which = which[order]
    cuts = np.flatnonzero(np.diff(sorted_which)) + 1
    pieces = []
    for part in np.split(order, cuts):
        if len(part) == 0:
            continue
        c = int(which[part[0]])
        pieces.append(column.chunk(c).take(pa.array(positions[part] - bounds[c])))
    if not pieces:
        return column.chunk(0).slice(0, 0) if column.num_chunks else pa.array([], column.type)
    grouped = pa.concat_arrays(pieces)
    if ordered:
        return grouped
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    return grouped.take(pa.array(inverse))


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
