"""The training benchmark: the Epsilon rev1 recipe, scaled, through kxl's launch and through plain
sd-scripts with the same arguments, alternating; then a straight-vs-resumed check of kxl.

    python bench/bench_train.py [--device cuda|cpu] [--tiny] [--reps 2] [--work DIR] [--model CKPT]

Each run is one `launch/epsilon.sh` launch (kxl: accelerate -> kxl_train.entry with the patches)
or the same accelerate command with sd-scripts' own sdxl_train_network.py and without the
`--kxl-*` options (plain), derived from `epsilon.sh --dry-run`. kxl_testing.train_probe measures
inside both training processes the same way (see there). Order ABBA.. so drift cancels.

Figures per run: s/step and img/s after the warm-up steps, GPU peaks (allocated / reserved),
peak RSS (training process and whole launch tree), launch -> training loop and -> end of step 1.
The kxl / plain ratio in s/step is printed with its spread. The resume check trains kxl 2K steps
with a state at K, resumes a second run from that state and compares the traces (sample keys
and captions per step) and the final LoKr weights (bitwise, else the largest difference next to
what the weights moved over the resumed steps).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kxl_common.atomic import write_json, write_text
from kxl_common.upstream import REPO_ROOT
from kxl_train.recipe import read_recipe_file
from kxl_testing import bench_stats

PROBE_SITE = Path(__file__).resolve().parent / "probe_site"
LAUNCH = REPO_ROOT / "launch" / "epsilon.sh"
# The file names the rev1 recipe saves under (kohaku-xl-epsilon-lyco-stepNNNNNNNN...), as the release.
OUTPUT_NAME = read_recipe_file(REPO_ROOT / "recipes" / "epsilon-rev1.toml")[0]["output_name"]
CARD_BYTES = 24 * 2**30  # the card's RTX 3090


@dataclass
class Workload:
    device: str  # cuda / cpu
    tiny: bool
    batch: int
    grad_accum: int
    warmup: int
    steps: int  # measured, after the warm-up
    resolution: int
    buckets: list[tuple[int, int]]
    min_bucket: int = 256
    max_bucket: int = 4096

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def images_per_step(self) -> int:
        return self.batch * self.grad_accum

    def images_per_bucket(self, steps: int | None = None) -> int:
        """Enough images that every step of the longest run falls in one epoch, a whole number
        of batches per bucket."""
        steps = max(steps or 0, self.total_steps)
        batches = math.ceil(steps * self.grad_accum / len(self.buckets))
        return batches * self.batch


def buckets_near(resolution: int, count: int, min_bucket: int, max_bucket: int) -> list[tuple[int, int]]:
    """The square bucket and the count-1 candidates nearest to square (sd-scripts' grid, as
    kxl_prep.buckets computes it), portrait and landscape in turn."""
    import numpy as np

    from kxl_prep.buckets import BucketGrid

    grid = BucketGrid((resolution, resolution), min_bucket, max_bucket, 64).resolutions()
    # |log(w/h)| rounded, so a bucket and its transpose tie and the portrait one (smaller w) leads
    order = sorted(range(len(grid)), key=lambda i: (round(abs(float(np.log(grid[i, 0] / grid[i, 1]))), 9), grid[i, 0]))
    return [(int(grid[i, 0]), int(grid[i, 1])) for i in order[:count]]


def workload(device: str, tiny: bool, *, batch: int | None = None, grad_accum: int | None = None,
             warmup: int | None = None, steps: int | None = None) -> Workload:
    if tiny:
        base = dict(batch=4, grad_accum=1, warmup=1, steps=3, resolution=192, min_bucket=64, max_bucket=512, n=3)
    elif device == "cuda":  # the card's buckets around 1024x1024, batch 4
        base = dict(batch=4, grad_accum=2, warmup=2, steps=4, resolution=1024, min_bucket=256, max_bucket=4096, n=5)
    else:  # full-size SDXL on a CPU: the smoke's scale
        base = dict(batch=2, grad_accum=1, warmup=1, steps=2, resolution=128, min_bucket=64, max_bucket=256, n=1)
    for key, value in dict(batch=batch, grad_accum=grad_accum, warmup=warmup, steps=steps).items():
        if value is not None:
            base[key] = value
    n = base.pop("n")
    return Workload(device=device, tiny=tiny, buckets=buckets_near(base["resolution"], n, base["min_bucket"],
                                                                   base["max_bucket"]), **base)


def make_dataset(directory: Path, work: Workload, per_bucket: int) -> Path:
    """Smooth random colour images at the workload's buckets (exact bucket sizes), kxl-prep's
    built-in sample's captions, meta.json and a dataset.toml like kxl-prep's."""
    import numpy as np
    from PIL import Image

    from kxl_testing.train_smoke import demo_captions

    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions = demo_captions(directory)
    rng = np.random.default_rng(0)
    meta = {}
    for b, (w, h) in enumerate(work.buckets):
        for i in range(per_bucket):
            key = f"bench_{w}x{h}_{i:03d}.png"
            if not (images / key).is_file():
                base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
                Image.fromarray(base).resize((w, h), Image.BILINEAR).save(images / key)
            meta[key] = {"caption": captions[(b * per_bucket + i) % len(captions)], "image_size": [w, h]}
    write_json(directory / "meta.json", meta)
    write_text(directory / "dataset.toml", "\n".join([
        "# kxl training benchmark: generated images at real buckets, the built-in sample's captions",
        "[general]", "shuffle_caption = true", 'keep_tokens_separator = "|||"', "caption_tag_dropout_rate = 0.15",
        "", "[[datasets]]", f"resolution = {work.resolution}", "enable_bucket = true",
        f"min_bucket_reso = {work.min_bucket}", f"max_bucket_reso = {work.max_bucket}", "bucket_reso_steps = 64",
        "", "  [[datasets.subsets]]", f'  metadata_file = "{directory / "meta.json"}"', f'  image_dir = "{images}"', "",
    ]))
    return directory / "dataset.toml"


def overrides(work: Workload, tokenizers: Path, *, steps: int, save_every: int | None = None,
              save_state: bool = False) -> list[str]:
    """The rev1 recipe scaled to the workload (recipe key=value overrides)."""
    out = [
        f"max_train_steps={steps}", f"train_batch_size={work.batch}",
        f"gradient_accumulation_steps={work.grad_accum}",
        "lr_warmup_steps=0",  # the card warms up over 1000 steps: the few here would barely move
        f"save_every_n_steps={save_every or 10**6}", f"save_state={'true' if save_state else 'false'}",
        'save_precision="float"',  # exact weights for the resume comparison
        f'tokenizer_cache_dir="{tokenizers}"', f'resolution="{work.resolution},{work.resolution}"',
        f"min_bucket_reso={work.min_bucket}", f"max_bucket_reso={work.max_bucket}",
    ]
    if work.device == "cpu":
        out += ['mixed_precision="bf16"',  # fp16 needs CUDA's grad scaler
                "max_data_loader_n_workers=0", "persistent_data_loader_workers=false"]
    return out


def launch_args(work: Workload, dataset: Path, model: Path, out: Path, recipe_overrides: list[str],
                kxl_options: list[str] = ()) -> list[str]:
    args = ["--dataset", str(dataset), "--model", str(model), "--output", str(out), "--gpus", "1",
            *recipe_overrides, *kxl_options]
    if work.device == "cpu" and cuda_available():
        args.append("--cpu")  # accelerate's own flag: train on the CPU of a GPU machine
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def dry_run_command(args: list[str], env: dict) -> list[str]:
    """The exact command launch/epsilon.sh would run (its --dry-run prints it last)."""
    result = subprocess.run([str(LAUNCH), *args, "--dry-run"], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"epsilon.sh --dry-run failed:\n{result.stderr[-3000:]}")
    lines = result.stdout.strip().splitlines()
    if "# command" not in lines:
        raise RuntimeError(f"epsilon.sh --dry-run printed no '# command' line:\n{result.stdout[-2000:]}")
    return shlex.split(lines[lines.index("# command") + 1])


def plain_command(kxl_command: list[str], sd_scripts: Path) -> list[str]:
    """The same accelerate launch with sd-scripts' own script instead of `-m kxl_train.entry`
    and without kxl's `--kxl-*` options."""
    for i in range(len(kxl_command) - 1):
        if kxl_command[i:i + 2] == ["-m", "kxl_train.entry"]:
            rest = [t for t in kxl_command[i + 2:] if not t.startswith("--kxl-")]
            return [*kxl_command[:i], str(Path(sd_scripts) / "sdxl_train_network.py"), *rest]
    raise ValueError(f"not a kxl launch command (no '-m kxl_train.entry'): {shlex.join(kxl_command)[:300]}")


