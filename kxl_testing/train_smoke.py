"""The offline proof that the Epsilon recipe trains: real sd-scripts, CPU, a random full-size SDXL.

1. builds an offline tokenizer cache and a random-weight full-size SDXL checkpoint
   (kxl_testing.sdxl_random, kxl_common.clip_tokenizer), once per work directory;
2. makes a tiny fine-tuning dataset from kxl-prep's built-in sample (`prepare_dataset.py --demo`):
   its captions, small generated images, and a dataset.toml scaled down to 128 px;
3. runs the Epsilon rev1 recipe, scaled down (a few steps, batch 2, no accumulation, bf16 on CPU,
   Lion8bit), through launch/epsilon.sh;
4. checks the LoKr files: the module keys the preset implies (counted independently on meta
   models), lokr_w1 / full lokr_w2 shapes and factors, weights moved from their initial values;
5. reports the step time and the peak memory (RSS of the whole process tree).

Heavy steps take an optional lock file (flock), so they never overlap other heavy jobs.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kxl_common.atomic import write_json, write_text
from kxl_common.lock import file_lock
from kxl_common.upstream import REPO_ROOT

RESOLUTION = 128
N_IMAGES = 6
BATCH = 2
FALLBACK_CAPTIONS = [
    "1girl, hatsune miku, vocaloid ||| aqua hair, twintails, smile, looking at viewer ||| masterpiece, newest, safe",
    "1boy, original ||| short hair, jacket, outdoors, sky, cloud ||| best quality, recent, safe",
    "no humans, original ||| scenery, tree, river, mountain ||| great quality, mid, safe",
]


def scaled_overrides(steps: int, tokenizer_cache: Path) -> list[str]:
    """The Epsilon recipe, scaled down for a CPU: what changes and why."""
    return [
        f"max_train_steps={steps}",
        f"train_batch_size={BATCH}",
        "gradient_accumulation_steps=1",
        'mixed_precision="bf16"',          # --full_fp16 / fp16 need a CUDA grad scaler
        "lr_warmup_steps=0",
        "save_every_n_steps=1",            # one LoKr file per step: step times and weight motion
        'save_precision="float"',          # exact weights, so small Lion steps are visible
        "save_state=false",
        "max_data_loader_n_workers=0",
        "persistent_data_loader_workers=false",
        f'tokenizer_cache_dir="{tokenizer_cache}"',
    ]


@contextlib.contextmanager
def heavy_lock(path: str | os.PathLike | None):
    """flock(path) around a heavy step (no-op without a path)."""
    if not path:
        yield
        return
    with file_lock(path):
        yield


class PeakRss:
    """Polls the RSS of a process and all its descendants; keeps the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self._proc = psutil.Process(pid)
        self.peak = 0
        self.peak_anon = 0  # RSS less file-backed/shared pages (what page cache cannot give back)
        self.samples: list[tuple[float, int]] = []  # (wall clock, RSS of the tree)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        import psutil

        while not self._stop.is_set():
            total = anon = 0
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    info = p.memory_info()
                    total += info.rss
                    anon += info.rss - getattr(info, "shared", 0)
            self.peak = max(self.peak, total)
            self.peak_anon = max(self.peak_anon, anon)
            self.samples.append((time.time(), total))
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def demo_captions(work: Path) -> list[str]:
    """Captions of kxl-prep's built-in sample (`prepare_dataset.py --demo`); a fixed few if that
    is unavailable."""
    demo = work / "demo"
    if not (demo / "meta.json").is_file():
        result = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_dataset.py"), "--demo", str(demo)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return FALLBACK_CAPTIONS
    meta = json.loads((demo / "meta.json").read_text(encoding="utf-8"))
    captions = [entry["caption"] for entry in meta.values() if entry.get("caption")]
    return captions or FALLBACK_CAPTIONS


