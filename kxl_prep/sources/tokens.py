"""Vectorized parsing of integer tokens packed in text (tag id lists), without Python loops.

Used for HakuBooru's text tag lists (`$<base36>#$<base36>#`) and for SQLite's
group_concat output (`12,5,7`): the strings of a chunk are joined into one byte buffer and
every maximal run of digits becomes one integer.
"""
from __future__ import annotations

import numpy as np

_LUT36 = np.full(256, -1, dtype=np.int8)
_LUT36[ord("0"):ord("9") + 1] = np.arange(10)
_LUT36[ord("a"):ord("z") + 1] = np.arange(10, 36)
_LUT36[ord("A"):ord("Z") + 1] = np.arange(10, 36)
_LUT10 = _LUT36.copy()
_LUT10[_LUT10 >= 10] = -1


def parse_token_lists(strings: list[str], base: int,
                      known_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integers in each string (digit runs in `base`, anything else separates).

    Returns (values int64, counts per string). Strings must be ASCII (validate first).
    known_counts: the number of integers per string when the caller knows it (SQLite's
    count() next to group_concat), which lets comma lists take numpy's text parser alone.
    """
    counts = np.zeros(len(strings), dtype=np.int64)
    if not strings:
        return np.zeros(0, dtype=np.int64), counts
    if base == 10 and known_counts is not None and known_counts.min(initial=1) > 0:
        # comma lists from SQLite's group_concat (validated by the caller)
        values = np.fromstring(",".join(strings), dtype=np.int64, sep=",")
        if known_counts.sum() == len(values):
            return values, known_counts.astype(np.int64)
    lut = _LUT36 if base == 36 else _LUT10
    # a separator between strings so runs never cross string boundaries
    buf = np.frombuffer(("\n".join(strings) + "\n").encode("ascii"), dtype=np.uint8)
    digit = lut[buf]
    edge = np.diff((digit >= 0).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edge == 1)
    ends = np.flatnonzero(edge == -1)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64), counts
    lengths = ends - starts
    if lengths.max() > 12:
        raise ValueError("tag id too long")
    values = np.zeros(len(starts), dtype=np.int64)
    # add the k-th digit from the right of every token at once
    for k in range(int(lengths.max())):
        has = lengths > k if k else slice(None)
        values[has] += digit[ends[has] - 1 - k].astype(np.int64) * np.int64(base) ** k
    # string k occupies [bounds[k], bounds[k+1]) in the buffer
    lengths_s = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings)) + 1
    bounds = np.concatenate(([0], np.cumsum(lengths_s)))
    counts = np.diff(np.searchsorted(starts, bounds))
    return values, counts
