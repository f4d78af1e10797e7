"""What every selector takes and returns, and the one seeded sampler they draw with.

A selector is a function `(posts, params, ctx) -> Selection`; kxl_prep.select names and runs them.

Determinism: sampling never uses numpy's Generator methods (whose streams may change between
numpy versions). It draws raw 64-bit words from PCG64 seeded by SeedSequence([seed, stream])
(both stable by numpy's policy), gives the k-th position the k-th word, and keeps the
positions with the smallest words (ties to the lower position). Same n, k, seed and stream ->
same positions on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd


@dataclass
class SelectContext:
    seed: int
    # Multiplies every requested count (rounded to nearest): runs a recipe on a small sample.
    count_scale: float = 1.0
    # The recipe file, so a selector can resolve files named relative to it.
    recipe_path: str | None = None
    progress: bool = True


@dataclass
class Selection:
    positions: np.ndarray  # int64 row positions into the posts table, ascending by id
    group: np.ndarray  # int32 group index of each selected row (into `groups`)
    groups: list[dict[str, Any]] = field(default_factory=list)  # per group: label + counts
    # Optional selector-specific report for the manifest, given the kept row positions.
    details: Callable[[np.ndarray], dict[str, Any]] | None = None


Selector = Callable[[pd.DataFrame, dict, SelectContext], Selection]


def sample_positions(n: int, k: int, seed: int, stream: int) -> np.ndarray:
    """k distinct positions out of range(n), ascending; uniform, without replacement."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    bitgen = np.random.PCG64(np.random.SeedSequence([int(seed), int(stream)]))
    words = bitgen.random_raw(n)
    # the k smallest words, ties to the lower position: O(n) partition instead of a sort
    kth = np.partition(words, k - 1)[k - 1]
    below = np.flatnonzero(words < kth)
    at = np.flatnonzero(words == kth)
    chosen = np.concatenate([below, at[: k - len(below)]])
    chosen.sort()
    return chosen.astype(np.int64, copy=False)