def run_env(probe_dir: Path, sd_scripts: Path, work: Workload, deterministic: bool = False,
            base: dict | None = None) -> dict:
    base = dict(os.environ if base is None else base)
    path = [str(PROBE_SITE), str(REPO_ROOT), *([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])]
    env = dict(base, PYTHONPATH=os.pathsep.join(path), KXL_BENCH_PROBE=str(probe_dir), KXL_SD_SCRIPTS=str(sd_scripts),
               KXL_PYTHON_BIN=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("KXL_BENCH_TINY", None)
    env.pop("KXL_BENCH_DETERMINISTIC", None)
    if work.tiny:
        env["KXL_BENCH_TINY"] = "1"
    if deterministic:
        env["KXL_BENCH_DETERMINISTIC"] = "1"
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env


@dataclass
class Launch:
    name: str
    returncode: int
    wall_s: float
    t_launch: float
    rss_tree_peak: int
    log: Path
    out: Path
    records: list[dict] = field(default_factory=list)


def launch(name: str, command: list[str], env: dict, run_dir: Path, timeout: float) -> Launch:
    from kxl_testing.train_smoke import PeakRss

    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    with open(log, "w") as fh:
        fh.write(shlex.join(command) + "\n")
        fh.flush()
        t_launch = time.time()
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
                                start_new_session=True)
        meter = PeakRss(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
            fh.write(f"\nkxl bench: killed after {timeout} s\n")
        peak = meter.stop()
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("probe-*.json"))]
    return Launch(name=name, returncode=rc, wall_s=time.time() - t_launch, t_launch=t_launch, rss_tree_peak=peak,
                  log=log, out=run_dir / "out", records=records)


