"""The Epsilon LyCORIS LoKr preset: validation and an exact count of what it creates.

The count instantiates sd-scripts' SDXL UNet (library/sdxl_original_unet.py) and the two CLIP
text encoders on the `meta` device (no memory), builds the LyCORIS network exactly as
`--network_module lycoris.kohya` does (lycoris.kohya.create_network), and reports every module:
its name, the shapes of lokr_w1 / lokr_w2 and its parameter count.

    kxl-train lokr-count [--recipe recipes/epsilon-rev1.toml] [--modules]
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from kxl_common.errors import KxlError
from kxl_common.lycoris_helpers import lycoris_module
from kxl_common.toml_file import read_toml
from kxl_common.upstream import REPO_ROOT
from kxl_train.sdxl_shapes import meta_models

PRESET_PATH = REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"
FILE_LIMIT_BYTES = 800 * 10**6  # "the raw LoKr file is under 800 MB"


class PresetError(KxlError, ValueError):
    pass


def load_preset(path: str | Path = PRESET_PATH) -> dict:
    """The preset as LyCORIS reads it; raises PresetError naming what LyCORIS would reject."""
    config_sdk = lycoris_module("config_sdk")
    PresetConfig, PresetValidationError = config_sdk.PresetConfig, config_sdk.PresetValidationError

    data = read_toml(path, what="LyCORIS preset", error=PresetError)
    try:
        PresetConfig.from_dict(data, strict=True)
    except PresetValidationError as exc:
        raise PresetError(f"{path}: {exc}") from exc
    return data


@dataclass
class LokrModuleInfo:
    name: str
    target_class: str  # class of the layer it wraps (Linear / Conv2d)
    w1: tuple
    w2: tuple
    params: int
    org_shape: tuple = ()  # weight shape of the wrapped layer
    tensors: dict = field(default_factory=dict)  # {param: shape} as the saved file will hold them


@dataclass
class NetworkCount:
    modules: list[LokrModuleInfo] = field(default_factory=list)
    missing_unet_names: list[str] = field(default_factory=list)
    missing_te_names: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def by_prefix(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for m in self.modules:
            prefix = m.name.split("_")[1]  # unet / te1 / te2
            out[prefix][0] += 1
            out[prefix][1] += m.params
        return {k: (v[0], v[1]) for k, v in out.items()}

    def file_bytes(self, bytes_per_param: int) -> int:
        """Tensor bytes of the saved file (plus one scalar alpha per module)."""
        return (self.params + len(self.modules)) * bytes_per_param


# LycorisNetworkKohya.apply_preset writes the preset into CLASS attributes, and only the keys the
# preset names: a second network built in the same process would inherit the first one's rest.
_PRESET_CLASS_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                       "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
                       "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@contextlib.contextmanager
def lycoris_class_state():
    """Restore LycorisNetworkKohya's preset class attributes after building a network."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {a: getattr(LycorisNetworkKohya, a) for a in _PRESET_CLASS_ATTRS}
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(LycorisNetworkKohya, a, v)


def network_kwargs(network_args: list[str]) -> dict:
    """`--network_args key=value ...` as sd-scripts hands them to create_network."""
    kwargs = {}
    for item in network_args:
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def count_network(sd_scripts: Path, network_args: list[str], network_dim: int, network_alpha: float,
                  models=None) -> NetworkCount:
    """Build the LyCORIS network on meta models and describe every module it creates.

    `models` (unet, [text encoders]) replaces sd-scripts' SDXL models (tests use tiny ones)."""
    import torch
    from lycoris import kohya

    if models is None:
        unet, te1, te2 = meta_models(sd_scripts)
        tes = [te1, te2]
    else:
        unet, tes = models
    kwargs = network_kwargs(network_args)
    preset = load_preset(kwargs["preset"]) if "preset" in kwargs else {}
    with torch.device("meta"), lycoris_class_state():
        network = kohya.create_network(1.0, network_dim, network_alpha, None, tes, unet, **kwargs)
    count = NetworkCount()
    for lora in network.unet_loras + network.text_encoder_loras:
        w1 = getattr(lora, "lokr_w1", None)
        w2 = getattr(lora, "lokr_w2", None)
        count.modules.append(LokrModuleInfo(
            name=lora.lora_name, target_class=type(lora.org_module[0]).__name__,
            w1=tuple(w1.shape) if w1 is not None else (), w2=tuple(w2.shape) if w2 is not None else (),
            params=sum(p.numel() for p in lora.parameters()),
            org_shape=tuple(getattr(lora, "shape", ())),
            tensors={k: tuple(v.shape) for k, v in lora.state_dict().items()}))
    unet_names = {n for n, _ in unet.named_modules()}
    te_names = {n for te in tes for n, _ in te.named_modules()}
    count.missing_unet_names = [n for n in preset.get("unet_target_name", []) if n not in unet_names]
    count.missing_te_names = [n for n in preset.get("text_encoder_target_name", []) if n not in te_names]
    return count


def w1_factor(info: LokrModuleInfo) -> int:
    """The Kronecker factor a module ended up with (the larger side of lokr_w1)."""
    return max(info.w1) if info.w1 else 1


def summary_lines(count: NetworkCount) -> list[str]:
    lines = []
    for prefix, (n, params) in sorted(count.by_prefix().items()):
        lines.append(f"{prefix:5s} {n:5d} modules {params:13,d} params")
    lines.append(f"total {len(count.modules):5d} modules {count.params:13,d} params")
    lines.append(f"file  fp16 {count.file_bytes(2) / 1e6:8.1f} MB   fp32 {count.file_bytes(4) / 1e6:8.1f} MB")
    factors = collections.Counter(w1_factor(m) for m in count.modules)
    lines.append("w1 factors: " + ", ".join(f"{f}: {n} modules" for f, n in sorted(factors.items())))
    return lines


def main(argv: list[str] | None = None) -> None:
    import click

    from kxl_common.upstream import require_sd_scripts

    @click.command()
    @click.option("--recipe", type=click.Path(exists=True, dir_okay=False),
                  default=str(REPO_ROOT / "recipes" / "epsilon-rev1.toml"), show_default=True,
                  help="Recipe whose network_* settings to use.")
    @click.option("--modules", is_flag=True, help="List every module.")
    def cli(recipe, modules):
        """Count the LoKr modules and parameters a recipe's preset creates on SDXL."""
        from kxl_train.recipe import load_recipe, resolved_network_args

        values = load_recipe(recipe)
        count = count_network(require_sd_scripts(), resolved_network_args(values, Path(recipe)),
                              int(values["network_dim"]), float(values["network_alpha"]))
        if modules:
            for m in count.modules:
                click.echo(f"{m.name:80s} {m.target_class:7s} w1={m.w1} w2={m.w2} {m.params:,d}")
        for line in summary_lines(count):
            click.echo(line)
        for name in count.missing_unet_names + count.missing_te_names:
            click.echo(f"error: preset names {name!r}, which does not exist in the model", err=True)

    cli.main(args=argv, standalone_mode=True)
