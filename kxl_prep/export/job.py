"""The whole export, as `kxl-prep export` runs it.

prep dir (selection.parquet, meta.json, dataset.toml) + shard roots
  -> shard index (built once, cached) -> plan (units per tar, not found)
  -> this job's units (--shard K/N) minus what the journals say is done
  -> workers -> image_dir -> meta.json / rejects / summary (under a lock shared by all jobs)
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from kxl_common.errors import KxlError
from kxl_common.toml_file import read_toml
from kxl_common.atomic import write_json
from kxl_prep.columnar import writer_following
from kxl_prep.outputs import DATASET_TOML, META_JSON, SELECTION_PARQUET, TRAIN_RECORDS, refresh_output_entry
from kxl_prep.export import summary as summ
from kxl_prep.export.distribute import ProgressBar, default_workers, run_local, run_ray
from kxl_common.lock import file_lock
from kxl_prep.export.index import default_index_dir, discover_shards, ensure_index, load_index, resolve_duplicates
from kxl_prep.export.plan import make_plan
from kxl_prep.export.process import ExportSettings
from kxl_prep.buckets import DEFAULT_GRID, BucketGrid
from kxl_prep.export.unit import UnitTask
from kxl_prep.export.writer import read_journal, scan_image_dir

STATE_DIR = ".kxl-export"
LOCK_WAIT_S = 60.0
SELECTION_COLUMNS = ("id", "file_ext", "md5")  # captions are streamed when meta.json is written


class ExportError(KxlError, RuntimeError):
    pass


@dataclass
class ExportOptions:
    prep_dir: Path
    shard_roots: list[Path]
    image_dir: Path | None = None
    index_dir: Path | None = None
    settings: ExportSettings = ExportSettings()
    workers: int = 0  # 0: every core
    shard: tuple[int, int] = (0, 1)
    ray_address: str | None = None
    use_ray: bool = False
    fsync: bool = True
    progress: bool | None = None  # None: tqdm decides (off when not a terminal)
    index_only: bool = False


def read_dataset_toml(prep_dir: Path) -> tuple[Path | None, BucketGrid]:
    """image_dir of the first subset (relative to prep_dir) and the bucket settings."""
    path = prep_dir / DATASET_TOML
    if not path.exists():
        return None, DEFAULT_GRID
    doc = read_toml(path, what="dataset config", error=ExportError, allow_empty=True)
    general = doc.get("general", {})
    datasets = doc.get("datasets") or [{}]
    ds = datasets[0]
    subsets = ds.get("subsets") or [{}]

    def pick(key, default):
        for level in (subsets[0], ds, general):
            if key in level:
                return level[key]
        return default

    reso = pick("resolution", 1024)
    if isinstance(reso, str):
        parts = [int(x) for x in reso.split(",")]
        reso = (parts[0], parts[-1])
    elif isinstance(reso, int):
        reso = (reso, reso)
    else:
        reso = (int(reso[0]), int(reso[-1]))
    params = BucketGrid(reso, int(pick("min_bucket_reso", 256)), int(pick("max_bucket_reso", 4096)),
                        int(pick("bucket_reso_steps", 64)))
    image_dir = subsets[0].get("image_dir")
    if image_dir is None:
        return None, params
    image_dir = Path(image_dir)
    return (image_dir if image_dir.is_absolute() else prep_dir / image_dir), params


def read_selection(prep_dir: Path) -> pd.DataFrame:
    path = prep_dir / SELECTION_PARQUET
    if not path.exists():
        raise ExportError(f"{path}: not found (run `kxl-prep` first: the export reads its selection)")
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in ("id", "caption") if c not in names]
    if missing:
        raise ExportError(f"{path}: no {', '.join(f'`{c}`' for c in missing)} column")
    return pd.read_parquet(path, columns=[c for c in SELECTION_COLUMNS if c in names])


def check_settings(state_dir: Path, fingerprint: dict) -> None:
    """Refuse to mix outputs made with different settings in one image_dir."""
    path = state_dir / "settings.json"
    fingerprint = json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            previous = json.load(fh)
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise ExportError(
                f"{state_dir.parent} was exported with other settings ({', '.join(changed)}: "
                f"{ {k: previous.get(k) for k in changed} } then, { {k: fingerprint.get(k) for k in changed} } now). "
                "Use another --image-dir, or delete that directory to start over."
            )
        return
    write_json(path, fingerprint)


def build_index(opts: ExportOptions, workers: int):
    shards = discover_shards(opts.shard_roots)
    if not shards:
        raise ExportError(f"no *.tar files under {', '.join(map(str, opts.shard_roots))}")
    index_dir = opts.index_dir or default_index_dir(shards)
    index_dir.mkdir(parents=True, exist_ok=True)
    # job K of N starts at its own place in the list so array jobs split the indexing
    k, n = opts.shard
    start = (len(shards) * k) // n
    order = shards[start:] + shards[:start]
    bar = ProgressBar(len(order), "indexing shards", disable=opts.progress is False, unit="tar")
    rebuilt = 0
    if workers > 1 and len(order) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(order))) as pool:
            try:
                for _, was_built in pool.imap_unordered(_ensure_one, [(s, index_dir) for s in order]):
                    rebuilt += was_built
                    bar("built" if was_built else "cached")
            except Exception:
                # a bad tar: let the other workers finish the index files they are writing (the
                # pool's exit would kill them mid-write and leave their temp files behind)
                pool.close()
                pool.join()
                raise
    else:
        for shard in order:
            _, was_built = ensure_index(shard, index_dir)
            rebuilt += was_built
            bar("built" if was_built else "cached")
    bar.close()
    index = resolve_duplicates(load_index(shards, index_dir), shards)
    return shards, index, index_dir, rebuilt


def record_export_counts(prep_dir: Path, images: int) -> None:
    """manifest.json and report.md count what meta.json now holds (the exported images), and
    keep the prepared count beside it, so the three files agree after an export."""
    from kxl_prep.outputs import MANIFEST_JSON
    from kxl_prep.report import write_report

    manifest_path = prep_dir / MANIFEST_JSON
    if not manifest_path.exists():
        return
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    counts = manifest["counts"]
    prepared = counts.get("images_prepared", counts["images"])
    counts["images_prepared"] = prepared
    counts["images"] = images
    manifest["export"] = {"images": images, "images_prepared": prepared, "not_exported": prepared - images,
                          "rejects": summ.REJECTS}
    write_json(manifest_path, manifest)
    for name in write_report(prep_dir, manifest):
        refresh_output_entry(prep_dir, name, "kxl-prep export")


def _ensure_one(args):
    return ensure_index(*args)


def resolve_outputs(opts: ExportOptions) -> tuple[Path, Path, BucketGrid]:
    """(prep_dir, image_dir, bucket settings): --image-dir, else dataset.toml's, else prep_dir/images."""
    prep_dir = Path(opts.prep_dir)
    toml_image_dir, bucket_params = read_dataset_toml(prep_dir)
    image_dir = Path(opts.image_dir or toml_image_dir or (prep_dir / "images"))
    if opts.image_dir and toml_image_dir and Path(opts.image_dir).resolve() != toml_image_dir.resolve():
        print(f"warning: dataset.toml's image_dir is {toml_image_dir}, images go to {image_dir}", file=sys.stderr)
    return prep_dir, image_dir, bucket_params