def figures(result: Launch, variant: str, rep: int, work: Workload) -> bench_stats.RunFigures:
    if result.returncode != 0:
        tail = result.log.read_text(errors="replace")[-3000:]
        raise bench_stats.ProbeError(f"{result.name} failed (exit {result.returncode}); {result.log}:\n{tail}")
    record = bench_stats.training_record(result.records)
    return bench_stats.run_figures(record, variant=variant, rep=rep, warmup=work.warmup,
                                   images_per_step=work.images_per_step, t_launch=result.t_launch,
                                   rss_tree_peak=result.rss_tree_peak)


# ----------------------------------------------------------------------------- resume check
def max_difference(a: Path, b: Path) -> tuple[bool, float, int]:
    """(bitwise equal, largest |a - b| over all tensors, tensors compared)."""
    import torch
    from safetensors import safe_open

    equal, largest = True, 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        keys = set(fa.keys())
        if keys != set(fb.keys()):
            raise bench_stats.ProbeError(f"{a} and {b} hold different tensors")
        for key in sorted(keys):
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if not torch.equal(ta, tb):
                equal = False
                largest = max(largest, float((ta.double() - tb.double()).abs().max()))
    return equal, largest, len(keys)


def compare_resume(straight: Path, resumed: Path, k: int) -> dict:
    from kxl_train.resume.trace import diff_traces, read_trace

    full = read_trace(straight / "trace.jsonl")
    tail = read_trace(resumed / "trace.jsonl")
    trace_problems = diff_traces(full[k:], tail)
    final = f"{OUTPUT_NAME}.safetensors"
    equal, diff, tensors = max_difference(straight / final, resumed / final)
    _, moved, _ = max_difference(straight / f"{OUTPUT_NAME}-step{k:08d}.safetensors", straight / final)
    return {"resumed_at": k, "steps": len(full), "trace_steps_compared": len(tail),
            "trace_identical": not trace_problems and len(tail) == len(full) - k, "trace_problems": trace_problems[:5],
            "weights_bitwise_equal": equal, "weights_max_abs_difference": diff, "tensors": tensors,
            "weights_max_abs_movement_over_resumed_steps": moved}


# ----------------------------------------------------------------------------- preparation
def prepare_inputs(work_dir: Path, work: Workload, model: Path | None, tokenizers: Path | None, lock: str | None,
                   resume_steps: int) -> tuple[Path, Path, Path]:
    from kxl_testing.train_smoke import heavy_lock

    work_dir.mkdir(parents=True, exist_ok=True)
    if tokenizers is None:
        tokenizers = work_dir / "tokenizers"
        if not (tokenizers / "openai_clip-vit-large-patch14").is_dir():
            from kxl_common.clip_tokenizer import make_tokenizer_cache

            make_tokenizer_cache(tokenizers)
    if model is None:
        model = work_dir / ("sdxl_tiny.safetensors" if work.tiny else "sdxl_random.safetensors")
        if not model.is_file():
            if work.tiny:
                build_tiny(model)
            else:
                from kxl_testing.sdxl_random import make_random_sdxl

                with heavy_lock(lock):
                    make_random_sdxl(model)
    per_bucket = work.images_per_bucket(resume_steps)
    dataset = make_dataset(work_dir / f"data-{work.resolution}-{per_bucket}", work, per_bucket)
    return model, dataset, tokenizers


