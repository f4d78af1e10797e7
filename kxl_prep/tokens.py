"""Captions against the token budget: how many would lose their fixed suffix at the training
recipe's max_token_length, counted with the CLIP tokenizer sd-scripts uses.

What sd-scripts v0.10.1 does with a caption (library/train_util.py BaseDataset.process_caption,
library/strategy_base.py TokenizeStrategy._get_input_ids, library/strategy_sdxl.py):

- process_caption splits `prefix ||| general ||| suffix` on the first two separators, each
  section on caption_separator (","), strips every tag and drops empty ones, shuffles the
  general tags, drops each with caption_tag_dropout_rate, and joins everything with ", ";
- SdxlTokenizeStrategy(max_token_length) tokenizes that text with CLIPTokenizer(truncation=True,
  max_length=max_token_length + 2): BOS, the FIRST max_token_length content tokens, EOS; then it
  cuts them into max_token_length / 75 chunks of 75 tokens, each given its own BOS and EOS.
  Unset, max_token_length is 75 (one chunk). Content tokens past max_token_length are dropped.
  Both text encoders' tokenizers share one vocabulary, so both keep the same tokens.

The suffix (quality, year, meta, rating tags) comes last, so a caption of more than
max_token_length content tokens loses the end of its suffix (its rating tags first); when its
prefix and general tags alone fill the budget, it loses the whole suffix.

What is counted: the caption as process_caption joins it with no tag dropped, the worst case.
Shuffling changes no count: CLIP pre-tokenizes on whitespace and punctuation, every general tag
is followed by ", " whatever the order (the suffix is never empty), so the same pieces reach the
BPE. Tag dropout only shortens a caption; one seeded dropout draw per counted caption estimates
the share of training steps whose caption is cut (`with_dropout`).

Every caption is counted by default: each distinct tag is tokenized once (alone and followed by
","), and the per-caption sums are numpy, so millions of captions take seconds to a minute
(bench/bench_caption_tokens.py). `sample` > 0 counts a seeded sample of that many captions
instead, each share with a 95% Wilson interval (finite-population corrected).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# sd-scripts' --max_token_length: unset (75), 150 or 225 (train_util's argument help; the
# tokenize strategies cut the text into chunks of 75)
ALLOWED_MAX_TOKEN_LENGTHS = (75, 150, 225)
CHUNK = 75
DEFAULT_WARN_SHARE = 0.01
Z95 = 1.959963984540054
HIST_BIN = 5  # tokens per histogram bin


class TokenizerUnavailable(RuntimeError):
    """The CLIP vocabulary or the tokenizer library is missing; the message says what to install."""


def check_max_token_length(value, where: str) -> int:
    if isinstance(value, bool) or value not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ValueError(f"{where}: max_token_length must be one of {list(ALLOWED_MAX_TOKEN_LENGTHS)} "
                         f"(sd-scripts' values; 75 = unset), got {value!r}; set it to the training recipe's "
                         f"max_token_length")
    return int(value)


def load_tokenizer():
    """The CLIP tokenizer (kxl_common.clip_tokenizer.clip_fast_tokenizer), or TokenizerUnavailable."""
    try:
        import ftfy  # noqa: F401  (the count runs it where transformers' CLIPTokenizer would)

        from kxl_common.clip_tokenizer import clip_fast_tokenizer

        return clip_fast_tokenizer()
    except (ImportError, FileNotFoundError) as exc:
        raise TokenizerUnavailable(
            f"cannot count caption tokens: {exc}. The count needs the `tokenizers` package and the CLIP "
            f"vocabulary of open-clip-torch (pip install tokenizers ftfy; pip install --no-deps open-clip-torch; "
            f"./setup.sh installs both)") from exc


def wilson_interval(hits: int, n: int, population: int | None = None, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of hits / n; `population` (sampling without replacement) applies the
    finite-population correction, so counting the whole population gives [p, p]."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    if population is not None and n >= population:
        return p, p
    n_eff = n * (population - 1) / (population - n) if population is not None else n
    z2 = z * z / n_eff
    centre = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff)) / (1 + z2)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p = 0 or 1: exact ends


PREFIX, GENERAL, SUFFIX = 0, 1, 2


@dataclass
class CaptionTags:
    """Every tag of a chunk of captions as process_caption splits them, in caption order."""

    row: np.ndarray  # caption index
    section: np.ndarray  # PREFIX, GENERAL or SUFFIX
    names: pa.Array  # the stripped tag text


def caption_tags(captions: pa.Array, separator: str = "|||") -> CaptionTags:
    """process_caption's split, vectorized: the first two separators cut prefix / general / suffix
    (no separator: every tag is general), each section is split on ",", tags are stripped and
    empty ones dropped."""
    parts = pc.split_pattern(captions, separator, max_splits=2)
    part_row = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)
    offsets = parts.offsets.to_numpy(zero_copy_only=False)
    n_parts = np.diff(offsets)
    index = offsets[0] + np.arange(len(part_row)) - offsets[:-1][part_row]  # position in its caption
    section = np.where(n_parts[part_row] == 1, GENERAL, index)
    pieces = pc.split_pattern(pc.list_flatten(parts), ",")
    piece_part = pc.list_parent_indices(pieces).to_numpy(zero_copy_only=False)
    names = pc.utf8_trim_whitespace(pc.list_flatten(pieces))
    keep = pc.greater(pc.utf8_length(names), 0).to_numpy(zero_copy_only=False)
    return CaptionTags(part_row[piece_part][keep], section[piece_part][keep].astype(np.int8),
                       names.filter(pa.array(keep)))


def joined_lengths(row: np.ndarray, alone: np.ndarray, comma: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
    """Content tokens of each caption's kept tags joined by ", ": CLIP pre-tokenizes on whitespace
    and punctuation, so the joined text's tokens are every kept tag's tokens with its "," (a
    trailing ")" and "," may make one token) but the last tag's, which has no comma."""
    row, alone, comma = row[keep], alone[keep], comma[keep]
    total = np.bincount(row, weights=comma, minlength=n)
    if len(row):
        last = np.flatnonzero(np.r_[row[1:] != row[:-1], True])  # rows are sorted: each row's last tag
        total[row[last]] -= comma[last] - alone[last]
    return total.astype(np.int32)


