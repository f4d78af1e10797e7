"""sd-scripts' real training loop (tests/train/test_resume_tiny_sdxl.py's tiny models) on a kxl-prep
output: the columnar dataset trains exactly what sd-scripts' own dataset trains (same trace of
keys, captions and flips per step, bitwise-same weights), and exact resume holds through it,
DataLoader workers included (skipped without sd-scripts)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kxl_testing.prep_output import make_prep_output  # noqa: E402


@pytest.fixture(scope="module")
def runs(sd_scripts, tmp_path_factory):
    from test_resume_tiny_sdxl import train

    os.environ.setdefault("KXL_SD_SCRIPTS", str(sd_scripts))
    tmp = tmp_path_factory.mktemp("tiny_columnar")
    make_prep_output(tmp / "data", n_images=9)  # train() uses tmp/data/dataset.toml
    columnar = train(tmp, "columnar", "--max_data_loader_n_workers", "0")
    plain = train(tmp, "plain", "--max_data_loader_n_workers", "0", "--kxl-no-columnar-data")
    return tmp, train, columnar, plain


def test_columnar_run_trains_what_sd_scripts_dataset_trains(runs):
    from test_resume_tiny_sdxl import assert_same

    from kxl_train.resume.trace import read_trace

    tmp, _, columnar, plain = runs
    assert "kxl columnar dataset: 9 images" in (tmp / "columnar.log").read_text()
    assert "kxl columnar dataset" not in (tmp / "plain.log").read_text()
    trace = read_trace(columnar / "trace.jsonl")
    assert [r["step"] for r in trace] == list(range(1, 8))
    assert trace == read_trace(plain / "trace.jsonl")
    for step in range(1, 8):
        assert_same(columnar / f"net-step{step:08d}.safetensors", plain / f"net-step{step:08d}.safetensors")
    assert_same(columnar / "net.safetensors", plain / "net.safetensors")


@pytest.mark.parametrize("k,workers,columnar", [(3, "2", True), (4, "0", False)])
def test_resume_through_the_columnar_dataset(runs, k, workers, columnar):
    """A columnar run resumed with workers, and a state of the columnar run resumed by
    sd-scripts' own dataset (the recipe fingerprints agree)."""
    from test_resume_tiny_sdxl import assert_same

    from kxl_train.resume.trace import read_trace

    tmp, train, straight, _ = runs
    extra = ["--persistent_data_loader_workers"] if workers != "0" else []
    resumed = train(tmp, f"columnar_resumed{k}", "--resume", str(straight / f"net-step{k:08d}-state"),
                    "--max_data_loader_n_workers", workers, *extra,
                    *([] if columnar else ["--kxl-no-columnar-data"]))
    assert read_trace(resumed / "trace.jsonl") == read_trace(straight / "trace.jsonl")[k:]
    for step in range(k + 1, 8):
        assert_same(straight / f"net-step{step:08d}.safetensors", resumed / f"net-step{step:08d}.safetensors")
    assert_same(straight / "net.safetensors", resumed / "net.safetensors")
