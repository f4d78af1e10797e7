"""One shard's work, run inside one worker: read, process, write, journal each post.

The member bytes come from the task's `source` (kxl_prep.export.reader: a local tar by
default; kxl fetch gives ranged hub reads): everything after the read is the same code.
"""
from __future__ import annotations

import errno
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from kxl_prep.buckets import BucketAssigner, BucketGrid
from kxl_prep.export.plan import PostTask
from kxl_prep.export.process import ExportSettings, Processed, process_image
from kxl_prep.export.reader import LocalTar, MemberSource
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
    source: MemberSource | None = None  # None: the local tar at shard_path


# errors no rerun of the next unit would escape: the job stops instead of failing every unit
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


@dataclass
class UnitResult:
    shard_rel: str
    counts: Counter = field(default_factory=Counter)  # ok / rejected / recovered
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    error: str | None = None
    fatal: bool = False  # the disk is full (or read-only): stop the job, a rerun resumes


Progress = Callable[..., None]  # progress(status, nbytes=0)


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
    source = task.source if task.source is not None else LocalTar(task.shard_path)
    try:
        to_read = []
        for post in task.posts:
            if task.existing.get(post.id) and _adopt(post, task, image_dir, journal):
                result.counts["recovered"] += 1
                if progress is not None:
                    progress("recovered")
            else:
                to_read.append(post)
        if to_read:
            with source.open() as reader:
                for post, data in reader.read_members(to_read):
                    status = _one_post(post, data, task, image_dir, bucket_of, journal, result)
                    result.counts[status] += 1
                    if progress is not None:
                        progress(status, 0 if isinstance(data, EOFError) else len(data))
        if task.fsync:
            fsync_dir(image_dir)  # renames durable before the journal that records them
    except Exception as exc:  # noqa: BLE001 - reported per unit, the job goes on
        result.error = f"{type(exc).__name__}: {exc}"
        result.fatal = isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS
    finally:
        journal.close(fsync=task.fsync)
    result.seconds = time.perf_counter() - started
    return result


def _adopt(post, task, image_dir, journal) -> bool:
    """A file renamed into place by a run killed before its journal line: adopt it (reading
    only its header). False when it is unreadable (removed: the post is redone)."""
    existing = task.existing[post.id]
    name = sorted(existing)[0]
    try:
        with Image.open(image_dir / name) as im:
            size = im.size
    except Exception:  # noqa: BLE001 - unreadable: redo it
        remove_files(image_dir, existing)
        return False
    journal.add({"id": post.id, "status": "ok", "file": name, "size": list(size), "recovered": True})
    return True


def _one_post(post, data, task, image_dir, bucket_of, journal, result) -> str:
    if isinstance(data, EOFError):
        journal.add({"id": post.id, "status": "rejected", "reason": "shard_truncated", "detail": str(data)})
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
