"""The training metadata sd-scripts v0.10.1 writes into a LoKr file's header, built by kxl for a
size estimate (docs/lokr-size.md).

train_network.py puts ~75 `ss_*` keys in every saved network, all strings. Most are short values
(learning rates, flags: a few kB in all). Three grow with the dataset:
- `ss_tag_frequency`: {directory: {tag: count}}. sd-scripts counts tags per image directory
  (DreamBooth-style subsets: every caption file, split on ",", stripped, lower-cased) or per
  metadata file (fine-tuning subsets: only the records' separate `tags` field, which kxl's
  meta.json does not have, so there it stays empty);
- `ss_bucket_info`: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error"};
- `ss_dataset_dirs`: {directory: {"n_repeats", "img_count"}}.
With a dataset config file (`--dataset_config`), `ss_datasets` holds every dataset's tag_frequency
and bucket_info once more. Values are `json.dumps` strings (ASCII, non-ASCII escaped), and the
safetensors header escapes their quotes again: kxl_common.safetensors_header.metadata_bytes
counts the bytes as they land in the file.
"""
from __future__ import annotations

import collections
import json
from typing import Iterable

import numpy as np


def count_tags(captions: Iterable[str], into: collections.Counter | None = None) -> collections.Counter:
    """Tag counts as sd-scripts keeps them for one directory: split on ",", strip, lower-case, skip empty."""
    counts = into if into is not None else collections.Counter()
    counts.update(t for c in captions for t in (x.strip().lower() for x in c.split(",")) if t)
    return counts


def bucket_info(bucket_counts: dict[tuple[int, int], int], mean_ar_error: float) -> dict:
    """sd-scripts' bucket_info: buckets with images, numbered in the bucket manager's order
    (sorted resolutions), resolution as a [w, h] pair."""
    ordered = sorted(bucket_counts)
    return {"buckets": {str(i): {"resolution": list(r), "count": int(bucket_counts[r])}
                        for i, r in enumerate(ordered) if bucket_counts[r] > 0},
            "mean_img_ar_error": float(mean_ar_error)}


def scalar_metadata(values: dict) -> dict[str, str]:
    """The short keys of a run (names as train_network.py writes them; values from `values`, a
    representative guess otherwise): what every file carries whatever the dataset."""
    keys = ["session_id", "training_started_at", "output_name", "learning_rate", "text_encoder_lr", "unet_lr",
            "num_train_images", "num_validation_images", "num_reg_images", "num_batches_per_epoch", "num_epochs",
            "gradient_checkpointing", "gradient_accumulation_steps", "max_train_steps", "lr_warmup_steps",
            "lr_scheduler", "network_module", "network_dim", "network_alpha", "network_dropout", "mixed_precision",
            "full_fp16", "v2", "base_model_version", "clip_skip", "max_token_length", "cache_latents", "seed",
            "lowram", "noise_offset", "multires_noise_iterations", "multires_noise_discount", "adaptive_noise_scale",
            "zero_terminal_snr", "training_comment", "sd_scripts_commit_hash", "optimizer", "max_grad_norm",
            "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
            "face_crop_aug_range", "prior_loss_weight", "min_snr_gamma", "scale_weight_norms", "ip_noise_gamma",
            "debiased_estimation", "noise_offset_random_strength", "ip_noise_gamma_random_strength", "loss_type",
            "huber_schedule", "huber_scale", "huber_c", "fp8_base", "fp8_base_unet", "validation_seed",
            "validation_split", "max_validation_steps", "validate_every_n_epochs", "validate_every_n_steps",
            "resize_interpolation", "batch_size_per_device", "total_batch_size", "resolution", "color_aug",
            "flip_aug", "random_crop", "shuffle_caption", "enable_bucket", "bucket_no_upscale", "min_bucket_reso",
            "max_bucket_reso", "keep_tokens", "network_args", "sd_model_hash", "new_sd_model_hash", "sd_model_name",
            "vae_name", "training_finished_at", "steps", "epoch"]
    guess = {"session_id": "1234567890", "training_started_at": "1700000000.1234567",
             "sd_scripts_commit_hash": "0" * 40, "new_sd_model_hash": "0" * 64, "sd_model_hash": "0" * 8,
             "training_finished_at": "1700500000.1234567", "optimizer": "bitsandbytes.optim.lion.Lion8bit(weight_decay=0.1,betas=(0.9, 0.95))"}
    return {f"ss_{k}": str(values.get(k, guess.get(k, "None"))) for k in keys}


def modelspec_metadata() -> dict[str, str]:
    """The sai model spec keys sd-scripts adds to an SDXL LoRA-type save (modelspec.*), and the
    state dict hash LyCORIS adds: about 0.5 kB."""
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": "kohaku-xl-epsilon-lyco", "modelspec.resolution": "1024x1024",
            "modelspec.date": "2024-05-01T00:00:00", "modelspec.prediction_type": "epsilon",
            "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


def run_metadata(tag_frequency: dict[str, dict[str, int]], dirs: dict[str, int], buckets: dict,
                 values: dict, dataset_config: bool) -> dict[str, str]:
    """The whole header metadata of one save: scalars, modelspec and the dataset keys, the way
    train_network.py lays them out with or without a dataset config file."""
    meta = {**scalar_metadata(values), **modelspec_metadata()}
    dataset_dirs = {d: {"n_repeats": 1, "img_count": n} for d, n in dirs.items()}
    if dataset_config:
        dataset = {"is_dreambooth": True, "batch_size_per_device": values.get("batch_size_per_device", 4),
                   "num_train_images": sum(dirs.values()), "num_reg_images": 0, "resolution": [1024, 1024],
                   "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 4096,
                   "tag_frequency": tag_frequency, "bucket_info": buckets, "resize_interpolation": None,
                   "subsets": [{"img_count": n, "num_repeats": 1, "image_dir": d} for d, n in dirs.items()]}
        meta["ss_datasets"] = json.dumps([dataset])
    else:
        meta["ss_reg_dataset_dirs"] = json.dumps({})
        meta["ss_bucket_info"] = json.dumps(buckets)
    meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    meta["ss_dataset_dirs"] = json.dumps(dataset_dirs)
    return meta


def mean_ar_error(widths: np.ndarray, heights: np.ndarray, bucket_w: np.ndarray, bucket_h: np.ndarray) -> float:
    """sd-scripts' mean |image aspect - bucket aspect| over the images."""
    return float(np.mean(np.abs(widths / heights - bucket_w / bucket_h)))
