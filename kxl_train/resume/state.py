"""What a saved state must agree on with the run that resumes it, and the file that says so.

Every state directory saved by a kxl run gets `kxl_resume.json` beside sd-scripts'
`train_state.json`: the global step, the recipe fields that decide the lr curve, the batch
geometry and the data (a fingerprint of the bucket contents and captions), and the command
line that made it. A resume compares them with the resuming run and refuses any difference,
naming each field, before the model is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kxl_common.errors import KxlError
from kxl_common.atomic import write_json

RESUME_FILE = "kxl_resume.json"
UPSTREAM_STATE_FILE = "train_state.json"
FORMAT = 1
SAMPLER_SCHEME = "kxl-exact-v1"

# sd-scripts arguments that shape the lr schedule (train_util.get_scheduler_fix) or the step
# geometry; a resumed run must have exactly the saved values.
LR_SCHEDULE_ARGS = (
    "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_scheduler_type",
    "lr_scheduler_args", "lr_warmup_steps", "lr_decay_steps", "lr_scheduler_num_cycles",
    "lr_scheduler_power", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio",
    "max_train_steps",
)
BATCH_ARGS = ("train_batch_size", "gradient_accumulation_steps")
OPTIMIZER_ARGS = ("optimizer_type", "optimizer_args", "max_grad_norm")
# Per-subset settings that change which caption / augmentation a sample gets.
SUBSET_FIELDS = (
    "num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
    "secondary_separator", "enable_wildcard", "color_aug", "flip_aug", "face_crop_aug_range",
    "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "token_warmup_min",
    "token_warmup_step", "alpha_mask",
)


class ResumeRefused(KxlError, RuntimeError):
    """The state cannot be resumed exactly by this run; the message says why and what to do."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def dataset_description(group) -> dict:
    """Fingerprints of an sd-scripts DatasetGroup: which items exist (bucket contents, batch
    sizes, repeats), their captions, and the per-subset caption/augmentation settings.

    The hashes are of json.dumps(per-dataset list, sort_keys=True, ensure_ascii=False), written
    out dataset by dataset; a columnar dataset (kxl_train.dataset) writes its own parts from its
    records, so a state resumes whether or not the run reads the data columnar."""
    items, captions = hashlib.sha256(b"["), hashlib.sha256(b"[")
    subsets = []
    num_items = 0
    for i, ds in enumerate(group.datasets):
        sep = b", " if i else b""
        items.update(sep)
        captions.update(sep)
        columnar = getattr(ds, "kxl_fingerprint_json", None)
        if columnar is not None:
            item_chunks, caption_chunks = columnar()
            for chunk in item_chunks:
                items.update(chunk.encode("utf-8"))
            if len(group.datasets) > 1:  # one dataset: its records carry the digest
                for chunk in caption_chunks:
                    captions.update(chunk.encode("utf-8"))
            subsets.append([{f: _jsonable(getattr(s, f, None)) for f in SUBSET_FIELDS} for s in ds.subsets])
            num_items += len(ds)
            continue
        manager = ds.bucket_manager
        buckets = [[list(reso), sorted(bucket)] for reso, bucket in zip(manager.resos, manager.buckets) if bucket]
        items.update(_json({"batch_size": ds.batch_size, "buckets": buckets}))
        num_items += len(ds)
        captions.update(_json(sorted((key, info.caption) for key, info in ds.image_data.items())))
        seen = []
        for key in sorted(ds.image_to_subset):
            subset = ds.image_to_subset[key]
            desc = {f: _jsonable(getattr(subset, f, None)) for f in SUBSET_FIELDS}
            if desc not in seen:
                seen.append(desc)
        subsets.append(seen)
    items.update(b"]")
    captions.update(b"]")
    captions_sha256 = captions.hexdigest()
    if len(group.datasets) == 1 and getattr(group.datasets[0], "kxl_fingerprint_json", None) is not None:
        captions_sha256 = group.datasets[0].records.header["captions_sha256"]
    return {
        "num_items": num_items,
        "items_sha256": items.hexdigest(),
        "captions_sha256": captions_sha256,
        "subsets": subsets,
    }


def recipe_description(args, num_processes: int, dataset: dict) -> dict:
    """The fields a resume must match, from the parsed sd-scripts args."""
    get = lambda name: _jsonable(getattr(args, name, None))  # noqa: E731
    return {
        "lr_schedule": {name: get(name) for name in LR_SCHEDULE_ARGS},
        "batch": {**{name: get(name) for name in BATCH_ARGS}, "num_processes": num_processes},
        "optimizer": {name: get(name) for name in OPTIMIZER_ARGS},
        "seed": get("seed"),
        "sampler": SAMPLER_SCHEME,
        "dataset": dataset,
    }


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value


def recipe_differences(saved: dict, current: dict) -> list[str]:
    flat_saved, flat_current = {}, {}
    _flatten("", saved, flat_saved)
    _flatten("", current, flat_current)
    lines = []
    for key in sorted(set(flat_saved) | set(flat_current)):
        a, b = flat_saved.get(key, "<absent>"), flat_current.get(key, "<absent>")
        if a != b:
            lines.append(f"  {key}: state has {json.dumps(a)[:200]}, this run has {json.dumps(b)[:200]}")
    return lines


def write_resume_record(state_dir: str | os.PathLike, record: dict) -> Path:
    path = Path(state_dir) / RESUME_FILE
    write_json(path, {"format": FORMAT, **record})
    return path


def read_state(state_dir: str | os.PathLike) -> dict:
    """kxl_resume.json of a state directory, checked against train_state.json."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ResumeRefused(f"resume state {state_dir} is not a directory")
    path = state_dir / RESUME_FILE
    if not path.is_file():
        raise ResumeRefused(
            f"resume state {state_dir} has no {RESUME_FILE}: it was not saved by a kxl run, so its "
            f"sample order came from the global RNG and cannot be reproduced. Resume it with plain "
            f"sd-scripts, or pass --kxl-inexact-resume to run sd-scripts' own resume unchanged."
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT:
        raise ResumeRefused(f"{path}: format {record.get('format')!r}, this kxl reads format {FORMAT}")
    upstream = state_dir / UPSTREAM_STATE_FILE
    if upstream.is_file():
        current_step = json.loads(upstream.read_text(encoding="utf-8")).get("current_step")
        if current_step != record["global_step"]:
            raise ResumeRefused(
                f"{upstream} says current_step={current_step} but {path} says global_step="
                f"{record['global_step']}: the state directory is inconsistent"
            )
    return record


def check_resumable(state_dir: str | os.PathLike, record: dict, current_recipe: dict) -> None:
    diffs = recipe_differences(record["recipe"], current_recipe)
    if diffs:
        raise ResumeRefused(
            f"resume state {state_dir} (step {record['global_step']}) does not match this run's recipe:\n"
            + "\n".join(diffs)
            + "\nAn exact resume needs the same lr schedule, batch geometry, optimizer, seed and "
            "data. Resume with the original recipe (launch/resume.sh STATE_DIR replays it)."
        )