def build_tiny(model: Path) -> None:
    """In a child process: the shrink is process-wide and must not leak into this one."""
    code = "import sys; from kxl_testing.tiny_sdxl import make_tiny_sdxl; make_tiny_sdxl(sys.argv[1])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, str(model)], check=True, env=env)


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class Options:
    work_dir: Path
    sd_scripts: Path
    work: Workload
    reps: int = 2
    resume: bool = True
    resume_k: int = 2
    deterministic: bool = True
    model: Path | None = None
    tokenizers: Path | None = None
    lock: str | None = None
    timeout: float = 1800


def benchmark(opts: Options, echo=print) -> dict:
    work = opts.work
    model, dataset, tokenizers = prepare_inputs(opts.work_dir, work, opts.model, opts.tokenizers, opts.lock,
                                                2 * opts.resume_k if opts.resume else 0)
    echo(f"workload: {work.device}{' tiny' if work.tiny else ''} SDXL {model}; batch {work.batch} x "
         f"accumulation {work.grad_accum} = {work.images_per_step} images/step; buckets {work.buckets}; "
         f"{work.warmup} warm-up + {work.steps} measured steps; {opts.reps} repetitions, alternating")
    speed_overrides = overrides(work, tokenizers, steps=work.total_steps)
    runs: list[bench_stats.RunFigures] = []
    report: dict = {"workload": asdict(work), "model": str(model), "runs": [], "failures": []}
    for rep in range(opts.reps):
        order = ("kxl", "plain") if rep % 2 == 0 else ("plain", "kxl")
        for variant in order:
            run_dir = opts.work_dir / "runs" / f"{variant}-{rep}"
            _clean(run_dir)
            env = run_env(run_dir, opts.sd_scripts, work)
            args = launch_args(work, dataset, model, run_dir / "out", speed_overrides)
            if variant == "kxl":
                command = [str(LAUNCH), *args]
            else:
                command = plain_command(dry_run_command(args, env), opts.sd_scripts)
            result = launch(f"{variant} run {rep}", command, env, run_dir, opts.timeout)
            try:
                fig = figures(result, variant, rep, work)
            except bench_stats.ProbeError as exc:
                report["failures"].append(str(exc))
                echo(f"FAILED: {exc}")
                continue
            runs.append(fig)
            report["runs"].append(asdict(fig))
            echo(f"{variant} rep {rep}: {fig.s_per_step:.3f} s/step, {fig.img_per_s:.2f} img/s, "
                 f"step 1 ends {fig.launch_to_first_step_s:.1f} s after launch")
    kxl = [r for r in runs if r.variant == "kxl"]
    plain = [r for r in runs if r.variant == "plain"]
    for line in bench_stats.table(runs, CARD_BYTES if work.device == "cuda" else None):
        echo(line)
    if kxl and plain:
        ratio = bench_stats.ratio_with_spread(kxl, plain)
        report["ratio"] = asdict(ratio)
        echo(f"kxl / plain s/step: {ratio.text(1.01)}")
        cpu_ratio = bench_stats.ratio_with_spread(kxl, plain, clock="cpu")
        report["cpu_ratio"] = asdict(cpu_ratio)
        echo(f"kxl / plain CPU s/step (training process): {cpu_ratio.text()}")
    if opts.resume:
        report["resume"] = resume_check(opts, work, model, dataset, tokenizers, echo)
    write_json(opts.work_dir / "report.json", report)
    echo(f"report: {opts.work_dir / 'report.json'}")
    return report


