"""The training benchmark's smallest form, end to end on the CPU with real sd-scripts: the tiny
SDXL-shaped model, one kxl and one plain run through the real launch, the straight-vs-resumed
check (needs sd-scripts; a few minutes on 2 cores)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.sdscripts


@pytest.fixture(scope="module")
def report(sd_scripts, tmp_path_factory):
    from kxl_testing import bench_train

    work = bench_train.workload("cpu", True, batch=2, warmup=1, steps=1)
    opts = bench_train.Options(work_dir=tmp_path_factory.mktemp("bench"), sd_scripts=sd_scripts, work=work, reps=1,
                               resume_k=1, timeout=900)
    return opts, bench_train.benchmark(opts, echo=lambda _m: None)


def _tiny_module_counts(sd_scripts) -> tuple[int, int]:
    """(UNet, text encoder) modules the rev1 recipe's preset creates on the tiny SDXL: SDXL's own
    count (meta device) with TE2 cut to tiny_sdxl.TE2_LAYERS of its 32 layers."""
    from kxl_testing.tiny_sdxl import TE2_LAYERS
    from kxl_testing.train_smoke import expected_modules

    counts = expected_modules(sd_scripts).by_prefix()
    return counts["unet"][0], counts["te1"][0] + counts["te2"][0] * TE2_LAYERS // 32


def test_both_runs_measured_through_their_own_entry(report):
    opts, rep = report
    assert rep["failures"] == []
    runs = {r["variant"]: r for r in rep["runs"]}
    assert set(runs) == {"kxl", "plain"}
    for variant, run in runs.items():
        assert run["steps"] == 2 and len(run["intervals"]) == 2 and run["s_per_step"] > 0
        assert run["img_per_s"] == pytest.approx(2 / run["s_per_step"])
        assert 0 < run["launch_to_loop_s"] < run["launch_to_first_step_s"]
        assert run["cuda_allocated_peak_bytes"] is None  # CPU
        assert run["rss_peak_bytes"] > 2**28 and run["rss_tree_peak_bytes"] >= run["rss_peak_bytes"] * 0.5
        assert run["environment"]["cuda"] is False
        log = (opts.work_dir / "runs" / f"{variant}-0" / "train.log").read_text()
        # the tiny model keeps SDXL's module layout (TE2 shortened): the recipe preset's modules
        unet, te = _tiny_module_counts(opts.sd_scripts)
        assert f"create LyCORIS for U-Net: {unet} modules" in log and f"create LyCORIS for Text Encoder: {te} modules" in log
        patched = "kxl: loading the U-Net directly" in log
        assert patched == (variant == "kxl")
        probe = [json.loads(p.read_text()) for p in (opts.work_dir / "runs" / f"{variant}-0").glob("probe-*.json")]
        trained = [p for p in probe if p["t_loop_start"] is not None]
        assert len(trained) == 1 and trained[0]["tiny"]
        entry = " ".join(trained[0]["argv"])
        assert ("kxl_train" in entry) == (variant == "kxl") and ("sdxl_train_network.py" in entry) == (variant == "plain")
    ratio = rep["ratio"]
    assert ratio["pairs"] == [pytest.approx(runs["kxl"]["s_per_step"] / runs["plain"]["s_per_step"])]


def test_resume_check_identical_on_cpu(report):
    _opts, rep = report
    check = rep["resume"]
    assert check["ok"] and check["trace_identical"] and check["trace_steps_compared"] == 1
    assert check["weights_bitwise_equal"] and check["weights_max_abs_difference"] == 0.0
    assert check["weights_max_abs_movement_over_resumed_steps"] > 0
