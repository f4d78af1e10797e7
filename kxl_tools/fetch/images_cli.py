"""`kxl fetch images PREP_DIR --pool NAME` (the click command; the `kxl fetch` group adds it)."""
from __future__ import annotations

import sys

import click

from kxl_common.cli_support import InputDir, OutputDir
from kxl_prep.export.job import ExportError
from kxl_prep.export.plan import parse_shard_spec
from kxl_prep.export.cli import ray_options, run_options, settings_from, settings_options
from kxl_prep.export.summary import format_summary
from kxl_tools.fetch.coalesce import DEFAULT_MAX_GAP, DEFAULT_MAX_SPAN
from kxl_tools.fetch.hub_index import IndexMismatch
from kxl_tools.fetch.images import FetchError, FetchOptions, format_dry_run, run_fetch
from kxl_tools.fetch.pools import PoolError, load_pools
from kxl_tools.fetch.ranged import Retry


@click.command("images")
@click.argument("prep_dir", type=InputDir())
@click.option("--pool", required=True, metavar="NAME",
              help=f"Image pool: {', '.join(sorted(load_pools()))} (kxl_tools/fetch/pools.toml).")
@click.option("--image-dir", type=OutputDir(),
              help="Where images go [default: the image_dir of PREP_DIR/dataset.toml].")
@click.option("--index-dir", type=OutputDir(),
              help="Shard index cache [default: ~/.cache/kxl/hub-index].")
@click.option("--revision", help="Revision of the pool's repository [default: the pool table's].")
@click.option("--index-revision", help="Revision of the index repository [default: the pool table's].")
@settings_options
@click.option("--requests", "n_requests", type=click.IntRange(1), default=8, show_default=True,
              help="Range requests in flight at once, in all.")
@click.option("--max-gap", type=click.IntRange(0), default=DEFAULT_MAX_GAP, show_default=True,
              help="Merge two members into one request when at most this many bytes lie between them.")
@click.option("--max-span", type=click.IntRange(1), default=DEFAULT_MAX_SPAN, show_default=True,
              help="Largest merged request (bytes; held in memory).")
@click.option("--retries", type=click.IntRange(0), default=Retry.attempts, show_default=True,
              help="Retries of a request on 429 / 5xx / a cut connection, with exponential backoff.")
@click.option("--retry-wait", type=click.FloatRange(0), default=Retry.base_wait, show_default=True,
              help="First backoff wait (seconds), doubling up to 30.")
@click.option("--timeout", type=click.FloatRange(0.1), default=Retry.timeout, show_default=True,
              help="Seconds without a byte before a request is retried.")
@click.option("--workers", type=click.IntRange(0), default=0, help="Processes [default: every core, at most --requests].")
@run_options
@click.option("--dry-run", is_flag=True, help="Print the bytes to fetch next to the bytes of the whole tars; fetch nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def images(prep_dir, pool, image_dir, index_dir, revision, index_revision, fmt, quality, resize, resample, alpha,
           verify, max_pixels, webp_method, jpeg_draft, n_requests, max_gap, max_span, retries, retry_wait, timeout,
           workers, shard_spec, ray_address, no_fsync, dry_run, quiet):
    """Fetch the images of PREP_DIR/selection.parquet from the pool's tars on the hub (only the
    selected members, by range requests) into the image_dir, and rewrite PREP_DIR/meta.json to
    match, exactly as `kxl-prep export` over the same tars downloaded whole. Resumable: run it
    again after any interruption. HF_TOKEN for gated pools."""
    try:
        settings = settings_from(fmt, quality, resize, resample, alpha, verify, max_pixels, webp_method, jpeg_draft)
        opts = FetchOptions(
            prep_dir=prep_dir, pool=pool, image_dir=image_dir, index_dir=index_dir, settings=settings,
            workers=workers, requests=n_requests, max_gap=max_gap, max_span=max_span,
            retry=Retry(attempts=retries, base_wait=retry_wait, timeout=timeout), shard=parse_shard_spec(shard_spec),
            **ray_options(ray_address), fsync=not no_fsync, progress=False if quiet else None, dry_run=dry_run, revision=revision,
            index_revision=index_revision)
        summary = run_fetch(opts)
    except (FetchError, PoolError, IndexMismatch, ExportError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc  # OSError: e.g. a full disk while indexing
    if dry_run:
        click.echo(format_dry_run(summary))
        return
    click.echo(format_summary(summary).replace("export:", "fetch:", 1))
    run = summary["this_run"]
    if run["failed_units"] or (summary["exported"] == 0 and summary["pending"] == 0):
        if summary["exported"] == 0 and not run["failed_units"]:
            click.echo("error: nothing was fetched (every selected post was rejected or is not in the pool)", err=True)
        sys.exit(1)

