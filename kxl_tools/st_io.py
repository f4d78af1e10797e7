"""Tensor-at-a-time safetensors reading and writing with bounded memory.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a tensor read
touches stays resident in the mapping, so RSS grows with the bytes read (measured with
safetensors 0.4.5: reading a 512 MB file tensor by tensor left RSS 580 MB higher). Reading
three 7 GB checkpoints that way holds ~21 GB. Here each tensor is `pread` into its own buffer
and freed after use, so the resident set is the tensors in flight only.

The format (documented at https://github.com/huggingface/safetensors): 8 bytes little-endian
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

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Header size guard, as safetensors itself refuses headers over 100 MB.
MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class SafetensorsReader:
    """Header parsed once; `read(name)` returns a fresh CPU tensor (owned memory)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise SafetensorsError(f"{self.path}: cannot open ({exc.strerror})") from exc
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.metadata, self.tensors = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        head = os.pread(self._fd, 8, 0)
        if len(head) != 8:
            raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > self.file_size:
            raise SafetensorsError(f"{self.path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({exc})") from exc
        meta = header.pop("__metadata__", None) or {}
        base = 8 + n
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype = entry.get("dtype")
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: unsupported dtype {dtype!r}")
            begin, end = entry["data_offsets"]
            info = TensorInfo(name, dtype, tuple(entry["shape"]), base + begin, base + end)
            if info.end > self.file_size or info.nbytes != info.numel * DTYPES[dtype].itemsize:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r}: offsets {begin}..{end} do not fit "
                    f"shape {list(info.shape)} {dtype} in a file of {self.file_size} bytes"
                )
            tensors[name] = info
        return meta, tensors

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
