"""The header of a safetensors file: tensor names, dtypes, shapes, offsets and metadata.

Read without touching the data (two preads), so it is as cheap for a 7 GB checkpoint as for a
LoKr file; kxl_tools.st_io reads tensors on top of it and kxl_train derives presets from it.

The format (documented at https://github.com/huggingface/safetensors): 8 bytes little-endian
u64 N, then N bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]}, optional
"__metadata__": {str: str}}, then the data buffer; offsets are relative to the buffer start.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from kxl_common.errors import KxlError

# Bytes per element of every dtype the format names that kxl reads.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# Header size guard, as safetensors itself refuses headers over 100 MB.
MAX_HEADER = 100_000_000


class SafetensorsError(KxlError, ValueError):
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
    def torch_dtype(self):
        from kxl_common.torch_dtypes import DTYPES

        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    path: Path
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_bytes: int = 0  # the JSON header's length N (the file is 8 + N + tensor data)

    @property
    def metadata_bytes(self) -> int:
        """Bytes the `__metadata__` entry takes in the header, written as safetensors writes it
        (compact JSON, UTF-8): `"__metadata__":{...}` plus its separating comma."""
        return metadata_bytes(self.metadata)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def metadata_bytes(metadata: dict[str, str]) -> int:
    """Header bytes of a `__metadata__` entry (0 for none), compact JSON as safetensors writes it."""
    if not metadata:
        return 0
    return len(json.dumps({"__metadata__": metadata}, separators=(",", ":"), ensure_ascii=False).encode()) - 2 + 1


def parse_header(fd: int, path: str | os.PathLike) -> Header:
    """The header of the open file `fd` (named `path` in errors); every tensor checked to fit."""
    path = Path(path)
    file_size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > file_size:
        raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
        begin, end = entry["data_offsets"]
        info = TensorInfo(name, dtype, tuple(entry["shape"]), base + begin, base + end)
        if info.end > file_size or info.nbytes != info.numel * DTYPE_SIZES[dtype]:
            raise SafetensorsError(
                f"{path}: tensor {name!r}: offsets {begin}..{end} do not fit "
                f"shape {list(info.shape)} {dtype} in a file of {file_size} bytes"
            )
        tensors[name] = info
    return Header(path, file_size, meta, tensors, n)


def read_header(path: str | os.PathLike) -> Header:
    """Open `path`, read its header, close it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot open ({exc.strerror})") from exc
    try:
        return parse_header(fd, path)
    finally:
        os.close(fd)
