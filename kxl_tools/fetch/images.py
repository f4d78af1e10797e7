"""`kxl fetch images`: the images of PREP_DIR/selection.parquet straight from a pool's tars on
the hub into the dataset's image_dir, the same files, meta.json and rejects as
`kxl-prep export` over the same tars downloaded whole.

prep dir + pool (pools.toml) -> the repository's tar list (one commit, pinned for the run)
  -> the tars the selection can be in (the pool's layout) -> their shard indexes (published
  hfutils JSON, or tar headers by ranges; cached) -> the export's plan -> the export's units,
  each reading its members by coalesced range requests (source.HubTarSource) instead of a
  local tar -> the export's writer, journal, meta.json, rejects and summary.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import requests
from huggingface_hub.errors import HfHubHTTPError

from kxl_prep.export.distribute import ProgressBar, default_workers
from kxl_prep.export.index import make_shard, resolve_duplicates
from kxl_prep.export.job import STATE_DIR, ExportError, ExportOptions, export_plan, make_tasks, read_selection, resolve_outputs
from kxl_prep.export.plan import make_plan
from kxl_prep.export.process import ExportSettings
from kxl_tools.fetch.coalesce import DEFAULT_MAX_GAP, DEFAULT_MAX_SPAN, coalesce, summarize
from kxl_tools.fetch.hub import FetchError, Hub, explain, repo_label
from kxl_tools.fetch.hub_index import HubTar, IndexMismatch, default_index_dir, ensure_hub_index, read_hub_index
from kxl_tools.fetch.pools import POOLS_FILE, Pool, PoolError, get_pool
from kxl_tools.fetch.ranged import HubFile, Retry, get_range
from kxl_tools.fetch.source import HubTarSource


@dataclass
class FetchOptions:
    prep_dir: Path
    pool: str
    image_dir: Path | None = None
    index_dir: Path | None = None
    settings: ExportSettings = ExportSettings()
    workers: int = 0  # processes; 0: every core, at most `requests`
    requests: int = 8  # concurrent range requests in all
    max_gap: int = DEFAULT_MAX_GAP
    max_span: int = DEFAULT_MAX_SPAN
    retry: Retry = field(default_factory=Retry)
    shard: tuple[int, int] = (0, 1)
    ray_address: str | None = None
    use_ray: bool = False
    fsync: bool = True
    progress: bool | None = None
    dry_run: bool = False
    revision: str | None = None  # the pool's repository revision (default: the table's)
    index_revision: str | None = None
    pools_file: Path = POOLS_FILE


def list_tars(pool: Pool, revision: str, retry: Retry) -> tuple[str, dict[str, HubTar]]:
    """(commit, rel -> tar) of the pool's repository at `revision`, in one listing (fetch.hub)."""
    from huggingface_hub import constants

    snap = Hub(retries=retry.attempts).snapshot(pool.repo, pool.repo_type, revision)
    tars = {path: HubTar(HubFile(pool.repo, path, pool.repo_type, snap.commit, constants.ENDPOINT), remote.size,
                         remote.sha256)
            for path, remote in snap.files.items() if path.endswith(".tar")}
    return snap.commit, tars


def _check_token(pool: Pool) -> None:
    from huggingface_hub import get_token

    if pool.gated and not get_token():
        raise FetchError(f"pool {pool.name}: {repo_label(pool.repo, pool.repo_type)} is a gated repository; accept "
                         "its conditions on its hub page, then set HF_TOKEN to an access token of that account "
                         "(or run `hf auth login`) and rerun; nothing was written")


def build_index(pool: Pool, tars: dict[str, HubTar], wanted: list[str], index_dir: Path, opts: FetchOptions):
    """Our shard index for the `wanted` tars (built once each, threads bounded by --requests)."""
    bar = ProgressBar(len(wanted), "indexing tars", disable=opts.progress is False, unit="tar")
    built = 0
    paths = {}

    def one(rel):
        return rel, ensure_hub_index(pool, tars[rel], index_dir, opts.retry)

    with ThreadPoolExecutor(max(1, min(opts.requests, len(wanted) or 1))) as workers:
        for rel, (path, was_built) in workers.map(one, wanted):
            paths[rel] = path
            built += was_built
            bar("built" if was_built else "cached")
    bar.close()
    return paths, built


INDEX_COLUMNS = (("id", "int64"), ("ext", "object"), ("member", "object"), ("offset", "int64"), ("size", "int64"),
                 ("sha256", "object"), ("shard", "int64"))


def _plan(selection, shards, rels, paths):
    """The export's plan over the indexed tars (shards: every tar of the repository)."""
    position = {rel: i for i, rel in enumerate(rels)}
    frames = []
    for rel in sorted(paths):
        frame = read_hub_index(paths[rel])
        frame["shard"] = position[rel]
        frames.append(frame)
    index = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame({c: pd.Series(dtype=t) for c, t in INDEX_COLUMNS}))
    index = resolve_duplicates(index, shards)
    return make_plan(selection, shards, index), index


