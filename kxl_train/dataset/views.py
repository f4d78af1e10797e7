"""sd-scripts' per-image containers (BucketManager.buckets, BaseDataset.buckets_indices,
image_data, image_to_subset) as views over memory-mapped train records: each key, batch index
and ImageInfo is built when sd-scripts asks for it and dropped with the item that asked.

Orders that change (an epoch's shuffled bucket, sd-scripts' shuffled batch index) are int32
arrays (array.array: 4 bytes an entry, shuffled in place by random.shuffle exactly as the list
they stand for, since random.shuffle only swaps positions). No sd-scripts import.
"""
from __future__ import annotations

import bisect
from array import array
from collections.abc import Mapping
from typing import Callable, Iterator

import numpy as np

from kxl_common.train_records import TrainRecords
from kxl_train.resume.items import WatchedImageData


def int32_array(values) -> array:
    out = array("i")
    if out.itemsize != 4:  # pragma: no cover - every platform CPython supports has a 4-byte int
        raise RuntimeError("array('i') is not 4 bytes here")
    out.frombytes(np.ascontiguousarray(values, dtype=np.int32).tobytes())
    return out


class BucketKeys:
    """One bucket's keys (sd-scripts: a list of image keys), as rows of the records."""

    def __init__(self, records: TrainRecords, rows):
        self.records = records
        self.rows = rows  # array('i') (mutable) or a read-only numpy view of the mapping

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.records.key(int(r)) for r in self.rows[index]]
        return self.records.key(int(self.rows[index]))

    def __setitem__(self, index: int, key: str) -> None:
        row = self.records.find(key)
        if row < 0:
            raise KeyError(key)
        self.rows[index] = row

    def __iter__(self) -> Iterator[str]:
        for row in self.rows:
            yield self.records.key(int(row))

    def copy(self) -> "BucketKeys":
        return BucketKeys(self.records, int32_array(self.rows))

    def shuffle_with(self, rng) -> None:
        """rng.shuffle of the keys, on the rows (the same permutation, without key objects)."""
        if not isinstance(self.rows, array):
            self.rows = int32_array(self.rows)
        rng.shuffle(self.rows)


class BatchIndices:
    """BaseDataset.buckets_indices: item i is BucketBatchIndex(bucket, batch_size, batch) of the
    ordinal order[i] (identity without an order), ordinals counting batches bucket by bucket."""

    def __init__(self, make_index: Callable, starts: list[int], batch_size: int, order: array | None = None):
        self.make_index, self.starts, self.batch_size, self.order = make_index, starts, batch_size, order

    def __len__(self) -> int:
        return self.starts[-1]

    def _index(self, ordinal: int):
        if not 0 <= ordinal < self.starts[-1]:
            raise IndexError(ordinal)
        bucket = bisect.bisect_right(self.starts, ordinal) - 1
        return self.make_index(bucket, self.batch_size, ordinal - self.starts[bucket])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return self._index(self.order[i] if self.order is not None else i)

    def __setitem__(self, i: int, value) -> None:
        if self.order is None:
            self.order = int32_array(np.arange(len(self)))
        self.order[i] = self.starts[value.bucket_index] + value.batch_index

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def copy(self) -> "BatchIndices":
        order = None if self.order is None else array("i", self.order)
        return BatchIndices(self.make_index, self.starts, self.batch_size, order)


class RecordKeys(Mapping):
    """A mapping keyed by the records' image keys, iterated in sd-scripts' registration order
    (image_data's); a subclass says what a key maps to."""

    records: TrainRecords

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.records.find(key) >= 0

    def __len__(self) -> int:
        return self.records.rows

    def __iter__(self) -> Iterator[str]:
        for row in self.records.data_order:
            yield self.records.key(int(row))


class ColumnarImageData(RecordKeys):
    """BaseDataset.image_data: key -> a fresh ImageInfo of its record. Iterates in sd-scripts'
    registration order. Tells kxl's exact resume of each lookup (as WatchedImageData does)."""

    reports_lookups = True

    def __init__(self, records: TrainRecords, make_info: Callable[[int], object]):
        self.records, self.make_info = records, make_info

    def __getitem__(self, key):
        watcher = WatchedImageData.watcher
        if watcher is not None:
            watcher.next_image(key)
        row = self.records.find(key) if isinstance(key, str) else -1
        if row < 0:
            raise KeyError(key)
        return self.make_info(row)


def fingerprint_json(records: TrainRecords, batch_size: int) -> tuple[Iterator[str], Iterator[str]]:
    """The JSON text kxl_train.resume.state.dataset_description hashes for a dataset, in chunks:
    {"batch_size": B, "buckets": [[[w, h], [sorted keys]], ...]} and [[key, caption], ...]."""

    def items():
        yield f'{{"batch_size": {int(batch_size)}, "buckets": ['
        for b, (w, h) in enumerate(records.resos):
            yield f"[[{w}, {h}], " if b == 0 else f", [[{w}, {h}], "
            yield from records.bucket_keys_json(b)
            yield "]"
        yield "]}"

    return items(), records.captions_json()


class SameSubset(RecordKeys):
    """BaseDataset.image_to_subset of a dataset with one subset."""

    def __init__(self, records: TrainRecords, subset):
        self.records, self.subset = records, subset

    def __getitem__(self, key):
        return self.subset  # asked only for keys of this dataset's buckets