def make_dataset(work: Path) -> Path:
    """N_IMAGES small PNGs, their meta.json (sd-scripts' fine-tuning format) and dataset.toml."""
    import numpy as np
    from PIL import Image

    data = work / "dataset"
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions = demo_captions(work)
    rng = np.random.default_rng(0)
    meta = {}
    for i in range(N_IMAGES):
        # smooth colour fields: something a VAE encodes without extreme values
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
        key = f"smoke_{i:02d}.png"
        image.save(images / key)
        meta[key] = {"caption": captions[i % len(captions)], "image_size": [RESOLUTION, RESOLUTION]}
    write_json(data / "meta.json", meta)
    write_text(data / "dataset.toml", "\n".join([
        "# kxl smoke dataset: the built-in sample's captions, scaled down to 128 px",
        "[general]", "shuffle_caption = true", 'keep_tokens_separator = "|||"', "caption_tag_dropout_rate = 0.15",
        "", "[[datasets]]", f"resolution = {RESOLUTION}", "enable_bucket = true", "min_bucket_reso = 64",
        "max_bucket_reso = 256", "bucket_reso_steps = 64",
        "", "  [[datasets.subsets]]", f'  metadata_file = "{data / "meta.json"}"', f'  image_dir = "{images}"', "",
    ]))
    return data / "dataset.toml"


@dataclass
class SmokeResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    peak_rss_training_bytes: int = 0  # from the first saved step on (model loaded, training)
    peak_anon_bytes: int = 0  # RSS less file-backed pages
    step_seconds: list[float] = field(default_factory=list)
    tqdm_s_per_it: float | None = None
    files: list[str] = field(default_factory=list)
    log: str = ""


def run_training(work: Path, model: Path, dataset_toml: Path, steps: int, lock: str | None,
                 env: dict | None = None) -> SmokeResult:
    out = work / "out"
    tokenizers = work / "tokenizers"
    cmd = [str(REPO_ROOT / "launch" / "epsilon.sh"), "--dataset", str(dataset_toml), "--model", str(model),
           "--output", str(out), "--gpus", "1", *scaled_overrides(steps, tokenizers)]
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               KXL_PYTHON_BIN=sys.executable)
    log_path = work / "train.log"
    with heavy_lock(lock), open(log_path, "w") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        meter = PeakRss(proc.pid)
        rc = proc.wait()
        peak = meter.stop()
        log.write(f"\nkxl smoke: peak RSS {peak}, peak anonymous {meter.peak_anon}\n")
        wall = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    files = sorted(out.glob("*.safetensors"))
    step_files = sorted(out.glob("*-step*.safetensors"))
    mtimes = [f.stat().st_mtime for f in step_files]
    rates = re.findall(r"(\d+(?:\.\d+)?)s/it", text)
    training = [rss for t, rss in meter.samples if mtimes and t >= mtimes[0]]
    return SmokeResult(returncode=rc, wall_s=wall, peak_rss_bytes=peak,
                       peak_rss_training_bytes=max(training, default=0), peak_anon_bytes=meter.peak_anon,
                       step_seconds=[b - a for a, b in zip(mtimes, mtimes[1:])],
                       tqdm_s_per_it=float(rates[-1]) if rates else None,
                       files=[str(f) for f in files], log=str(log_path))


def prepare(work: Path, lock: str | None) -> tuple[Path, Path]:
    """Tokenizer cache, random SDXL (once) and the dataset; returns (model, dataset.toml)."""
    from kxl_testing.sdxl_random import make_random_sdxl
    from kxl_common.clip_tokenizer import make_tokenizer_cache

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizers" / "openai_clip-vit-large-patch14").is_dir():
        make_tokenizer_cache(work / "tokenizers")
    model = Path(os.environ.get("KXL_SMOKE_MODEL", work / "sdxl_random.safetensors"))
    if not model.is_file():
        with heavy_lock(lock):
            make_random_sdxl(model)
    return model, make_dataset(work)


def expected_modules(sd_scripts: Path, recipe_path: Path | None = None):
    """The LoKr modules the Epsilon recipe's preset creates, counted on meta models."""
    from kxl_train.lokr_preset import count_network
    from kxl_train.recipe import load_recipe, resolved_network_args

    recipe_path = recipe_path or REPO_ROOT / "recipes" / "epsilon-rev1.toml"
    values = load_recipe(recipe_path)
    return count_network(sd_scripts, resolved_network_args(values, recipe_path),
                         int(values["network_dim"]), float(values["network_alpha"]))


