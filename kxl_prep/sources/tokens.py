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


def parse_token_lists(strings: list[str], base: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers in each string (digit runs in `base`, anything else separates).

    Returns (values int64, counts per string). Strings must be ASCII (validate first).
    """
    counts = np.zeros(len(strings), dtype=np.int64)
    if not strings:
        return np.zeros(0, dtype=np.int64), counts
    lut = _LUT36 if base == 36 else _LUT10
    # a separator between strings so runs never cross string boundaries
    buf = np.frombuffer(("\n".join(strings) + "\n").encode("ascii"), dtype=np.uint8)
    digit = lut[buf]
    is_d = digit >= 0
    if not is_d.any():
        return np.zeros(0, dtype=np.int64), counts
    prev = np.empty_like(is_d)
    prev[0] = False
    prev[1:] = is_d[:-1]
    starts = np.flatnonzero(is_d & ~prev)
    nxt = np.empty_like(is_d)
    nxt[-1] = False
    nxt[:-1] = is_d[1:]
    ends = np.flatnonzero(is_d & ~nxt) + 1
    pos = np.flatnonzero(is_d)
    token = np.repeat(np.arange(len(starts)), ends - starts)
    power = (ends[token] - 1 - pos).astype(np.int64)
    if power.max(initial=0) > 12:
        raise ValueError("tag id too long")
    contrib = digit[pos].astype(np.int64) * (np.int64(base) ** power)
    values = np.add.reduceat(contrib, np.searchsorted(pos, starts))
    # string k occupies [string_start[k], string_start[k+1]) in the buffer
    lengths = np.fromiter((len(s) + 1 for s in strings), dtype=np.int64, count=len(strings))
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    counts = np.diff(np.searchsorted(starts, bounds))
    return values, counts
