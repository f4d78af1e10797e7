"""Training recipes: TOML files of sdxl_train_network arguments, validated before anything runs.

A recipe is a TOML file whose sections group sd-scripts arguments for people (names are free,
as in sd-scripts' own --config_file), plus one `[kxl]` section for what only kxl reads:

    [kxl]
    gpus = 4                 # processes in the DDP run (accelerate --num_processes)
    low_memory_load = true   # --kxl-low-memory-load: the UNet loads in the training dtype
    attention = "sdpa"       # one-key switch: "sdpa" (--sdpa) or "xformers" (--xformers)
    full_fp16 = false        # one-key switch for sd-scripts' --full_fp16

Every other key must be a real sdxl_train_network argument: sd-scripts' --config_file accepts
unknown keys silently, so a typo here is an error naming the key and the closest valid one.
Types, choices and ranges are checked; command-line overrides `key=value` (torchtune style)
are applied first (`kxl.gpus=2` reaches the kxl section).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kxl_common.errors import KxlError
from kxl_common.toml_file import read_toml
from kxl_train.sdxl_args import load_table

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

KXL_SECTION = "kxl"
KXL_KEYS = {"gpus": int, "description": str, "low_memory_load": bool, "sample_on_cpu": bool,
            # --kxl-keep-caption-suffix (kxl_train.caption_suffix): off in the reproduction's recipes
            "keep_caption_suffix": bool}
# Inputs a launch supplies (dataset dir, model path, output dir); a recipe may leave them out.
LAUNCH_INPUTS = ("pretrained_model_name_or_path", "dataset_config", "output_dir")

# [kxl] switches that set sd-scripts arguments, so the author's choice is one key away
# (`kxl.attention=xformers`, `kxl.full_fp16=true`); applied by apply_kxl_switches.
KXL_SWITCHES = {"attention": str, "full_fp16": bool}
KXL_KEYS.update(KXL_SWITCHES)
ATTENTION_FLAGS = {"sdpa": "sdpa", "xformers": "xformers"}  # kxl.attention value -> sd-scripts flag
# What sd-scripts allows besides the default (unset: 75 tokens), said with the fix.
CHOICE_FIXES = {"max_token_length": "use 150 or 225, or leave max_token_length unset for 75 tokens"}

# Names sd-scripts' get_optimizer knows (matched case-insensitively); a dotted path to a custom
# optimizer class is accepted too.
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
    "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdaGrad", "DAdaptAdam",
    "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "DAdaptAdamPreprint", "Prodigy",
    "Adafactor", "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree",
)
# transformers.optimization.SchedulerType (4.54.1) + diffusers' piecewise_constant; sd-scripts
# also takes "adafactor[:lr]".
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "piecewise_constant",
)
# (low, high, low inclusive, high inclusive); None is unbounded.
RANGES = {
    "learning_rate": (0, None, False, True), "unet_lr": (0, None, True, True),
    "text_encoder_lr": (0, None, True, True), "train_batch_size": (1, None, True, True),
    "gradient_accumulation_steps": (1, None, True, True), "max_train_steps": (1, None, True, True),
    "max_train_epochs": (1, None, True, True), "lr_warmup_steps": (0, None, True, True),
    "min_snr_gamma": (0, None, False, True), "noise_offset": (0, 1, True, True),
    "caption_tag_dropout_rate": (0, 1, True, True), "caption_dropout_rate": (0, 1, True, True),
    "save_every_n_steps": (1, None, True, True), "save_every_n_epochs": (1, None, True, True),
    "min_bucket_reso": (64, None, True, True), "max_bucket_reso": (64, None, True, True),
    "bucket_reso_steps": (1, None, True, True), "network_dim": (1, None, True, True),
    "network_alpha": (0, None, False, True), "max_grad_norm": (0, None, True, True),
    "seed": (0, 2**32 - 1, True, True), "max_data_loader_n_workers": (0, None, True, True),
    "keep_tokens": (0, None, True, True), "scale_weight_norms": (0, None, False, True),
}


class RecipeError(KxlError, ValueError):
    """A recipe problem, naming the file, the key and the reason."""


@dataclass
class Arg:
    name: str
    flag: str
    kind: str
    nargs: str | None
    choices: list | None


def arguments() -> dict[str, Arg]:
    table = load_table()["arguments"]
    return {name: Arg(name, spec["flag"], spec["kind"], spec["nargs"], spec["choices"])
            for name, spec in table.items()}


def _toml_value(text: str) -> Any:
    """`key=value` override text as TOML would read it; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise RecipeError(f"override {item!r}: empty key")
    return key, _toml_value(text.strip())


