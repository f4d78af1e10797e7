"""Benches cannot rot: every script in bench/ has a smallest form that runs here, from the
checkout, finishes and prints its figures (the figures themselves are not asserted: speed is
what a bench reports, never what a test checks). A new bench without an entry in SMALLEST fails.

A bench imports this checkout's code whatever is installed: each puts the repository root first
on sys.path, which test_bench_imports_this_checkout checks against a decoy copy of the packages.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BENCHES = sorted(p.name for p in BENCH.glob("*.py"))
PACKAGES = ("kxl_common", "kxl_prep", "kxl_train", "kxl_tools", "kxl_testing")
FIGURE = r"[\d.]+"


@dataclass(frozen=True)
class Smallest:
    args: tuple[str, ...] = ()      # after the script; "{tmp}" is the test's own folder
    prints: tuple[str, ...] = ()    # patterns of the figure lines it must print
    sd_scripts: bool = False        # skipped, with the reason, where sd-scripts is absent
    covered_by: str | None = None   # a test that already runs this bench's smallest form


SMALLEST = {
    "bench_caption_tokens.py": Smallest(
        ("--captions", "2000", "--peer-captions", "500", "--slow-captions", "100"),
        (rf"\| kxl TokenCounter .* \| 2,000 \| {FIGURE} \|", rf"\| transformers CLIPTokenizer .* \| {FIGURE}x \|",
         rf"tokens per caption: mean {FIGURE}")),
    "bench_compare.py": Smallest(
        ("run", "--layout", "tiny", "--workdir", "{tmp}/work", "--results", "{tmp}/figures.json"),
        (rf"merge\s+{FIGURE} s wall\s+{FIGURE} s CPU\s+peak RSS\s+{FIGURE} MiB",
         rf"compare_ckpt_ckpt\s+{FIGURE} s wall", rf"compare_ckpt_lokr\s+{FIGURE} s wall.*verdict",
         rf"inspect_lokr\s+{FIGURE} s wall")),
    "bench_compare_run.py": Smallest(
        ("run", "--workdir", "{tmp}/work", "--steps", "2", "--modules", "6"),
        (rf"compare-run\s+wall\s+{FIGURE} s\s+CPU\s+{FIGURE} s\s+peak RSS\s+{FIGURE} MiB",
         rf"peer: kxl compare loop\s+wall\s+{FIGURE} s", rf"ratio compare-run / peer: wall {FIGURE}, CPU {FIGURE}")),
    "bench_eval.py": Smallest(
        ("--tiny-images", "2", "--reps", "1", "--json", "{tmp}/figures.json"),
        (rf"kxl {FIGURE} img/s, plain diffusers call {FIGURE} img/s, kxl/peer time {FIGURE}",
         rf"3600-character benchmark on one GPU .* = {FIGURE} h")),
    "bench_fetch_images.py": Smallest(
        ("--smoke",),
        (rf"whole tars\s+{FIGURE}\s+\d+\s+{FIGURE}", rf"fetch gap=0\s+{FIGURE}\s+\d+\s+{FIGURE}\s+{FIGURE}\s+{FIGURE}",
         r"meta.json identical across ways: True")),
    "bench_export.py": Smallest(
        ("--scratch", "{tmp}/scratch", "--images", "4", "--tars", "2"),
        (rf"ours copy, verify=full\s+2\s+{FIGURE}\s+{FIGURE}", rf"peer pillow-loop webp q90\s+1\s+{FIGURE}",
         rf"copy, verify=full\s+{FIGURE} img/cpu-s")),
    "bench_prep.py": Smallest(
        ("--sizes", "2000", "--peer-posts", "100", "--workdir", "{tmp}/work"),
        (r"2,000", rf"{FIGURE}x")),
    "bench_resume_start.py": Smallest(
        ("--images", "2000", "--buckets", "4", "--processes", "2"),
        (r"2,000 images", rf"^\s+0\s+1\s+{FIGURE}\s+{FIGURE}$", rf"peak RSS {FIGURE} MiB")),
    "bench_tag_select.py": Smallest(
        ("--posts", "3000"),
        (rf"3,000 posts .* posts/s", rf"peak {FIGURE} MB", r"per rule:")),
    "bench_train.py": Smallest(sd_scripts=True, covered_by="tests/train/test_bench_train_tiny.py"),
    "bench_train_data.py": Smallest(
        ("--images", "2000", "--workers", "1", "--workdir", "{tmp}/work"),
        (rf"ready \(s\)\s+{FIGURE}\s+{FIGURE}", rf"worker private growth, max \(MiB\)\s+{FIGURE}\s+{FIGURE}"),
        sd_scripts=True),
    "lokr_size.py": Smallest(
        ("metadata", "--images", "2000"),
        (rf"2,000 captions of the Epsilon form", rf"kxl meta.json \(no tags field\)\s+metadata\s+{FIGURE} MB",
         rf"ss_tag_frequency: {FIGURE} header bytes per tag entry")),
    # the full-size SDXL on the CPU (~23 GB peak): its smallest form is the whole smoke test
    "smoke_train.py": Smallest(sd_scripts=True, covered_by="tests/train/test_train_smoke.py"),
}


def bench_env() -> dict:
    """The environment a user runs a bench in: no PYTHONPATH pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    return env


