"""kxl_testing.sdxl_random's file (written through kxl_tools.st_io.StreamingWriter) holds each
component's tensors as its builder makes them under the seed, fp16, with the fixture metadata.
Tiny stand-in components: the full-size build is 7 GB (tests/train/test_resume_sdscripts.py)."""
from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kxl_testing import sdxl_random as sx


def linear():
    layer = torch.nn.Linear(6, 4)  # draws from torch's RNG, as the real builders do
    return {"lin.weight": layer.weight, "lin.bias": layer.bias, "lin.logit_scale": torch.tensor(sx.LOGIT_SCALE)}


def conv():
    layer = torch.nn.Conv2d(3, 2, 3)
    return {"conv.weight": layer.weight, "conv.bias": layer.bias, "conv.empty": torch.empty(0, 5)}


def test_file_holds_each_component_as_built(tmp_path, monkeypatch):
    monkeypatch.setattr(sx, "_components", lambda: [("linear", linear), ("conv", conv)])
    path = sx.make_random_sdxl(tmp_path / "m.safetensors", seed=7, progress=False)

    torch.manual_seed(7)
    with torch.no_grad(), sx._default_dtype(torch.float16):
        want = {**linear(), **conv()}
    got = load_file(str(path))
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == torch.float16 and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "kxl_fixture": "random-weight SDXL", "seed": "7"}
    # another seed, other weights
    other = load_file(str(sx.make_random_sdxl(tmp_path / "o.safetensors", seed=8, progress=False)))
    assert not torch.equal(other["lin.weight"], got["lin.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "o.safetensors"]  # no temp file left
