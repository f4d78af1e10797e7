"""A separate virtual environment holding dghs-imgutils, so that tests can run deepghs' own CCIP
code next to kxl's (imgutils pins numpy < 2; kxl's environment has numpy 2).

Made once per set of versions under $XDG_CACHE_HOME/kxl (default ~/.cache/kxl) and reused;
KXL_IMGUTILS_PYTHON names the Python of an existing environment instead. Pillow and
onnxruntime are pinned to the versions kxl runs with, so that a comparison tests imgutils'
logic, not two releases of the libraries under it. Where the environment cannot be made
(no network, no wheel for this Python), ImgutilsUnavailable says why.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

IMGUTILS_VERSION = "0.19.0"
PYTHON_ENV_VAR = "KXL_IMGUTILS_PYTHON"
RUNNER = Path(__file__).with_name("imgutils_ccip_run.py")
COMPLETE = "kxl-complete.json"
INSTALL_TIMEOUT_S = 1200


class ImgutilsUnavailable(RuntimeError):
    pass


def pins() -> list[str]:
    import onnxruntime
    import PIL

    return [f"dghs-imgutils=={IMGUTILS_VERSION}", f"pillow=={PIL.__version__}",
            f"onnxruntime=={onnxruntime.__version__}"]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kxl"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@contextmanager
def _locked(path: Path):
    """One process builds the environment; the others wait for it (pytest-xdist, two checkouts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list, what: str) -> None:
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ImgutilsUnavailable(f"{what}: no answer in {INSTALL_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        tail = [line for line in lines if line.startswith("ERROR")][-2:] or lines[-3:]
        raise ImgutilsUnavailable(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def imgutils_python(root: Path | None = None) -> Path:
    """The Python of an environment with dghs-imgutils; made on first use (about a minute:
    imgutils brings opencv, scikit-learn, scipy, pandas... some 700 MB)."""
    if os.environ.get(PYTHON_ENV_VAR):
        return Path(os.environ[PYTHON_ENV_VAR])
    wanted = pins()
    key = hashlib.sha256(json.dumps([sys.version, wanted]).encode()).hexdigest()[:12]
    root = Path(root or cache_root())
    venv = root / f"imgutils-{IMGUTILS_VERSION}-{key}"
    python = venv_python(venv)
    with _locked(root / f"{venv.name}.lock"):
        if (venv / COMPLETE).is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a build cut short
        start = time.monotonic()
        try:
            _run([sys.executable, "-m", "venv", venv], f"python -m venv {venv}")
            _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--timeout", "30",
                  "--retries", "1", *wanted], f"pip install {' '.join(wanted)}")
            # importing imgutils also checks onnxruntime (it pip-installs one when missing)
            _run([python, "-c", "import imgutils.metrics.ccip"], "import imgutils.metrics.ccip")
        except ImgutilsUnavailable:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        (venv / COMPLETE).write_text(json.dumps({"pins": wanted, "python": sys.version,
                                                 "seconds": round(time.monotonic() - start, 1)}), encoding="utf-8")
    return python


def run_imgutils_ccip(python: Path, model_folder: Path, images: list, cross: tuple[list, list], work: Path) -> dict:
    """imgutils' answers for these images on this model folder (see imgutils_ccip_run.py)."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    spec, out = work / "spec.json", work / "imgutils.npz"
    spec.write_text(json.dumps({"model_folder": str(model_folder), "images": [str(p) for p in images],
                                "cross": [list(cross[0]), list(cross[1])], "hub_cache": str(work / "hub")}),
                    encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(python), str(RUNNER), str(spec), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"imgutils run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with np.load(out) as data:
        result = {k: data[k] for k in data.files}
    result["versions"] = json.loads(str(result["versions"]))
    return result
