"""kxl_train.dataset.views without sd-scripts: the views behave as the lists and dicts sd-scripts
builds (random.shuffle gives the same permutation, lookups the same records), and exact
resume's fingerprints of a columnar dataset equal those of the same data held in lists."""
from __future__ import annotations

import random
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_common.train_records import TrainRecords
from kxl_prep.buckets import BucketGrid
from kxl_prep.columnar import TrainRecordsWriter
from kxl_train.dataset.views import BatchIndices, BucketKeys, ColumnarImageData, SameSubset, fingerprint_json
from kxl_train.resume import items as items_mod
from kxl_train.resume import state as state_mod
from kxl_train.resume.items import WatchedImageData

GRID = BucketGrid((64, 64), 32, 128, 32)
SIZES = [(64, 64), (128, 32), (32, 128), (90, 30), (80, 70), (40, 150)]


class BucketBatchIndex(NamedTuple):  # sd-scripts' train_util.BucketBatchIndex
    bucket_index: int
    bucket_batch_size: int
    batch_index: int


def write_records(path, n: int, seed: int = 0) -> TrainRecords:
    rng = random.Random(seed)
    keys = [f"{rng.randrange(10**6)}-{i}.png" for i in range(n)]
    sizes = [SIZES[rng.randrange(len(SIZES))] for _ in range(n)]
    with TrainRecordsWriter(path, GRID) as writer:
        writer.add(keys, [f'1girl ||| tag{i % 7}, "x" ||| {i}' for i in range(n)], [s[0] for s in sizes],
                   [s[1] for s in sizes])
        writer.close("0" * 64)
    return TrainRecords(path)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_bucket_keys_shuffle_like_the_list(tmp_path_factory, n, seed):
    rec = write_records(tmp_path_factory.mktemp("r") / "r.arrow", n, seed % 1000)
    for b in range(len(rec.resos)):
        view = BucketKeys(rec, rec.bucket_rows(rec.bucket_data_order, b))
        as_list = [rec.key(int(r)) for r in rec.bucket_rows(rec.bucket_data_order, b)]
        assert list(view) == as_list and len(view) == len(as_list) and view[1:3] == as_list[1:3]
        original = list(as_list)
        copy = view.copy()
        copy.shuffle_with(random.Random(seed))
        random.Random(seed).shuffle(as_list)
        assert list(copy) == as_list
        assert list(view) == original  # the copy was shuffled, not the mapped rows
        # through random.shuffle's own item swaps (sd-scripts' BucketManager.shuffle on a view)
        slow = view.copy()
        random.Random(seed).shuffle(slow)
        assert list(slow) == as_list


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 9), min_size=1, max_size=6), batch=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_batch_indices_are_sd_scripts_list(counts, batch, seed):
    expected = [BucketBatchIndex(b, batch, j) for b, c in enumerate(counts) for j in range(-(-c // batch))]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + -(-c // batch))
    view = BatchIndices(BucketBatchIndex, starts, batch)
    assert list(view) == expected and len(view) == len(expected) and view[-1] == expected[-1]
    original = list(expected)
    random.Random(seed).shuffle(expected)
    shuffled = view.copy()
    random.Random(seed).shuffle(shuffled)
    assert list(shuffled) == expected and list(view) == original
    assert list(shuffled.copy()) == expected
    with pytest.raises(IndexError):
        view[len(view)]


def test_image_data_builds_records_on_lookup_and_reports_them(tmp_path):
    rec = write_records(tmp_path / "r.arrow", 20)
    made = []
    data = ColumnarImageData(rec, lambda row: made.append(row) or ("info", row))
    key = rec.key(5)
    assert data[key] == ("info", 5) and key in data and "nope" not in data
    with pytest.raises(KeyError):
        data["nope"]
    assert list(data) == [rec.key(int(r)) for r in rec.data_order] and len(data) == 20
    seen = []

    class Watcher:
        def next_image(self, k):
            seen.append(k)

    WatchedImageData.watcher = Watcher()
    try:
        data[key]
    finally:
        WatchedImageData.watcher = None
    assert seen == [key] and made == [5, 5]
    subsets = SameSubset(rec, "the subset")
    assert subsets[key] == "the subset" and len(subsets) == 20 and sorted(subsets) == sorted(data)


class ListDataset:
    """The containers sd-scripts' FineTuningDataset holds, as lists and dicts."""

    def __init__(self, rec: TrainRecords, batch_size: int, subset):
        self.batch_size = batch_size
        self.bucket_manager = type("BM", (), {})()
        self.bucket_manager.resos = list(rec.resos)
        self.bucket_manager.buckets = [[rec.key(int(r)) for r in rec.bucket_rows(rec.bucket_data_order, b)]
                                       for b in range(len(rec.resos))]
        info = type("Info", (), {})
        self.image_data = {}
        for row in rec.data_order:
            i = info()
            i.caption = rec.caption(int(row))
            self.image_data[rec.key(int(row))] = i
        self.image_to_subset = {k: subset for k in self.image_data}
        self.subsets = [subset]
        self.length = sum(-(-c // batch_size) for c in rec.counts)

    def __len__(self):
        return self.length


class ColumnarLike(ListDataset):
    def __init__(self, rec, batch_size, subset):
        super().__init__(rec, batch_size, subset)
        self.records = rec

    def kxl_fingerprint_json(self):
        return fingerprint_json(self.records, self.batch_size)


class Subset:
    num_repeats, shuffle_caption, caption_separator, keep_tokens = 1, True, ",", 0
    keep_tokens_separator, caption_tag_dropout_rate = "|||", 0.15


@pytest.mark.parametrize("n_datasets", [1, 2])
def test_fingerprints_of_columnar_and_list_datasets_agree(tmp_path, n_datasets):
    group_lists = type("G", (), {})()
    group_cols = type("G", (), {})()
    recs = [write_records(tmp_path / f"r{i}.arrow", 30 + i, seed=i) for i in range(n_datasets)]
    group_lists.datasets = [ListDataset(r, 4, Subset()) for r in recs]
    group_cols.datasets = [ColumnarLike(r, 4, Subset()) for r in recs]
    plain, columnar = state_mod.dataset_description(group_lists), state_mod.dataset_description(group_cols)
    assert plain == columnar and plain["num_items"] == sum(len(d) for d in group_lists.datasets)
    group_cols.datasets[0].batch_size = 2  # another batch size is another fingerprint
    assert state_mod.dataset_description(group_cols)["items_sha256"] != plain["items_sha256"]


def test_exact_resume_layout_of_views_equals_the_lists(tmp_path):
    """canonicalize / epoch_bucket on a columnar-like dataset give the keys they give on lists."""
    rec = write_records(tmp_path / "r.arrow", 40)
    lists, cols = ListDataset(rec, 3, Subset()), ColumnarLike(rec, 3, Subset())
    starts = [0]
    for c in rec.counts:
        starts.append(starts[-1] + -(-c // 3))
    lists.buckets_indices = [BucketBatchIndex(b, 3, j) for b, c in enumerate(rec.counts) for j in range(-(-c // 3))]
    random.Random(1).shuffle(lists.buckets_indices)
    cols.buckets_indices = BatchIndices(BucketBatchIndex, starts, 3)
    cols.bucket_manager.buckets = [BucketKeys(rec, rec.bucket_rows(rec.bucket_data_order, b)) for b in range(len(rec.resos))]
    cols.kxl_canonical_layout = lambda: (
        [BucketKeys(rec, rec.bucket_rows(rec.bucket_key_order, b)) for b in range(len(rec.resos))],
        BatchIndices(BucketBatchIndex, starts, 3))
    cols.image_data = ColumnarImageData(rec, lambda row: row)
    for ds in (lists, cols):
        ds._kxl_seed, ds._kxl_pos = 42, 0
        items_mod.canonicalize(ds)
    assert isinstance(lists.image_data, WatchedImageData) and isinstance(cols.image_data, ColumnarImageData)
    for epoch in (1, 2, 5):
        for ds in (lists, cols):
            ds.current_epoch = epoch
            items_mod.layout_for_epoch(ds)
        assert [list(b) for b in lists.bucket_manager.buckets] == [list(b) for b in cols.bucket_manager.buckets]
        assert list(lists.buckets_indices) == list(cols.buckets_indices)
