"""Small synthetic inputs for the export's tests and benchmark (never used by the export).
Tars are written with kxl_testing.sample's `write_tar` and `member_name`.

- `photo_like(w, h, seed)`: an RGB image with smooth gradients, edges and noise, so JPEG/WebP
  sizes and decode/resize costs resemble real illustrations (a flat image compresses ~100x
  better and would make the figures meaningless);
- `write_prep_dir(dir, rows, image_dir)`: the prep outputs the export reads (selection.parquet,
  meta.json, and dataset.toml through kxl_prep.outputs with the default recipe's buckets), from
  rows {id, ext, width, height, caption}.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from kxl_prep.outputs import DATASET_TOML, META_JSON, SELECTION_PARQUET, dataset_config, write_dataset_toml
from kxl_prep.recipe import load_recipe


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(xx / (17 + 11 * rng.random()) + yy / (29 + 13 * rng.random())),
        127 + 100 * np.cos(yy / (23 + 7 * rng.random())),
        127 + 100 * np.sin((xx + yy) / (31 + 5 * rng.random())),
    ], axis=-1)
    noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):  # hard edges, like line art
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(2, 9)))
    return img


def encode(img: Image.Image, ext: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}[ext]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write_prep_dir(prep_dir: Path, rows: list[dict], image_dir: str = "images") -> Path:
    """selection.parquet + meta.json + dataset.toml as the prep pipeline writes them."""
    prep_dir = Path(prep_dir)
    prep_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({
        "id": [int(r["id"]) for r in rows],
        "image_key": [f"{r['id']}.{r['ext']}" for r in rows],
        "file_ext": [r["ext"] for r in rows],
        "width": [int(r.get("width", 1024)) for r in rows],
        "height": [int(r.get("height", 1024)) for r in rows],
        "md5": [r.get("md5", "0" * 32) for r in rows],
        "rating": ["general"] * len(rows),
        "caption": [r.get("caption", f"caption of {r['id']}") for r in rows],
    })
    frame.to_parquet(prep_dir / SELECTION_PARQUET, index=False)
    meta = {f"{r['id']}.{r['ext']}": {"caption": r.get("caption", f"caption of {r['id']}"),
                                      "image_size": [int(r.get("width", 1024)), int(r.get("height", 1024))]}
            for r in rows}
    (prep_dir / META_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    config = dataset_config(load_recipe(), Path(META_JSON), Path(image_dir))
    write_dataset_toml(prep_dir / DATASET_TOML, config)
    return prep_dir
