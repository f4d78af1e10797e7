"""The training benchmark's figures and command derivation (no sd-scripts): probe records ->
step times, throughput, memory peaks, kxl / plain ratio; the plain command from kxl's; the
workload's buckets and dataset."""
from __future__ import annotations

import math
import statistics

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_testing import bench_stats
from kxl_testing import bench_train
from kxl_testing.model_stubs import write_sdxl_header_only


def record(step_seconds, *, start=1000.0, first_step=0, cpu_per_step=None, cuda=None, pid=7):
    """A probe record whose steps take the given wall seconds (CPU seconds: cpu_per_step)."""
    t, cpu = start, 50.0
    steps = []
    for i, dt in enumerate(step_seconds):
        t += dt
        cpu += (cpu_per_step or step_seconds)[i]
        point = {"step": first_step + i + 1, "t": t, "cpu_s": cpu, "rss_peak_bytes": (i + 1) * 2**20}
        if cuda:
            point["cuda_allocated_peak_bytes"], point["cuda_reserved_peak_bytes"] = cuda[i]
        steps.append(point)
    return {"pid": pid, "t_loop_start": start, "cpu_s_loop_start": 50.0, "start_step": first_step,
            "steps": steps, "epoch_ends": []}


def test_step_intervals_and_run_figures():
    rec = record([5.0, 2.0, 2.5, 1.5], cpu_per_step=[9.0, 4.0, 4.0, 5.0],
                 cuda=[(10, 20), (30, 40), (25, 41), (5, 6)])
    assert bench_stats.step_intervals(rec) == pytest.approx([5.0, 2.0, 2.5, 1.5])
    fig = bench_stats.run_figures(rec, variant="kxl", rep=0, warmup=1, images_per_step=8, t_launch=990.0,
                                  rss_tree_peak=123)
    assert fig.s_per_step == pytest.approx(2.0)
    assert fig.s_per_step_sd == pytest.approx(statistics.stdev([2.0, 2.5, 1.5]))
    assert fig.img_per_s == pytest.approx(4.0)
    assert fig.cpu_s_per_step == pytest.approx(13 / 3)
    assert fig.launch_to_loop_s == pytest.approx(10.0) and fig.launch_to_first_step_s == pytest.approx(15.0)
    assert (fig.cuda_allocated_peak_bytes, fig.cuda_reserved_peak_bytes) == (30, 41)
    assert fig.rss_peak_bytes == 4 * 2**20 and fig.rss_tree_peak_bytes == 123


def test_resumed_record_counts_from_its_start_step():
    rec = record([3.0, 1.0], first_step=4)
    assert bench_stats.step_intervals(rec) == pytest.approx([3.0, 1.0])


@pytest.mark.parametrize("broken,match", [
    ({"t_loop_start": None}, "no training step"),
    ({"steps": []}, "no training step"),
])
def test_records_without_steps_are_errors(broken, match):
    rec = dict(record([1.0, 1.0]), **broken)
    with pytest.raises(bench_stats.ProbeError, match=match):
        bench_stats.step_intervals(rec)


def test_gaps_in_steps_and_too_few_steps_are_errors():
    rec = record([1.0, 1.0, 1.0])
    rec["steps"][1]["step"] = 5
    with pytest.raises(bench_stats.ProbeError, match="not consecutive"):
        bench_stats.step_intervals(rec)
    with pytest.raises(bench_stats.ProbeError, match="none after 3 warm-up"):
        bench_stats.run_figures(record([1.0, 1.0, 1.0]), variant="plain", rep=1, warmup=3, images_per_step=4,
                                t_launch=0.0)


def test_training_record_is_the_one_that_reached_the_loop():
    launcher = {"pid": 1, "t_loop_start": None, "steps": []}
    trainer = record([1.0])
    assert bench_stats.training_record([launcher, trainer]) is trainer
    with pytest.raises(bench_stats.ProbeError, match="found 0 of 1"):
        bench_stats.training_record([launcher])
    with pytest.raises(bench_stats.ProbeError, match="found 2"):
        bench_stats.training_record([trainer, record([2.0], pid=8)])


