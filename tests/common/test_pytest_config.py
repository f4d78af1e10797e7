"""`pytest -q` says why tests were skipped (a bare "66 skipped" told nothing)."""
from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_skip_reasons_are_reported():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    flags = shlex.split(options.get("addopts", ""))
    assert any(f.startswith("-r") and "s" in f[2:] for f in flags), flags