def run_fetch(opts: FetchOptions) -> dict:
    started = time.perf_counter()
    pool = get_pool(opts.pool, opts.pools_file)
    if opts.index_revision:
        pool = Pool(**{**pool.__dict__, "index_revision": opts.index_revision})
    export_opts = ExportOptions(prep_dir=opts.prep_dir, shard_roots=[], image_dir=opts.image_dir,
                                index_dir=opts.index_dir, settings=opts.settings, workers=opts.workers,
                                shard=opts.shard, ray_address=opts.ray_address, use_ray=opts.use_ray,
                                fsync=opts.fsync, progress=opts.progress)
    prep_dir, image_dir, bucket_params = resolve_outputs(export_opts)
    selection = read_selection(prep_dir)
    _check_token(pool)
    try:
        commit, tars = list_tars(pool, opts.revision or pool.revision, opts.retry)
        if not tars:
            raise FetchError(f"pool {pool.name}: no *.tar in {pool.repo}@{opts.revision or pool.revision}")
        rels = sorted(tars)
        root = f"hf://{pool.repo_type}s/{pool.repo}"
        shards = [make_shard(root, rel, 0, path=f"{root}@{commit}/{rel}") for rel in rels]
        wanted = sorted(pool.candidates(selection["id"].astype("int64").unique(), rels))
        index_dir = Path(opts.index_dir or default_index_dir())
        paths, built = build_index(pool, tars, wanted, index_dir, opts)
        plan, index = _plan(selection, shards, rels, paths)
        # the export tells `beyond_original_range` from `not_in_shards` by the largest id in ALL
        # original/ tars: when that matters, index the original/ tars the routing skipped too
        unrouted = [rel for rel, shard in zip(rels, shards) if shard.kind == "original" and rel not in paths]
        if unrouted and plan.not_found["reason"].isin(["beyond_original_range", "not_in_shards"]).any():
            more, built_more = build_index(pool, tars, unrouted, index_dir, opts)
            paths.update(more)
            built += built_more
            plan, index = _plan(selection, shards, rels, paths)
        wanted = sorted(paths)
        sha_of = {}
        for shard_no, group in index[index["sha256"].notna()].groupby("shard"):
            sha_of[rels[int(shard_no)]] = dict(zip(group["id"].astype("int64").tolist(), group["sha256"].tolist()))

        workers = opts.workers or min(default_workers(), opts.requests)
        per_unit = max(1, opts.requests // max(1, workers))

        def source_for(unit):
            return HubTarSource(tars[unit.shard.rel].file, sha_of.get(unit.shard.rel, {}), opts.max_gap,
                                opts.max_span, per_unit, opts.retry)

        if opts.dry_run:
            return dry_run_report(plan, export_opts, image_dir, bucket_params, tars, opts, pool, commit)
        units = plan.slice(*opts.shard)
        if units:  # an access problem shows here, before a file is written
            get_range(tars[units[0].shard.rel].file, 0, 1, opts.retry)
        summary = export_plan(export_opts, plan, image_dir, bucket_params, workers, started, index_dir=index_dir,
                              indexed=built, source_for=source_for, label="fetch", show_bytes=True)
    except (HfHubHTTPError, requests.RequestException) as exc:  # hub access: one line (fetch.hub)
        raise explain(exc, repo_label(pool.repo, pool.repo_type)) from None
    summary["pool"] = {"name": pool.name, "repo": pool.repo, "commit": commit, "tars_indexed": len(wanted),
                       "index_dir": str(index_dir)}
    return summary


def dry_run_report(plan, export_opts, image_dir, bucket_params, tars, opts, pool, commit) -> dict:
    """What this job (--shard K/N) would still fetch, against the whole tars it touches."""
    state_dir = image_dir / STATE_DIR
    tasks, already_done = make_tasks(plan.slice(*opts.shard), image_dir, state_dir, export_opts, bucket_params)
    totals = {"requests": 0, "bytes": 0, "member_bytes": 0, "gap_bytes": 0}
    for task in tasks:
        for key, value in summarize(coalesce(task.posts, opts.max_gap, opts.max_span)).items():
            totals[key] += value
    touched = sorted({t.shard_rel for t in tasks})
    return {"dry_run": True, "pool": pool.name, "repo": pool.repo, "commit": commit,
            "images": sum(len(t.posts) for t in tasks), "already_done": already_done,
            "not_found": int(len(plan.not_found)), "tars_touched": len(touched),
            "whole_tar_bytes": sum(tars[rel].size for rel in touched), **totals,
            "max_gap": opts.max_gap}


def format_dry_run(report: dict) -> str:
    gib = 2 ** 30
    whole = report["whole_tar_bytes"]
    share = f" ({report['bytes'] / whole:.1%} of them)" if whole else ""
    return "\n".join([
        f"dry run: pool {report['pool']} ({report['repo']}@{report['commit'][:12]})",
        f"  to fetch: {report['images']:,} images, {report['bytes'] / gib:.3f} GiB in {report['requests']:,} range "
        f"requests{share} ({report['member_bytes'] / gib:.3f} GiB of images, {report['gap_bytes'] / gib:.3f} GiB of "
        f"gaps read to save requests, --max-gap {report['max_gap']:,} bytes)",
        f"  the whole tars they are in: {report['tars_touched']:,} tars, {whole / gib:.3f} GiB",
        f"  already done: {report['already_done']:,}; not in the pool: {report['not_found']:,}",
    ])


__all__ = ["FetchError", "FetchOptions", "IndexMismatch", "PoolError", "ExportError", "format_dry_run", "run_fetch"]