def figs(variant, rep, seconds, warmup=1):
    return bench_stats.run_figures(record(seconds), variant=variant, rep=rep, warmup=warmup, images_per_step=4,
                                   t_launch=990.0)


def test_ratio_pairs_by_repetition_and_propagates_the_scatter():
    kxl = [figs("kxl", 0, [9, 2.0, 2.2]), figs("kxl", 1, [9, 2.4, 2.2])]
    plain = [figs("plain", 1, [9, 2.0, 2.0]), figs("plain", 0, [9, 2.2, 2.2])]
    r = bench_stats.ratio_with_spread(kxl, plain)
    assert r.pairs == pytest.approx([2.1 / 2.2, 2.3 / 2.0])
    assert (r.low, r.high) == (min(r.pairs), max(r.pairs))
    k, p = [2.0, 2.2, 2.4, 2.2], [2.0, 2.0, 2.2, 2.2]
    km, pm = statistics.fmean(k), statistics.fmean(p)
    assert r.ratio == pytest.approx(km / pm)
    se = lambda v, m: statistics.stdev(v) / math.sqrt(len(v)) / m  # noqa: E731
    assert r.stderr == pytest.approx(km / pm * math.sqrt(se(k, km) ** 2 + se(p, pm) ** 2))
    assert "target <= 1.01: NOT met" in r.text(1.01)
    with pytest.raises(bench_stats.ProbeError, match="no repetition"):
        bench_stats.ratio_with_spread([figs("kxl", 3, [1, 1])], plain)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.5, 50), min_size=2, max_size=6), st.floats(0.5, 2.0))
def test_ratio_of_scaled_runs_is_the_scale(seconds, scale):
    plain = [figs("plain", 0, [1.0, *seconds])]
    kxl = [figs("kxl", 0, [1.0, *[s * scale for s in seconds]])]
    r = bench_stats.ratio_with_spread(kxl, plain)
    assert r.ratio == pytest.approx(scale) and r.pairs == pytest.approx([scale])
    assert bench_stats.ratio_with_spread(kxl, plain, clock="cpu").ratio == pytest.approx(scale)


def test_table_reports_the_card_budget():
    run = bench_stats.run_figures(record([1.0, 1.0], cuda=[(2**30, 30 * 2**30), (2**30, 2 * 2**30)]), variant="kxl",
                                  rep=0, warmup=1, images_per_step=4, t_launch=999.0)
    rows = bench_stats.table([run], 24 * 2**30)
    assert rows[2].startswith("| kxl | 0 | 1.000 (0.000) | 4.00 |")
    assert rows[-1] == "largest reserved GPU memory 30.00 GiB against a 24 GiB card: does NOT fit"


# ----------------------------------------------------------------------------- commands
KXL_COMMAND = ["/py", "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "fp16",
               "-m", "kxl_train.entry", "--network_module", "lycoris.kohya", "--seed", "0",
               "--kxl-trace=/o/t.jsonl", "--kxl-low-memory-load"]


def test_plain_command_swaps_the_entry_for_sd_scripts_and_drops_kxl_options(tmp_path):
    plain = bench_train.plain_command(KXL_COMMAND, tmp_path)
    assert plain == ["/py", "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "fp16",
                     str(tmp_path / "sdxl_train_network.py"), "--network_module", "lycoris.kohya", "--seed", "0"]
    with pytest.raises(ValueError, match="not a kxl launch"):
        bench_train.plain_command(plain, tmp_path)


