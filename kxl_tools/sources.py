"""What `kxl compare` compares: per-module weight deltas from a LoKr file or a checkpoint.

A source answers `delta(name)` for canonical names (kxl_tools.keys): a float32 tensor, or
None when it does not change that module. Tensors are read one at a time.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kxl_common.errors import KxlError

from .keys import CheckpointIndex, Part
from .lokr import NetworkFile, is_network_file
from .st_io import SafetensorsReader


class SourceError(KxlError, ValueError):
    pass


def open_file(path: str | Path) -> tuple[str, SafetensorsReader]:
    """('network' | 'checkpoint', reader) for a safetensors file; clear error otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SourceError(f"{path}: only .safetensors files are read (pickled .ckpt/.pt files can run code)")
    reader = SafetensorsReader(path)
    keys = reader.keys()
    if is_network_file(keys):
        return "network", reader
    index = CheckpointIndex.from_reader(reader)
    if index.looks_like_sdxl():
        return "checkpoint", reader
    reader.close()
    raise SourceError(
        f"{path}: neither a LoKr/LyCORIS network file (keys lora_unet_*/lora_te1_*/lora_te2_*) "
        f"nor an SDXL single-file checkpoint (keys model.diffusion_model.*, conditioner.embedders.1.*)"
    )


class OneTensorCache:
    """Keep the last tensor read: TE2's fused in_proj serves q, k and v in turn."""

    def __init__(self, reader: SafetensorsReader):
        self.reader = reader
        self.key: str | None = None
        self.value: torch.Tensor | None = None

    def get(self, key: str) -> torch.Tensor:
        if key != self.key:
            self.value = None  # free before reading the next one
            self.value = self.reader.read(key)
            self.key = key
        return self.value


class NetworkDeltas:
    """Deltas of a LoKr file (kron(w1, w2) * scale per module; w_norm / b_norm of norm modules)."""

    kind = "network"

    def __init__(self, reader: SafetensorsReader, index: CheckpointIndex | None = None):
        self.reader = reader
        self.label = str(reader.path)
        self.net = NetworkFile(reader)
        self.index = index
        self._names = self.net.delta_names()
        self._name_set = set(self._names)
        self.unsupported = self.net.unsupported()

    def names(self) -> list[str]:
        return list(self._names)

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        if self.index is not None and name in self.index:
            return self.index[name].shape
        return None

    def delta(self, name: str) -> torch.Tensor | None:
        if name not in self._name_set:
            return None
        return self.net.delta(name, self.shape_of(name))


class CheckpointDeltas:
    """W - W_base per canonical part of a checkpoint; W itself when no base is given.

    With a base, a part whose delta is exactly zero counts as not changed (None).
    Non-float tensors (position_ids) are never compared.
    """

    kind = "checkpoint"

    def __init__(self, reader: SafetensorsReader, base: SafetensorsReader | None = None, base_cache: "OneTensorCache | None" = None):
        self.reader = reader
        self.label = str(reader.path)
        self.index = CheckpointIndex.from_reader(reader)
        self.base = base
        self._cache = OneTensorCache(reader)
        # Two checkpoints compared against one base share its cache: each base tensor is read once.
        self._base_cache = base_cache if base_cache is not None else (OneTensorCache(base) if base is not None else None)
        if base is not None:
            missing = [k for k in reader.keys() if k not in base]
            if missing:
                raise SourceError(
                    f"{reader.path}: {len(missing)} tensors are not in the base {base.path} "
                    f"(first: {missing[0]!r}); is the base an SDXL checkpoint of the same layout?"
                )
            for k in reader.keys():
                if reader.tensors[k].shape != base.tensors[k].shape:
                    raise SourceError(
                        f"{reader.path}: tensor {k!r} has shape {list(reader.tensors[k].shape)}, "
                        f"the base has {list(base.tensors[k].shape)}"
                    )

    def names(self) -> list[str]:
        return [n for n, p in self.index.parts.items() if self.reader.tensors[p.ckpt_key].torch_dtype.is_floating_point]

    def _part(self, cache: OneTensorCache, part: Part) -> torch.Tensor:
        """A float32 copy (never a view of the cached tensor: callers modify it in place)."""
        t = cache.get(part.ckpt_key)
        if part.rows is not None:
            t = t[part.rows[0]:part.rows[1]]
        return t.clone() if t.dtype == torch.float32 else t.float()

    def delta(self, name: str) -> torch.Tensor | None:
        part = self.index.parts.get(name)
        if part is None or not self.reader.tensors[part.ckpt_key].torch_dtype.is_floating_point:
            return None
        if self._base_cache is None:
            return self._part(self._cache, part)
        raw, raw_base = self._cache.get(part.ckpt_key), self._base_cache.get(part.ckpt_key)
        if raw.dtype == raw_base.dtype and torch.equal(raw, raw_base):
            return None  # unchanged, decided without float copies (most tensors of a LoKr run)
        w = self._part(self._cache, part)
        w.sub_(self._part(self._base_cache, part))
        if not torch.any(w):
            return None
        return w
