"""`--shard K/N`: which share of a job this process does, one convention for every command.

K is 0-based, 0 <= K < N, as in a Slurm array started with `--array=0-(N-1)`:
`--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT` (and torch's ranks, and Hugging Face
datasets' `shard(num_shards, index)`). Share K takes items K, K+N, K+2N, ... so the N shares
partition the items.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

from kxl_common.errors import KxlError

T = TypeVar("T")
WHOLE = (0, 1)
HELP = ("K/N: do share K of N, 0-based (0 <= K < N), e.g. a Slurm array started with --array=0-(N-1): "
        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.")


class ShardError(KxlError, ValueError):
    pass


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N); None or '' -> (0, 1), the whole job."""
    if not spec:
        return WHOLE
    try:
        k_text, n_text = spec.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ShardError(f"--shard {spec!r}: expected K/N, e.g. 3/16") from None
    if not (n >= 1 and 0 <= k < n):
        hint = f" (K is 0-based: the last of {n} is {n - 1}/{n})" if n >= 1 and k == n else ""
        raise ShardError(f"--shard {spec!r}: need 0 <= K < N{hint}")
    return k, n


def take_share(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """Share K of N of `items`: every N-th from K."""
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ShardError(f"shard {k}/{n}: need 0 <= K < N")
    return list(items[k::n])
