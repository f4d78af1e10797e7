"""Names: sd-scripts / LyCORIS network module names <-> SDXL single-file (SGM) checkpoint keys.

Verified against sd-scripts v0.10.1 and lycoris-lora 4.1.3:

- A network module is named `prefix + "_" + module_path.replace(".", "_")` where module_path
  is the module's name inside the model sd-scripts builds (networks/lora.py create_modules;
  lycoris/kohya.py create_modules / create_modules_). For SDXL the prefixes are `lora_unet`,
  `lora_te1`, `lora_te2` (two text encoders -> indexed prefix).
- U-Net: sd-scripts' SdxlUNet2DConditionModel uses the SGM names, loaded by stripping
  `model.diffusion_model.` (library/sdxl_model_util.py load_models_from_sdxl_checkpoint).
- TE1: a transformers CLIPTextModel loaded from `conditioner.embedders.0.transformer.` with
  the prefix stripped, so module paths start with `text_model.`.
- TE2: a transformers CLIPTextModelWithProjection built from the OpenCLIP keys under
  `conditioner.embedders.1.model.` by convert_sdxl_text_encoder_2_checkpoint:
  transformer.resblocks.N -> text_model.encoder.layers.N, ln_1/ln_2 -> layer_norm1/2,
  mlp.c_fc/c_proj -> mlp.fc1/fc2, attn.out_proj -> self_attn.out_proj, attn.in_proj_weight
  and in_proj_bias -> q/k/v_proj split in three equal row chunks (q, k, v order),
  positional_embedding -> embeddings.position_embedding.weight, token_embedding ->
  embeddings.token_embedding, ln_final -> final_layer_norm, text_projection ->
  text_projection.weight (copied as is, not transposed), logit_scale kept aside.

Every checkpoint tensor gets a canonical name: the network module name for a module's
`weight` (what a LoKr file is keyed by), `<module name>.<param>` for its other parameters
(bias, ...), and the raw checkpoint key for anything no network module can address (VAE,
logit_scale, position_ids).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from kxl_common.errors import KxlError
from kxl_common.model_files import is_sdxl_keys

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

LORA_UNET = "lora_unet"
LORA_TE1 = "lora_te1"
LORA_TE2 = "lora_te2"

BLOCKS = ("TE1", "TE2", "UNet input", "UNet middle", "UNet output", "UNet other", "VAE", "other")

_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_TE2_RESBLOCK_SUBS = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
_TE2_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
QKV = ("q_proj", "k_proj", "v_proj")


class KeyMapError(KxlError, ValueError):
    pass


@dataclass(frozen=True)
class Part:
    """One canonical tensor inside a checkpoint tensor.

    `rows` is a (start, stop) row slice of the checkpoint tensor (TE2's fused in_proj holds
    q, k, v); None means the whole tensor.
    """

    name: str
    ckpt_key: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]


def module_name(prefix: str, module_path: str) -> str:
    """The network module name sd-scripts and LyCORIS give a module at `module_path`."""
    return f"{prefix}_{module_path}".replace(".", "_")


def _canonical(prefix: str, param_path: str) -> str:
    module_path, _, param = param_path.rpartition(".")
    if not module_path:
        raise KeyMapError(f"parameter path {param_path!r} has no module part")
    name = module_name(prefix, module_path)
    return name if param == "weight" else f"{name}.{param}"


def te2_hf_paths(sgm_key: str) -> list[str] | None:
    """transformers CLIPTextModelWithProjection parameter path(s) for a TE2 checkpoint key.

    Returns three paths (q, k, v) for the fused in_proj, one path otherwise, None for keys
    that have no parameter in sd-scripts' text encoder 2 (logit_scale, position_ids).
    """
    rest = sgm_key[len(TE2_PREFIX):] if sgm_key.startswith(TE2_PREFIX) else sgm_key
    m = _RESBLOCK.match(rest)
    if m:
        layer, sub = m.groups()
        head = f"text_model.encoder.layers.{layer}."
        if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
            param = "weight" if sub.endswith("weight") else "bias"
            return [f"{head}self_attn.{p}.{param}" for p in QKV]
        for old, new in _TE2_RESBLOCK_SUBS.items():
            if sub.startswith(old):
                return [head + new + sub[len(old):]]
        raise KeyMapError(f"text encoder 2 key {sgm_key!r}: unexpected resblock parameter {sub!r}")
    if rest in _TE2_TOP:
        return [_TE2_TOP[rest]]
    return None


def checkpoint_parts(key: str, shape: Sequence[int]) -> list[Part]:
    """Canonical parts of one checkpoint tensor (see module docstring)."""
    shape = tuple(shape)
    if key.startswith(UNET_PREFIX):
        return [Part(_canonical(LORA_UNET, key[len(UNET_PREFIX):]), key, None, shape)]
    if key.startswith(TE1_PREFIX):
        rest = key[len(TE1_PREFIX):]
        if rest.endswith("position_ids"):  # a buffer, not a parameter (sd-scripts drops it)
            return [Part(key, key, None, shape)]
        return [Part(_canonical(LORA_TE1, rest), key, None, shape)]
    if key.startswith(TE2_PREFIX):
        paths = te2_hf_paths(key)
        if paths is None:
            return [Part(key, key, None, shape)]
        if len(paths) == 1:
            return [Part(_canonical(LORA_TE2, paths[0]), key, None, shape)]
        if not shape or shape[0] % 3:
            raise KeyMapError(f"{key}: fused q/k/v tensor of shape {list(shape)} does not split in three")
        d = shape[0] // 3
        return [
            Part(_canonical(LORA_TE2, p), key, (i * d, (i + 1) * d), (d, *shape[1:]))
            for i, p in enumerate(paths)
        ]
    return [Part(key, key, None, shape)]


def block_of(name: str) -> str:
    """Report block of a canonical name or network module name."""
    if name.startswith(LORA_TE1 + "_"):
        return "TE1"
    if name.startswith(LORA_TE2 + "_"):
        return "TE2"
    if name.startswith(LORA_UNET + "_"):
        rest = name[len(LORA_UNET) + 1:]
        if rest.startswith("input_blocks_"):
            return "UNet input"
        if rest.startswith("middle_block_"):
            return "UNet middle"
        if rest.startswith("output_blocks_"):
            return "UNet output"
        return "UNet other"
    if name.startswith(VAE_PREFIX):
        return "VAE"
    return "other"


class CheckpointIndex:
    """Canonical name -> Part for every tensor of a single-file SDXL checkpoint, in file order."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], order: Iterable[str] | None = None):
        self.parts: dict[str, Part] = {}
        self.by_key: dict[str, list[Part]] = {}
        for key in order if order is not None else shapes:
            parts = checkpoint_parts(key, shapes[key])
            self.by_key[key] = parts
            for p in parts:
                other = self.parts.get(p.name)
                if other is not None:
                    raise KeyMapError(f"checkpoint keys {other.ckpt_key!r} and {key!r} both map to {p.name!r}")
                self.parts[p.name] = p

    @classmethod
    def from_reader(cls, reader) -> "CheckpointIndex":
        infos = sorted(reader.tensors.values(), key=lambda t: t.begin)  # sequential reads
        return cls({t.name: t.shape for t in infos}, [t.name for t in infos])

    def looks_like_sdxl(self) -> bool:
        return is_sdxl_keys(self.by_key)

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def __getitem__(self, name: str) -> Part:
        return self.parts[name]