def test_every_bench_has_a_smallest_form():
    assert BENCHES == sorted(SMALLEST), "a bench/*.py without a smallest form (or an entry without its bench)"


@pytest.mark.parametrize("name", BENCHES)
def test_smallest_form_finishes_and_prints_its_figures(name, tmp_path, request):
    form = SMALLEST.get(name)
    assert form is not None, f"bench/{name} has no smallest form: add it to SMALLEST in {Path(__file__).name}"
    if form.covered_by:
        text = (REPO / form.covered_by).read_text(encoding="utf-8")
        module = {"bench_train.py": "kxl_testing import bench_train", "smoke_train.py": "train_smoke"}[name]
        assert module in text, f"{form.covered_by} no longer runs bench/{name}'s code"
        if form.sd_scripts:
            request.getfixturevalue("sd_scripts")
        pytest.skip(f"bench/{name}: its smallest form runs in {form.covered_by}")
    if form.sd_scripts:
        request.getfixturevalue("sd_scripts")  # skips with how to get sd-scripts
    args = [a.replace("{tmp}", str(tmp_path)) for a in form.args]
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=tmp_path, env=bench_env(),
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench/{name} {' '.join(args)} failed:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    for pattern in form.prints:
        assert re.search(pattern, output, re.MULTILINE), f"bench/{name}: no line matching {pattern!r} in:\n{output[-3000:]}"


CHECK = """
import importlib, runpy, sys
repo, decoy, script = sys.argv[1:4]
runpy.run_path(script, run_name="bench_import_check")  # the bench's module level, not its main
assert repo in sys.path, "the bench does not put the checkout on sys.path"
for name in {packages!r}:
    module = importlib.import_module(name)
    print(name, module.__file__)
"""


@pytest.mark.parametrize("name", BENCHES)
def test_bench_imports_this_checkout(name, tmp_path):
    """With a decoy copy of every package ahead of the installed one (PYTHONPATH), a bench still
    imports this checkout's code: it does not depend on which copy is installed."""
    decoy = tmp_path / "decoy"
    for package in PACKAGES:
        (decoy / package).mkdir(parents=True)
        (decoy / package / "__init__.py").write_text("raise ImportError('the decoy copy was imported')\n")
    env = {**bench_env(), "PYTHONPATH": str(decoy)}
    proc = subprocess.run([sys.executable, "-c", CHECK.format(packages=PACKAGES), str(REPO), str(decoy), str(BENCH / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench/{name}:\n{proc.stderr[-3000:]}"
    files = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in PACKAGES)
    assert sorted(files) == sorted(PACKAGES)
    for package, file in files.items():
        assert Path(file).resolve().is_relative_to(REPO), f"bench/{name} imported {package} from {file}"
