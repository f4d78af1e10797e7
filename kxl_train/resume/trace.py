"""A per-optimizer-step log of what was trained on: sample keys and final captions.

One JSON object per line and per optimizer step:
  {"step": 12, "epoch": 1, "rank": 0,
   "micro_batches": [{"epoch": 0, "position": 22, "index": 5,
                      "keys": [...], "captions": [...], "flipped": [...]}, ...]}
`step` is the global step reached by that optimizer step (1-based, as in checkpoint names).
With several processes each rank writes its own file (`name.rank<R>.jsonl`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kxl_common.atomic import write_text


def rank_path(path: str | os.PathLike, rank: int, num_processes: int) -> Path:
    path = Path(path)
    if num_processes <= 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_trace(path: str | os.PathLike) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not a trace record ({exc})") from None
    return records


class TraceWriter:
    """Append-only trace for one rank. When a run resumes at step S into an existing trace
    file, records after S (written by the interrupted run after its last saved state) are
    dropped first, so the file stays the record of one exact run."""

    def __init__(self, path: str | os.PathLike, rank: int = 0, resume_after_step: int | None = None):
        self.path = Path(path)
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if resume_after_step is None:
                raise FileExistsError(
                    f"trace file {self.path} already exists and this run does not resume: "
                    f"choose another --kxl-trace path or remove it"
                )
            kept = [r for r in read_trace(self.path) if r["step"] <= resume_after_step]
            write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        self._pending: list[dict] = []

    def add_micro_batch(self, record: dict) -> None:
        self._pending.append(record)

    def end_step(self, step: int, epoch: int) -> None:
        line = {"step": step, "epoch": epoch, "rank": self.rank, "micro_batches": self._pending}
        self._pending = []
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            fh.flush()


def diff_traces(expected: list[dict], actual: list[dict]) -> list[str]:
    """Human-readable differences between two traces (empty when identical)."""
    problems = []
    by_step_e = {r["step"]: r for r in expected}
    by_step_a = {r["step"]: r for r in actual}
    for step in sorted(set(by_step_e) | set(by_step_a)):
        e, a = by_step_e.get(step), by_step_a.get(step)
        if e is None or a is None:
            problems.append(f"step {step}: only in {'actual' if e is None else 'expected'}")
        elif e != a:
            problems.append(f"step {step}: expected {json.dumps(e)[:300]} got {json.dumps(a)[:300]}")
    return problems
