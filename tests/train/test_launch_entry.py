"""kxl_train.entry: --kxl-* options are taken off, installers run first, bnb is checked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from kxl_common import check_env
from kxl_common.check_env import bnb_version_problem
from kxl_train import entry, patches, torchvision_compat


def test_split_kxl_options_forms():
    argv = ["--lr", "1e-4", "--kxl-trace=out/t.jsonl", "--kxl-exact-resume", "--save_state",
            "--kxl-skip", "12", "--network_args", "algo=lokr"]
    options, rest = entry.split_kxl_options(argv)
    assert options == {"trace": "out/t.jsonl", "exact_resume": True, "skip": "12"}
    assert rest == ["--lr", "1e-4", "--save_state", "--network_args", "algo=lokr"]


def test_split_kxl_options_trailing_flag():
    assert entry.split_kxl_options(["--a", "--kxl-x"]) == ({"x": True}, ["--a"])


@given(st.lists(st.sampled_from(["--lr", "1e-4", "--save_state", "x=1", "a b"]), max_size=8))
def test_split_without_kxl_options_is_identity(argv):
    assert entry.split_kxl_options(argv) == ({}, argv)


@pytest.mark.parametrize("version,bad", [("0.35.4", False), ("0.36.0", True), ("0.38.1", True),
                                         ("0.41.0", True), ("0.41.1", False), ("0.50.2", False)])
def test_bnb_window(version, bad, monkeypatch):
    assert (bnb_version_problem(version) is not None) == bad
    monkeypatch.setattr(check_env.md, "version", lambda name: version)
    if bad:
        with pytest.raises(SystemExit, match="0.36.0..0.41.0"):
            entry.check_bitsandbytes()
    else:
        entry.check_bitsandbytes()


def test_installers_run_before_sd_scripts_with_options(monkeypatch, tmp_path):
    fake = tmp_path / "sd"
    (fake / "library").mkdir(parents=True)
    (fake / "sdxl_train_network.py").write_text("")
    monkeypatch.setenv("KXL_SD_SCRIPTS", str(fake))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(torchvision_compat, "install", lambda: False)
    calls = []
    monkeypatch.setattr(patches, "INSTALLERS", [lambda o, a: calls.append(("install", dict(o), list(a)))])
    monkeypatch.setattr(entry, "run_sdxl_train_network", lambda d, a: calls.append(("run", d, list(a))))
    entry.main(["--max_train_steps", "3", "--kxl-trace", "t.jsonl"])
    assert calls == [("install", {"trace": "t.jsonl"}, ["--max_train_steps", "3"]),
                     ("run", fake.resolve(), ["--max_train_steps", "3"])]
    assert sys.path[0] == str(fake.resolve())


@pytest.mark.sdscripts
def test_entry_reaches_sd_scripts_parser(sd_scripts):
    env = dict(os.environ, KXL_SD_SCRIPTS=str(sd_scripts), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "kxl_train.entry", "--help", "--kxl-trace", "x"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # options only sdxl_train_network's parser has (train_network + SDXL additions)
    assert "--network_module" in out.stdout and "--cache_text_encoder_outputs" in out.stdout
