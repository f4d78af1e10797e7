"""Small synthetic inputs for the export's tests and benchmark (never used by the export).

- `photo_like(w, h, seed)`: an RGB image with smooth gradients, edges and noise, so JPEG/WebP
  sizes and decode/resize costs resemble real illustrations (a flat image compresses ~100x
  better and would make the figures meaningless);
- `member_name(id, ext, style)`: `<id>.<ext>` at the tar root as nyanko7/danbooru2023 names
  them, `./<id>.<ext>`, or the `<id % 1000>/<id>.<ext>` form of the directory tree;
- `write_tar(path, members)`: a plain tar of (member name, bytes);
- `write_prep_dir(dir, rows, image_dir)`: the prep outputs the export reads (selection.parquet,
  meta.json, dataset.toml), from rows {id, ext, width, height, caption}.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw


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


MEMBER_STYLES = ("flat", "dot", "bucket")


def member_name(post_id: int, ext: str, style: str = "flat") -> str:
    """flat `<id>.<ext>`, dot `./<id>.<ext>`, bucket `<id % 1000 as 4 digits>/<id>.<ext>`."""
    if style not in MEMBER_STYLES:
        raise ValueError(f"member style {style!r}: expected one of {MEMBER_STYLES}")
    prefix = {"flat": "", "dot": "./", "bucket": f"{post_id % 1000:04d}/"}[style]
    return f"{prefix}{post_id}.{ext}"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


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
    frame.to_parquet(prep_dir / "selection.parquet", index=False)
    meta = {f"{r['id']}.{r['ext']}": {"caption": r.get("caption", f"caption of {r['id']}"),
                                      "image_size": [int(r.get("width", 1024)), int(r.get("height", 1024))]}
            for r in rows}
    (prep_dir / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (prep_dir / "dataset.toml").write_text(
        "[general]\nresolution = 1024\nmin_bucket_reso = 256\nmax_bucket_reso = 4096\n"
        "bucket_reso_steps = 64\nenable_bucket = true\n\n[[datasets]]\n\n[[datasets.subsets]]\n"
        f'image_dir = "{image_dir}"\nmetadata_file = "meta.json"\n', encoding="utf-8")
    return prep_dir
