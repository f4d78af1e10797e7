"""Run-time patches that give sd-scripts v0.10.1 a columnar, memory-mapped fine-tuning dataset
for kxl-prep outputs (train_records.arrow beside meta.json; format: kxl_common.train_records).

What changes (installed by kxl_train.entry through kxl_train.patches; the submodule is never
edited):

- config_util.generate_dataset_group_by_blueprint builds its fine-tuning datasets through
  `config_util.FineTuningDataset`; that name becomes a factory that returns a
  ColumnarFineTuningDataset where the subset is a kxl-prep output (one subset, num_repeats 1,
  bucketing on, grid as written, fresh records) and sd-scripts' own FineTuningDataset otherwise;
- ColumnarFineTuningDataset is a FineTuningDataset whose image_data, image_to_subset,
  bucket lists and batch index are views over the records (kxl_train.dataset.views): nothing
  parses meta.json, no ImageInfo exists but the one of the image being loaded. Loading an item
  is sd-scripts' own BaseDataset.__getitem__; make_buckets fills the same buckets in the same
  order and shuffles them with the same random draws;
- DatasetGroup.__init__ would copy every dataset's image_data into one dict; for groups with a
  columnar dataset it gets a lazy ChainMap instead (sd-scripts reads it for --debug_dataset only).

--kxl-no-columnar-data leaves sd-scripts' dataset as it is.
"""
from __future__ import annotations

import collections
import logging
import os

import numpy as np

from kxl_common.train_records import TrainRecords, records_path
from kxl_train.attribute_patches import AttributePatches
from kxl_train.dataset.views import (BatchIndices, BucketKeys, ColumnarImageData, SameSubset, fingerprint_json,
                                     int32_array)
from kxl_train import source_edits
from kxl_train.resume.items import PatchError

logger = logging.getLogger("kxl.dataset")

# Exact text of the sd-scripts v0.10.1 code whose behaviour ColumnarFineTuningDataset
# reproduces; anything else is another sd-scripts and is refused.
ANCHORS = {
    "config_util.generate_dataset_group_by_blueprint": (
        "dataset_klass = FineTuningDataset",
        "dataset = dataset_klass(subsets=subsets, **asdict(dataset_blueprint.params), **extra_dataset_params)",
        "dataset.make_buckets()",
        "dataset.set_seed(seed)",
        "DatasetGroup(datasets)",
    ),
    "train_util.FineTuningDataset.__init__": (
        "image_keys_sorted_by_length_desc = sorted(metadata.keys(), key=len, reverse=True)",
        "abs_path = os.path.join(subset.image_dir, image_key)",
        "image_info = ImageInfo(image_key, subset.num_repeats, caption, False, abs_path, subset.caption_dropout_rate)",
        "subset.resize_interpolation if subset.resize_interpolation is not None else self.resize_interpolation",
        "image_info.image_size = tuple(image_size)  # width, height",
        "self.register_image(image_info, subset)",
        "self.num_train_images += len(metadata) * subset.num_repeats",
        "self.set_tag_frequency(os.path.basename(subset.metadata_file), tags_list)",
        "subset.img_count = len(metadata)",
    ),
    "train_util.BaseDataset.make_buckets": (
        "self.bucket_manager.make_buckets()",
        "self.bucket_manager.select_bucket(\n                    image_width, image_height\n                )",
        "self.bucket_manager.sort()",
        "self.bucket_manager.add_image(image_info.bucket_reso, image_info.image_key)",
        'self.bucket_info["buckets"][i] = {"resolution": reso, "count": len(bucket)}',
        'self.bucket_info["mean_img_ar_error"] = mean_img_ar_error',
        "self.buckets_indices.append(BucketBatchIndex(bucket_index, self.batch_size, batch_index))",
        "self.shuffle_buckets()\n        self._length = len(self.buckets_indices)",
    ),
    "train_util.BaseDataset.__getitem__": (
        "bucket = self.bucket_manager.buckets[self.buckets_indices[index].bucket_index]",
        "image_info = self.image_data[image_key]",
        "subset = self.image_to_subset[image_key]",
    ),
    "train_util.BucketManager.shuffle": ("random.shuffle(bucket)",),
    "train_util.DatasetGroup.__init__": ("self.image_data.update(dataset.image_data)",),
}


def check_anchors(modules: dict) -> None:
    source_edits.check_anchors(modules, ANCHORS, "kxl columnar dataset",
                               fix="pass --kxl-no-columnar-data for sd-scripts' own dataset")


