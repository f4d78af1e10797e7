"""`kxl-prep export`: danbooru2023 tar shards -> the training image_dir."""
from __future__ import annotations

import sys

import click

from kxl_common.cli_support import InputDir, OutputDir
from kxl_common.shard import HELP as SHARD_HELP
from kxl_prep.export.job import ExportError, ExportOptions, run_export
from kxl_prep.export.plan import parse_shard_spec
from kxl_prep.export.process import ALPHA_MODES, FORMATS, RESAMPLE, RESIZE_MODES, VERIFY_MODES, ExportSettings
from kxl_prep.export.summary import format_summary


def _apply(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


# What happens to each image, shared with `kxl fetch images` (the same settings give the same files).
settings_options = _apply([
    click.option("--format", "fmt", type=click.Choice(FORMATS), default="copy", show_default=True,
                 help="copy keeps the original bytes; webp/jpeg/png re-encode."),
    click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True),
    click.option("--resize", type=click.Choice(RESIZE_MODES), default="none", show_default=True,
                 help="cover: down-size to the size sd-scripts resizes to for the image's bucket; "
                   "crop: also centre-crop to the bucket. Never up-sizes."),
    click.option("--resample", type=click.Choice(tuple(RESAMPLE)), default="area", show_default=True,
                 help="area: OpenCV INTER_AREA, bit-identical to sd-scripts' own down-sizing; box, lanczos: Pillow."),
    click.option("--alpha", type=click.Choice(ALPHA_MODES), default="drop", show_default=True,
                 help="drop: what sd-scripts' convert('RGB') sees; white: composite on white."),
    click.option("--verify", type=click.Choice(VERIFY_MODES), default="full", show_default=True,
                 help="full decodes every copied image (truncated files are rejected); header is faster."),
    click.option("--max-pixels", type=click.IntRange(1), default=ExportSettings.max_pixels, show_default=True,
                 help="Images with more pixels are rejected as decompression bombs."),
    click.option("--webp-method", type=click.IntRange(0, 6), default=4, show_default=True),
    click.option("--jpeg-draft/--no-jpeg-draft", default=True, show_default=True,
                 help="Decode JPEGs at a reduced DCT scale when down-sizing (faster)."),
])

# How the work is spread (--shard K/N, Ray) and made durable, shared with `kxl fetch images`.
run_options = _apply([
    click.option("--shard", "shard_spec", metavar="K/N", help=SHARD_HELP),
    click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
                 help="Run units as Ray tasks (pip install 'kxl[ray]'); ADDRESS of a cluster, or 'auto'."),
    click.option("--no-fsync", is_flag=True, help="Skip fsync (faster; a power cut may lose recent images)."),
])


def settings_from(fmt, quality, resize, resample, alpha, verify, max_pixels, webp_method, jpeg_draft) -> ExportSettings:
    return ExportSettings(format=fmt, quality=quality, resize=resize, resample=resample, alpha=alpha, verify=verify,
                          max_pixels=max_pixels, webp_method=webp_method, jpeg_draft=jpeg_draft)


def ray_options(ray_address) -> dict:
    """use_ray / ray_address of the job options from --ray [ADDRESS]."""
    return {"use_ray": ray_address is not None, "ray_address": None if ray_address == "auto" else ray_address}


@click.command("export")
@click.argument("prep_dir", type=InputDir())
@click.option("--shards", "shard_roots", multiple=True, required=True,
              type=InputDir(),
              help="Directory holding danbooru2023 tars (searched recursively: original/, recent/, "
                   "updates/<date>/, webp-4Mpixel ...). Repeat it; for a post found in several, "
                   "the earlier root wins, and within a root updates > recent > original.")
@click.option("--image-dir", type=OutputDir(),
              help="Where images go [default: the image_dir of PREP_DIR/dataset.toml].")
@click.option("--index-dir", type=OutputDir(),
              help="Shard index cache [default: <first root>/.kxl-index, or ~/.cache/kxl/shard-index].")
@settings_options
@click.option("--workers", type=click.IntRange(0), default=0, help="Processes [default: every core].")
@run_options
@click.option("--index-only", is_flag=True, help="Only build the shard index (e.g. once before an array job).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(prep_dir, shard_roots, image_dir, index_dir, fmt, quality, resize, resample, alpha, verify, max_pixels,
           webp_method, jpeg_draft, workers, shard_spec, ray_address, no_fsync, index_only, quiet):
    """Export the images of PREP_DIR/selection.parquet from the tar shards into the image_dir,
    and rewrite PREP_DIR/meta.json to match the files written. Resumable: run it again after
    any interruption. Rejects go to PREP_DIR/export_rejects.parquet, figures to
    PREP_DIR/export_summary.json."""
    try:
        settings = settings_from(fmt, quality, resize, resample, alpha, verify, max_pixels, webp_method, jpeg_draft)
        opts = ExportOptions(
            prep_dir=prep_dir, shard_roots=list(shard_roots), image_dir=image_dir, index_dir=index_dir,
            settings=settings, workers=workers, shard=parse_shard_spec(shard_spec),
            **ray_options(ray_address), fsync=not no_fsync, progress=False if quiet else None, index_only=index_only,
        )
        summary = run_export(opts)
    except (ExportError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if index_only:
        click.echo(f"index: {summary['indexed_posts']} posts in {summary['shards']} shards "
                   f"({summary['rebuilt']} indexed now) in {summary['index_dir']}")
        return
    click.echo(format_summary(summary))
    if summary["this_run"]["failed_units"]:
        sys.exit(1)

