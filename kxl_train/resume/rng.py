"""Random streams derived from names instead of drawn from a shared global state.

`derive_seed(seed, "sample", epoch, ...)` hashes its parts, so a sample's randomness depends
only on what the sample is, never on how much randomness was used before it: a resumed run
that never loads the skipped samples draws exactly what the uninterrupted run drew.

`RandomRouter` stands in for the `random` module inside a library: calls go to the stream
selected with `use(rng)`, and to the real module outside such a block, so everything else
in that library behaves as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from typing import Iterator

SEED_BITS = 64


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from an ordered tuple of ints/strings (stable across Python versions)."""
    for part in parts:
        if not isinstance(part, (int, str)) or isinstance(part, bool):
            raise TypeError(f"derive_seed takes ints and strings, got {part!r}")
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=SEED_BITS // 8).digest()
    return int.from_bytes(digest, "big")


def derived_random(*parts: object) -> random.Random:
    return random.Random(derive_seed(*parts))


def sample_rng(seed: int, epoch: int, *sample_index: int | str) -> random.Random:
    """The stream for one sample occurrence of one epoch (caption shuffle, tag dropout, flip,
    crop): the same in every run with this seed, whatever was loaded before."""
    return derived_random(seed, "sample", epoch, *sample_index)


class RandomRouter:
    """Module-like proxy for `random`: attribute lookups go to the active stream if one is
    selected in this thread, else to the real `random` module."""

    def __init__(self, fallback=random):
        self._fallback = fallback
        self._local = threading.local()

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @property
    def active(self) -> random.Random | None:
        stack = self._stack()
        return stack[-1] if stack else None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        rng = self.active
        if rng is not None and hasattr(rng, name) and name != "seed":
            return getattr(rng, name)
        if rng is not None and name == "seed":
            raise RuntimeError("random.seed() called while a derived stream is active")
        return getattr(self._fallback, name)

    @contextlib.contextmanager
    def use(self, rng: random.Random) -> Iterator[random.Random]:
        stack = self._stack()
        stack.append(rng)
        try:
            yield rng
        finally:
            stack.pop()

    def switch(self, rng: random.Random) -> None:
        """Replace the innermost active stream (inside a `use` block)."""
        stack = self._stack()
        if not stack:
            raise RuntimeError("RandomRouter.switch outside a use() block")
        stack[-1] = rng
