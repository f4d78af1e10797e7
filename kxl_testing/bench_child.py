"""A bench's measured step run in a fresh interpreter (`SCRIPT child ARGS...`), so its wall time
and peak memory are its own; the child prints its figures as a JSON line, the last one counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_child(script: str | os.PathLike, args: list[str], what: str) -> dict:
    """The figures `script child *args` prints; SystemExit naming `what`, with the child's stderr
    tail, when it fails. The child imports this repository's code first."""
    cmd = [sys.executable, str(Path(script).resolve()), "child", *args]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