def run_export(opts: ExportOptions) -> dict:
    started = time.perf_counter()
    prep_dir, image_dir, bucket_params = resolve_outputs(opts)
    workers = opts.workers or default_workers()
    selection = read_selection(prep_dir)

    shards, index, index_dir, rebuilt = build_index(opts, workers)
    if opts.index_only:
        return {"shards": len(shards), "indexed_posts": int(len(index)), "rebuilt": rebuilt, "index_dir": str(index_dir)}
    plan = make_plan(selection, shards, index)
    return export_plan(opts, plan, image_dir, bucket_params, workers, started, index_dir=index_dir, indexed=rebuilt)


def export_plan(opts: ExportOptions, plan, image_dir: Path, bucket_params: BucketGrid, workers: int, started: float,
                *, index_dir, indexed: int, source_for: Callable | None = None, label: str = "export",
                show_bytes: bool = False) -> dict:
    """Run a plan's units (this job's --shard slice) into image_dir, then meta.json, rejects and
    the summary. `source_for(unit)` gives each unit's member bytes (default: its local tar):
    `kxl-prep export` and `kxl fetch images` differ only there."""
    state_dir = image_dir / STATE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {**opts.settings.fingerprint(), "buckets": asdict(bucket_params)}
    check_settings(state_dir, fingerprint)

    k, n = opts.shard
    with job_lock(state_dir, k, n, label):
        summary = _export_slice(opts, plan, image_dir, state_dir, bucket_params, workers, fingerprint,
                                index_dir, indexed, started, source_for, label, show_bytes)
    return summary


