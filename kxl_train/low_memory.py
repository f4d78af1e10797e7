"""`--kxl-low-memory-load`: load the SDXL UNet straight into the training dtype.

sd-scripts loads the UNet in fp32 unless --full_fp16/--full_bf16 (which also put the trained
network in half precision), and only then casts it to the mixed-precision dtype
(train_network.py: `unet.to(dtype=unet_weight_dtype)`, cast_unet() is True for SDXL). Peak host
memory therefore holds a 10.3 GB fp32 UNet. With this patch the UNet's tensors are converted to
that dtype as they are loaded (library/sdxl_model_util._load_state_dict_on_device), so the fp32
copy never exists; the result after sd-scripts' cast is the same tensor values (a float16/bfloat16
value goes through float32 exactly). The network (LoKr) weights stay fp32, text encoders and VAE
are untouched. Inactive with mixed_precision "no" and with --fp8_base / --fp8_base_unet.
"""
from __future__ import annotations

import functools
import logging

from kxl_train.argv import option_value

log = logging.getLogger(__name__)
OPTION = "low_memory_load"


def target_dtype_name(argv: list[str]) -> str | None:
    """fp16 / bf16 when the UNet will be cast to that dtype anyway; None when the patch must not act."""
    if "--fp8_base" in argv or "--fp8_base_unet" in argv:
        return None
    mixed = option_value(argv, "--mixed_precision")
    return mixed if mixed in ("fp16", "bf16") else None


def install_low_memory_load(kxl_options: dict, argv: list[str]) -> None:
    if not kxl_options.get(OPTION):
        return
    name = target_dtype_name(argv)
    if name is None:
        log.warning("--kxl-low-memory-load: inactive (needs mixed_precision fp16/bf16 and no fp8_base)")
        return
    import torch
    from library import sdxl_model_util, sdxl_original_unet

    target = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
    original = sdxl_model_util._load_state_dict_on_device
    if getattr(original, "_kxl_low_memory", False):
        return

    @functools.wraps(original)
    def load_unet_in_training_dtype(model, state_dict, device, dtype=None):
        if dtype is None and isinstance(model, sdxl_original_unet.SdxlUNet2DConditionModel):
            log.info(f"kxl: loading the U-Net directly as {target} (it is cast to it before training)")
            dtype = target
        return original(model, state_dict, device=device, dtype=dtype)

    load_unet_in_training_dtype._kxl_low_memory = True
    sdxl_model_util._load_state_dict_on_device = load_unet_in_training_dtype