def make_classes(train_util):
    """ColumnarFineTuningDataset and its BucketManager, for this process's sd-scripts."""

    class ColumnarBucketManager(train_util.BucketManager):
        def shuffle(self):
            for bucket in self.buckets:  # BucketManager.shuffle: random.shuffle(bucket), on the rows
                bucket.shuffle_with(train_util.random)

    class ColumnarFineTuningDataset(train_util.FineTuningDataset):
        """sd-scripts' FineTuningDataset over train_records.arrow (see the module docstring)."""

        def __init__(self, subsets, records: TrainRecords, batch_size, resolution, network_multiplier, enable_bucket,
                     min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale, debug_dataset,
                     validation_seed=None, validation_split=0.0, resize_interpolation=None):
            # FineTuningDataset.__init__'s attributes, without reading meta.json
            train_util.BaseDataset.__init__(self, resolution, network_multiplier, debug_dataset, resize_interpolation)
            self.batch_size = batch_size
            self.size = min(self.width, self.height)
            self.latents_cache = None
            self.enable_bucket = enable_bucket
            self.min_bucket_reso, self.max_bucket_reso = self.adjust_min_max_bucket_reso_by_steps(
                resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            self.bucket_reso_steps = bucket_reso_steps
            self.bucket_no_upscale = bucket_no_upscale
            [subset] = subsets
            self.records = records
            self.image_data = ColumnarImageData(records, self._image_info)
            self.image_to_subset = SameSubset(records, subset)
            self.num_train_images = records.rows * subset.num_repeats
            self.num_reg_images = 0
            self.set_tag_frequency(os.path.basename(subset.metadata_file), [])  # kxl-prep writes no "tags"
            subset.img_count = records.rows
            self.subsets.append(subset)
            logger.info("kxl columnar dataset: %d images from %s (memory-mapped)", records.rows, records.path)

        def _image_info(self, row: int):
            """The ImageInfo FineTuningDataset registers for this row, plus make_buckets' fields."""
            rec, subset = self.records, self.subsets[0]
            key = rec.key(row)
            abs_path = key if os.path.isabs(key) else os.path.join(subset.image_dir, key)
            info = train_util.ImageInfo(key, subset.num_repeats, rec.caption(row), False, abs_path,
                                        subset.caption_dropout_rate)
            info.resize_interpolation = (
                subset.resize_interpolation if subset.resize_interpolation is not None else self.resize_interpolation
            )
            info.image_size = rec.size(row)
            info.bucket_reso, info.resized_size, _ = self.bucket_manager.select_bucket(*info.image_size)
            expected = rec.resos[int(rec.bucket[row])]
            if info.bucket_reso != expected:
                raise PatchError(f"kxl columnar dataset: {key!r}: sd-scripts picks bucket {info.bucket_reso}, "
                                 f"{rec.path} says {expected}; rewrite it (kxl-prep train-records DATA_DIR)")
            return info

        def _batch_starts(self) -> list[int]:
            batches = [-(-count // self.batch_size) for count in self.records.counts]
            return [0, *np.cumsum(batches, dtype=np.int64).tolist()]

        def make_buckets(self):
            rec = self.records
            manager = ColumnarBucketManager(self.bucket_no_upscale, (self.width, self.height), self.min_bucket_reso,
                                            self.max_bucket_reso, self.bucket_reso_steps)
            manager.make_buckets()  # the predefined resolutions select_bucket chooses from
            unknown = [r for r in rec.resos if r not in manager.predefined_resos_set]
            if unknown:
                raise PatchError(f"kxl columnar dataset: {rec.path} has buckets {unknown[:3]} that sd-scripts "
                                 f"does not make for this resolution and bucket range")
            # BucketManager after select_bucket + sort(): the used resolutions sorted, buckets
            # filled in image_data order
            manager.resos = list(rec.resos)
            manager.reso_to_id = {reso: i for i, reso in enumerate(manager.resos)}
            manager.buckets = [BucketKeys(rec, int32_array(rec.bucket_rows(rec.bucket_data_order, b)))
                               for b in range(len(rec.resos))]
            self.bucket_manager = manager
            self.bucket_info = {"buckets": {}}
            for i, (reso, count) in enumerate(zip(rec.resos, rec.counts)):
                self.bucket_info["buckets"][i] = {"resolution": reso, "count": count}
                logger.info(f"bucket {i}: resolution {reso}, count: {count}")
            self.bucket_info["mean_img_ar_error"] = np.float64(rec.header["mean_ar_error"])
            starts = self._batch_starts()
            # shuffled as sd-scripts shuffles its list (same draws), on ordinals: an int array
            # shuffles at list speed; the view then turns ordinals into BucketBatchIndex
            order = int32_array(np.arange(starts[-1]))
            self.buckets_indices = order
            self.shuffle_buckets()
            self.buckets_indices = BatchIndices(train_util.BucketBatchIndex, starts, self.batch_size, order)
            self._length = len(self.buckets_indices)

        def kxl_canonical_layout(self):
            """kxl exact resume's canonical layout (kxl_train.resume.items.canonicalize): each bucket
            sorted by key and the batch index in (bucket, batch) order, straight from the mapping."""
            rec = self.records
            buckets = [BucketKeys(rec, rec.bucket_rows(rec.bucket_key_order, b)) for b in range(len(rec.resos))]
            return buckets, BatchIndices(train_util.BucketBatchIndex, self._batch_starts(), self.batch_size)

        def kxl_fingerprint_json(self):
            """(items, captions) JSON text chunks of kxl_train.resume.state.dataset_description."""
            return fingerprint_json(self.records, self.batch_size)

        def _no_caching(self, *args, **kwargs):
            raise PatchError("kxl columnar dataset: latent / text encoder output caching keeps state per image, "
                             "which this dataset does not hold; pass --kxl-no-columnar-data to cache")

        new_cache_latents = cache_latents = _no_caching
        new_cache_text_encoder_outputs = cache_text_encoder_outputs = cache_text_encoder_outputs_sd3 = _no_caching

    return ColumnarFineTuningDataset


def usable_records(subsets, params: dict) -> TrainRecords | None:
    """The records of a dataset that can be columnar; None (with the reason logged) otherwise."""
    if len(subsets) != 1:
        return None
    [subset] = subsets
    metadata_file = getattr(subset, "metadata_file", None)
    if not metadata_file or str(metadata_file).endswith(".jsonl"):
        return None
    path = records_path(metadata_file)
    if not path.is_file():
        logger.info("kxl columnar dataset: no %s beside %s: sd-scripts' own dataset", path.name, metadata_file)
        return None
    records = TrainRecords(path)
    records.check_fresh(metadata_file)  # stale records are an error, not a silent fallback
    grid = records.header["grid"]
    resolution = params.get("resolution")
    reasons = []
    if subset.num_repeats != 1:
        reasons.append(f"num_repeats {subset.num_repeats}")
    if not params.get("enable_bucket") or params.get("bucket_no_upscale"):
        reasons.append("bucketing off or bucket_no_upscale")
    if params.get("validation_split"):
        reasons.append("validation_split")
    if records.rows == 0:
        reasons.append("no images")
    if subset.image_dir is None:
        reasons.append("no image_dir")
    if resolution is None or tuple(resolution) != tuple(grid["resolution"]) or (
            params.get("min_bucket_reso"), params.get("max_bucket_reso"), params.get("bucket_reso_steps")) != (
            grid["min_reso"], grid["max_reso"], grid["step"]):
        reasons.append(f"bucket grid {resolution}, {params.get('min_bucket_reso')}..{params.get('max_bucket_reso')} "
                       f"step {params.get('bucket_reso_steps')} differs from the records' {grid}")
    if reasons:
        logger.warning("kxl columnar dataset not used for %s (%s): sd-scripts' own dataset", metadata_file,
                       "; ".join(reasons))
        return None
    return records


class Installed(AttributePatches):
    def __init__(self, dataset_class):
        super().__init__()
        self.dataset_class = dataset_class


def install(kxl_options: dict, argv: list[str]) -> Installed | None:
    if kxl_options.get("no_columnar_data"):
        logger.info("kxl: --kxl-no-columnar-data: sd-scripts' own dataset for every subset")
        return None
    from library import config_util, train_util

    check_anchors({"config_util": config_util, "train_util": train_util})
    dataset_class = make_classes(train_util)
    installed = Installed(dataset_class)
    upstream_class = config_util.FineTuningDataset

    def fine_tuning_dataset(subsets, **params):
        records = usable_records(subsets, params)
        if records is None:
            return upstream_class(subsets=subsets, **params)
        return dataset_class(subsets=subsets, records=records, **params)

    installed.replace(config_util, "FineTuningDataset", fine_tuning_dataset)
    original_group_init = train_util.DatasetGroup.__init__

    def group_init(self, datasets):
        columnar = [ds for ds in datasets if isinstance(ds, dataset_class)]
        views = [(ds, ds.image_data) for ds in columnar]
        for ds in columnar:
            ds.image_data = {}  # nothing to copy: the group's image_data becomes a view below
        try:
            original_group_init(self, datasets)
        finally:
            for ds, view in views:
                ds.image_data = view
        if columnar:  # dict.update order: the last dataset's entry wins
            self.image_data = collections.ChainMap(*[ds.image_data for ds in reversed(list(datasets))])

    installed.replace(train_util.DatasetGroup, "__init__", group_init)
    return installed
