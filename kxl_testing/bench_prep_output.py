"""An Epsilon-shaped kxl-prep output of N images without pixels (meta.json, train_records.arrow,
selection.parquet, manifest.json, dataset.toml), written chunk by chunk through
kxl_prep.outputs.DatasetWriter as `kxl-prep prepare` writes it, for bench/bench_train_data.py.

Captions look like rev1's (`<people, characters, artists> ||| ~28 general tags ||| quality,
year, rating`, ~330 characters, meta.json ~1.76 GiB at 5.21M images); sizes spread over
Danbooru-like aspect ratios; keys `<id>.<ext>` in id order.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from kxl_prep import outputs as out
from kxl_prep.buckets import DEFAULT_GRID

CHUNK = 200_000
QUALITY = ["masterpiece", "best quality", "great quality", "good quality", "normal quality", "low quality"]
YEARS = ["newest", "recent", "mid", "early", "old"]
RATINGS = ["safe", "sensitive", "nsfw", "explicit"]


def _words(rng, n: int, lo: int, hi: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(lo, hi, n)
    return ["".join(letters[rng.integers(0, 26, k)]) for k in lengths]


def caption_pools(rng) -> tuple[list[str], list[str], list[str]]:
    tags = [f"{a} {b}" if i % 3 else a for i, (a, b) in enumerate(zip(_words(rng, 20_000, 3, 9), _words(rng, 20_000, 3, 8)))]
    heads = [", ".join(["1girl" if i % 4 else "2girls", "solo", *(_words(rng, 2, 5, 14))]) for i in range(5_000)]
    pick = rng.zipf(1.3, (60_000, 28)) % len(tags)
    generals = [", ".join(tags[j] for j in row) for row in pick]
    tails = [f"{q}, {y}, {r}" for q in QUALITY for y in YEARS for r in RATINGS]
    return heads, generals, tails


def epsilon_config(meta: Path, image_dir: Path, batch_size: int = 4) -> dict:
    g = DEFAULT_GRID
    return {
        "general": {"shuffle_caption": True, "keep_tokens_separator": "|||", "caption_tag_dropout_rate": 0.15},
        "datasets": [{
            "resolution": g.resolution[0], "enable_bucket": True, "bucket_no_upscale": False,
            "min_bucket_reso": g.min_reso, "max_bucket_reso": g.max_reso, "bucket_reso_steps": g.step,
            "batch_size": batch_size,
            "subsets": [{"metadata_file": str(meta), "image_dir": str(image_dir)}],
        }],
    }


def chunk_rows(seed: int, lo: int, ids, pools):
    """(keys, extensions, widths, heights, captions) of the chunk of images starting at row `lo`."""
    heads, generals, tails = pools
    crng = np.random.default_rng([seed, lo])
    n = len(ids)
    ext = np.array(["png", "jpg", "webp"])[crng.choice(3, n, p=[0.3, 0.6, 0.1])]
    keys = [f"{i}.{e}" for i, e in zip(ids.tolist(), ext.tolist())]
    short = crng.integers(700, 2400, n)
    aspect = np.exp(crng.normal(-0.15, 0.35, n))  # portrait-leaning, like Danbooru
    width = np.where(aspect >= 1, short * aspect, short).astype(np.int32)
    height = np.where(aspect >= 1, short, short / aspect).astype(np.int32)
    h_idx, g_idx, t_idx = crng.integers(0, len(heads), n), crng.integers(0, len(generals), n), crng.integers(0, len(tails), n)
    captions = [f"{heads[a]} ||| {generals[b]} ||| {tails[c]}" for a, b, c in zip(h_idx, g_idx, t_idx)]
    return keys, ext, width, height, captions


def epsilon_rows(n_images: int, seed: int = 0):
    """The rows make_bench_prep_output writes, chunk by chunk, without writing anything:
    (keys, widths, heights, captions) per chunk."""
    rng = np.random.default_rng(seed)
    pools = caption_pools(rng)
    ids = np.sort(rng.choice(7_900_000, size=n_images, replace=False)) + 1
    for lo in range(0, n_images, CHUNK):
        keys, _, width, height, captions = chunk_rows(seed, lo, ids[lo:lo + CHUNK], pools)
        yield keys, width, height, captions


def make_bench_prep_output(out_dir: Path, n_images: int, seed: int = 0, progress: bool = True) -> dict:
    """Write the output; returns the seconds the columnar records added to the write."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    heads, generals, tails = caption_pools(rng)
    ids = np.sort(rng.choice(7_900_000, size=n_images, replace=False)) + 1
    added = {"records_add_s": 0.0, "records_close_s": 0.0}
    writer = out.DatasetWriter(out_dir, n_images, grid=DEFAULT_GRID)
    records = writer._meta.records
    add, close = records.add, records.close

    def timed(fn, name):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                added[name] += time.perf_counter() - t
        return wrapper

    records.add, records.close = timed(add, "records_add_s"), timed(close, "records_close_s")
    t_write = time.perf_counter()
    with writer:
        for lo in tqdm(range(0, n_images, CHUNK), desc="bench prep output", unit="chunk", disable=not progress):
            hi = min(lo + CHUNK, n_images)
            n = hi - lo
            keys, ext, width, height, captions = chunk_rows(seed, lo, ids[lo:hi], (heads, generals, tails))
            writer.write({
                "id": ids[lo:hi].astype(np.int64), "image_key": pa.array(keys, pa.string()),
                "file_ext": pa.array(ext.tolist(), pa.string()), "width": width, "height": height,
                "bucket_w": np.zeros(n, np.int32), "bucket_h": np.zeros(n, np.int32),
                "md5": pa.array([""] * n, pa.string()), "rating": pa.array(["g"] * n, pa.string()),
                "caption": pa.array(captions, pa.large_string()),
            })
    write_s = time.perf_counter() - t_write
    from kxl_common.digest import sha256_file

    t = time.perf_counter()
    sha256_file(out_dir / out.META_JSON)  # what the incremental meta.json hash costs, about
    added["meta_sha256_s"] = time.perf_counter() - t
    t = time.perf_counter()
    outputs = out.describe_outputs(out_dir, [out.META_JSON, out.SELECTION_PARQUET, out.TRAIN_RECORDS])
    added["manifest_checksums_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sha256_file(out_dir / out.TRAIN_RECORDS)
    added["records_checksum_s"] = time.perf_counter() - t
    g = DEFAULT_GRID
    manifest = {"kind": "kxl-prep dataset (bench, no pixels)", "counts": {"images": n_images},
                "buckets": {"resolution": list(g.resolution), "min_reso": g.min_reso, "max_reso": g.max_reso,
                            "step": g.step},
                "outputs": outputs}
    (out_dir / out.MANIFEST_JSON).write_text(json.dumps(manifest, indent=1))
    out.write_dataset_toml(out_dir / out.DATASET_TOML, epsilon_config((out_dir / out.META_JSON).resolve(),
                                                                      (out_dir / "images").resolve()))
    added["write_s"] = write_s
    added["added_s"] = (added["records_add_s"] + added["records_close_s"] + added["meta_sha256_s"]
                        + added["records_checksum_s"])
    return added
