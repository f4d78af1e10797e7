"""The aspect-ratio bucket sd-scripts will put each image in, from its width and height alone.

Written from sd-scripts' documented behaviour (v0.10.1, BucketManager with upscaling
allowed, i.e. no `bucket_no_upscale`), not copied:

- min/max bucket sides are first moved onto the step grid (min down, max up) and must
  bracket the resolution;
- candidates, with A = resolution area and s = step: the square side floor(sqrt(A) / s) * s,
  and for every w in min, min+s, ..., max: h = min(max, floor(floor(A / w) / s) * s); when
  h >= min both (w, h) and (h, w) are candidates. Sorted as (w, h) tuples.
- an image whose exact (w, h) is a candidate uses it; otherwise the candidate whose w/h is
  nearest to the image's (float64 |cand - image|), ties going to the first in sorted order.

Vectorized: nearest by binary search over the distinct candidate ratios (subtraction is
monotone in IEEE arithmetic, so the float minimum is at one of the two neighbours).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kxl_common.errors import KxlError
from kxl_prep.recipe import BucketSpec


class BucketError(KxlError, ValueError):
    pass


@dataclass(frozen=True)
class BucketGrid:
    resolution: tuple[int, int]
    min_reso: int
    max_reso: int
    step: int

    @classmethod
    def from_spec(cls, spec: BucketSpec) -> "BucketGrid":
        return cls(tuple(spec.resolution), spec.min_reso, spec.max_reso, spec.step)

    def adjusted(self) -> tuple[int, int]:
        """(min, max) as sd-scripts uses them: min rounded down, max up, to the step."""
        lo = self.min_reso - self.min_reso % self.step
        hi = self.max_reso if self.max_reso % self.step == 0 else self.max_reso + self.step - self.max_reso % self.step
        if min(self.resolution) < lo:
            raise BucketError(f"min bucket side {lo} is larger than the resolution {self.resolution}")
        if max(self.resolution) > hi:
            raise BucketError(f"max bucket side {hi} is smaller than the resolution {self.resolution}")
        return lo, hi

    def resolutions(self) -> np.ndarray:
        """Candidate (w, h) rows, sorted as tuples."""
        lo, hi = self.adjusted()
        area = self.resolution[0] * self.resolution[1]
        s = self.step
        found = {(math.isqrt(area) // s * s,) * 2}
        for w in range(lo, hi + 1, s):
            h = min(hi, (area // w) // s * s)
            if h >= lo:
                found.add((w, h))
                found.add((h, w))
        return np.array(sorted(found), dtype=np.int64)


# The grid of the recipe defaults (Epsilon: 1024x1024 area, sides 256..4096, step 64).
DEFAULT_GRID = BucketGrid.from_spec(BucketSpec())


class BucketAssigner:
    def __init__(self, grid: BucketGrid):
        self.grid = grid
        self.resos = grid.resolutions()
        ratios = self.resos[:, 0] / self.resos[:, 1]
        # distinct ratios ascending, and for each the first sorted candidate having it
        self.ratios, first = np.unique(ratios, return_index=True)
        self.first_index = first  # np.unique returns the first occurrence
        self.keys = self.resos[:, 0] * (1 << 32) + self.resos[:, 1]
        self.key_order = np.argsort(self.keys)

    def assign_index(self, width: np.ndarray, height: np.ndarray) -> np.ndarray:
        """Index into self.resos for every (width, height)."""
        width = np.asarray(width, dtype=np.int64)
        height = np.asarray(height, dtype=np.int64)
        if len(width) and (width.min() <= 0 or height.min() <= 0):
            raise BucketError("image sizes must be positive")
        ar = width / height
        right = np.clip(np.searchsorted(self.ratios, ar), 0, len(self.ratios) - 1)
        left = np.clip(right - 1, 0, len(self.ratios) - 1)
        err_l = np.abs(self.ratios[left] - ar)
        err_r = np.abs(self.ratios[right] - ar)
        idx_l = self.first_index[left]
        idx_r = self.first_index[right]
        chosen = np.where(err_l < err_r, idx_l, np.where(err_r < err_l, idx_r, np.minimum(idx_l, idx_r)))
        # an image already at a candidate size stays there
        keys = width * (1 << 32) + height
        pos = np.clip(np.searchsorted(self.keys[self.key_order], keys), 0, len(self.keys) - 1)
        exact = self.keys[self.key_order][pos] == keys
        chosen = np.where(exact, self.key_order[pos], chosen)
        return chosen.astype(np.int64)

    def assign(self, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = self.assign_index(width, height)
        return self.resos[idx, 0].astype(np.int32), self.resos[idx, 1].astype(np.int32)

    def assign_one(self, width: int, height: int) -> tuple[int, int]:
        """The bucket of one image (export resizes one file at a time)."""
        bw, bh = self.assign(np.array([width]), np.array([height]))
        return int(bw[0]), int(bh[0])


def histogram(bucket_w: np.ndarray, bucket_h: np.ndarray) -> list[dict]:
    """Images per bucket, sorted by (w, h): [{w, h, aspect, count, share}]."""
    if len(bucket_w) == 0:
        return []
    keys = bucket_w.astype(np.int64) * (1 << 32) + bucket_h.astype(np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    total = int(counts.sum())
    rows = []
    for key, count in zip(uniq.tolist(), counts.tolist()):
        w, h = key >> 32, key & 0xFFFFFFFF
        rows.append({"w": w, "h": h, "aspect": round(w / h, 4), "count": count, "share": count / total})
    return rows
