"""Tensor-at-a-time safetensors reading and writing with bounded memory.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a tensor read
touches stays resident in the mapping, so RSS grows with the bytes read (measured with
safetensors 0.4.5: reading a 512 MB file tensor by tensor left RSS 580 MB higher). Reading
three 7 GB checkpoints that way holds ~21 GB. Here each tensor is `pread` into its own buffer
and freed after use, so the resident set is the tensors in flight only.

The header is parsed by kxl_common.safetensors_header (shared with kxl_train). The format
(documented at https://github.com/huggingface/safetensors): 8 bytes little-endian
u64 N, then N bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]}, optional
"__metadata__": {str: str}}, then the data buffer; offsets are relative to the buffer start,
tensors are contiguous, row-major, little-endian.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from kxl_common.atomic import atomic_open
from kxl_common.safetensors_header import SafetensorsError, TensorInfo, parse_header  # noqa: F401 (re-exported)
from kxl_common.torch_dtypes import DTYPE_NAMES


class SafetensorsReader:
    """Header parsed once; `read(name)` returns a fresh CPU tensor (owned memory)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise SafetensorsError(f"{self.path}: cannot open ({exc.strerror})") from exc
        try:
            header = parse_header(self._fd, self.path)
        except BaseException:
            # -1 first: __del__ must not close the number again (by then another file's)
            fd, self._fd = self._fd, -1
            os.close(fd)
            raise
        self.file_size, self.metadata, self.tensors = header.file_size, header.metadata, header.tensors
        self.header = header

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:  # pread may return short counts for very large reads
            n = os.preadv(self._fd, [view[got:]], info.begin + got)
            if n <= 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: file ends early")
            got += n
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class StreamingWriter:
    """Write a safetensors file one tensor at a time, in the planned order.

    The header (names, dtypes, shapes, offsets) is fixed up front from `plan`, so nothing but
    the tensor being written is ever held. The file appears atomically on `close()` without
    error; an exception leaves no output.
    """

    def __init__(self, path: str | os.PathLike, plan: Iterable[PlannedTensor], metadata: dict[str, str] | None = None):
        self.plan = list(plan)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise SafetensorsError(f"metadata values must be strings: {bad[:5]}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for t in self.plan:
            if t.dtype not in DTYPE_NAMES:
                raise SafetensorsError(f"tensor {t.name!r}: dtype {t.dtype} cannot be stored")
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as safetensors does
        self.path = Path(path)
        self._ctx = atomic_open(path, "wb")
        self._fh = self._ctx.__enter__()
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise SafetensorsError(f"tensor {name!r}: not in the write plan")
        want = self.plan[self._next]
        if name != want.name:
            raise SafetensorsError(f"tensor {name!r} written out of order: expected {want.name!r}")
        if tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise SafetensorsError(
                f"tensor {name!r}: got {tensor.dtype} {list(tensor.shape)}, planned {want.dtype} {list(want.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # A byte view of the tensor's own memory; no copy for CPU contiguous tensors.
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            missing = self.plan[self._next].name
            self.abort(SafetensorsError(f"only {self._next} of {len(self.plan)} tensors written; next was {missing!r}"))
        self._ctx.__exit__(None, None, None)
        # The temporary file was created 0600; give the output the usual umask-based mode.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.path, 0o666 & ~mask)

    def abort(self, exc: BaseException) -> None:
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise exc

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, etype, exc, tb) -> None:
        if etype is None:
            self.close()
        else:
            self._ctx.__exit__(etype, exc, tb)
