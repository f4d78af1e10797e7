"""Run work units: in-process, on a pool of processes (one shard at a time per worker), or on Ray.

Beyond one machine there are two ways, both over the same units:
- `--shard K/N` (e.g. a Slurm array): job K takes every N-th unit from K (Plan.slice);
- `--ray` (the optional `ray` extra): every unit becomes a Ray task on the cluster.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from collections import Counter
from typing import Callable, Iterator

from tqdm import tqdm

from kxl_prep.export.unit import UnitResult, UnitTask, run_unit

_progress_queue = None  # set in each pool worker
_parent_pid = -1
_stop = None  # an Event: set when the job stops early; a unit not yet started is skipped


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_worker(q, parent_pid: int, stop) -> None:
    global _progress_queue, _parent_pid, _stop
    _progress_queue = q
    _parent_pid = parent_pid
    _stop = stop


def _report(status: str, nbytes: int = 0) -> None:
    # A worker must not outlive a killed (kill -9) export: it would race the rerun.
    if os.getppid() != _parent_pid:
        os._exit(1)
    _progress_queue.put((status, nbytes))


def _run_in_pool(task: UnitTask) -> UnitResult | None:
    if _stop.is_set():
        return None
    return run_unit(task, _report)


class ProgressBar:
    """images/s, ETA and running ok / rejected counts; with `bytes_total`, also the MiB read
    so far of that total (kxl fetch: what is still to come over the network)."""

    def __init__(self, total: int, desc: str, disable: bool | None = None, unit: str = "img",
                 bytes_total: int | None = None):
        tqdm.monitor_interval = 0  # no monitor thread: worker processes are forked
        self.bar = tqdm(total=total, desc=desc, unit=unit, smoothing=0.05, dynamic_ncols=True, disable=disable)
        self.counts: Counter = Counter()
        self.bytes = 0
        self.bytes_total = bytes_total

    def __call__(self, status: str, nbytes: int = 0) -> None:
        self.counts[status] += 1
        self.bytes += nbytes
        self.bar.update(1)
        if self.bar.n % 64 == 0 or self.bar.n == self.bar.total:
            self.bar.set_postfix(self._postfix(), refresh=False)

    def _postfix(self) -> dict:
        if self.bytes_total is None:
            return dict(self.counts)
        return {**self.counts, "MiB": f"{self.bytes / 2**20:.1f}/{self.bytes_total / 2**20:.1f}"}

    def close(self) -> None:
        self.bar.set_postfix(self._postfix(), refresh=False)
        self.bar.close()


def run_local(tasks: list[UnitTask], workers: int, progress: Callable[[str], None]) -> Iterator[UnitResult]:
    """Yield each unit's result as it finishes. workers=1 runs in this process."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield run_unit(task, progress)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    q, stop = ctx.Queue(), ctx.Event()
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(q, os.getpid(), stop),
                  maxtasksperchild=16) as pool:
        # the biggest shards first, so the tail of the job is short
        order = sorted(tasks, key=lambda t: -len(t.posts))
        pending = pool.imap_unordered(_run_in_pool, order, chunksize=1)
        done = 0
        try:
            while done < len(tasks):
                result = _next(pending, q, progress)
                if result is not _WAITING:
                    done += 1
                    yield result
        except GeneratorExit:
            # The caller stopped early (e.g. a full disk). Let the pool wind down instead of
            # terminating it: a worker killed while it sends a result holds the result queue's lock
            # for ever, and Pool.terminate then waits on it. Units not started are skipped; those
            # running finish (their writes are atomic, a rerun resumes them).
            stop.set()
            while done < len(tasks):
                done += _next(pending, q, progress) is not _WAITING
            pool.close()
            pool.join()
            raise
        _drain(q, progress)


_WAITING = object()


def _next(pending, q, progress):
    """The next finished unit's result, or _WAITING after 0.1 s; progress drained meanwhile."""
    _drain(q, progress)
    try:
        return pending.next(timeout=0.1)
    except mp.TimeoutError:
        return _WAITING


def _drain(q, progress) -> None:
    try:
        while True:
            progress(*q.get_nowait())
    except queue_mod.Empty:
        pass


def run_ray(tasks: list[UnitTask], address: str | None, progress: Callable[[str], None]) -> Iterator[UnitResult]:
    """Each unit is a Ray task (one CPU each). Progress is counted per finished unit.

    The image_dir (and, for the export, the shards) must be on a filesystem every Ray node sees."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs the optional extra: pip install 'kxl[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_unit)
    waiting = {remote.remote(task): task for task in tasks}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        for ref in ready:
            waiting.pop(ref)
            result: UnitResult = ray.get(ref)
            nbytes = result.bytes_in  # counted with the unit's first image
            for status, n in result.counts.items():
                for _ in range(n):
                    progress(status, nbytes)
                    nbytes = 0
            yield result