def read_recipe_file(path: str | Path) -> tuple[dict, dict]:
    """(sd-scripts values flattened over sections, kxl values); duplicates are errors."""
    path = Path(path)
    data = read_toml(path, what="training recipe", error=RecipeError)
    values: dict = {}
    where: dict = {}
    kxl: dict = {}
    for section, body in data.items():
        if section == KXL_SECTION:
            if not isinstance(body, dict):
                raise RecipeError(f"{path}: [{KXL_SECTION}] must be a table")
            kxl.update(body)
            continue
        items = body.items() if isinstance(body, dict) else [(section, body)]
        for key, value in items:
            if isinstance(value, dict):
                raise RecipeError(f"{path}: [{section}] {key}: nested tables are not sd-scripts arguments")
            if key in values:
                raise RecipeError(f"{path}: {key} is set twice ([{where[key]}] and [{section}])")
            values[key], where[key] = value, section
    return values, kxl


def apply_overrides(values: dict, kxl: dict, overrides: list[str]) -> None:
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith(KXL_SECTION + "."):
            kxl[key[len(KXL_SECTION) + 1:]] = value
        else:
            values[key] = value


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _check_scalar(key: str, kind: str, value: Any) -> Any:
    """The value converted to what argparse would produce for `kind`, or RecipeError."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind in ("float", "int_or_float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{key}: must be finite, got {value!r}")
        return float(value) if kind == "float" else value
    if not isinstance(value, str):
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    return value


def _check_range(key: str, value: Any) -> None:
    if key not in RANGES or isinstance(value, (str, bool)):
        return
    low, high, low_in, high_in = RANGES[key]
    bad = (low is not None and (value < low or (value == low and not low_in))) or (
        high is not None and (value > high or (value == high and not high_in)))
    if bad:
        lo = "(-inf" if low is None else ("[" if low_in else "(") + str(low)
        hi = "inf)" if high is None else str(high) + ("]" if high_in else ")")
        raise RecipeError(f"{key}: {value!r} is outside {lo}, {hi}")


def validate_values(values: dict, table: dict[str, Arg] | None = None) -> dict:
    """Check every key, type, choice and range; return the values in argparse's types."""
    table = table or arguments()
    checked = {}
    for key, value in values.items():
        if key not in table:
            raise RecipeError(f"{key!r} is not an sdxl_train_network argument{_closest(key, table)}")
        arg = table[key]
        if arg.nargs in ("*", "+"):
            items = value if isinstance(value, list) else [value]
            if arg.nargs == "+" and not items:
                raise RecipeError(f"{key}: needs at least one value")
            converted = [_check_scalar(key, arg.kind, v) for v in items]
        else:
            if isinstance(value, list):
                raise RecipeError(f"{key}: takes one value, got a list {value!r}")
            converted = _check_scalar(key, arg.kind, value)
        for item in converted if isinstance(converted, list) else [converted]:
            if arg.choices is not None and item not in arg.choices:
                fix = f"; fix: {CHOICE_FIXES[key]}" if key in CHOICE_FIXES else ""
                raise RecipeError(f"{key}: {item!r} is not one of {[c for c in arg.choices if c is not None]}{fix}")
            _check_range(key, item)
        checked[key] = converted
    _check_semantics(checked)
    return checked


def _resolution(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 2) or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise RecipeError(f"resolution: expected \"W,H\" or \"N\", got {text!r}")
    w, h = int(parts[0]), int(parts[-1])
    return w, h


