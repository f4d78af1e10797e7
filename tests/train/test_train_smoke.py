"""The proof that it trains: the Epsilon recipe, scaled down, with real sd-scripts on CPU.

Slow (a full-size random SDXL is built and loaded; a step takes about a minute on 2 cores) and
memory-hungry (~20 GB): runs only with sd-scripts present AND when asked for, with
`-m slow` or KXL_SMOKE=1. KXL_HEAVY_LOCK=/path/lock serialises it with other heavy jobs;
KXL_SMOKE_MODEL / KXL_SMOKE_WORK reuse a built checkpoint / work directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.sdscripts]
STEPS = 3


@pytest.fixture(scope="module")
def trained(sd_scripts, request, tmp_path_factory):
    if "slow" not in (request.config.getoption("-m") or "") and os.environ.get("KXL_SMOKE") != "1":
        pytest.skip("smoke training is slow: run with -m slow or KXL_SMOKE=1")
    from kxl_testing import train_smoke as smoke

    work = Path(os.environ.get("KXL_SMOKE_WORK") or tmp_path_factory.mktemp("smoke"))
    lock = os.environ.get("KXL_HEAVY_LOCK")
    model, dataset_toml = smoke.prepare(work, lock)
    result = smoke.run_training(work, model, dataset_toml, STEPS, lock)
    return result, smoke.expected_modules(sd_scripts), work


def test_training_finishes_and_writes_lokr_files(trained):
    result, _expected, work = trained
    assert result.returncode == 0, f"training failed; see {result.log}"
    names = sorted(Path(f).name for f in result.files)
    # one file per step (save_every_n_steps=1) + the final one
    assert names == [f"kohaku-xl-epsilon-lyco-step{s:08d}.safetensors" for s in range(1, STEPS + 1)] + ["kohaku-xl-epsilon-lyco.safetensors"]
    print(f"peak RSS {result.peak_rss_bytes / 2**30:.1f} GiB, {result.tqdm_s_per_it} s/step")


def test_lokr_keys_shapes_factors_and_motion(trained):
    from kxl_testing import train_smoke as smoke

    result, expected, _work = trained
    files = [Path(f) for f in result.files]
    first = next(f for f in files if "-step" in f.name)
    final = next(f for f in files if "-step" not in f.name)
    check = smoke.check_lokr_files(first, final, expected)
    lokr = [m for m in expected.modules if m.w1]
    norms = len(expected.modules) - len(lokr)
    assert check["modules"] == len(lokr) == 1058 and check["norm_modules"] == norms
    assert check["keys"] == sum(len(m.tensors) for m in expected.modules) == 3 * 1058 + 2 * norms
    # Every w2 (zero at start) moved except those of TE1's last layer: SDXL conditions on TE1's
    # penultimate hidden state, so layer 11 gets no gradient (and 0 stays 0 under decoupled decay).
    assert check["unmoved_w2"] == sorted(
        n for n in expected_names(expected) if re.match(r"lora_te1_text_model_encoder_layers_11_", n))
    assert check["moved_w1"] >= 1058 - 6
    assert check["unmoved_norms"] == []  # the norm modules (train_norm) are all UNet layers in the forward


def expected_names(expected):
    return [m.name for m in expected.modules]