def resume_check(opts: Options, work: Workload, model: Path, dataset: Path, tokenizers: Path, echo) -> dict:
    k = opts.resume_k
    base = overrides(work, tokenizers, steps=2 * k, save_every=k, save_state=True)
    results = {}
    for name in ("straight", "resumed"):
        run_dir = opts.work_dir / "runs" / f"resume-{name}"
        _clean(run_dir)
        extra = [f"--kxl-trace={run_dir / 'out' / 'trace.jsonl'}"]
        if name == "resumed":
            extra.append(f"--kxl-resume={opts.work_dir / 'runs' / 'resume-straight' / 'out' / f'{OUTPUT_NAME}-step{k:08d}-state'}")
        env = run_env(run_dir, opts.sd_scripts, work, deterministic=opts.deterministic)
        results[name] = launch(f"resume check, {name}", [str(LAUNCH), *launch_args(work, dataset, model, run_dir / "out", base, extra)],
                               env, run_dir, opts.timeout)
        if results[name].returncode != 0:
            tail = results[name].log.read_text(errors="replace")[-3000:]
            echo(f"FAILED: resume check, {name} run (exit {results[name].returncode}):\n{tail}")
            return {"ok": False, "failed_run": name, "log": str(results[name].log)}
    check = compare_resume(results["straight"].out, results["resumed"].out, k)
    check["deterministic_algorithms"] = opts.deterministic
    check["ok"] = check["trace_identical"]
    echo(f"resume check (state at step {k} of {2 * k}): trace {'identical' if check['trace_identical'] else 'DIFFERS'}; "
         f"final LoKr {'bitwise identical' if check['weights_bitwise_equal'] else 'differs'}"
         f" (max |straight - resumed| {check['weights_max_abs_difference']:.3g}; the weights moved up to "
         f"{check['weights_max_abs_movement_over_resumed_steps']:.3g} over steps {k + 1}..{2 * k}; "
         f"deterministic algorithms {'on' if opts.deterministic else 'off'})")
    return check


def _clean(run_dir: Path) -> None:
    import shutil

    if run_dir.exists():
        shutil.rmtree(run_dir)


def main(argv: list[str] | None = None) -> None:
    import click

    @click.command()
    @click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
    @click.option("--tiny", is_flag=True, help="A tiny SDXL-shaped model (kxl_testing.tiny_sdxl): minutes on a CPU.")
    @click.option("--reps", default=2, show_default=True, help="Repetitions of the kxl / plain pair.")
    @click.option("--batch", type=int, help="Batch per step (default: 4).")
    @click.option("--grad-accum", type=int, help="Gradient accumulation (default: 2 on CUDA, 1 on the CPU).")
    @click.option("--warmup", type=int, help="Steps left out of the timings.")
    @click.option("--steps", type=int, help="Measured steps after the warm-up.")
    @click.option("--resume-at", "resume_k", default=2, show_default=True,
                  help="The resume check saves a state at this step of 2x as many and resumes from it.")
    @click.option("--no-resume", is_flag=True, help="Skip the resume check.")
    @click.option("--no-deterministic", is_flag=True, help="Resume check without torch.use_deterministic_algorithms.")
    @click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path),
                  default=Path("/tmp/kxl-bench-train"), show_default=True)
    @click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="SDXL checkpoint (default: a random one built in --work, tiny with --tiny).")
    @click.option("--tokenizers", type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Offline tokenizer cache (default: built in --work; needs open-clip-torch).")
    @click.option("--timeout", default=1800.0, show_default=True, help="Seconds per training run.")
    @click.option("--lock", default=os.environ.get("KXL_HEAVY_LOCK"), help="flock file for building the full SDXL.")
    def cli(device, tiny, reps, batch, grad_accum, warmup, steps, resume_k, no_resume, no_deterministic, work_dir,
            model, tokenizers, timeout, lock):
        """kxl vs plain sd-scripts: s/step, img/s, memory, start-up; straight vs resumed."""
        from kxl_common.upstream import require_sd_scripts

        if device == "cuda" and not cuda_available():
            raise click.ClickException("no CUDA device here: use --device cpu (with --tiny for a run of minutes)")
        work = workload(device, tiny, batch=batch, grad_accum=grad_accum, warmup=warmup, steps=steps)
        opts = Options(work_dir=work_dir.resolve(), sd_scripts=require_sd_scripts(), work=work, reps=reps,
                       resume=not no_resume, resume_k=resume_k, deterministic=not no_deterministic, model=model,
                       tokenizers=tokenizers, lock=lock, timeout=timeout)
        report = benchmark(opts, echo=click.echo)
        failed = report["failures"] or not report["runs"] or (opts.resume and not report["resume"].get("ok"))
        sys.exit(1 if failed else 0)

    cli.main(args=argv, standalone_mode=True)


if __name__ == "__main__":
    main()