def check_lokr_files(first: Path, last: Path, expected) -> dict:
    """Compare saved LoKr files with the expected modules; returns figures, raises AssertionError.

    Norm modules (train_norm: w_norm / b_norm, both zero at start) are checked for their shapes
    and motion like the LoKr modules' w2."""
    from safetensors import safe_open

    want = {m.name: m for m in expected.modules}
    norms = {n for n, m in want.items() if not m.w1}
    with safe_open(str(last), "pt") as f_last, safe_open(str(first), "pt") as f_first:
        keys = set(f_last.keys())
        names = {k.split(".")[0] for k in keys}
        assert names == set(want), (f"modules differ: missing {sorted(set(want) - names)[:5]}, "
                                    f"unexpected {sorted(names - set(want))[:5]}")
        saved: dict[str, dict] = {}
        for k in keys:
            name, _, param = k.partition(".")
            saved.setdefault(name, {})[param] = tuple(f_last.get_slice(k).get_shape())
        wrong = [n for n in sorted(names) if saved[n] != {k: tuple(v) for k, v in want[n].tensors.items()}]
        assert not wrong, f"tensors or shapes differ from the preset's: {wrong[:5]}"
        lokr = names - norms
        for name in lokr:
            assert {f"{name}.lokr_w1", f"{name}.lokr_w2", f"{name}.alpha"} <= keys, f"{name}: not a full-matrix LoKr"
            assert not any(k.startswith(name + ".lokr_w2_") for k in keys), f"{name}: low-rank w2"
        unmoved_w2, moved_w1, unmoved_norms = [], 0, []
        for name in sorted(lokr):
            w2 = f_last.get_tensor(f"{name}.lokr_w2")
            if not bool(w2.abs().max() > 0):  # full-matrix w2 starts at exactly zero
                unmoved_w2.append(name)
            if not bool((f_last.get_tensor(f"{name}.lokr_w1") == f_first.get_tensor(f"{name}.lokr_w1")).all()):
                moved_w1 += 1
        for name in sorted(norms):
            if not bool(f_last.get_tensor(f"{name}.w_norm").abs().max() > 0):  # zero at start
                unmoved_norms.append(name)
    return {"modules": len(lokr), "norm_modules": len(norms), "keys": len(keys), "unmoved_w2": unmoved_w2,
            "moved_w1": moved_w1, "unmoved_norms": unmoved_norms}


def main(argv: list[str] | None = None) -> None:
    import click

    @click.command()
    @click.option("--work", type=click.Path(file_okay=False), default="/tmp/kxl-smoke", show_default=True)
    @click.option("--steps", default=3, show_default=True)
    @click.option("--lock", default=os.environ.get("KXL_HEAVY_LOCK"), help="flock file for heavy steps.")
    def cli(work, steps, lock):
        """Train the scaled-down Epsilon recipe on CPU with real sd-scripts and report figures."""
        from kxl_common.upstream import require_sd_scripts

        work = Path(work).resolve()
        sd_scripts = require_sd_scripts()
        model, dataset_toml = prepare(work, lock)
        result = run_training(work, model, dataset_toml, steps, lock)
        click.echo(f"returncode {result.returncode}; wall {result.wall_s:.0f} s; peak RSS "
                   f"{result.peak_rss_bytes / 2**30:.1f} GiB (training, from step 1 on: "
                   f"{result.peak_rss_training_bytes / 2**30:.1f} GiB; anonymous peak "
                   f"{result.peak_anon_bytes / 2**30:.1f} GiB); step files' spacing {result.step_seconds}; "
                   f"tqdm {result.tqdm_s_per_it} s/it; log {result.log}")
        report = asdict(result)
        if result.returncode == 0:
            step_files = sorted(Path(f) for f in result.files if "-step" in f)
            final = [Path(f) for f in result.files if "-step" not in f]
            report["check"] = check_lokr_files(step_files[0], final[0], expected_modules(sd_scripts))
            click.echo(json.dumps(report["check"], indent=1)[:2000])
        write_json(work / "report.json", report)
        sys.exit(result.returncode)

    cli.main(args=argv, standalone_mode=True)


if __name__ == "__main__":
    main()