@dataclass(frozen=True)
class BudgetSpec:
    max_token_length: int = 225
    sample: int = 0  # 0: every caption; else a seeded sample of this many
    seed: int = 0
    tag_dropout_rate: float = 0.15
    separator: str = "|||"
    warn_share: float = DEFAULT_WARN_SHARE


class TokenCounter:
    """Counts the tokens of the chosen captions as the caption chunks stream past (add), then
    summarizes (result). n: how many captions will be added in all."""

    def __init__(self, n: int, spec: BudgetSpec, tokenizer=None):
        self.n, self.spec = n, spec
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        rng = np.random.default_rng([spec.seed, 0x70C3])
        if spec.sample <= 0 or spec.sample >= n:
            self.rows = None  # every caption
        else:
            self.rows = np.sort(rng.choice(n, size=spec.sample, replace=False))
        self.dropout_rng = np.random.default_rng([spec.seed, 0xD807])
        self.total: list[np.ndarray] = []
        self.suffix: list[np.ndarray] = []
        self.dropped: list[np.ndarray] = []
        self.cache: dict[tuple[str, bool], tuple[int, int]] = {}  # (tag, unescape_html) -> lengths
        self.seconds = 0.0
        self.counted = 0

    def _tag_lengths(self, names: list[str], unescape_html: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(tokens of the tag, tokens of the tag followed by ",") per tag name."""
        from kxl_common.clip_tokenizer import ftfy_fixed

        new = sorted({v for v in names if (v, unescape_html) not in self.cache})
        if new:
            fixed = [ftfy_fixed(v, unescape_html) for v in new]
            alone = self.tokenizer.encode_batch_fast(fixed, add_special_tokens=False)
            comma = self.tokenizer.encode_batch_fast([f + "," for f in fixed], add_special_tokens=False)
            self.cache.update(((v, unescape_html), (len(a.ids), len(c.ids))) for v, a, c in zip(new, alone, comma))
        pairs = np.array([self.cache[v, unescape_html] for v in names], dtype=np.int32).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def add(self, start: int, captions: pa.Array) -> None:
        """The captions of rows start .. start + len(captions)."""
        t0 = time.perf_counter()
        if self.rows is not None:
            lo, hi = np.searchsorted(self.rows, [start, start + len(captions)])
            if lo == hi:
                return
            captions = captions.take(pa.array(self.rows[lo:hi] - start))
        tags = caption_tags(captions, self.spec.separator)
        encoded = pc.dictionary_encode(tags.names)
        alone, comma = self._tag_lengths(encoded.dictionary.to_pylist())
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        alone, comma = alone[codes], comma[codes]
        n = len(captions)
        # ftfy unescapes HTML entities ("&amp;") only in text without a literal "<": a tag holding
        # one keeps its entity when a tag of the caption that reaches the tokenizer has a "<"
        entity = np.flatnonzero(pc.match_substring(tags.names, "&").to_numpy(zero_copy_only=False))
        has_lt = pc.match_substring(tags.names, "<").to_numpy(zero_copy_only=False)
        literal = self._tag_lengths(tags.names.take(pa.array(entity)).to_pylist(), False) if len(entity) else None

        def lengths(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Joined lengths of the kept tags, and the per-tag lengths used."""
            a, c = alone, comma
            if literal is not None:
                row_lt = np.bincount(tags.row[keep], weights=has_lt[keep], minlength=n) > 0
                kept_literal = row_lt[tags.row[entity]]
                a, c = alone.copy(), comma.copy()
                a[entity[kept_literal]] = literal[0][kept_literal]
                c[entity[kept_literal]] = literal[1][kept_literal]
            return joined_lengths(tags.row, a, c, keep, n), a, c

        everything = np.ones(len(codes), dtype=bool)
        total, a, c = lengths(everything)
        in_suffix = tags.section == SUFFIX
        suffix = joined_lengths(tags.row[in_suffix], a[in_suffix], c[in_suffix], everything[in_suffix], n)
        # process_caption keeps a general tag when random() >= rate; one draw per general tag
        keep = everything.copy()
        general = np.flatnonzero(tags.section == GENERAL)
        keep[general] = self.dropout_rng.random(len(general)) >= self.spec.tag_dropout_rate
        self.total.append(total)
        self.suffix.append(suffix)
        self.dropped.append(lengths(keep)[0])
        self.counted += n
        self.seconds += time.perf_counter() - t0

    def result(self) -> dict:
        return budget_summary(
            np.concatenate(self.total) if self.total else np.empty(0, np.int32),
            np.concatenate(self.suffix) if self.suffix else np.empty(0, np.int32),
            np.concatenate(self.dropped) if self.dropped else np.empty(0, np.int32),
            self.spec, population=self.n, seconds=self.seconds,
        )


def _share(hits: int, n: int, population: int) -> dict:
    lo, hi = wilson_interval(hits, n, population)
    return {"count": int(hits), "share": hits / n if n else 0.0, "ci95": [lo, hi],
            "estimated_captions": int(round(hits / n * population)) if n else 0}


def budget_summary(total: np.ndarray, suffix: np.ndarray, dropped: np.ndarray, spec: BudgetSpec, *,
                   population: int, seconds: float = 0.0) -> dict:
    """manifest["tokens"]: the counts of the counted captions (lengths in content tokens, BOS and
    EOS excluded) against spec.max_token_length."""
    budget = spec.max_token_length
    n = len(total)
    over = int((total > budget).sum())
    whole = int((total - suffix >= budget).sum())
    over_dropout = int((dropped > budget).sum())
    top = max(int(total.max()) if n else 0, budget + CHUNK)
    # bins [1, 5], [6, 10], ...: every budget (a multiple of 5) ends a bin; [0, 0] first
    edges = [0, *range(1, top + 2 * HIST_BIN, HIST_BIN)]
    counts, _ = np.histogram(total, bins=edges)
    percentiles = (50, 90, 99, 99.9)
    return {
        "max_token_length": budget,
        "tokenizer": "CLIP BPE (open-clip-torch bpe_simple_vocab_16e6), as transformers' CLIPTokenizer with ftfy",
        "counted_text": "process_caption's join: prefix, general and suffix tags joined by ', ' (no '|||')",
        "captions": population,
        "counted": n,
        "sampled": n < population,
        "sample_seed": spec.seed if n < population else None,
        "captions_per_s": round(n / seconds) if seconds > 0 else None,
        "seconds": round(seconds, 3),
        # no tag dropped (the worst case; shuffling changes no count)
        "suffix_cut": _share(over, n, population),
        "suffix_wholly_lost": _share(whole, n, population),
        # one seeded draw of tag dropout per counted caption: the share of training steps cut
        "with_dropout": {"tag_dropout_rate": spec.tag_dropout_rate, **_share(over_dropout, n, population)},
        "length": {
            "mean": float(total.mean()) if n else 0.0,
            "max": int(total.max()) if n else 0,
            "percentiles": {f"p{p:g}": float(np.percentile(total, p)) if n else 0.0 for p in percentiles},
            "over": {str(k): int((total > k).sum()) for k in ALLOWED_MAX_TOKEN_LENGTHS},
        },
        "suffix_length": {"mean": float(suffix.mean()) if n else 0.0, "max": int(suffix.max()) if n else 0},
        "histogram": {"bin_tokens": HIST_BIN, "edges": edges, "counts": counts.tolist()},
        "warn_share": spec.warn_share,
    }


def budget_warning(summary: dict) -> str | None:
    """The loud warning when more than warn_share of the captions would lose (part of) their suffix."""
    cut = summary["suffix_cut"]
    if cut["share"] <= summary["warn_share"]:
        return None
    lo, hi = cut["ci95"]
    how = (f"{cut['count']:,} of {summary['counted']:,} sampled captions ({100 * lo:.2f}%..{100 * hi:.2f}% of all, 95%)"
           if summary["sampled"] else f"{cut['count']:,} of {summary['counted']:,} captions")
    return (f"{100 * cut['share']:.1f}% of captions are longer than max_token_length {summary['max_token_length']}: "
            f"{how} lose the end of their suffix (quality / year / meta / rating tags), "
            f"{summary['suffix_wholly_lost']['count']:,} all of it (no tag dropped; with tag dropout "
            f"{100 * summary['with_dropout']['share']:.1f}% of steps). Raise max_token_length (150 or 225, in the "
            f"training recipe AND the data recipe's captions.max_token_length), shorten captions, or train with "
            f"[kxl] keep_caption_suffix = true (drops general tags instead; docs/captions-token-budget.md)")
