"""Figures of the training benchmark from the probe's records (kxl_testing.train_probe): step
times, throughput, memory, start-up, and the kxl / plain ratio with its spread. Pure functions,
no sd-scripts: what bench_train prints is computed here."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

GIB = 2**30


class ProbeError(ValueError):
    pass


def step_intervals(record: dict, clock: str = "t") -> list[float]:
    """Seconds of each optimizer step of one run: from the loop's start (sd-scripts' epoch-0
    sample_images call) to step 1's end, then between consecutive step ends. clock "t" is the
    wall clock, "cpu_s" the training process's CPU seconds."""
    start = record.get("t_loop_start" if clock == "t" else "cpu_s_loop_start")
    steps = record.get("steps") or []
    if start is None or not steps:
        raise ProbeError(f"probe record of pid {record.get('pid')}: no training step recorded")
    numbers = [s["step"] for s in steps]
    first = record.get("start_step") or 0
    if numbers != list(range(first + 1, first + 1 + len(steps))):
        raise ProbeError(f"probe record of pid {record.get('pid')}: steps {numbers} are not consecutive from {first + 1}")
    times = [start, *(s[clock] for s in steps)]
    return [b - a for a, b in zip(times, times[1:])]


def _peak(record: dict, key: str) -> int | None:
    values = [p[key] for p in [*record.get("steps", []), *record.get("epoch_ends", [])] if key in p]
    return max(values) if values else None


@dataclass
class RunFigures:
    variant: str  # "kxl" / "plain"
    rep: int
    steps: int
    warmup: int
    intervals: list[float]
    cpu_intervals: list[float]
    s_per_step: float
    s_per_step_sd: float
    img_per_s: float
    cpu_s_per_step: float
    launch_to_loop_s: float
    launch_to_first_step_s: float
    cuda_allocated_peak_bytes: int | None
    cuda_reserved_peak_bytes: int | None
    rss_peak_bytes: int | None  # the training process (ru_maxrss)
    rss_tree_peak_bytes: int | None = None  # every process of the launch, polled
    grad_scales: list[float] = field(default_factory=list)
    environment: dict = field(default_factory=dict)


def run_figures(record: dict, *, variant: str, rep: int, warmup: int, images_per_step: int,
                t_launch: float, rss_tree_peak: int | None = None) -> RunFigures:
    intervals = step_intervals(record)
    if len(intervals) <= warmup:
        raise ProbeError(f"{variant} run {rep}: {len(intervals)} steps recorded, none after {warmup} warm-up steps")
    measured = intervals[warmup:]
    mean = statistics.fmean(measured)
    cpu = step_intervals(record, "cpu_s")
    return RunFigures(
        variant=variant, rep=rep, steps=len(intervals), warmup=warmup, intervals=intervals, cpu_intervals=cpu,
        s_per_step=mean, cpu_s_per_step=statistics.fmean(cpu[warmup:]),
        s_per_step_sd=statistics.stdev(measured) if len(measured) > 1 else 0.0,
        img_per_s=images_per_step / mean,
        launch_to_loop_s=record["t_loop_start"] - t_launch,
        launch_to_first_step_s=record["steps"][0]["t"] - t_launch,
        cuda_allocated_peak_bytes=_peak(record, "cuda_allocated_peak_bytes"),
        cuda_reserved_peak_bytes=_peak(record, "cuda_reserved_peak_bytes"),
        rss_peak_bytes=_peak(record, "rss_peak_bytes"), rss_tree_peak_bytes=rss_tree_peak,
        grad_scales=[p["grad_scale"] for p in record["steps"] if "grad_scale" in p],
        environment=record.get("environment") or {},
    )


def training_record(records: list[dict]) -> dict:
    """The one probe record of a launch that reached training (the launcher's own processes
    write none); several mean several training processes, which this benchmark does not run."""
    trained = [r for r in records if r.get("t_loop_start") is not None]
    if len(trained) != 1:
        raise ProbeError(f"expected one training process's probe record, found {len(trained)} of {len(records)}")
    return trained[0]


@dataclass
class Ratio:
    ratio: float  # mean kxl s/step over mean plain s/step
    stderr: float  # from the step-to-step scatter of both (propagated relative errors)
    pairs: list[float]  # kxl / plain per repetition
    low: float
    high: float

    def text(self, target: float | None = None) -> str:
        verdict = ""
        if target is not None:
            verdict = f"; target <= {target:.2f}: {'met' if self.ratio <= target else 'NOT met'}"
        return (f"{self.ratio:.4f} +- {self.stderr:.4f} (per repetition {self.low:.4f} .. {self.high:.4f}, "
                f"n={len(self.pairs)}){verdict}")


def ratio_with_spread(kxl: list[RunFigures], plain: list[RunFigures], clock: str = "wall") -> Ratio:
    """kxl / plain in s/step over repetitions (paired by repetition number); clock "wall" or
    "cpu" (the training process's CPU seconds per step)."""
    if not kxl or not plain:
        raise ProbeError("a ratio needs at least one kxl and one plain run")
    by_rep = {r.rep: r for r in plain}
    per_step = (lambda r: r.s_per_step) if clock == "wall" else (lambda r: r.cpu_s_per_step)
    series = (lambda r: r.intervals) if clock == "wall" else (lambda r: r.cpu_intervals)
    pairs = [per_step(k) / per_step(by_rep[k.rep]) for k in kxl if k.rep in by_rep]
    if not pairs:
        raise ProbeError("no repetition has both a kxl and a plain run")
    k_steps = [t for r in kxl for t in series(r)[r.warmup:]]
    p_steps = [t for r in plain for t in series(r)[r.warmup:]]
    k_mean, p_mean = statistics.fmean(k_steps), statistics.fmean(p_steps)
    ratio = k_mean / p_mean

    def rel_se(values: list[float], mean: float) -> float:
        return statistics.stdev(values) / math.sqrt(len(values)) / mean if len(values) > 1 else 0.0

    stderr = ratio * math.hypot(rel_se(k_steps, k_mean), rel_se(p_steps, p_mean))
    return Ratio(ratio=ratio, stderr=stderr, pairs=pairs, low=min(pairs), high=max(pairs))


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def table(runs: list[RunFigures], budget_bytes: int | None = None) -> list[str]:
    """Markdown rows, one per run."""
    rows = ["| run | rep | s/step (sd) | img/s | CPU s/step | launch->loop s | launch->step 1 s | GPU alloc GiB | "
            "GPU reserved GiB | RSS GiB (process / tree) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r.variant} | {r.rep} | {r.s_per_step:.3f} ({r.s_per_step_sd:.3f}) | {r.img_per_s:.2f} | {r.cpu_s_per_step:.2f} | "
                    f"{r.launch_to_loop_s:.1f} | {r.launch_to_first_step_s:.1f} | {_gib(r.cuda_allocated_peak_bytes)} | "
                    f"{_gib(r.cuda_reserved_peak_bytes)} | {_gib(r.rss_peak_bytes)} / {_gib(r.rss_tree_peak_bytes)} |")
    if budget_bytes:
        peaks = [r.cuda_reserved_peak_bytes for r in runs if r.cuda_reserved_peak_bytes is not None]
        if peaks:
            rows.append(f"largest reserved GPU memory {_gib(max(peaks))} GiB against a "
                        f"{budget_bytes / GIB:.0f} GiB card: {'fits' if max(peaks) <= budget_bytes else 'does NOT fit'}")
    return rows
