"""Benchmark kxl compare / merge / inspect on full-size random-weight SDXL files.

Generates (streamed, fp16) a base SDXL single-file checkpoint and a second checkpoint B with
every key and shape sd-scripts v0.10.1 saves (~6.9 GB each), and a full-size LoKr file with
LyCORIS's own module set for SDXL (kohya wrapper, preset "full", factor 4, full matrix:
~205M parameters, ~390 MiB). Then, each in a fresh child process that reports its own wall
time and peak RSS (resource.getrusage ru_maxrss, which counts file pages mapped into the
process too):
  merge    BASE + LOKR -> A (fp16)
  compare  A vs B  --base BASE   (three 6.9 GB checkpoints streamed, every tensor differs)
  compare  A vs LOKR --base BASE (the merge checked against its LoKr)
  inspect  A, LOKR
The multi-GB files are deleted at the end unless --keep. Heavy on disk and I/O (alone on the machine):
  .venv/bin/python bench/bench_compare.py run --workdir DIR
Needs sd-scripts (KXL_SD_SCRIPTS or the submodule) and lycoris-lora for the layouts.
Smallest form (SDXL-named toy files, no sd-scripts, seconds): run --layout tiny --workdir DIR --results FILE
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kxl_testing.bench_child import run_child  # noqa: E402 - after the sys.path line


def _child(step: str, args: list[str]) -> dict:
    """Run one measured step in a fresh interpreter; it prints a JSON line with its figures."""
    return run_child(__file__, [step, *args], f"step {step}")


@click.group()
def cli():
    pass


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/kxl-bench"), show_default=True)
@click.option("--factor", default=4, show_default=True, help="LoKr factor (full matrix).")
@click.option("--keep", is_flag=True, help="Keep the generated multi-GB files.")
@click.option("--layout", type=click.Choice(["sdxl", "tiny"]), default="sdxl", show_default=True,
              help="sdxl: the full-size files (needs sd-scripts); tiny: SDXL-named toy files "
                   "(kxl_testing.synthetic_checkpoints.tiny_layout), the bench's smallest form.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=REPO / "bench" / "results" / "bench_compare.json", show_default=True)
def run(workdir, factor, keep, layout, results):
    """Generate the files, run the measured steps, print the figures."""
    from kxl_common.upstream import require_sd_scripts

    sd = require_sd_scripts() if layout == "sdxl" else "tiny"
    workdir.mkdir(parents=True, exist_ok=True)
    base, b, a, lokr = (workdir / n for n in ("base.safetensors", "b.safetensors", "a.safetensors", "lokr.safetensors"))
    figures = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "factor": factor, "layout": layout}
    try:
        figures["generate"] = _child("generate", [str(sd), str(workdir), str(factor)])
        sizes = {p.name: p.stat().st_size for p in (base, b, lokr)}
        figures["sizes_bytes"] = sizes
        figures["merge"] = _child("merge", [str(base), str(lokr), str(a)])
        figures["compare_ckpt_ckpt"] = _child("compare", [str(a), str(b), str(base), str(workdir / "cmp-ab")])
        figures["compare_ckpt_lokr"] = _child("compare", [str(a), str(lokr), str(base), str(workdir / "cmp-al")])
        figures["inspect_ckpt"] = _child("inspect", [str(a)])
        figures["inspect_lokr"] = _child("inspect", [str(lokr)])
    finally:
        if not keep:
            for p in (base, b, a, lokr):
                p.unlink(missing_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(figures, indent=2) + "\n")
    gib = 2**30
    click.echo(f"files: checkpoint {sizes['base.safetensors'] / gib:.2f} GiB each, LoKr {sizes['lokr.safetensors'] / 2**20:.0f} MiB")
    for step in ("generate", "merge", "compare_ckpt_ckpt", "compare_ckpt_lokr", "inspect_ckpt", "inspect_lokr"):
        f = figures[step]
        extra = f" verdict {f['verdict']}" if "verdict" in f else ""
        click.echo(f"{step:<18} {f['seconds']:8.1f} s wall {f['cpu_seconds']:8.1f} s CPU   peak RSS {f['peak_rss_mib']:8.0f} MiB"
                   f"   load {f['load_avg_1min_at_end']:.1f}{extra}")
    click.echo(f"figures written to {results}")


def _finish(t0: float, **extra) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # less sensitive to a busy shared machine
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "load_avg_1min_at_end": os.getloadavg()[0],
        **extra,
    }))


@cli.command()
@click.argument("step")
@click.argument("args", nargs=-1)
def child(step, args):
    t0 = time.perf_counter()
    import torch

    if step == "generate":
        from kxl_testing.synthetic_checkpoints import (lokr_plan, lycoris_lokr_plan, sdxl_layout, tiny_layout,
                                                       write_checkpoint, write_lokr)

        sd, workdir, factor = args  # sd: sd-scripts' path, or "tiny"
        workdir = Path(workdir)
        layout = tiny_layout() if sd == "tiny" else sdxl_layout(sd)
        write_checkpoint(workdir / "base.safetensors", layout, seed=0, dtype=torch.float16, progress=True)
        write_checkpoint(workdir / "b.safetensors", layout, seed=2, dtype=torch.float16, progress=True)
        plan = (lokr_plan(layout, factor=int(factor)) if sd == "tiny"
                else lycoris_lokr_plan(sd, factor=int(factor), full_matrix=True, preset="full"))
        write_lokr(workdir / "lokr.safetensors", plan, seed=1, dtype=torch.float16, std=0.03)
        _finish(t0, tensors=len(layout), lokr_modules=len(plan))
    elif step == "merge":
        from kxl_tools.merge import merge

        res = merge(*args, dtype="fp16", progress=False)
        _finish(t0, modules_merged=res["modules_merged"])
    elif step == "compare":
        from kxl_common.atomic import write_json
        from kxl_tools.compare import compare_files, json_safe

        a, b, base, out = args
        report = compare_files(a, b, base=base, progress=False)
        write_json(Path(out) / "compare.json", json_safe(report))
        _finish(t0, verdict=report["verdict"]["level"], modules_both=report["counts"]["both"],
                rel_fro=report["total"]["rel_fro"], cosine=report["total"]["cosine"])
    elif step == "inspect":
        from kxl_tools.inspect import inspect_file

        r = inspect_file(args[0])
        _finish(t0, tensors=r["tensors"])
    else:
        raise SystemExit(f"unknown step {step}")


if __name__ == "__main__":
    cli()
