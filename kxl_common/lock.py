"""An advisory lock file shared by processes and jobs (the kernel releases it when its
holder dies, so a kill -9 never leaves a stale lock)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, timeout: float | None = None, poll: float = 0.2) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with its folder). Waits forever by default;
    with `timeout`, raises TimeoutError once that many seconds pass without the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if timeout is None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{path}: still locked after {timeout} s") from None
                    time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
