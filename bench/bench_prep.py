"""Benchmark of the data-prep job on synthetic danbooru2023-sized HakuBooru DBs.

For each size N it builds (or reuses) a synthetic DB of N posts with ~30 tags each
(kxl_testing.sample.make_bench_db), then runs in a fresh child process the whole job as
`kxl-prep prepare` runs it: read + selection + filters + quality + captions + buckets +
outputs (kxl_prep.pipeline.prepare with the epsilon-rev1 recipe, quotas scaled by
N / 7.6M). It reports seconds per phase, posts/s end to end and the child's peak RSS.

In the same run it measures HakuBooru 0.0.3 (the peer) on the same DB: its peewee models
and KohakuCaptioner, captioning a fixed subset of posts one by one as its Exporter does,
and prints our end-to-end posts/s over its captions/s.

    .venv/bin/python bench/bench_prep.py                         # 100k and 1M posts
    .venv/bin/python bench/bench_prep.py --sizes 100000,1000000,7600000   # alone on the machine
    .venv/bin/python bench/bench_prep.py --sizes 2000 --peer-posts 200 --workdir DIR   # smallest form
    .venv/bin/python bench/bench_prep.py --sizes 100000 --reader-only --json out.json

Wall seconds and CPU seconds (user + sys of the child) are both reported: on a shared
machine wall time also counts other people's load; "cpu ratio" compares CPU seconds.

Targets: the full rev1 job (7.6M posts) under 10 minutes on 2 cores and under 8 GB peak
RSS; posts/s roughly constant from 100k to 7.6M (cost linear in N); >= 20x HakuBooru.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's code first, installed or not

FULL_DUMP_POSTS = 7_600_000


def _peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_job(db: str, out: str, n_posts: int, reader_only: bool) -> dict:
    if reader_only:
        from kxl_prep.sources import read_posts

        t0, c0 = time.perf_counter(), _cpu_s()
        res = read_posts([db], progress=False)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "posts_read": len(res.posts), "timings_s": {"read": round(wall, 3)},
                "images": None, "peak_rss_gb": _peak_rss_gb(), "cpu_s": _cpu_s() - c0}
    from kxl_prep.pipeline import prepare

    t0, c0 = time.perf_counter(), _cpu_s()  # the job, not the interpreter start and imports
    manifest = prepare([db], out, count_scale=n_posts / FULL_DUMP_POSTS, progress=False)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "posts_read": manifest["counts"]["posts_read"],
            "images": manifest["counts"]["images"], "timings_s": manifest["timings_s"],
            "peak_rss_gb": _peak_rss_gb(), "cpu_s": _cpu_s() - c0}


def child_hakubooru(db: str, n_posts: int) -> dict:
    """HakuBooru 0.0.3: select posts through its peewee models, caption each with
    KohakuCaptioner (its default captioner; one SQL query per post for the tags)."""
    import contextlib
    import io

    from hakubooru.caption import KohakuCaptioner
    from hakubooru.dataset import db as hdb

    with contextlib.redirect_stdout(io.StringIO()):
        hdb.load_db(db)
    total = hdb.Post.select().count()
    step = max(1, total // n_posts)
    # every step-th post across the id range, as a selection would spread them (not timed)
    posts = list(hdb.Post.select().where((hdb.Post.id % step) == 0).order_by(hdb.Post.id).limit(n_posts)) \
        if step > 1 else list(hdb.Post.select().limit(n_posts))
    t0, c0 = time.perf_counter(), _cpu_s()
    captioner = KohakuCaptioner()
    n_chars = 0
    for post in posts:
        n_chars += len(captioner.caption(post, None))
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {"wall_s": wall, "cpu_s": cpu, "posts": len(posts), "posts_per_s": len(posts) / wall,
            "posts_per_cpu_s": len(posts) / cpu, "peak_rss_gb": _peak_rss_gb(), "caption_chars": n_chars}


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"child {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _db_path(workdir: Path, n: int, seed: int, storage: str) -> Path:
    return workdir / f"bench-v2-{storage}-{n}-s{seed}.db"


@click.command()
@click.option("--sizes", default="100000,1000000", show_default=True,
              help="Comma-separated post counts.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/kxl-bench-prep"),
              show_default=True, help="Where the synthetic DBs and outputs go (DBs are reused).")
@click.option("--storage", type=click.Choice(["relation", "text"]), default="relation",
              show_default=True, help="How the DB stores tags.")
@click.option("--seed", default=0, show_default=True)
@click.option("--peer-posts", default=20_000, show_default=True,
              help="Posts HakuBooru captions per size (0: skip the peer).")
@click.option("--reader-only", is_flag=True, help="Time kxl_prep.sources.read_posts alone.")
@click.option("--keep-dbs/--drop-dbs", default=True, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON.")
@click.option("--_child", "child", type=click.Choice(["job", "hakubooru"]), default=None, hidden=True)
@click.option("--_db", "child_db", default=None, hidden=True)
@click.option("--_out", "child_out", default=None, hidden=True)
@click.option("--_n", "child_n", type=int, default=0, hidden=True)
def main(sizes, workdir, storage, seed, peer_posts, reader_only, keep_dbs, json_out,
         child, child_db, child_out, child_n):
    if child == "job":
        print(json.dumps(child_job(child_db, child_out, child_n, reader_only)))
        return
    if child == "hakubooru":
        print(json.dumps(child_hakubooru(child_db, child_n)))
        return

    from kxl_testing.sample import make_bench_db

    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(s) for s in sizes.split(",") if s.strip()]:
        db = _db_path(workdir, n, seed, storage)
        gen_s = None
        if not db.exists():
            click.echo(f"building a {n:,}-post DB ({storage}) at {db} ...", err=True)
            t0 = time.perf_counter()
            tmp = db.with_suffix(".tmp")
            make_bench_db(tmp, n, seed, tag_storage=storage, tag_id_index=False)
            os.replace(tmp, db)
            gen_s = time.perf_counter() - t0
        out = workdir / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        click.echo(f"running the job on {n:,} posts ...", err=True)
        ours = _run_child(["--_child", "job", "--_db", str(db), "--_out", str(out), "--_n", str(n)]
                          + (["--reader-only"] if reader_only else []))
        peer = None
        if peer_posts:
            click.echo(f"running HakuBooru on {peer_posts:,} of them ...", err=True)
            peer = _run_child(["--_child", "hakubooru", "--_db", str(db), "--_n", str(peer_posts)])
        row = {
            "posts": n, "storage": storage, "db_bytes": db.stat().st_size, "db_build_s": gen_s,
            "job": "reader" if reader_only else "full", **ours,
            "posts_per_s": ours["posts_read"] / ours["wall_s"],
            "hakubooru": peer,
            "ratio_vs_hakubooru": (ours["posts_read"] / ours["wall_s"]) / peer["posts_per_s"] if peer else None,
            # CPU seconds: less sensitive than wall time to other load on a shared machine
            "ratio_vs_hakubooru_cpu": (ours["posts_read"] / ours["cpu_s"]) / peer["posts_per_cpu_s"] if peer else None,
        }
        results.append(row)
        shutil.rmtree(out, ignore_errors=True)
        if not keep_dbs:
            db.unlink()
        click.echo(_table(results), err=True)

    click.echo(_table(results))
    if json_out:
        json_out.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


def _table(results: list[dict]) -> str:
    """Seconds per phase (the pipeline's own timings), end-to-end posts/s, peak RSS, peer."""
    phases: list[str] = []
    for r in results:
        phases += [p for p in r["timings_s"] if p != "total" and p not in phases]
    head = (f"{'posts':>10} {'job':>6} " + " ".join(f"{p[:10]:>10}" for p in phases)
            + f" {'total s':>8} {'cpu s':>7} {'posts/s':>9} {'peak GB':>8} {'haku/s':>7} {'ratio':>6}"
            + f" {'cpu ratio':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        t = r["timings_s"]
        cells = " ".join(f"{t[p]:>10.1f}" if p in t else f"{'-':>10}" for p in phases)
        peer = r["hakubooru"]
        lines.append(
            f"{r['posts']:>10,} {r['job']:>6} {cells} {r['wall_s']:>8.1f} {r['cpu_s']:>7.1f} "
            f"{r['posts_per_s']:>9,.0f} {r['peak_rss_gb']:>8.2f} "
            + (f"{peer['posts_per_s']:>7,.0f} {r['ratio_vs_hakubooru']:>5.1f}x "
               f"{r['ratio_vs_hakubooru_cpu']:>8.1f}x" if peer else f"{'-':>7} {'-':>6} {'-':>9}"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
