"""A small kxl-prep output with "exported" images for `kxl eval` tests.

`make_eval_dataset` runs kxl_prep on the synthetic danbooru sample (kxl_testing.sample), every
post selected. `export_references` then plays the export step: it writes `<id>.png` into the
dataset's image_dir for every selected post. A post showing one of the benchmark characters
gets a JPEG-recompressed copy of an image that a model generated for that character (its own
prompt, one of its seeds, in turn), so a model scored against references of its own making
must match them; every other post gets seeded noise.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def make_eval_dataset(root: str | Path, *, n_posts: int = 400, seed: int = 0) -> Path:
    from kxl_prep.pipeline import prepare
    from kxl_prep.recipe import load_recipe
    from kxl_testing.sample import make_sample

    root = Path(root)
    sample = make_sample(root / "sample", n_posts=n_posts, seed=seed, images=False)
    out = root / "dataset"
    prepare([sample.jsonl], out, recipe=load_recipe().replace(selection={"method": "all"}), progress=False)
    return out


def _jpeg(path: Path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def export_references(dataset: Path, generated: Path, prompt_file: Path, *, seed: int = 0) -> dict[str, list[int]]:
    """Write every selected post's image into the dataset's image_dir; returns
    display name -> the post ids given that character's generated images."""
    from PIL import Image

    from kxl_tools.eval.generate import image_path
    from kxl_tools.eval.prompts import read_prompt_file, recipe_of
    from kxl_tools.eval.score import dataset_image_dir, reference_ids

    chars = [p for p in read_prompt_file(prompt_file) if p.kind == "character"]
    sep = recipe_of(dataset).captions.keep_tokens_separator
    refs = reference_ids(dataset, [p.display for p in chars], sep)
    image_dir = dataset_image_dir(dataset)
    image_dir.mkdir(parents=True, exist_ok=True)
    owner: dict[int, tuple] = {}
    for p in chars:  # a post with two benchmark characters shows the first one
        for j, pid in enumerate(refs.get(p.display, [])):
            owner.setdefault(int(pid), (p, p.seeds[j % len(p.seeds)]))
    given: dict[str, list[int]] = {}
    rng = np.random.default_rng(seed)
    for pid in pq.read_table(dataset / "selection.parquet", columns=["id"]).column("id").to_pylist():
        if pid in owner:
            p, s = owner[pid]
            data = _jpeg(image_path(generated, p.id, s))
            given.setdefault(p.display, []).append(pid)
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
            data = buf.getvalue()
        (image_dir / f"{pid}.png").write_bytes(data)
    return given
