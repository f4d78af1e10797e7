"""--kxl-low-memory-load: when it acts, and that it only changes the UNet's load dtype."""
from __future__ import annotations

import pytest

from kxl_train import low_memory as lm


@pytest.mark.parametrize("argv,expected", [
    (["--mixed_precision", "fp16"], "fp16"),
    (["--mixed_precision=bf16"], "bf16"),
    (["--mixed_precision", "no"], None),
    ([], None),
    (["--mixed_precision", "fp16", "--fp8_base"], None),
    (["--mixed_precision", "bf16", "--fp8_base_unet"], None),
])
def test_target_dtype(argv, expected):
    assert lm.target_dtype_name(argv) == expected


def test_without_the_option_nothing_is_imported(monkeypatch):
    lm.install_low_memory_load({}, ["--mixed_precision", "fp16"])  # no sd-scripts needed: a no-op


@pytest.mark.sdscripts
def test_unet_only_gets_the_training_dtype(sd_scripts, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(sd_scripts))
    from kxl_train import torchvision_compat

    torchvision_compat.install()
    from library import sdxl_model_util, sdxl_original_unet

    calls = []
    monkeypatch.setattr(sdxl_model_util, "_load_state_dict_on_device",
                        lambda model, sd, device, dtype=None: calls.append((type(model).__name__, dtype)))
    lm.install_low_memory_load({"low_memory_load": True}, ["--mixed_precision", "bf16"])
    unet = sdxl_original_unet.SdxlUNet2DConditionModel.__new__(sdxl_original_unet.SdxlUNet2DConditionModel)
    # call sites as in library/sdxl_model_util.py (keyword device/dtype)
    sdxl_model_util._load_state_dict_on_device(unet, {}, device="cpu", dtype=None)
    sdxl_model_util._load_state_dict_on_device(torch.nn.Linear(1, 1), {}, device="cpu")  # a text encoder
    sdxl_model_util._load_state_dict_on_device(unet, {}, device="cpu", dtype=torch.float16)  # --full_fp16
    assert calls == [("SdxlUNet2DConditionModel", torch.bfloat16), ("Linear", None),
                     ("SdxlUNet2DConditionModel", torch.float16)]