@contextlib.contextmanager
def job_lock(state_dir: Path, k: int, n: int, label: str = "export"):
    """One live run per slice of an image_dir (a rerun while the first still runs would race)."""
    # the workers of a killed run hold it until they notice (within one image each)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(state_dir / f"run-{k}-of-{n}.lock", timeout=LOCK_WAIT_S))
        except TimeoutError:
            raise ExportError(f"another {label} of slice {k}/{n} into {state_dir.parent} is running") from None
        yield


def _export_slice(opts, plan, image_dir, state_dir, bucket_params, workers, fingerprint, index_dir,
                  rebuilt, started, source_for, label, show_bytes) -> dict:
    k, n = opts.shard
    prep_dir = Path(opts.prep_dir)
    tasks, already_done = make_tasks(plan.slice(k, n), image_dir, state_dir, opts, bucket_params, source_for)
    total = sum(len(t.posts) for t in tasks)
    bytes_total = sum(p.size for t in tasks for p in t.posts) if show_bytes else None
    bar = ProgressBar(total, f"{label} {k}/{n}" if n > 1 else label, disable=opts.progress is False,
                      bytes_total=bytes_total)
    failed: list[str] = []
    stopped = None
    recovered = processed = 0
    results = run_ray(tasks, opts.ray_address, bar) if opts.use_ray else run_local(tasks, workers, bar)
    try:
        for result in results:
            recovered += result.counts["recovered"]
            processed += result.counts["ok"] + result.counts["rejected"]
            if result.error:
                failed.append(f"{result.shard_rel}: {result.error}")
            if result.fatal:  # disk full: every other unit would fail the same way
                stopped = result.error
                break
    finally:
        results.close()  # after a break: stops the worker pool (their temp files go on the rerun)
        bar.close()

    with file_lock(prep_dir / ".export.lock"):
        records = summ.collect_records(plan, state_dir)
        summary = summ.build_summary(plan, records)
        # With --shard K/N the (large) meta.json is rewritten once, by the slice that finds
        # nothing pending; a single job rewrites it even when interrupted, to match its files.
        summary["meta_json_rewritten"] = summary["pending"] == 0 or n == 1
        if summary["meta_json_rewritten"]:
            with writer_following(prep_dir) or contextlib.nullcontext() as train_records:
                # train_records.arrow follows meta.json (closed with its sha256)
                entries, digest = summ.write_meta(prep_dir, prep_dir / SELECTION_PARQUET, records, train_records)
                summary["meta_json_sha256"] = digest
                if train_records is not None:
                    refresh_output_entry(prep_dir, TRAIN_RECORDS, "kxl-prep export")
                refresh_output_entry(prep_dir, META_JSON, "kxl-prep export", sha256=digest)
                record_export_counts(prep_dir, entries)
        summ.write_rejects(prep_dir, plan, records)
        seconds = time.perf_counter() - started
        summary["this_run"] = {
            "shard": f"{k}/{n}", "workers": "ray" if opts.use_ray else workers, "processed": processed, "recovered": recovered,
            "already_done": already_done, "seconds": round(seconds, 3),
            "images_per_s": round(processed / seconds, 2) if seconds > 0 else 0.0,
            "failed_units": failed, "shards_indexed": rebuilt, "stopped": stopped,
        }
        summary["image_dir"] = str(image_dir)
        summary["index_dir"] = str(index_dir)
        summary["settings"] = fingerprint
        write_json(prep_dir / summ.SUMMARY, summary)
    return summary


def make_tasks(units, image_dir: Path, state_dir: Path, opts: ExportOptions, bucket_params: BucketGrid,
               source_for: Callable | None = None):
    """What is left of each unit: posts with no journal line (or whose file went missing)."""
    outputs, temps = scan_image_dir(image_dir)
    tasks: list[UnitTask] = []
    already_done = 0
    for unit in units:
        jpath = summ.journal_path(state_dir, unit.key)
        journal = read_journal(jpath)
        todo = []
        for post in unit.posts:
            rec = journal.get(post.id)
            if rec is not None and (rec["status"] == "rejected" or rec["file"] in outputs.get(post.id, ())):
                already_done += 1
                continue
            todo.append(post)
        stale = [name for post in unit.posts for name in temps.get(post.id, ())]
        if not todo and not stale:
            continue
        existing = {p.id: outputs[p.id] for p in todo if p.id in outputs}
        tasks.append(UnitTask(unit.shard.path, unit.shard.rel, str(jpath), str(image_dir), todo, existing, stale,
                              opts.settings, bucket_params, opts.fsync,
                              source_for(unit) if source_for is not None else None))
    return tasks, already_done