def _check_semantics(v: dict) -> None:
    if "optimizer_type" in v and v["optimizer_type"]:
        name = v["optimizer_type"]
        if "." not in name and name.lower() not in {o.lower() for o in OPTIMIZERS}:
            raise RecipeError(f"optimizer_type: {name!r} is not an optimizer sd-scripts knows"
                              f"{_closest(name, OPTIMIZERS)}")
    if "lr_scheduler" in v:
        name = v["lr_scheduler"]
        if name not in SCHEDULERS and not name.startswith("adafactor"):
            raise RecipeError(f"lr_scheduler: {name!r} is not a scheduler sd-scripts knows{_closest(name, SCHEDULERS)}")
    if "resolution" in v:
        _resolution(v["resolution"])
    steps = v.get("bucket_reso_steps", 64)
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if key in v and v[key] % steps:
            raise RecipeError(f"{key}: {v[key]} is not a multiple of bucket_reso_steps ({steps})")
    if v.get("min_bucket_reso", 256) > v.get("max_bucket_reso", 1024):
        raise RecipeError(f"min_bucket_reso ({v.get('min_bucket_reso', 256)}) exceeds max_bucket_reso "
                          f"({v.get('max_bucket_reso', 1024)})")
    if v.get("full_fp16") and v.get("mixed_precision") != "fp16":
        raise RecipeError("full_fp16 needs mixed_precision = \"fp16\"")
    if v.get("full_bf16") and v.get("mixed_precision") != "bf16":
        raise RecipeError("full_bf16 needs mixed_precision = \"bf16\"")
    if v.get("cache_text_encoder_outputs") and not v.get("network_train_unet_only"):
        raise RecipeError("cache_text_encoder_outputs needs network_train_unet_only (text encoders "
                          "cannot train on cached outputs)")
    for item in v.get("network_args", []):
        if "=" not in item:
            raise RecipeError(f"network_args: {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.strip() == "decompose_both" and value.strip().lower() == "false":
            raise RecipeError("network_args: decompose_both=False turns it ON (LyCORIS reads the string "
                              "as a bool: any non-empty string is true); omit it instead")
    for item in v.get("optimizer_args", []):
        if "=" not in item:
            raise RecipeError(f"optimizer_args: {item!r} is not key=value")


def validate_kxl(kxl: dict) -> dict:
    for key, value in kxl.items():
        if key not in KXL_KEYS:
            raise RecipeError(f"[kxl] {key!r} is not a kxl setting{_closest(key, KXL_KEYS)}")
        expected = KXL_KEYS[key]
        if expected is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"[kxl] {key}: expected a positive integer, got {value!r}")
        if expected is bool and not isinstance(value, bool):
            raise RecipeError(f"[kxl] {key}: expected true or false, got {value!r}")
        if expected is str and not isinstance(value, str):
            raise RecipeError(f"[kxl] {key}: expected a string, got {value!r}")
    if "attention" in kxl and kxl["attention"] not in ATTENTION_FLAGS:
        raise RecipeError(f"[kxl] attention = {kxl['attention']!r} is not one of {list(ATTENTION_FLAGS)}; "
                          f"fix: kxl.attention=sdpa (PyTorch's own) or kxl.attention=xformers (the author's)")
    return {"gpus": 1, **kxl}


def apply_kxl_switches(values: dict, kxl: dict) -> dict:
    """sd-scripts values with the [kxl] switches applied: `attention` turns on its flag
    (--sdpa / --xformers), `full_fp16` sets --full_fp16. A recipe or override that also sets one
    of those flags to something else is an error: the switch is the one place to say it."""
    out = dict(values)
    if "attention" in kxl:
        chosen = ATTENTION_FLAGS[kxl["attention"]]
        for flag in ATTENTION_FLAGS.values():
            if flag in out and bool(out[flag]) != (flag == chosen):
                raise RecipeError(f"{flag} = {str(out[flag]).lower()} disagrees with [kxl] attention = "
                                  f"{kxl['attention']!r}; fix: set only kxl.attention (sdpa or xformers)")
        out[chosen] = True
    if "full_fp16" in kxl:
        if "full_fp16" in out and bool(out["full_fp16"]) != kxl["full_fp16"]:
            raise RecipeError(f"full_fp16 = {str(out['full_fp16']).lower()} disagrees with [kxl] full_fp16 = "
                              f"{str(kxl['full_fp16']).lower()}; fix: set only kxl.full_fp16 (true or false)")
        out["full_fp16"] = kxl["full_fp16"]
    return out


