"""`kxl eval score`: CCIP of each generated character image against reference images of the
same character taken from the dataset.

References: the rows of selection.parquet whose caption's fixed prefix (the part before the
first keep-tokens separator: people count, characters, copyrights, artists) holds the
character as the captions write it (the prompt's `display`), found as exported files
`<id>.<ext>` in the dataset's image_dir; up to `refs` of them per character, picked at
random with a seed fixed by the character.

Definitions (also in docs/eval.md):
- difference d(g) of a generated image g: the mean CCIP difference between g and the
  character's references;
- g is judged the same character when d(g) <= the model's threshold (metrics.json);
- per character: score = share of its images judged the same, mean_difference = mean d(g);
- overall: score = mean of the per-character scores (each character counts once),
  image_score = share over all images, mean_difference = mean of the per-character ones.
Characters without references (or without generated images) are listed, not scored.
The control: the same images against the references of another character (a random
derangement of the characters); a CCIP that discriminates scores it far lower.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from kxl_common.atomic import atomic_open, write_json
from kxl_prep.export.writer import OUTPUT_RE

from .ccip import CCIP
from .errors import EvalError
from .generate import GENERATE_JSON, image_path
from .prompts import read_prompt_file, recipe_of

SCORE_JSON = "score.json"
PER_CHARACTER_CSV = "score_per_character.csv"


def dataset_image_dir(dataset_dir: Path) -> Path:
    """The image_dir of the dataset's dataset.toml (where kxl-prep export writes)."""
    toml = Path(dataset_dir) / "dataset.toml"
    if not toml.is_file():
        raise EvalError(f"{dataset_dir}: no dataset.toml; pass --image-dir")
    cfg = tomllib.loads(toml.read_text(encoding="utf-8"))
    try:
        return Path(cfg["datasets"][0]["subsets"][0]["image_dir"])
    except (KeyError, IndexError) as exc:
        raise EvalError(f"{toml}: field datasets[0].subsets[0].image_dir missing") from exc


def exported_files(image_dir: Path) -> dict[int, str]:
    """post id -> file name of the finished exports (`<id>.<ext>`; temp files are ignored)."""
    if not Path(image_dir).is_dir():
        raise EvalError(f"image_dir {image_dir}: not a folder (export the dataset's images first)")
    out = {}
    with os.scandir(image_dir) as it:
        for entry in it:
            m = OUTPUT_RE.match(entry.name)
            if m and entry.is_file():
                out[int(m.group(1))] = entry.name
    return out


def reference_ids(dataset_dir: Path, displays: Sequence[str], sep: str) -> dict[str, np.ndarray]:
    """display name -> ids of the selected posts whose caption prefix holds it (sorted)."""
    table = pq.read_table(Path(dataset_dir) / "selection.parquet", columns=["id", "caption"])
    prefix = pc.list_element(pc.split_pattern(table.column("caption"), sep, max_splits=1), 0)
    tokens = pc.split_pattern(pc.utf8_trim_whitespace(prefix), ", ")
    rows = pc.list_parent_indices(tokens).to_numpy()
    flat = pc.list_flatten(tokens)
    hit = pc.is_in(flat, value_set=pa.array(sorted(set(displays)), flat.type)).to_numpy(zero_copy_only=False)
    ids = table.column("id").to_numpy()
    pairs = pd.DataFrame({"display": flat.filter(pa.array(hit)).to_numpy(zero_copy_only=False),
                          "id": ids[rows[hit]]}).drop_duplicates()
    return {d: np.sort(g["id"].to_numpy()) for d, g in pairs.groupby("display")}


def pick_references(ids: np.ndarray, files: dict[int, str], k: int, key: str) -> list[int]:
    have = np.array([i for i in ids if int(i) in files], dtype=np.int64)
    if len(have) <= k:
        return have.tolist()
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    return np.sort(rng.choice(have, size=k, replace=False)).tolist()


def _derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (n >= 2): shuffle, then shift by one."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, 1)
    return out


def _summary(per: pd.DataFrame, prefix: str) -> dict:
    scored = per[per[f"{prefix}score"].notna()]
    if scored.empty:
        return {"characters": 0, "score": None, "image_score": None, "mean_difference": None}
    n_img = scored["images"].sum()
    return {
        "characters": int(len(scored)),
        "score": float(scored[f"{prefix}score"].mean()),
        "image_score": float((scored[f"{prefix}score"] * scored["images"]).sum() / n_img),
        "mean_difference": float(scored[f"{prefix}mean_difference"].mean()),
    }


