"""Atomic image writes and the per-shard journal that makes the export resumable.

An image is written to a hidden temp name in image_dir, fsynced, then renamed to
`<id>.<ext>`: a reader (or a rerun after kill -9) sees either the whole file or nothing.
Each finished post then gets one JSON line in its shard's journal (`ok` with the written
name and size, or `rejected` with the reason). A rerun skips journalled posts, adopts a
renamed file whose journal line was lost (reading only its header), and deletes stale
temp files of its own posts.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Iterable

TEMP_PREFIX = ".kxl-"
TEMP_RE = re.compile(r"^\.kxl-(\d+)\.[A-Za-z0-9]+\.[0-9a-f]+\.tmp$")
OUTPUT_RE = re.compile(r"^(\d+)\.([A-Za-z0-9]+)$")


def write_image(image_dir: Path, post_id: int, ext: str, data: bytes, *, fsync: bool = True) -> str:
    """Write `<id>.<ext>` atomically; returns the file name."""
    name = f"{post_id}.{ext}"
    tmp = image_dir / f"{TEMP_PREFIX}{post_id}.{ext}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, image_dir / name)
    return name


def scan_image_dir(image_dir: Path) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(id -> finished output names, id -> our temp files) in one directory listing."""
    outputs: dict[int, list[str]] = {}
    temps: dict[int, list[str]] = {}
    if not image_dir.exists():
        return outputs, temps
    with os.scandir(image_dir) as it:
        for entry in it:
            name = entry.name
            m = OUTPUT_RE.match(name)
            if m:
                outputs.setdefault(int(m.group(1)), []).append(name)
                continue
            t = TEMP_RE.match(name)
            if t:
                temps.setdefault(int(t.group(1)), []).append(name)
    return outputs, temps


def remove_files(image_dir: Path, names: Iterable[str]) -> int:
    n = 0
    for name in names:
        try:
            os.unlink(image_dir / name)
            n += 1
        except FileNotFoundError:
            pass
    return n


class Journal:
    """Append-only JSON lines, one per finished post; flushed per line (survives kill -9)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        self._fh: IO[str] = open(path, "a", encoding="utf-8")

    def add(self, record: dict) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self, *, fsync: bool = True) -> None:
        if fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (killed mid-write) so the next line starts clean."""
    if not path.exists():
        return
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(4096, pos)
            fh.seek(pos - step)
            block = fh.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                fh.truncate(pos - step + nl + 1)
                return
            pos -= step
        fh.truncate(0)


def read_journal(path: Path) -> dict[int, dict]:
    """id -> last record. A torn last line (killed mid-write) is ignored."""
    records: dict[int, dict] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn write at the end
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[int(rec["id"])] = rec
    return records
