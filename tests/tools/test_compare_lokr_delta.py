"""LoKr delta and scale rules against LyCORIS 4.1.3 itself.

Each case builds a LyCORIS LokrModule on a tiny Linear/Conv2d, fills its factors with random
values, saves its state dict to safetensors and reads it back through kxl_tools. Two
independent references:
- the module's training forward (its output minus the original layer's output) must equal
  the layer applied with our delta: the scale is applied once;
- LokrModule.get_diff_weight must equal our delta times the module's scale: the documented
  LyCORIS defect (scale applied twice, lycoris/modules/lokr.py:381-386). For full-matrix
  modules the scale is 1 and both agree.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

lokr_mod = pytest.importorskip("lycoris.modules.lokr")

from kxl_tools.lokr import LokrFactors, NetworkFile
from kxl_tools.st_io import SafetensorsReader

CASES = [
    ("linear full matrix", lambda: nn.Linear(32, 48), dict(lora_dim=4, alpha=2, factor=4, full_matrix=True)),
    ("linear low-rank w2", lambda: nn.Linear(64, 96), dict(lora_dim=2, alpha=3, factor=4)),
    ("linear low-rank w1 and w2", lambda: nn.Linear(64, 96), dict(lora_dim=1, alpha=0.5, factor=8, decompose_both=True)),
    ("linear low-rank rs_lora", lambda: nn.Linear(64, 96), dict(lora_dim=4, alpha=3, factor=4, rs_lora=True)),
    ("conv3x3 low-rank w2", lambda: nn.Conv2d(32, 64, 3, padding=1), dict(lora_dim=2, alpha=4, factor=4)),
    ("conv3x3 tucker", lambda: nn.Conv2d(32, 64, 3, padding=1), dict(lora_dim=2, alpha=4, factor=4, use_tucker=True)),
    ("conv3x3 full matrix", lambda: nn.Conv2d(32, 64, 3, padding=1), dict(lora_dim=4, alpha=4, factor=4, full_matrix=True)),
    ("conv1x1 low-rank w2", lambda: nn.Conv2d(32, 64, 1), dict(lora_dim=2, alpha=1, factor=4)),
]


def _build(make_layer, kwargs, seed):
    torch.manual_seed(seed)
    layer = make_layer()
    module = lokr_mod.LokrModule("lora_unet_x", layer, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return layer, module


def _factors_via_file(tmp_path, module) -> LokrFactors:
    sd = {f"lora_unet_x.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    path = tmp_path / "one.safetensors"
    save_file(sd, str(path))
    net = NetworkFile(SafetensorsReader(path))
    assert net.lokr_names() == ["lora_unet_x"]
    return net.factors("lora_unet_x")


@pytest.mark.parametrize("label,make_layer,kwargs", CASES, ids=[c[0] for c in CASES])
def test_delta_matches_lycoris_forward(tmp_path, label, make_layer, kwargs):
    layer, module = _build(make_layer, kwargs, seed=zlib.crc32(label.encode()))
    f = _factors_via_file(tmp_path, module)
    delta = f.delta(tuple(layer.weight.shape))
    assert f.scale == pytest.approx(module.scale)
    x = torch.randn(3, layer.in_features) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 6, 6)
    with torch.no_grad():
        module.apply_to()
        y = module(x)
        if isinstance(layer, nn.Linear):
            ours = F.linear(x, layer.weight + delta, layer.bias)
        else:
            ours = F.conv2d(x, layer.weight + delta, layer.bias, padding=layer.padding)
    assert torch.allclose(y, ours, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


@pytest.mark.parametrize("label,make_layer,kwargs", CASES, ids=[c[0] for c in CASES])
def test_lycoris_get_diff_weight_applies_scale_twice(tmp_path, label, make_layer, kwargs):
    layer, module = _build(make_layer, kwargs, seed=zlib.crc32(label.encode()) + 1)
    f = _factors_via_file(tmp_path, module)
    ours = f.delta(tuple(layer.weight.shape))
    with torch.no_grad():
        lyco, _ = module.get_diff_weight(shape=layer.weight.shape)
    assert torch.allclose(lyco, ours * module.scale, rtol=1e-5, atol=1e-6 * float(ours.abs().max()))
    if f.full_matrix:
        assert f.scale == 1.0
        assert torch.allclose(lyco, ours, rtol=1e-5, atol=1e-6)
    else:
        assert module.scale != 1.0  # the cases are chosen so the defect is visible
        assert not torch.allclose(lyco, ours)


def test_alpha_missing_or_zero_means_scale_one():
    w1 = torch.randn(2, 2)
    w2a, w2b = torch.randn(3, 2), torch.randn(2, 5)
    for tensors in ({}, {"alpha": torch.tensor(0.0)}):
        f = LokrFactors.from_tensors("m", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, **tensors})
        assert f.scale == 1.0
    f = LokrFactors.from_tensors("m", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    assert f.scale == 0.5
    # Full matrix: alpha is ignored (LyCORIS forces alpha = dim when both halves are full).
    f = LokrFactors.from_tensors("m", {"lokr_w1": w1, "lokr_w2": torch.randn(3, 5), "alpha": torch.tensor(7.0)})
    assert f.scale == 1.0


def test_delta_independent_kron():
    """kron written out element-wise: delta[i*b + j, k*d + l] = s * w1[i, k] * w2[j, l]."""
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(2, 3, generator=g)
    w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    f = LokrFactors.from_tensors("m", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)})
    w2 = w2a @ w2b
    got = f.delta()
    for i in range(2):
        for j in range(4):
            for k in range(3):
                for m in range(5):
                    assert got[i * 4 + j, k * 5 + m] == pytest.approx(1.5 * float(w1[i, k] * w2[j, m]), rel=1e-5)


@pytest.mark.parametrize(
    "tensors,message",
    [
        ({"lokr_w1": torch.ones(2, 2)}, "lokr_w2"),
        ({"lokr_w2": torch.ones(2, 2)}, "lokr_w1"),
        ({"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(2, 2), "dora_scale": torch.ones(4, 1)}, "dora_scale"),
        ({"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(3, 2), "lokr_w2_b": torch.ones(3, 4)}, "do not chain"),
        ({"lokr_w1": torch.ones(2, 2), "lora_up.weight": torch.ones(2, 2)}, "not a LoKr"),
    ],
)
def test_malformed_modules_are_named(tensors, message):
    with pytest.raises(ValueError, match=message) as info:
        LokrFactors.from_tensors("lora_unet_bad", tensors)
    assert "lora_unet_bad" in str(info.value)