def test_dry_run_command_is_what_the_launch_script_runs(tmp_path):
    """epsilon.sh --dry-run on a real recipe; the derived plain command keeps every sd-scripts
    argument and accelerate flag."""
    work = bench_train.workload("cpu", True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.toml").write_text("[[datasets]]\n")
    model = write_sdxl_header_only(tmp_path / "m.safetensors")
    args = bench_train.launch_args(work, data / "dataset.toml", model, tmp_path / "out",
                                   bench_train.overrides(work, tmp_path / "tok", steps=4), ["--kxl-trace=/x.jsonl"])
    env = bench_train.run_env(tmp_path / "probe", tmp_path, work)
    command = bench_train.dry_run_command(args, env)
    i = command.index("kxl_train.entry")
    sd_args = command[i + 1:]
    assert "--kxl-trace=/x.jsonl" in sd_args and "--kxl-low-memory-load" in sd_args
    assert sd_args[sd_args.index("--max_train_steps") + 1] == "4"
    assert sd_args[sd_args.index("--mixed_precision") + 1] == "bf16"
    plain = bench_train.plain_command(command, tmp_path)
    assert plain[:i - 1] == command[:i - 1]
    assert plain[i:] == [a for a in sd_args if not a.startswith("--kxl-")]


def test_run_env_puts_the_probe_first_and_marks_tiny_and_deterministic(tmp_path):
    work = bench_train.workload("cpu", True)
    env = bench_train.run_env(tmp_path, tmp_path / "sd", work, deterministic=True,
                              base={"PYTHONPATH": "/site", "KXL_BENCH_TINY": "0"})
    paths = env["PYTHONPATH"].split(":")
    assert paths[0] == str(bench_train.PROBE_SITE) and paths[-1] == "/site"
    assert (bench_train.PROBE_SITE / "sitecustomize.py").is_file()
    assert env["KXL_BENCH_PROBE"] == str(tmp_path) and env["KXL_BENCH_TINY"] == "1"
    assert env["KXL_BENCH_DETERMINISTIC"] == "1" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    env = bench_train.run_env(tmp_path, tmp_path / "sd", bench_train.workload("cuda", False), base={})
    assert "KXL_BENCH_TINY" not in env and "KXL_BENCH_DETERMINISTIC" not in env


# ----------------------------------------------------------------------------- workload and data
def sd_scripts_bucket(w: int, h: int, resolution: int, lo: int, hi: int) -> bool:
    """(w, h) is a bucket of sd-scripts' grid for this resolution (the rule written out again)."""
    area = resolution * resolution
    if (w, h) == (math.isqrt(area) // 64 * 64,) * 2:
        return True
    return any((w, h) in ((x, min(hi, area // x // 64 * 64)), (min(hi, area // x // 64 * 64), x))
               for x in range(lo, hi + 1, 64) if min(hi, area // x // 64 * 64) >= lo)


@pytest.mark.parametrize("device,tiny,count", [("cuda", False, 5), ("cpu", True, 3)])
def test_buckets_are_real_and_around_the_square(device, tiny, count):
    work = bench_train.workload(device, tiny)
    assert len(work.buckets) == count and work.buckets[0] == (work.resolution, work.resolution)
    for w, h in work.buckets:
        assert sd_scripts_bucket(w, h, work.resolution, work.min_bucket, work.max_bucket), (w, h)
        assert abs(w * h - work.resolution ** 2) <= 64 * max(w, h)
    ratios = [round(abs(math.log(w / h)), 9) for w, h in work.buckets]
    assert ratios == sorted(ratios)
    if device == "cuda":
        assert work.buckets == [(1024, 1024), (960, 1088), (1088, 960), (896, 1152), (1152, 896)]
        assert (work.batch, work.images_per_step) == (4, 8)


def test_dataset_has_whole_batches_per_bucket_for_every_step(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr("kxl_testing.train_smoke.demo_captions", lambda _d: ["a ||| b, c ||| d"])
    work = bench_train.workload("cpu", True, steps=4)  # 5 steps of 4 images over 3 buckets
    per_bucket = work.images_per_bucket(6)
    assert per_bucket % work.batch == 0 and per_bucket * len(work.buckets) >= 6 * work.images_per_step
    toml_path = bench_train.make_dataset(tmp_path, work, per_bucket)
    config = tomllib.loads(toml_path.read_text())
    assert config["datasets"][0]["resolution"] == work.resolution
    meta = __import__("json").loads((tmp_path / "meta.json").read_text())
    assert len(meta) == per_bucket * len(work.buckets)
    for key, entry in meta.items():
        with Image.open(tmp_path / "images" / key) as image:
            assert list(image.size) == entry["image_size"]
            assert tuple(image.size) in work.buckets
