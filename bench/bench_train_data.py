"""The trainer's dataset at Epsilon scale: time and memory per process, plain sd-scripts vs kxl.

From a kxl-prep output of N images (no pixels; kxl_testing.bench_prep_output, built once under
--workdir), each side runs in a fresh child process:

  plain  sd-scripts v0.10.1 as `sdxl_train_network.py` builds its data: ConfigSanitizer ->
         BlueprintGenerator -> generate_dataset_group_by_blueprint -> FineTuningDataset
         (meta.json) -> make_buckets; no kxl patch
  kxl    the same calls through kxl's patches as kxl_train.entry installs them: the columnar
         dataset (train_records.arrow, memory-mapped) and exact resume's set-up (canonical
         layout, recipe fingerprints), i.e. what a kxl run does before its first step

and reports: seconds to import sd-scripts, seconds until the dataset is ready ("build"), memory
after it from /proc/self/smaps_rollup (private = Private_Dirty: memory no other process can
share; private clean = file pages only this process maps so far, page cache; shared; PSS; and
psutil's USS), then forks W DataLoader-like workers one after another, each walking the items a
DataLoader deals it in one epoch (every W-th item of the sampler's order: sd-scripts'
RandomSampler / kxl's ExactBatchSampler), touching what BaseDataset.__getitem__ touches except
pixels (batch index, bucket keys, image_data[key] and its fields, image_to_subset[key]; kxl:
through exact resume's load_item, epoch layout included), and reports each worker's private
growth (Private_Dirty after - before). Workers run one at a time so the machine holds one copy.

  .venv/bin/python bench/bench_train_data.py --images 1000000 --json bench-1m.json
  .venv/bin/python bench/bench_train_data.py --images 5210319 --json bench-5m.json   # alone on the machine
  .venv/bin/python bench/bench_train_data.py --images 2000 --workers 1 --workdir DIR   # smallest form

--plain-images M measures plain sd-scripts on the first M images only (one process of plain
sd-scripts at 5.21M holds ~7 GiB, its workers several GiB more each) and scales its memory
and times by N / M (marked "extrapolated").
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GIB, MIB = 2**30, 2**20

from kxl_testing.accelerator import FakeAccelerator  # noqa: E402 - after the sys.path line


# ----------------------------------------------------------------------------- memory
def smaps() -> dict:
    """Bytes from /proc/self/smaps_rollup (Linux), plus psutil's USS."""
    import psutil

    fields = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    full = psutil.Process().memory_full_info()
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Private_Dirty"],
            "private_clean": fields["Private_Clean"], "shared": fields["Shared_Clean"] + fields["Shared_Dirty"],
            "uss": full.uss}


# ----------------------------------------------------------------------------- child side
def touch_batch(ds, index: int) -> dict:
    """What BaseDataset.__getitem__ reads of one item, without pixels."""
    bbi = ds.buckets_indices[index]
    bucket = ds.bucket_manager.buckets[bbi.bucket_index]
    start = bbi.batch_index * bbi.bucket_batch_size
    n = 0
    for key in bucket[start : start + bbi.bucket_batch_size]:
        info = ds.image_data[key]
        subset = ds.image_to_subset[key]
        _ = (subset.flip_aug, info.latents, info.latents_npz, info.absolute_path, info.bucket_reso, info.resized_size,
             info.resize_interpolation, info.caption, info.text_encoder_outputs, info.text_encoder_outputs_npz)
        n += 1
    return {"n": n}


def walk_in_fork(walk, positions) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read_fd)
        try:
            before = smaps()
            t = time.perf_counter()
            images = sum(walk(int(p)) for p in positions)
            seconds = time.perf_counter() - t
            after = smaps()
            result = {"images": images, "seconds": seconds, "growth": after["private"] - before["private"],
                      "uss_growth": after["uss"] - before["uss"]}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": repr(exc)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    if "error" in result:
        raise RuntimeError(f"worker failed: {result['error']}")
    return result


