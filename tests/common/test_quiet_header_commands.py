"""Commands that only read a header print nothing from bitsandbytes (they never import it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lokr(tmp_path_factory):
    from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_lokr

    path = tmp_path_factory.mktemp("quiet") / "l.safetensors"
    write_lokr(path, lokr_plan(tiny_layout(), factor=2))
    return path


@pytest.mark.parametrize("argv", [["kxl_train.cli", "preset-from", "{lokr}", "--no-compare", "--out", "{tmp}/p.toml"],
                                  ["kxl_tools.cli", "inspect", "{lokr}"]])
def test_header_commands_do_not_import_bitsandbytes(lokr, tmp_path, argv):
    argv = [a.format(lokr=lokr, tmp=tmp_path) for a in argv]
    code = (f"import sys; sys.argv = ['kxl'] + {argv[1:]!r}\n"
            f"from {argv[0]} import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('BNB', 'bitsandbytes' in sys.modules)\nsys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    assert "BNB False" in res.stdout
    assert "gemm_4bit" not in res.stderr and "bitsandbytes" not in res.stderr
