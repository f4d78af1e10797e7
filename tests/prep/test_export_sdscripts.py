"""Down-sized exports against sd-scripts itself: it puts the written image in the bucket the
original had, finds nothing to resize, and crops it to the pixels it would have made from the
original."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kxl_prep.buckets import DEFAULT_GRID, BucketAssigner
from kxl_prep.export.process import ExportSettings, Processed, process_image, target_size
from kxl_testing.export_inputs import photo_like

pytestmark = pytest.mark.sdscripts


@pytest.fixture(scope="module")
def manager(train_util):
    m = train_util.BucketManager(False, (1024, 1024), 256, 4096, 64)
    m.make_buckets()
    return m


def test_written_sizes_keep_the_bucket_and_need_no_resize(manager):
    bucket_of = BucketAssigner(DEFAULT_GRID).assign_one
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(300, 9000, (3000, 2)), np.exp(rng.uniform(5, 9, (1000, 2))).astype(int)])
    fallbacks = 0
    for w, h in sizes.tolist():
        source_bucket, _, _ = manager.select_bucket(w, h)
        for mode in ("cover", "crop"):
            size, crop = target_size((w, h), bucket_of, mode)
            written = crop if crop is not None else size
            fallbacks += mode == "cover" and crop is not None
            bucket, resized, _ = manager.select_bucket(*written)
            assert tuple(bucket) == tuple(source_bucket), (w, h, mode, written)
            if written != (w, h):
                assert tuple(resized) == written  # sd-scripts only crops
    assert fallbacks < len(sizes) // 50  # the bucket-edge fallback is rare


def test_sd_scripts_crop_of_our_cover_image_is_our_crop_image(train_util, manager):
    src = photo_like(1700, 1100, 5)
    buf = io.BytesIO()
    src.save(buf, "PNG")
    data = buf.getvalue()
    bucket_of = BucketAssigner(DEFAULT_GRID).assign_one
    cover = process_image(data, "png", ExportSettings(format="png", resize="cover"), bucket_of)
    crop = process_image(data, "png", ExportSettings(format="png", resize="crop"), bucket_of)
    assert isinstance(cover, Processed) and isinstance(crop, Processed)
    cover_img = np.asarray(Image.open(io.BytesIO(cover.data)).convert("RGB"))
    bucket, resized, _ = manager.select_bucket(*cover.size)
    trimmed, original_size, _ = train_util.trim_and_resize_if_required(False, cover_img, bucket, resized)
    assert original_size == cover.size
    assert np.array_equal(trimmed, np.asarray(Image.open(io.BytesIO(crop.data)).convert("RGB")))

    # and it is exactly what sd-scripts makes from the original (resample=area is its cv2 INTER_AREA)
    bucket0, resized0, _ = manager.select_bucket(*src.size)
    assert tuple(bucket0) == tuple(bucket)
    theirs, _, _ = train_util.trim_and_resize_if_required(False, np.asarray(src), bucket0, resized0)
    assert np.array_equal(theirs, trimmed)
