"""Read one member's bytes from a plain tar by its recorded offset (no scan, no tarfile)."""
from __future__ import annotations

import os


class ShardReader:
    """An open shard; `read(offset, size)` is one pread."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise EOFError(f"{self.path}: wanted {size} bytes at offset {offset}, got {len(data)} (tar truncated?)")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
