"""A small kxl-prep output with real images (meta.json, train_records.arrow, manifest.json,
dataset.toml), written through kxl_prep.outputs.DatasetWriter as `kxl-prep prepare` writes it,
for tests that train or load it through sd-scripts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from kxl_prep import outputs as out
from kxl_prep.buckets import BucketGrid

TINY_GRID = BucketGrid((64, 64), 32, 128, 32)
TAGS = ["red hair", "smile", "outdoors", "sky", "cloud", "dress", "glasses", "book", "cat ears", "night",
        "tree", "river", "school uniform", "petals", "hoodie", "sitting"]
PREFIXES = ["1girl, solo", "1boy", "2girls", "no humans", "1girl"]
SUFFIXES = ["masterpiece, newest", "best quality", "newest"]
# (w, h): exact buckets and sizes that resize and crop into 64x64, 128x32, 32x128, 96x32 ...
SIZES = [(64, 64), (80, 70), (128, 32), (150, 40), (64, 64), (33, 120), (100, 96), (64, 64), (130, 33),
         (90, 30), (64, 66), (40, 150)]


def make_prep_output(root: Path, n_images: int = 12, seed: int = 0, batch_size: int = 2,
                     random_crop: bool = True, captions: list[str] | None = None) -> Path:
    """Write the output under root; returns root / dataset.toml. `captions`: one per image
    instead of the generated ones."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [7 + 131 * i for i in range(n_images)]  # keys of different lengths: "7.png", "138.png", ...
    rows = []
    for i, pid in enumerate(ids):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{pid}.png")
        tags = [TAGS[j] for j in rng.choice(len(TAGS), size=5, replace=False)]
        caption = f"{PREFIXES[i % len(PREFIXES)]} ||| {', '.join(tags)} ||| {SUFFIXES[i % len(SUFFIXES)]}"
        if captions is not None:
            caption = captions[i]
        rows.append((pid, f"{pid}.png", caption, w, h))
    with out.DatasetWriter(root, len(rows), grid=TINY_GRID) as writer:
        writer.write({
            "id": np.array([r[0] for r in rows], np.int64),
            "image_key": pa.array([r[1] for r in rows], pa.string()),
            "file_ext": pa.array(["png"] * len(rows), pa.string()),
            "width": np.array([r[3] for r in rows], np.int32),
            "height": np.array([r[4] for r in rows], np.int32),
            "bucket_w": np.zeros(len(rows), np.int32),  # buckets.json is not what these tests read
            "bucket_h": np.zeros(len(rows), np.int32),
            "md5": pa.array([""] * len(rows), pa.string()),
            "rating": pa.array(["g"] * len(rows), pa.string()),
            "caption": pa.array([r[2] for r in rows], pa.large_string()),
        })
    manifest = {
        "kind": "kxl-prep dataset",
        "buckets": {"resolution": list(TINY_GRID.resolution), "min_reso": TINY_GRID.min_reso,
                    "max_reso": TINY_GRID.max_reso, "step": TINY_GRID.step},
        "outputs": out.describe_outputs(root, [out.META_JSON, out.TRAIN_RECORDS]),
    }
    (root / out.MANIFEST_JSON).write_text(json.dumps(manifest, indent=1))
    toml = root / out.DATASET_TOML
    toml.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens_separator = \"|||\"\ncaption_tag_dropout_rate = 0.2\n"
        f"flip_aug = true\nrandom_crop = {'true' if random_crop else 'false'}\n\n"
        f"[[datasets]]\nresolution = 64\nenable_bucket = true\nbucket_no_upscale = false\nmin_bucket_reso = 32\n"
        f"max_bucket_reso = 128\nbucket_reso_steps = 32\nbatch_size = {batch_size}\n\n"
        f"  [[datasets.subsets]]\n  metadata_file = \"{(root / out.META_JSON).resolve()}\"\n"
        f"  image_dir = \"{images.resolve()}\"\n"
    )
    return toml
