"""Benchmark `kxl compare-run` on two runs of full-size Epsilon LoKr files.

Writes two run directories of STEPS LoKr files each (`kohaku-xl-epsilon-lyco-stepNNNNNNNN`, every
1700 steps), with the module set and shapes the preset of record creates on SDXL (kxl_train/
epsilon_lokr_plan.json; the author's config: 1058 LoKr + 256 norm modules, 384.6M parameters,
770 MB in fp16), random values. Then, each
in a fresh child process that reports its wall time, CPU time and peak RSS (ru_maxrss):
  compare-run  MINE RELEASED                 (every module delta of every file computed once)
  peer: kxl compare, once per pair the same table needs: STEPS cross pairs + 2 x STEPS moves
        (the first move of each run is from zero, i.e. the file against itself's norm; it is
        counted as one compare of the file with the next, as a user scripting `kxl compare` would)
No sd-scripts needed. Disk: 2 x STEPS x 770 MB; deleted at the end unless --keep.
  .venv/bin/python bench/bench_compare_run.py run --workdir DIR --steps 3     (alone on the machine)
  .venv/bin/python bench/bench_compare_run.py run --workdir DIR --steps 2 --modules 8   (smallest form)
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NAME = "kohaku-xl-epsilon-lyco"

from kxl_testing.bench_child import run_child  # noqa: E402 - after the sys.path line


def _child(args: list[str]) -> dict:
    return run_child(__file__, args, f"child {args}")


@click.group()
def cli():
    pass


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/kxl-bench-run"), show_default=True)
@click.option("--steps", default=3, show_default=True, help="LoKr files per run.")
@click.option("--modules", type=int, default=None, help="Only the first N modules of the plan (smallest form: a few).")
@click.option("--peer/--no-peer", default=True, show_default=True, help="Also time the kxl compare loop.")
@click.option("--keep", is_flag=True)
def run(workdir, steps, modules, peer, keep):
    from kxl_testing.synthetic_checkpoints import write_lokr
    from kxl_train.preset_from import PLAN_PATH

    plan = {n: {p: tuple(s) for p, s in ps.items()} for n, ps in json.loads(PLAN_PATH.read_text())["modules"].items()}
    if modules is not None:
        plan = dict(list(plan.items())[:modules])
    mine, released = workdir / "mine", workdir / "released"
    t0 = time.time()
    for i, d in enumerate((mine, released)):
        d.mkdir(parents=True, exist_ok=True)
        for k in range(1, steps + 1):
            f = d / f"{NAME}-step{1700 * k:08d}.safetensors"
            if not f.exists():
                write_lokr(f, plan, seed=100 * i + k, std=0.01 * k)
    size = sum(f.stat().st_size for f in mine.glob("*.safetensors"))
    print(f"files: 2 x {steps} LoKr of {len(plan)} modules, {size / steps / 1e6:.1f} MB each, written in {time.time() - t0:.0f} s")
    res = {"compare-run": _child(["compare-run", str(mine), str(released), str(workdir / "out")])}
    if peer:
        res["peer: kxl compare loop"] = _child(["peer", str(mine), str(released), str(workdir / "peer")])
    for k, v in res.items():
        print(f"{k:<24} wall {v['wall_s']:7.1f} s  CPU {v['cpu_s']:7.1f} s  peak RSS {v['peak_rss_mib']:6.0f} MiB  ({v['what']})")
    if peer:
        print(f"ratio compare-run / peer: wall {res['compare-run']['wall_s'] / res['peer: kxl compare loop']['wall_s']:.2f}, "
              f"CPU {res['compare-run']['cpu_s'] / res['peer: kxl compare loop']['cpu_s']:.2f}")
    if not keep:
        shutil.rmtree(workdir)


@cli.command()
@click.argument("mode")
@click.argument("mine", type=click.Path(path_type=Path))
@click.argument("released", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def child(mode, mine, released, out):
    t0, c0 = time.time(), time.process_time()
    if mode == "compare-run":
        from kxl_tools.trajectory import compare_runs

        r = compare_runs(mine, released, progress=False)
        what = f"{len(r['paired'])} pairs, TOTAL rel at last step {r['points'][-1]['blocks']['TOTAL']['distance']['rel_fro']:.4f}"
    else:
        from kxl_tools.compare import compare_files

        m, r_ = sorted(mine.glob("*.safetensors")), sorted(released.glob("*.safetensors"))
        pairs = list(zip(m, r_)) + list(zip(m, m[1:])) + list(zip(r_, r_[1:]))
        for a, b in pairs:
            last = compare_files(a, b, progress=False)
        what = f"{len(pairs)} kxl compare calls (the moves of the first files omitted), last rel {last['total']['rel_fro']:.4f}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "peak_rss_mib": rss, "what": what}))


if __name__ == "__main__":
    cli()