def measure(side: str, data: Path, workers: int, seed: int) -> dict:
    t0 = time.perf_counter()
    from kxl_train.sd_scripts_library import use_sd_scripts_library

    use_sd_scripts_library()
    from kxl_train import torchvision_compat

    torchvision_compat.install()
    import numpy as np
    import torch
    import sdxl_train_network
    from library import config_util, strategy_base, strategy_sd, train_util
    from library.config_util import BlueprintGenerator, ConfigSanitizer

    runtime = None
    if side == "kxl":  # kxl_train.entry's installers that touch the data
        from kxl_train.dataset import sdscripts as columnar
        from kxl_train.resume import sdscripts as resume

        columnar.install({}, [])
        runtime = resume.install({}, [])
    import_s = time.perf_counter() - t0
    gc.collect()
    mem0 = smaps()

    t1 = time.perf_counter()
    args = sdxl_train_network.setup_parser().parse_args(
        ["--dataset_config", str(data / "dataset.toml"), "--seed", str(seed), "--max_train_steps", "20354",
         "--gradient_accumulation_steps", "16"])
    train_util.prepare_dataset_args(args, True)
    strategy_base.LatentsCachingStrategy.set_strategy(strategy_sd.SdSdxlLatentsCachingStrategy(False, False, 1, False))
    blueprint = BlueprintGenerator(ConfigSanitizer(True, True, False, True)).generate(
        config_util.load_user_config(str(args.dataset_config)), args)
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    dataset_s = time.perf_counter() - t1
    setup_s = 0.0
    if runtime is not None:  # exact resume's set-up: canonical layout and recipe fingerprints
        t = time.perf_counter()
        runtime.group = group
        runtime.set_up(args, FakeAccelerator())
        setup_s = time.perf_counter() - t
    build_s = time.perf_counter() - t1
    gc.collect()
    mem1 = smaps()
    [ds] = group.datasets
    n_items = len(group)

    if runtime is None:
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)).numpy()

        def walk(position: int) -> int:
            return touch_batch(ds, int(order[position]))["n"]
    else:
        from kxl_train.resume.items import load_item
        from kxl_train.resume.sampler import EpochItem, epoch_order

        order = np.array(epoch_order(seed, 0, n_items, 1), dtype=np.int64)

        def walk(position: int) -> int:
            item = EpochItem(0, position, int(order[position]))
            return len(load_item(ds, 0, item.index, item, touch_batch, runtime.router)["kxl_keys"])

    gc.collect()
    results = [walk_in_fork(walk, range(w, n_items, workers)) for w in range(workers)]
    return {
        "side": side, "images": len(ds.image_data), "items": n_items, "import_s": import_s,
        "dataset_s": dataset_s, "setup_s": setup_s, "build_s": build_s,
        "before": mem0, "after": mem1,
        "private_gib": (mem1["private"] - mem0["private"]) / GIB,
        "private_clean_gib": (mem1["private_clean"] - mem0["private_clean"]) / GIB,
        "rss_gib": mem1["rss"] / GIB, "pss_gib": mem1["pss"] / GIB, "shared_gib": mem1["shared"] / GIB,
        "uss_gib": (mem1["uss"] - mem0["uss"]) / GIB,
        "workers": results,
        "worker_growth_mib": max(r["growth"] for r in results) / MIB if results else 0.0,
        "worker_growth_mean_mib": sum(r["growth"] for r in results) / len(results) / MIB if results else 0.0,
        "worker_walk_s": max(r["seconds"] for r in results) if results else 0.0,
    }


# ----------------------------------------------------------------------------- parent side
def ensure_data(workdir: Path, n: int) -> tuple[Path, dict]:
    from kxl_testing.bench_prep_output import make_bench_prep_output

    data = workdir / f"prep-{n}"
    done = data / "bench_prep.json"
    if not done.exists():
        print(f"writing a {n:,}-image kxl-prep output (no pixels) under {data} ...", flush=True)
        added = make_bench_prep_output(data, n)
        done.write_text(json.dumps(added, indent=1))
    return data, json.loads(done.read_text())


def run_child(side: str, data: Path, workers: int, seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--data", str(data), "--workers", str(workers),
                           "--seed", str(seed)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{side} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scaled(result: dict, factor: float) -> dict:
    out = dict(result, extrapolated_from_images=result["images"], scale=factor)
    for key in ("dataset_s", "setup_s", "build_s", "private_gib", "private_clean_gib", "uss_gib",
                "worker_growth_mib", "worker_growth_mean_mib", "worker_walk_s"):
        out[key] = result[key] * factor
    return out


@click.command()
@click.option("--images", type=int, default=1_000_000, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the figures here")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/kxl-bench-train-data"), show_default=True)
@click.option("--plain-images", type=int, help="measure plain sd-scripts on this many images and scale by N / M")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--child", type=click.Choice(["plain", "kxl"]), hidden=True)
@click.option("--data", type=click.Path(path_type=Path), hidden=True)
def main(images, workers, json_out, workdir, plain_images, seed, child, data):
    if child:
        print(json.dumps(measure(child, data, workers, seed)))
        return
    data, prep = ensure_data(workdir, images)
    kxl = run_child("kxl", data, workers, seed)
    if plain_images and plain_images < images:
        plain_data, _ = ensure_data(workdir, plain_images)
        plain = scaled(run_child("plain", plain_data, workers, seed), images / plain_images)
    else:
        plain = run_child("plain", data, workers, seed)
    print(f"\n{images:,} images, {kxl['items']:,} items (batch 4), {workers} workers; "
          f"prep: train_records.arrow added {prep['added_s']:.1f} s to writing the outputs")
    rows = [("ready (s)", "build_s", "{:.1f}", 10), ("  of which exact-resume set-up (s)", "setup_s", "{:.1f}", None),
            ("private after build (GiB)", "private_gib", "{:.2f}", 0.5),
            ("private clean, page cache (GiB)", "private_clean_gib", "{:.2f}", None),
            ("USS growth (GiB)", "uss_gib", "{:.2f}", None),
            ("worker private growth, max (MiB)", "worker_growth_mib", "{:.0f}", 100 * 10**6 / MIB),
            ("worker private growth, mean (MiB)", "worker_growth_mean_mib", "{:.0f}", None),
            ("imports (s)", "import_s", "{:.1f}", None)]
    note = f" (extrapolated x{plain['scale']:.2f} from {plain['extrapolated_from_images']:,})" if "scale" in plain else ""
    print(f"{'':36} {'plain sd-scripts' + note:>24} {'kxl':>10} {'ratio':>8} {'target':>8}")
    for label, key, fmt, target in rows:
        p, k = plain[key], kxl[key]
        ratio = f"{p / k:.0f}x" if k > 0 and key not in ("import_s", "setup_s", "private_clean_gib") else ""
        print(f"{label:36} {fmt.format(p):>24} {fmt.format(k):>10} {ratio:>8} {'' if target is None else fmt.format(target):>8}")
    figures = {"images": images, "workers": workers, "prep": prep,
               "plain": plain, "kxl": kxl,
               "targets": {"build_s": 10, "private_gib": 0.5, "worker_growth_mib": 100 * 10**6 / MIB}}
    if json_out:
        json_out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
