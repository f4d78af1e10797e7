"""Select posts by tag rules, vectorized over millions of posts.

The tag list columns are dictionary-encoded ONCE (`TagIndex`): each category becomes flat
int32 tag codes plus list offsets, per chunk of the table, and the set of names is the
source's vocabulary. The readers' columns (kxl_prep.sources: list<dictionary<int32,
string>> with one dictionary per column) already are that: their indices are used in place,
without a copy. All rules' tags are then found in one look-up pass per category (in chunks,
so the peak memory stays small), never a Python loop over posts.

Per-rule caps sample WITHOUT replacement and deterministically: the rule's eligible posts
are ordered by id, numpy's PCG64 seeded by SeedSequence([seed, rule index]) gives each a
raw 64-bit key (`random_raw`, the bit generator's own output, identical on every machine
and numpy version), and the `cap` posts with the smallest keys are kept (ties, which need
two equal 64-bit draws, go to the smaller id). Same inputs + seed => same selection,
whatever the row order of the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from kxl_prep.schema import TAG_CATEGORIES
from kxl_prep.selector_base import sample_positions
from kxl_prep.tags.rules import TagSelectionSpec, validate_against_vocabulary

ENCODE_CHUNK_ROWS = 1 << 19  # rows converted/encoded at a time
# Flat tag entries looked up at a time: numpy turns int32 indices into an intp copy, so a
# chunk costs 8 bytes per entry; 4M entries keep that at 32 MB.
LOOKUP_CHUNK = 1 << 22


@dataclass
class CodeSegment:
    """Tags of rows [row_start, row_start + len(offsets) - 1): row r's tag codes are
    codes[offsets[r - row_start]:offsets[r - row_start + 1]]."""

    row_start: int
    codes: np.ndarray  # int32; may be a read-only view of the source table's own buffer
    offsets: np.ndarray  # int64, starts at 0

    def rows_of_positions(self, positions: np.ndarray) -> np.ndarray:
        return self.row_start + np.searchsorted(self.offsets, positions, side="right") - 1


@dataclass
class CategoryCodes:
    vocabulary: list[str]  # code -> tag name
    code_of: dict[str, int]  # tag name -> code, for the names some post carries
    segments: list[CodeSegment]

    def lengths(self) -> np.ndarray:
        """Number of tags of every row (tests, reports)."""
        parts = [np.diff(seg.offsets) for seg in self.segments]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _to_arrow_lists(column) -> pa.ChunkedArray | None:
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
    if isinstance(column.dtype, pd.ArrowDtype):  # kxl_prep.sources: list<dictionary> (zero copy)
        arrow = column.array.__arrow_array__()
        return arrow if isinstance(arrow, pa.ChunkedArray) else pa.chunked_array([arrow])
    return None  # pandas object column: converted chunk by chunk in _encode_category


class _Vocabulary:
    """Global tag codes across pieces whose dictionaries may differ (or repeat names)."""

    def __init__(self) -> None:
        self.code_of: dict[str, int] = {}
        self._last: tuple[pa.Array, np.ndarray | None] | None = None

    def mapping(self, dictionary: pa.Array) -> np.ndarray | None:
        """Piece dictionary index -> global code; None when that is the identity (the first
        clean dictionary, or one equal to it: the readers share one dictionary per column,
        so their indices are used as they are)."""
        if self._last is not None and (self._last[0] is dictionary or self._last[0].equals(dictionary)):
            return self._last[1]
        names = dictionary.to_pylist()
        if not self.code_of and dictionary.null_count == 0:
            first = dict(zip(names, range(len(names))))
            if len(first) == len(names):
                self.code_of = first
                self._last = (dictionary, None)
                return None
        code_of = self.code_of
        out = np.empty(len(dictionary), dtype=np.int32)
        for i, name in enumerate(names):
            out[i] = code_of.setdefault(name, len(code_of)) if name is not None else -1
        self._last = (dictionary, out)
        return out


def _encode_piece(lists: pa.Array, vocab: _Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """One ListArray -> (int32 codes, int64 offsets from 0). Null lists count as empty; null
    names (a null index, or an index to a null dictionary entry) are dropped."""
    lens = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(lists)
    if (
        not pa.types.is_dictionary(flat.type)
        or flat.type.index_type != pa.int32()
        or flat.type.value_type not in (pa.string(), pa.large_string())
    ):
        flat = pc.dictionary_encode(flat.cast(pa.string()))  # nulls stay null indices
    mapping = vocab.mapping(flat.dictionary)
    if mapping is None and flat.indices.null_count == 0:
        codes = flat.indices.to_numpy(zero_copy_only=True)  # no copy
    else:
        raw = pc.fill_null(flat.indices, 0).to_numpy(zero_copy_only=False)
        codes = raw if mapping is None else mapping[raw]
        invalid = codes < 0
        if flat.indices.null_count:
            invalid |= ~pc.is_valid(flat.indices).to_numpy(zero_copy_only=False)
        if invalid.any():
            parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
            lens -= np.bincount(parents[invalid], minlength=len(lens))
            codes = codes[~invalid]
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return codes, offsets


def _encode_category(column, n_rows: int, label: str, progress: bool) -> CategoryCodes:
    """Tag list column -> int32 code segments. Arrow columns are taken chunk by chunk as they
    are (no copy when the chunk's dictionary is the shared one); pandas object columns are
    converted ENCODE_CHUNK_ROWS rows at a time (bounded memory)."""
    arrow = _to_arrow_lists(column)
    vocab = _Vocabulary()
    if arrow is not None:
        pieces = []
        row = 0
        for chunk in arrow.chunks:
            pieces.append((row, lambda chunk=chunk: chunk))
            row += len(chunk)
    else:
        pieces = [
            (start, lambda start=start: pa.array(
                column.iloc[start : start + ENCODE_CHUNK_ROWS], type=pa.list_(pa.string()), from_pandas=True
            ))
            for start in range(0, n_rows, ENCODE_CHUNK_ROWS)
        ]
    segments = []
    for row_start, get in tqdm(pieces, desc=f"index tags_{label}", unit="chunk", disable=not progress, leave=False):
        codes, offsets = _encode_piece(get(), vocab)
        segments.append(CodeSegment(row_start, codes, offsets))
    vocabulary = list(vocab.code_of)
    # Only names some post carries count as existing (a reader's dictionary may hold more).
    used = np.zeros(len(vocabulary), dtype=bool)
    for seg in segments:
        for start in range(0, len(seg.codes), LOOKUP_CHUNK):
            used[seg.codes[start : start + LOOKUP_CHUNK]] = True
    code_of = vocab.code_of if used.all() else {name: i for i, name in enumerate(vocabulary) if used[i]}
    return CategoryCodes(vocabulary, code_of, segments)


@dataclass
class TagIndex:
    ids: np.ndarray  # int64 post ids, in table row order
    categories: dict[str, CategoryCodes]

    @classmethod
    def build(cls, posts: pd.DataFrame | pa.Table, *, progress: bool = True) -> "TagIndex":
        n = posts.num_rows if isinstance(posts, pa.Table) else len(posts)
        ids = np.asarray(posts["id"].to_numpy(), dtype=np.int64)  # Arrow and pandas alike
        strictly_increasing = bool(np.all(ids[1:] > ids[:-1]))  # the readers' usual order
        if not strictly_increasing and len(np.unique(ids)) != n:
            raise ValueError("posts table: the 'id' column has duplicate post ids")
        cats = {c: _encode_category(posts[f"tags_{c}"], n, c, progress) for c in TAG_CATEGORIES}
        return cls(ids=ids, categories=cats)

    @property
    def n_posts(self) -> int:
        return len(self.ids)

    def vocabulary(self) -> dict[str, dict[str, int]]:
        """category -> {tag name: code}; usable as a name set by validate_against_vocabulary."""
        return {c: cc.code_of for c, cc in self.categories.items()}

    def hits(self, queries: Sequence[tuple[str | None, Sequence[str]]]) -> list[np.ndarray]:
        """For each (category or None for all, tags) query, the boolean row mask of posts
        having ANY of the tags. One pass over each category's codes for all queries."""
        masks = [np.zeros(self.n_posts, dtype=bool) for _ in queries]
        for cat, cc in self.categories.items():
            # slot per (query, tag present in this category's vocabulary)
            wanted: dict[int, list[int]] = {}
            for qi, (qcat, tags) in enumerate(queries):
                if qcat is not None and qcat != cat:
                    continue
                for tag in tags:
                    code = cc.code_of.get(tag)
                    if code is not None:
                        wanted.setdefault(code, []).append(qi)
            if not wanted:
                continue
            lut = np.zeros(len(cc.vocabulary), dtype=bool)
            lut[list(wanted)] = True
            row_parts, code_parts = [], []
            for seg in cc.segments:
                for start in range(0, len(seg.codes), LOOKUP_CHUNK):
                    chunk = seg.codes[start : start + LOOKUP_CHUNK]
                    pos = np.flatnonzero(lut[chunk])
                    row_parts.append(seg.rows_of_positions(pos + start))
                    code_parts.append(chunk[pos])
            rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
            hit_codes = np.concatenate(code_parts) if code_parts else np.zeros(0, np.int32)
            per_query: dict[int, list[int]] = {}
            for code, qis in wanted.items():
                for qi in qis:
                    per_query.setdefault(qi, []).append(code)
            for qi, codes in per_query.items():
                masks[qi][rows[np.isin(hit_codes, np.asarray(codes, dtype=np.int32))]] = True
        return masks


@dataclass
class RuleOutcome:
    name: str
    matched: np.ndarray  # bool row mask: the rule's criteria
    eligible: np.ndarray  # bool row mask: matched and not excluded
    sampled: np.ndarray  # bool row mask: eligible, after the cap


@dataclass
class TagSelectionResult:
    spec: TagSelectionSpec
    ids: np.ndarray  # int64, the selected post ids (union), ascending
    rows: np.ndarray  # int64, their row positions in the input table
    excluded: np.ndarray  # bool row mask: hit by the exclusions
    rules: list[RuleOutcome]
    n_posts: int

    def rule_membership(self) -> np.ndarray:
        """bool (len(ids), n_rules): which rules selected each selected post."""
        return np.stack([r.sampled[self.rows] for r in self.rules], axis=1) if self.rules else np.zeros((len(self.rows), 0), bool)


def _rule_mask(index: TagIndex, rule, masks: dict[tuple, np.ndarray]) -> np.ndarray:
    mask = np.ones(index.n_posts, dtype=bool)
    for cat, tags in rule.category_lists().items():
        mask &= masks[("any", cat, tags)]
    for tag in rule.all_of:
        mask &= masks[("any", None, (tag,))]
    if rule.any_of:
        mask &= masks[("any", None, rule.any_of)]
    if rule.none_of:
        mask &= ~masks[("any", None, rule.none_of)]
    return mask


def seeded_cap(rows: np.ndarray, ids: np.ndarray, cap: int | None, seed: int, rule_index: int) -> np.ndarray:
    """`cap` of `rows` (eligible row positions) sampled without replacement; see module doc.

    Returns row positions sorted by post id. Depends only on the set of ids, the seed and
    the rule index, not on the order of `rows`.
    """
    rows = rows[np.argsort(ids[rows], kind="stable")]
    if cap is None:
        return rows
    return rows[sample_positions(len(rows), cap, seed, rule_index)]


def select_by_tags(
    posts: pd.DataFrame | pa.Table,
    spec: TagSelectionSpec,
    *,
    index: TagIndex | None = None,
    validate: bool = True,
    progress: bool = True,
) -> TagSelectionResult:
    """Apply `spec` to the posts table: exclusions, each rule's match and seeded cap, union.

    Raises UnknownTagsError (before any matching) when a tag is missing from the source.
    """
    index = index or TagIndex.build(posts, progress=progress)
    if validate:
        validate_against_vocabulary(spec, index.vocabulary())

    # Every distinct any-of query of every rule and of the exclusions, in one pass.
    queries: list[tuple[str, str | None, tuple[str, ...]]] = []
    for rule in spec.rules:
        queries += [("any", cat, tags) for cat, tags in rule.category_lists().items()]
        queries += [("any", None, (tag,)) for tag in rule.all_of]
        if rule.any_of:
            queries.append(("any", None, rule.any_of))
        if rule.none_of:
            queries.append(("any", None, rule.none_of))
    ex = spec.exclude
    queries += [("any", cat, tags) for cat, tags in ex.category_lists().items()]
    if ex.tags:
        queries.append(("any", None, ex.tags))
    queries = list(dict.fromkeys(queries))
    masks = dict(zip(queries, index.hits([(q[1], q[2]) for q in queries])))

    excluded = np.zeros(index.n_posts, dtype=bool)
    for cat, tags in ex.category_lists().items():
        excluded |= masks[("any", cat, tags)]
    if ex.tags:
        excluded |= masks[("any", None, ex.tags)]
    if ex.ids:
        excluded |= np.isin(index.ids, np.asarray(ex.ids, dtype=np.int64))

    outcomes = []
    union = np.zeros(index.n_posts, dtype=bool)
    for i, rule in enumerate(spec.rules):
        matched = _rule_mask(index, rule, masks)
        eligible = matched & ~excluded
        chosen_rows = seeded_cap(np.flatnonzero(eligible), index.ids, rule.cap, spec.seed, i)
        sampled = np.zeros(index.n_posts, dtype=bool)
        sampled[chosen_rows] = True
        union |= sampled
        outcomes.append(RuleOutcome(rule.name, matched, eligible, sampled))

    rows = np.flatnonzero(union)
    rows = rows[np.argsort(index.ids[rows], kind="stable")]
    return TagSelectionResult(
        spec=spec, ids=index.ids[rows], rows=rows, excluded=excluded, rules=outcomes, n_posts=index.n_posts
    )
