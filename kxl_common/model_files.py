"""What a model path must be before anything loads it: checked from the safetensors header
alone (two preads, no tensor read), so `launch`, `kxl eval generate`, `merge`, `compare` and
`inspect` refuse a wrong file with one line instead of sd-scripts' HeaderTooLarge traceback
or pages of missing state_dict keys.

- an SDXL single-file checkpoint: a .safetensors file holding the SGM U-Net
  (model.diffusion_model.*) and the second text encoder (conditioner.embedders.1.model.*), as
  sd-scripts' `load_models_from_sdxl_checkpoint` reads it; or, where diffusers folders are
  taken, a folder with model_index.json;
- a LoKr / LyCORIS network file: a .safetensors file whose modules are all lora_unet_* /
  lora_te1_* / lora_te2_* names.
"""
from __future__ import annotations

from pathlib import Path

from kxl_common.errors import KxlError
from kxl_common.lokr_layout import is_network_file
from kxl_common.safetensors_header import Header, read_header

SDXL_UNET_PREFIX = "model.diffusion_model."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelFileError(KxlError, ValueError):
    pass


def _header(path: Path, role: str) -> Header:
    if not path.exists():
        raise ModelFileError(f"{role} {path}: does not exist")
    if path.is_dir():
        raise ModelFileError(f"{role} {path}: is a folder, not a .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(f"{role} {path}: only .safetensors files are read (pickled {path.suffix} files can run code)")
    header = read_header(path)  # SafetensorsError (a KxlError) names the path: garbage, truncated, empty
    if not header.tensors:
        raise ModelFileError(f"{role} {path}: holds no tensors")
    return header


def is_sdxl_keys(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(SDXL_UNET_PREFIX) for k in keys) and any(k.startswith(SDXL_TE2_PREFIX) for k in keys)


def check_sdxl_checkpoint(path, *, role: str = "model", diffusers_ok: bool = False) -> Path:
    """Refuse (ModelFileError / SafetensorsError) anything but an SDXL single-file checkpoint
    (or, with diffusers_ok, a diffusers folder); returns the path."""
    path = Path(path).expanduser()
    if diffusers_ok and path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelFileError(f"{role} {path}: a folder, but not a diffusers model (no model_index.json)")
        return path
    header = _header(path, role)
    keys = header.tensors.keys()
    if is_network_file(keys):
        raise ModelFileError(f"{role} {path}: is a LoKr/LyCORIS network file, not an SDXL checkpoint")
    if not is_sdxl_keys(keys):
        raise ModelFileError(
            f"{role} {path}: not an SDXL single-file checkpoint (no {SDXL_UNET_PREFIX}* U-Net and "
            f"{SDXL_TE2_PREFIX}* text encoder 2 keys among its {len(header.tensors)} tensors)")
    return path


def check_network_file(path, *, role: str = "LoKr") -> Path:
    """Refuse anything but a LoKr/LyCORIS network file; returns the path."""
    path = Path(path).expanduser()
    header = _header(path, role)
    if not is_network_file(header.tensors.keys()):
        what = "an SDXL checkpoint" if is_sdxl_keys(header.tensors.keys()) else "a safetensors file of other keys"
        raise ModelFileError(f"{role} {path}: is {what}, not a LoKr/LyCORIS network file "
                             "(keys lora_unet_* / lora_te1_* / lora_te2_*)")
    return path
