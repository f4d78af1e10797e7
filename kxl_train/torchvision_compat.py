"""A stand-in for the few torchvision transforms sd-scripts' training path uses.

sd-scripts imports `torchvision.transforms` at module level (library/train_util.py,
library/utils.py) for four things: Compose, ToTensor, Normalize([0.5], [0.5]) and
functional.pil_to_tensor. Where no working torchvision exists (a CPU-only torch, for which the
registry's torchvision wheels are CUDA builds that cannot load), `install()` puts this
stand-in into sys.modules, so training runs; a working torchvision is always preferred.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import logging
import sys
import types

import numpy as np
import torch

log = logging.getLogger(__name__)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


def pil_to_tensor(image) -> torch.Tensor:
    """uint8 CHW tensor of a PIL image (torchvision.transforms.functional.pil_to_tensor)."""
    array = np.array(image, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ToTensor:
    """HWC uint8 (PIL or ndarray) -> CHW float in [0, 1]; float arrays are only transposed."""

    def __call__(self, picture) -> torch.Tensor:
        array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        if tensor.dtype == torch.uint8:
            return tensor.to(torch.get_default_dtype()).div(255)
        return tensor


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std


def _gaussian_blur(*_args, **_kwargs):
    raise NotImplementedError("gaussian_blur needs a real torchvision (only sd-scripts' gradual latent uses it)")


def torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision.transforms")
        return True
    except Exception:  # ImportError, or a CUDA build failing to register its ops on CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


def install() -> bool:
    """Use the real torchvision when it imports; else install the stand-in. True if installed."""
    if torchvision_works():
        return False
    root, transforms, functional = _module("torchvision"), _module("torchvision.transforms"), _module(
        "torchvision.transforms.functional")
    functional.pil_to_tensor = pil_to_tensor
    functional.gaussian_blur = _gaussian_blur
    transforms.Compose, transforms.ToTensor, transforms.Normalize = Compose, ToTensor, Normalize
    transforms.functional = functional
    root.transforms = transforms
    root.__version__ = "0+kxl-stand-in"
    sys.modules.update({"torchvision": root, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})
    log.warning("torchvision is not usable here; using kxl's stand-in for the transforms sd-scripts needs")
    return True