def check_lycoris_preset(values: dict, recipe_path: Path) -> None:
    """A LyCORIS preset named by network_args must be one LyCORIS accepts (keys, algo options,
    factors): checked before anything starts, not when sd-scripts builds the network."""
    if values.get("network_module") != "lycoris.kohya":
        return
    preset = dict(item.split("=", 1) for item in resolved_network_args(values, recipe_path)).get("preset")
    if not preset or not preset.endswith(".toml"):
        return
    if not Path(preset).is_file():
        raise RecipeError(f"network_args preset={preset}: no such LyCORIS preset file")
    from kxl_train.lycoris_preset import PresetError, load_preset

    try:
        load_preset(preset)
    except PresetError as exc:
        raise RecipeError(f"network_args preset: {exc}") from None


@dataclass
class Recipe:
    path: Path
    values: dict  # validated sd-scripts arguments
    kxl: dict

    @property
    def gpus(self) -> int:
        return int(self.kxl["gpus"])

    def batch_per_gpu(self, dataset_batch_size: int | None = None) -> int:
        """dataset.toml's batch_size wins over train_batch_size, as in sd-scripts' config_util."""
        return int(dataset_batch_size or self.values.get("train_batch_size", 1))

    def effective_batch(self, dataset_batch_size: int | None = None) -> int:
        return self.batch_per_gpu(dataset_batch_size) * int(self.values.get("gradient_accumulation_steps", 1)) * self.gpus

    def summary(self, dataset_batch_size: int | None = None) -> list[str]:
        b = self.batch_per_gpu(dataset_batch_size)
        ga = int(self.values.get("gradient_accumulation_steps", 1))
        lines = [f"recipe: {self.path}",
                 f"effective batch: {b} per GPU x {ga} accumulation x {self.gpus} GPUs = "
                 f"{self.effective_batch(dataset_batch_size)}"]
        steps = self.values.get("max_train_steps")
        if steps:
            lines.append(f"total steps: {steps} ({steps * self.effective_batch(dataset_batch_size):,d} samples)")
        elif self.values.get("max_train_epochs"):
            lines.append(f"total steps: {self.values['max_train_epochs']} epochs (count set by the dataset)")
        return lines


DATA_RECIPE_TABLES = {"selection", "quotas", "captions", "filters", "buckets", "quality"}


def load_recipe_values(path: str | Path, overrides: list[str] = ()) -> tuple[dict, dict]:
    path = Path(path)
    doc = read_toml(path, what="training recipe", error=RecipeError)
    data_tables = sorted(DATA_RECIPE_TABLES & {k for k, v in doc.items() if isinstance(v, dict)})
    if data_tables:
        raise RecipeError(f"{path}: a data recipe (tables {data_tables}), for `kxl-prep prepare --recipe`; "
                          "kxl-train takes a training recipe such as recipes/epsilon-rev1.toml")
    values, kxl = read_recipe_file(path)
    try:  # the file alone first, so a problem is blamed on the file or on the override that made it
        validate_values(apply_kxl_switches(dict(values), validate_kxl(dict(kxl))))
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    try:
        apply_overrides(values, kxl, list(overrides))
        kxl = validate_kxl(kxl)
        values = validate_values(apply_kxl_switches(values, kxl))
    except RecipeError as exc:
        raise RecipeError(f"override {' '.join(overrides)}: {exc}") from None
    try:
        check_lycoris_preset(values, path)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return values, kxl


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    values, kxl = load_recipe_values(path, overrides)
    return Recipe(Path(path), values, kxl)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The validated sd-scripts values of a recipe."""
    return load(path, overrides).values


def resolved_network_args(values: dict, recipe_path: Path) -> list[str]:
    """network_args with a relative `preset=` path made absolute against the recipe's folder."""
    out = []
    for item in values.get("network_args", []):
        key, value = item.split("=", 1)
        if key.strip() == "preset" and value.strip().endswith(".toml") and not Path(value.strip()).is_absolute():
            value = str((Path(recipe_path).resolve().parent / value.strip()).resolve())
        out.append(f"{key.strip()}={value.strip()}" if key.strip() == "preset" else item)
    return out
