"""Where a unit's member bytes come from: a local plain tar (one pread per member, no scan,
no tarfile), or any other `MemberSource` (kxl fetch's ranged hub reads) that yields the
same bytes for the same (offset, size), so one unit processing serves both.

A source is a small picklable description (it travels to pool workers and Ray tasks);
`open()` inside the worker gives a reader whose `read_members(posts)` yields
(post, bytes) in the order given, or (post, EOFError) for a member past the tar's end
(the export rejects it as `shard_truncated`). Any other exception ends the unit (it is
retried by the next run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol


class MemberReader(Protocol):
    def read_members(self, posts: Iterable) -> Iterator[tuple[object, bytes | EOFError]]: ...

    def __enter__(self) -> "MemberReader": ...

    def __exit__(self, *exc) -> None: ...


class MemberSource(Protocol):
    def open(self) -> MemberReader: ...


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

    def read_members(self, posts: Iterable) -> Iterator[tuple[object, bytes | EOFError]]:
        for post in posts:
            try:
                yield post, self.read(post.offset, post.size)
            except EOFError as exc:
                yield post, exc

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class LocalTar:
    """The export's source: a tar on a filesystem the worker sees."""

    path: str

    def open(self) -> ShardReader:
        return ShardReader(self.path)
