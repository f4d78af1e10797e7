"""The torchvision stand-in matches what sd-scripts expects of torchvision.transforms."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kxl_train import torchvision_compat as tc


def test_image_transform_chain_matches_formula():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    chain = tc.Compose([tc.ToTensor(), tc.Normalize([0.5], [0.5])])
    out = chain(pixels)
    expected = torch.tensor(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0 * 2 - 1)
    assert out.shape == (3, 5, 7)
    torch.testing.assert_close(out, expected)


def test_pil_to_tensor_is_uint8_chw():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = tc.pil_to_tensor(Image.fromarray(pixels))
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 3)
    assert out[:, 1, 2].tolist() == pixels[1, 2].tolist()


def test_install_provides_importable_modules(monkeypatch):
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(tc, "torchvision_works", lambda: False)
    assert tc.install() is True
    from torchvision import transforms  # noqa: E402  (the stand-in)

    assert transforms.functional.pil_to_tensor is tc.pil_to_tensor
    with pytest.raises(NotImplementedError):
        transforms.functional.gaussian_blur(torch.zeros(1, 3, 3), 3, 1.0)
