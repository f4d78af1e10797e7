"""How long an exact resume takes to reach its first training item, at any step.

Builds an sd-scripts-shaped dataset of image keys only (no pixels: the cost measured is the
bookkeeping kxl adds, which is what depends on the step), bucketed like Epsilon's data, and
times, for resume steps 0 .. far into later epochs:
  canonicalize   once per process (sorted bucket lists)
  layout         the item's bucket for its epoch (each bucket once per epoch and process)
  order          the epoch's sampler permutation
  first item     from the resume position to the first loaded item's keys and captions
The time to the first item does not grow with the step: nothing before it is touched.

  .venv/bin/python bench/bench_resume_start.py --images 1000000
  .venv/bin/python bench/bench_resume_start.py --images 5350000  # ~3 GB
  .venv/bin/python bench/bench_resume_start.py --images 2000 --buckets 4   # smallest form
"""
from __future__ import annotations

import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import NamedTuple

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's code first, installed or not

from kxl_train.resume.items import canonicalize, load_item  # noqa: E402 - after the sys.path line
from kxl_train.resume.rng import RandomRouter  # noqa: E402
from kxl_train.resume.sampler import ExactBatchSampler  # noqa: E402
from kxl_train.resume.stepmath import EpochGeometry  # noqa: E402

ROUTER = RandomRouter(random)


class BucketBatchIndex(NamedTuple):
    bucket_index: int
    bucket_batch_size: int
    batch_index: int


class Info:
    __slots__ = ("caption",)

    def __init__(self, caption):
        self.caption = caption


class KeysOnlyDataset:
    """BaseDataset's bookkeeping (buckets, batch index, image_data) without images."""

    def __init__(self, num_images: int, num_buckets: int, batch_size: int):
        gen = random.Random(0)
        self.batch_size = batch_size
        self.current_epoch = self.current_step = 0
        self.image_data = {}
        self.bucket_manager = type("BM", (), {})()
        self.bucket_manager.buckets = [[] for _ in range(num_buckets)]
        for i in range(num_images):
            key = f"/data/{i % 1000:04d}/{i}.webp"
            self.image_data[key] = Info(f"1girl ||| tag{i % 97}, tag{i % 89}, tag{i % 83} ||| newest")
            self.bucket_manager.buckets[min(int(gen.expovariate(0.3)), num_buckets - 1)].append(key)
        self.buckets_indices = [
            BucketBatchIndex(b, batch_size, j)
            for b, bucket in enumerate(self.bucket_manager.buckets)
            for j in range(math.ceil(len(bucket) / batch_size))
        ]

    def __len__(self):
        return len(self.buckets_indices)

    def getitem(self, index):
        bbi = self.buckets_indices[index]
        bucket = self.bucket_manager.buckets[bbi.bucket_index]
        start = bbi.batch_index * bbi.bucket_batch_size
        captions = []
        for key in bucket[start : start + bbi.bucket_batch_size]:
            tokens = self.image_data[key].caption.split(" ||| ")[1].split(", ")
            ROUTER.shuffle(tokens)
            captions.append(", ".join(tokens))
        return {"captions": captions}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@click.command()
@click.option("--images", default=1_000_000, show_default=True)
@click.option("--buckets", default=40, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--processes", default=4, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
def main(images, buckets, batch_size, processes, grad_accum):
    ds, build_s = timed(lambda: KeysOnlyDataset(images, buckets, batch_size))
    geometry = EpochGeometry(len(ds), processes, grad_accum)
    ds._kxl_seed, ds._kxl_pos, ds._kxl_geometry = 42, 0, geometry
    _, canon_s = timed(lambda: canonicalize(ds))
    print(f"{images:,} images, {len(ds):,} items (batch {batch_size}), {processes} processes, GA {grad_accum}: "
          f"{geometry.steps_per_epoch:,} steps per epoch; build {build_s:.1f}s, canonicalize {canon_s:.2f}s")
    print(f"{'step':>10} {'epoch':>5} {'item s':>9} {'sampler s':>19}")
    for step in (0, 13_600, geometry.steps_per_epoch - 1, geometry.steps_per_epoch + 13_600,
                 3 * geometry.steps_per_epoch + 123):
        where = geometry.resumption(step)
        ds._kxl_layout_epoch = None  # a fresh process: the layout is computed again

        def first_item():
            sampler = ExactBatchSampler(len(ds), 42, processes)
            sampler.set_epoch(where.epoch)
            sampler.resume_at(where.epoch, where.order_offset)
            [item] = next(iter(sampler))
            return item

        item, order_s = timed(first_item)
        _, item_s = timed(lambda: load_item(ds, 0, item.index, item, KeysOnlyDataset.getitem, ROUTER))
        print(f"{step:>10,} {where.epoch + 1:>5} {item_s:>9.2f} {order_s:>19.3f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(item s includes laying out its bucket for the epoch)")


if __name__ == "__main__":
    main()
