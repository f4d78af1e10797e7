"""Benchmark `kxl fetch images` against downloading the whole tars, over the same loopback hub.

A pool in danbooru2023's layout (original/data-NNNN.tar, members `<id>.jpg` of realistic
JPEGs, an hfutils index per tar in the index repository) is served by kxl_testing.hub_server
with a per-answer latency (--latency, standing in for a distant hub: every file answer waits
that long, a redirected LFS read twice) and one shared link (--bandwidth MiB/s for all
answers together; loopback alone moves GB/s, which no hub client sees). A rev2-like selection takes a fraction of every tar
(--fraction; rev2 took 1.5M of 7.6M posts, about 0.2). Each way runs as a child process
(the client apart from the server; the `kxl fetch images` command alone, without the rest of
`kxl`, which imports torch), into its own image_dir, with
the same export settings
(copy, header check):

  whole tars     hf_hub_download of every tar the selection touches, then kxl-prep export
  fetch gap=G    kxl fetch images --max-gap G, for G in --gaps (0: one request per member)

Printed per way: bytes of tars moved (the server's count), requests, wall seconds, and the
ratios to the whole-tar way; every way's meta.json is checked to be byte-identical.

    .venv/bin/python bench/bench_fetch_images.py --scratch DIR
    .venv/bin/python bench/bench_fetch_images.py --smoke      # the smallest form (CI)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's code first, installed or not

from kxl_testing.export_inputs import encode, photo_like, write_prep_dir  # noqa: E402 - after the sys.path line
from kxl_testing.hub_pools import publish_pool  # noqa: E402
from kxl_testing.hub_server import HubServer  # noqa: E402
from kxl_testing.sample import member_name, write_tar  # noqa: E402
from kxl_tools.fetch.pools import get_pool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POOL = "danbooru2023"


def make_pool(root: Path, tars: int, per_tar: int, side: int, fraction: float, seed: int):
    """Tars of JPEGs (a few distinct images cycled) and a selection of `fraction` of each."""
    rng = np.random.default_rng(seed)
    images = [encode(photo_like(side, side * 3 // 4, seed + k), "jpg") for k in range(8)]
    rows, rels = [], []
    for t in range(tars):
        members, ids = [], []
        for j in range(per_tar):
            pid = 1000 * j + t  # original/data-NNNN.tar holds the ids with id % 1000 == NNNN
            members.append((member_name(pid, "jpg"), images[(pid * 7) % len(images)]))
            ids.append(pid)
        rel = f"original/data-{t:04d}.tar"
        write_tar(root / "tars" / rel, members)
        rels.append(rel)
        chosen = rng.choice(ids, size=max(1, round(fraction * per_tar)), replace=False)
        rows += [{"id": int(pid), "ext": "jpg"} for pid in sorted(chosen)]
    return rels, rows


def child_env(server: HubServer, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


WHOLE_TARS = """
import sys
from huggingface_hub import hf_hub_download
repo, out, *rels = sys.argv[1:]
for rel in rels:
    hf_hub_download(repo, rel, repo_type="dataset", local_dir=out)
"""


# `kxl fetch images` itself, without the rest of `kxl` (whose other commands import torch)
FETCH_IMAGES = "from kxl_tools.fetch.images_cli import images; images()"


def run_way(name: str, cmds: list[list[str]], server: HubServer, env: dict) -> dict:
    server.clear_log()
    started = time.perf_counter()
    for cmd in cmds:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd[:4])} failed:\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    tar_reads = [r for r in server.requests(file="*.tar") if r.status in (200, 206)]
    return {"way": name, "seconds": round(seconds, 3), "tar_bytes": server.bytes_served(file="*.tar"),
            "tar_requests": len(tar_reads), "index_bytes": server.bytes_served(file="*.json")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--tars", type=int, default=8)
    ap.add_argument("--per-tar", type=int, default=150)
    ap.add_argument("--side", type=int, default=640, help="image width (JPEG q90, 4:3)")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of each tar selected (rev2: ~0.2)")
    ap.add_argument("--gaps", default="0,65536,262144,1048576", help="--max-gap values to run")
    ap.add_argument("--latency", type=float, default=0.03, help="seconds before each file answer")
    ap.add_argument("--bandwidth", type=float, default=50.0, help="MiB/s of file bytes, all answers together")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="the smallest form (CI): 2 tars x 12 members, 2 ways")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tars, args.per_tar, args.side, args.gaps, args.latency, args.workers = 2, 12, 96, "0,1048576", 0.002, 1
        args.bandwidth = 0

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="kxl-bench-fetch-"))
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    rels, rows = make_pool(scratch, args.tars, args.per_tar, args.side, args.fraction, args.seed)
    pool = get_pool(POOL)
    whole_bytes = sum((scratch / "tars" / rel).stat().st_size for rel in rels)
    results = []
    with HubServer(scratch / "hub") as server:
        publish_pool(server, pool, scratch / "tars", rels)
        server.latency = args.latency
        server.bandwidth = args.bandwidth * 2**20 if args.bandwidth else None
        env = child_env(server, scratch / "hf_home")
        common = ["--format", "copy", "--verify", "header", "--workers", str(args.workers), "--quiet"]

        prep = write_prep_dir(scratch / "prep-whole", rows)
        results.append(run_way("whole tars", [
            [sys.executable, "-c", WHOLE_TARS, pool.repo, str(scratch / "downloaded"), *rels],
            [sys.executable, "-m", "kxl_prep.cli", "export", str(prep), "--shards", str(scratch / "downloaded"),
             "--index-dir", str(scratch / "idx-local"), *common]], server, env))
        metas = {"whole tars": (prep / "meta.json").read_bytes()}
        for gap in [int(g) for g in args.gaps.split(",")]:
            name = f"fetch gap={gap}"
            prep = write_prep_dir(scratch / f"prep-gap{gap}", rows)
            results.append(run_way(name, [
                [sys.executable, "-c", FETCH_IMAGES, str(prep), "--pool", POOL,
                 "--index-dir", str(scratch / f"idx-hub-{gap}"), "--max-gap", str(gap),
                 "--requests", str(args.requests), *common]], server, env))
            metas[name] = (prep / "meta.json").read_bytes()

    same = len({hashlib.sha256(m).hexdigest() for m in metas.values()}) == 1
    base = results[0]
    print(f"pool: {args.tars} tars x {args.per_tar} JPEGs ({whole_bytes / 2**20:.1f} MiB), selection "
          f"{len(rows)} images ({args.fraction:.0%} of each tar), latency {args.latency * 1000:.0f} ms per answer, "
          f"link {args.bandwidth or 'unlimited'} MiB/s, "
          f"{args.workers} worker(s), {args.requests} requests in flight")
    print(f"{'way':<20} {'tar MiB':>9} {'requests':>9} {'seconds':>8} {'bytes/whole':>12} {'time/whole':>11}")
    for r in results:
        r["bytes_ratio"] = round(r["tar_bytes"] / base["tar_bytes"], 4) if base["tar_bytes"] else None
        r["time_ratio"] = round(r["seconds"] / base["seconds"], 4) if base["seconds"] else None
        print(f"{r['way']:<20} {r['tar_bytes'] / 2**20:>9.2f} {r['tar_requests']:>9} {r['seconds']:>8.2f} "
              f"{r['bytes_ratio']:>12.3f} {r['time_ratio']:>11.3f}")
    print(f"meta.json identical across ways: {same}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "meta_identical": same}, indent=2))
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
