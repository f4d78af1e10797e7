"""Loading one sd-scripts dataset item so that everything random about it is a function of
(seed, epoch, sample): bucket contents per epoch, flips, caption shuffle, tag dropout.

Duck-typed on sd-scripts' BaseDataset (bucket_manager.buckets, buckets_indices of
BucketBatchIndex, image_data, current_epoch, current_step); no sd-scripts import, so the same
code runs in CI against a dataset shaped like it.
"""
from __future__ import annotations

import random

from kxl_train.resume.rng import RandomRouter, derived_random, sample_rng
from kxl_train.resume.sampler import EpochItem
from kxl_train.resume.stepmath import EpochGeometry


class PatchError(RuntimeError):
    """sd-scripts does not behave like the pinned version these patches were written for."""


class WatchedImageData(dict):
    """BaseDataset.image_data that tells the active item when __getitem__ moves to the next
    image (it is looked up exactly once per image there), so each image gets its own stream."""

    watcher = None  # set per item load, per process (DataLoader workers are processes)

    def __getitem__(self, key):
        watcher = WatchedImageData.watcher
        if watcher is not None:
            watcher.next_image(key)
        return dict.__getitem__(self, key)


class ItemRandomness:
    def __init__(self, router: RandomRouter, seed: int, epoch: int, ds_pos: int, bucket_index: int,
                 start: int, keys: list[str]):
        self.router, self.seed, self.epoch = router, seed, epoch
        self.ds_pos, self.bucket_index, self.start, self.keys = ds_pos, bucket_index, start, keys
        self.done = 0

    def next_image(self, key: str) -> None:
        if self.done >= len(self.keys) or self.keys[self.done] != key:
            raise PatchError(
                f"kxl exact resume: image lookup {key!r} does not follow the batch {self.keys}; "
                f"sd-scripts' BaseDataset.__getitem__ is not the pinned v0.10.1 one"
            )
        position = self.start + self.done
        self.router.switch(sample_rng(self.seed, self.epoch, self.ds_pos, self.bucket_index, position))
        self.done += 1


def canonicalize(ds) -> None:
    """Remember a canonical layout (sorted bucket contents, sorted batch index) of a dataset."""
    layout = getattr(ds, "kxl_canonical_layout", None)
    if layout is not None:  # kxl_train.dataset's columnar dataset: precomputed, memory-mapped views
        ds._kxl_canonical_buckets, ds._kxl_canonical_indices = layout()
    else:
        ds._kxl_canonical_buckets = [sorted(bucket) for bucket in ds.bucket_manager.buckets]
        ds._kxl_canonical_indices = sorted(ds.buckets_indices, key=lambda b: (b.bucket_index, b.batch_index))
    ds._kxl_layout_epoch = None
    ds._kxl_laid_out = set()
    if not isinstance(ds.image_data, WatchedImageData) and not getattr(ds.image_data, "reports_lookups", False):
        ds.image_data = WatchedImageData(ds.image_data)


def enter_epoch(ds, epoch1: int) -> None:
    """Make ds.current_epoch = epoch1; a new epoch resets the layout (buckets are laid out lazily,
    each on the first item that needs it, so starting an epoch costs no full reshuffle)."""
    ds.current_epoch = epoch1
    if ds._kxl_layout_epoch != epoch1:
        ds._kxl_layout_epoch = epoch1
        ds._kxl_laid_out = set()
        ds.buckets_indices = ds._kxl_canonical_indices.copy()  # canonical: the sampler shuffles items


def epoch_bucket(ds, bucket_index: int) -> list:
    """Bucket contents for the current epoch: the sorted keys shuffled by a stream derived from
    (seed, epoch, dataset, bucket), a pure function of them."""
    if bucket_index not in ds._kxl_laid_out:
        shuffled = list_copy(ds._kxl_canonical_buckets[bucket_index])
        shuffle(derived_random(ds._kxl_seed, "bucket", ds._kxl_layout_epoch, ds._kxl_pos, bucket_index), shuffled)
        ds.bucket_manager.buckets[bucket_index] = shuffled
        ds._kxl_laid_out.add(bucket_index)
    return ds.bucket_manager.buckets[bucket_index]


def list_copy(seq):
    """A mutable copy: list(seq), or the view's own copy (kxl_train.dataset.views)."""
    return list(seq) if isinstance(seq, list) else seq.copy()


def shuffle(rng: random.Random, seq) -> None:
    """rng.shuffle(seq); a view shuffles its rows instead (the same permutation)."""
    shuffle_with = getattr(seq, "shuffle_with", None)
    if shuffle_with is not None:
        shuffle_with(rng)
    else:
        rng.shuffle(seq)


def layout_for_epoch(ds) -> None:
    """The whole layout of ds.current_epoch at once (what a shuffle_buckets call asks for)."""
    epoch1 = ds.current_epoch
    ds._kxl_layout_epoch = None
    enter_epoch(ds, epoch1)
    for bucket_index in range(len(ds._kxl_canonical_buckets)):
        epoch_bucket(ds, bucket_index)


def load_item(ds, ds_pos: int, local_index: int, item: EpochItem, original_getitem, router: RandomRouter):
    enter_epoch(ds, item.epoch + 1)  # sd-scripts counts epochs from 1 while training
    geometry: EpochGeometry = ds._kxl_geometry
    micro = item.position // geometry.num_processes
    ds.current_step = item.epoch * geometry.steps_per_epoch + micro // geometry.grad_accum
    batch_index = ds.buckets_indices[local_index]
    start = batch_index.batch_index * batch_index.bucket_batch_size
    keys = list(epoch_bucket(ds, batch_index.bucket_index)[start : start + batch_index.bucket_batch_size])
    randomness = ItemRandomness(router, ds._kxl_seed, item.epoch, ds_pos, batch_index.bucket_index, start, keys)
    WatchedImageData.watcher = randomness
    try:
        # a stream that refuses use before the first image: nothing may draw outside a sample
        with router.use(_NoRandomBeforeFirstImage()):
            example = original_getitem(ds, local_index)
    finally:
        WatchedImageData.watcher = None
    if randomness.done != len(keys):
        raise PatchError(f"kxl exact resume: {randomness.done} image lookups for a batch of {len(keys)}")
    example["kxl_keys"] = keys
    example["kxl_item"] = [item.epoch, item.position, item.index]
    return example


class _NoRandomBeforeFirstImage(random.Random):
    def random(self):  # noqa: D401
        raise PatchError("kxl exact resume: random draw in an item before its first image")
