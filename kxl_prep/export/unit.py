"""One shard's work, run inside one worker: read, process, write, journal each post."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from kxl_prep.buckets import BucketAssigner, BucketGrid
from kxl_prep.export.plan import PostTask
from kxl_prep.export.process import ExportSettings, Processed, process_image
from kxl_prep.export.reader import ShardReader
from kxl_common.atomic import fsync_dir
from kxl_prep.export.writer import Journal, remove_files, write_image


@dataclass
class UnitTask:
    shard_path: str
    shard_rel: str
    journal_path: str
    image_dir: str
    posts: list[PostTask]  # still to do, in offset order
    existing: dict[int, list[str]]  # id -> finished files already in image_dir (adopted, not redone)
    stale_temps: list[str]  # our temp files left by a killed run, to delete
    settings: ExportSettings
    buckets: BucketGrid
    fsync: bool = True


@dataclass
class UnitResult:
    shard_rel: str
    counts: Counter = field(default_factory=Counter)  # ok / rejected / recovered
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    error: str | None = None


Progress = Callable[[str], None]


def run_unit(task: UnitTask, progress: Progress | None = None) -> UnitResult:
    """Never raises for a bad image; an I/O failure (disk full, unreadable tar) ends the unit
    with `error` set: what was finished stays journalled and a rerun goes on from there."""
    started = time.perf_counter()
    result = UnitResult(task.shard_rel)
    image_dir = Path(task.image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    remove_files(image_dir, task.stale_temps)
    bucket_of = BucketAssigner(task.buckets).assign_one if task.settings.resize != "none" else None
    journal = Journal(Path(task.journal_path))
    try:
        with ShardReader(task.shard_path) as reader:
            for post in task.posts:
                status = _one_post(post, task, reader, image_dir, bucket_of, journal, result)
                result.counts[status] += 1
                if progress is not None:
                    progress(status)
        if task.fsync:
            fsync_dir(image_dir)  # renames durable before the journal that records them
    except Exception as exc:  # noqa: BLE001 - reported per unit, the job goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        journal.close(fsync=task.fsync)
    result.seconds = time.perf_counter() - started
    return result


def _one_post(post, task, reader, image_dir, bucket_of, journal, result) -> str:
    existing = task.existing.get(post.id)
    if existing:
        # renamed into place by a run killed before its journal line: adopt it
        name = sorted(existing)[0]
        try:
            with Image.open(image_dir / name) as im:
                size = im.size
        except Exception:  # noqa: BLE001 - unreadable: redo it below
            remove_files(image_dir, existing)
        else:
            journal.add({"id": post.id, "status": "ok", "file": name, "size": list(size), "recovered": True})
            return "recovered"
    try:
        data = reader.read(post.offset, post.size)
    except EOFError as exc:
        journal.add({"id": post.id, "status": "rejected", "reason": "shard_truncated", "detail": str(exc)})
        return "rejected"
    result.bytes_in += len(data)
    out = process_image(data, post.ext, task.settings, bucket_of)
    if isinstance(out, Processed):
        name = write_image(image_dir, post.id, out.ext, out.data, fsync=task.fsync)
        result.bytes_out += len(out.data)
        journal.add({"id": post.id, "status": "ok", "file": name, "size": list(out.size),
                     "source_size": list(out.source_size), "notes": out.notes,
                     "bytes_in": len(data), "bytes_out": len(out.data)})
        return "ok"
    journal.add({"id": post.id, "status": "rejected", "reason": out.reason, "detail": out.detail,
                 "member": post.member})
    return "rejected"
