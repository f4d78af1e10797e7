"""`kxl eval generate`: one image per (prompt, seed), resumable, batched, sharded.

Layout of the output folder:
  generate.json            the model, the settings (and their digest), the prompt file's sha256
  images/<prompt id>/<seed>.png   written atomically, with prompt/seed/settings in PNG text

A rerun skips every image already on disk; a folder made with other settings or another
model is refused (mixing them would make the score meaningless). `--shard K/N` takes every
N-th job starting at the K-th (0-based, kxl_common.shard) of the prompt-file order, so N machines can split
one benchmark into the same folder (or folders merged later: names do not collide).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from kxl_common.atomic import write_bytes, write_json
from kxl_common.digest import sha256_file
from kxl_common.shard import WHOLE, parse_shard, take_share  # noqa: F401 - parse_shard for callers

from .backends import Backend
from .errors import EvalError
from .prompts import Prompt
from .settings import GenSettings

GENERATE_JSON = "generate.json"
IMAGES = "images"


@dataclass(frozen=True)
class Job:
    prompt: Prompt
    seed: int


# Above this many pixels an image takes minutes on a CPU (SDXL at 1024 px: several minutes per image).
CPU_WARN_PIXELS = 512 * 512


def cpu_warning(settings: GenSettings, device_type: str) -> str | None:
    """The warning `launch` gives for CPU sampling, for generation on a CPU at full size."""
    if device_type != "cpu" or settings.width * settings.height <= CPU_WARN_PIXELS:
        return None
    return (f"generating {settings.width}x{settings.height} px on a CPU: expect minutes per image; "
            "use a GPU (--device cuda) or a small settings file (recipes/eval/generate-tiny.toml) for a try")


def all_jobs(prompts: Sequence[Prompt]) -> list[Job]:
    return [Job(p, s) for p in prompts for s in p.seeds]


def shard_jobs(jobs: Sequence[Job], shard: tuple[int, int]) -> list[Job]:
    return take_share(jobs, shard)


def image_path(out_dir: Path, prompt_id: str, seed: int) -> Path:
    return Path(out_dir) / IMAGES / prompt_id / f"{seed}.png"


def _png_bytes(image, info: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def _check_or_write_header(out_dir: Path, header: dict) -> None:
    path = out_dir / GENERATE_JSON
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model", "settings_digest"):
            if old.get(key) != header[key]:
                raise EvalError(
                    f"{path}: this folder holds images made with another {key.replace('_digest', '')} "
                    f"({old.get(key)!r}, now {header[key]!r}); use a new --out folder")
        if old.get("prompt_file_sha256") != header["prompt_file_sha256"]:
            header = {**old, "prompt_file_sha256": header["prompt_file_sha256"],
                      "prompt_file": header["prompt_file"]}  # an edited prompt file may add prompts
        else:
            return
    write_json(path, header)


def run_generate(prompts: Sequence[Prompt], prompt_file: Path | None, settings: GenSettings, backend: Backend,
                 out_dir: Path, *, shard: tuple[int, int] = WHOLE, limit: int | None = None,
                 progress: bool = True) -> dict:
    """Generate the shard's missing images; returns counts (done, skipped, total)."""
    out_dir = Path(out_dir)
    jobs = shard_jobs(all_jobs(prompts), shard)
    if limit is not None:
        jobs = jobs[:limit]
    if not jobs:
        raise EvalError(f"shard {shard[0]}/{shard[1]} has no images to make ({len(all_jobs(prompts))} in all)")
    header = {
        "kind": "kxl eval generate",
        "model": backend.describe(),
        "settings": settings.pixel_dict(),
        "settings_digest": settings.digest(),
        "prompt_file": str(Path(prompt_file).resolve()) if prompt_file else None,
        "prompt_file_sha256": sha256_file(prompt_file) if prompt_file else None,
    }
    _check_or_write_header(out_dir, header)
    todo = [j for j in jobs if not image_path(out_dir, j.prompt.id, j.seed).is_file()]
    skipped = len(jobs) - len(todo)
    bs = settings.batch_size
    with tqdm(total=len(jobs), initial=skipped, desc="generate", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), bs):
            batch = todo[start:start + bs]
            images = backend.generate([j.prompt.prompt for j in batch], [j.seed for j in batch], settings)
            if len(images) != len(batch):
                raise EvalError(f"backend returned {len(images)} images for a batch of {len(batch)}")
            for job, image in zip(batch, images):
                info = {"prompt": job.prompt.prompt, "prompt_id": job.prompt.id, "seed": str(job.seed),
                        "settings": settings.pixel_dict()}
                write_bytes(image_path(out_dir, job.prompt.id, job.seed), _png_bytes(image, info))
            bar.update(len(batch))
    return {"out": str(out_dir), "done": len(todo), "skipped": skipped, "shard_total": len(jobs),
            "all_total": len(all_jobs(prompts)), "shard": f"{shard[0]}/{shard[1]}"}
