"""The demo: the synthetic sample (kxl_testing.sample) prepared and exported like danbooru2023.

`prepare_dataset.py --demo OUT_DIR` runs it. The command line `main` is kxl-prep's own commands
(prepare, select-tags, export) plus `--demo`; it lives here, not in kxl_prep, because the
sample is test and demo support that the product never imports.
"""
from __future__ import annotations

from pathlib import Path

import click

from kxl_common.cli_support import KxlGroup

from kxl_prep import cli as prep_cli
from kxl_prep.export.job import ExportError, ExportOptions, run_export
from kxl_prep.export.summary import format_summary
from kxl_testing.sample import make_sample

DEMO_POSTS = 2000


def run_demo(out_dir: Path, *, n_posts: int = DEMO_POSTS, seed: int = 0, progress: bool = True) -> dict:
    """Generate the synthetic sample under out_dir/sample, prepare it into out_dir (quotas
    scaled to the sample's size) and export its images into the dataset's image_dir."""
    out_dir = Path(out_dir)
    click.echo(f"demo: writing a {n_posts}-post synthetic sample to {out_dir / 'sample'}")
    sample = make_sample(out_dir / "sample", n_posts=n_posts, seed=seed)
    manifest = prep_cli.run_prepare(
        [sample.db], out_dir, None, None, None, None, None, n_posts / prep_cli.DANBOORU2023_POSTS, progress,
    )
    click.echo(prep_cli.summary_text(manifest))
    click.echo(f"demo: exporting images from {sample.shards}")
    try:
        summary = run_export(ExportOptions(prep_dir=out_dir, shard_roots=[sample.shards],
                                           progress=None if progress else False))
    except (ExportError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_summary(summary))
    failed = summary["this_run"]["failed_units"]
    if failed:
        raise click.ClickException(f"demo: {failed} export unit(s) failed (run it again to retry them)")
    click.echo(f"demo: done; see {out_dir / 'report.md'} and {out_dir / 'dataset.toml'}")
    return manifest


@click.group(cls=KxlGroup, invoke_without_command=True, commands=dict(prep_cli.main.commands))
@click.option(
    "--demo",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Generate the built-in synthetic sample under DIR/sample, prepare it into DIR and export its images.",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, demo_dir: Path | None, no_progress: bool) -> None:
    """danbooru2023 metadata -> Epsilon captions, buckets and an sd-scripts dataset
    (kxl-prep's commands; --demo runs them on a synthetic sample)."""
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not no_progress
    if demo_dir is not None:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("--demo runs on its own; drop the command after it")
        run_demo(demo_dir, progress=not no_progress)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