def run_score(gen_dir: Path, dataset_dir: Path, ccip_dir: Path, out_dir: Path, *, prompt_file: Path | None = None,
              image_dir: Path | None = None, refs: int = 8, control_seed: int = 0, progress: bool = True) -> dict:
    gen_dir, dataset_dir = Path(gen_dir), Path(dataset_dir)
    header_path = gen_dir / GENERATE_JSON
    if not header_path.is_file():
        raise EvalError(f"{gen_dir}: no {GENERATE_JSON} (not a `kxl eval generate` folder)")
    header = json.loads(header_path.read_text(encoding="utf-8"))
    prompt_file = Path(prompt_file or header.get("prompt_file") or "")
    prompts = [p for p in read_prompt_file(prompt_file) if p.kind == "character"]
    if not prompts:
        raise EvalError(f"{prompt_file}: no character prompts to score")
    if refs < 1:
        raise EvalError("refs must be >= 1")
    sep = recipe_of(dataset_dir).captions.keep_tokens_separator
    image_dir = Path(image_dir) if image_dir else dataset_image_dir(dataset_dir)
    files = exported_files(image_dir)
    ref_ids = reference_ids(dataset_dir, [p.display for p in prompts], sep)
    model = CCIP(ccip_dir)

    rows, gen_feats, ref_feats = [], {}, {}
    for p in tqdm(prompts, desc="ccip features", unit="char", disable=not progress):
        gens = [image_path(gen_dir, p.id, s) for s in p.seeds]
        gens = [g for g in gens if g.is_file()]
        picked = pick_references(ref_ids.get(p.display, np.zeros(0, np.int64)), files, refs, p.display)
        row = {"id": p.id, "character": p.character, "display": p.display, "copyright": p.copyright,
               "posts": p.posts, "images": len(gens), "references": len(picked)}
        if gens and picked:
            gen_feats[p.id] = model.features(gens)
            ref_feats[p.id] = model.features([image_dir / files[i] for i in picked])
        rows.append(row)

    scored = [r["id"] for r in rows if r["id"] in gen_feats]
    partner = dict(zip(scored, (scored[j] for j in _derangement(len(scored), control_seed)))) if len(scored) > 1 else {}
    for row in rows:
        pid = row["id"]
        for prefix, ref_of in (("", pid), ("control_", partner.get(pid))):
            if pid not in gen_feats or ref_of is None:
                row[f"{prefix}score"], row[f"{prefix}mean_difference"] = None, None
                continue
            # in float64, as imgutils' ccip_same compares a difference (a Python float) with the
            # threshold: numpy 2 would round the threshold to float32 against a float32 array
            d = model.cross_differences(gen_feats[pid], ref_feats[ref_of]).astype(np.float64).mean(axis=1)
            row[f"{prefix}score"] = float((d <= model.threshold).mean())
            row[f"{prefix}mean_difference"] = float(d.mean())
    per = pd.DataFrame(rows)
    if per["score"].notna().sum() == 0:
        raise EvalError("no character could be scored (no generated images with references); "
                        "check --image-dir and that the images were exported")
    no_refs = per[per["references"] == 0]["character"].tolist()
    no_images = per[(per["images"] == 0) & (per["references"] > 0)]["character"].tolist()
    result = {
        "kind": "kxl eval score",
        "generated": str(gen_dir.resolve()),
        "model": header.get("model"),
        "settings": header.get("settings"),
        "ccip": model.describe(),
        "dataset": str(dataset_dir.resolve()),
        "image_dir": str(image_dir),
        "references_per_character": refs,
        "overall": _summary(per, ""),
        "control_shuffled_references": _summary(per, "control_") if partner else None,
        "characters_total": int(len(per)),
        "characters_without_references": no_refs,
        "characters_without_images": no_images,
        "definition": "score: share of a character's generated images whose mean CCIP difference to its "
                      "references is <= threshold; overall: mean over characters",
    }
    write_json(Path(out_dir) / SCORE_JSON, result)
    with atomic_open(Path(out_dir) / PER_CHARACTER_CSV, "w", encoding="utf-8", newline="") as fh:
        per.to_csv(fh, index=False, lineterminator="\n")
    return result


def load_score(folder: Path) -> tuple[dict, pd.DataFrame]:
    folder = Path(folder)
    if not (folder / SCORE_JSON).is_file():
        raise EvalError(f"{folder}: no {SCORE_JSON} (run `kxl eval score` first)")
    return (json.loads((folder / SCORE_JSON).read_text(encoding="utf-8")),
            pd.read_csv(folder / PER_CHARACTER_CSV, keep_default_na=True))
