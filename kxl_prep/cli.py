"""kxl-prep: danbooru2023 metadata -> Epsilon captions, buckets, meta.json, dataset.toml.

    kxl-prep prepare SOURCES... --out DIR [--recipe TOML] [--seed N] [--fill-after-filter]
                     [--thresholds FILE] [--image-dir DIR] [--count-scale F]
                     [--reject-warn-share F]
    kxl-prep --demo OUT_DIR      built-in synthetic sample -> OUT_DIR/sample, prep -> OUT_DIR

`prepare_dataset.py` at the repository root is the same command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from kxl_prep.recipe import DEFAULT_RECIPE, RecipeError

# The size of danbooru2023 the shipped recipes' quotas are written for; the demo scales the
# quotas by sample size / this, so the sample is sampled like the full dump.
DANBOORU2023_POSTS = 7_600_000
DEMO_POSTS = 2000


def _summary(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [
        f"recipe {manifest['recipe']['name']} seed {manifest['seed']} "
        f"(filters {manifest['options']['filters_apply']})",
        f"posts read {c['posts_read']:,}  rejects {c['rejects']:,}  selected {c['selected']:,}  "
        f"images {c['images']:,}",
    ]
    for g in c["per_range"]:
        req = "all" if g["requested"] is None else f"{g['requested']:,}"
        short = f"  (short by {g['short']:,})" if g.get("short") else ""
        lines.append(
            f"  {g['range']:>22}: requested {req}, available {g['available']:,}, "
            f"selected {g['selected']:,}, kept {g['kept']:,}{short}"
        )
    for name, f in c["filters"].items():
        lines.append(f"  filter {name:<16} removed {f['removed']:,} (matched {f['matched']:,})")
    lines.append(f"  buckets in use {len(manifest['buckets']['histogram'])}; total {manifest['timings_s']['total']:.1f} s")
    return "\n".join(lines)


def run_prepare(sources, out, recipe, seed, fill_after_filter, thresholds, image_dir, count_scale, progress,
                reject_warn_share: float = 0.01) -> dict:
    from kxl_prep.pipeline import PrepError, prepare
    from kxl_prep.sources.errors import SourceError

    try:
        return prepare(
            list(sources) if not hasattr(sources, "posts") else sources,
            out,
            recipe=recipe,
            seed=seed,
            fill_after_filter=fill_after_filter,
            thresholds=thresholds,
            image_dir=image_dir,
            count_scale=count_scale,
            progress=progress,
            reject_warn_share=reject_warn_share,
        )
    except (PrepError, RecipeError, SourceError) as exc:
        raise click.ClickException(str(exc)) from exc


def run_demo(out_dir: Path, *, n_posts: int = DEMO_POSTS, seed: int = 0, progress: bool = True) -> dict:
    """Generate the synthetic sample under out_dir/sample, prepare it into out_dir and,
    when the image export is available, export its images."""
    from kxl_prep.sample import make_sample

    out_dir = Path(out_dir)
    click.echo(f"demo: writing a {n_posts}-post synthetic sample to {out_dir / 'sample'}")
    sample = make_sample(out_dir / "sample", n_posts=n_posts, seed=seed)
    manifest = run_prepare(
        [sample.db],
        out_dir,
        None,
        None,
        None,
        None,
        None,
        n_posts / DANBOORU2023_POSTS,
        progress,
    )
    click.echo(_summary(manifest))
    export = main.commands.get("export")
    if export is not None:
        click.echo(f"demo: exporting images from {sample.shards}")
        export.main(_demo_export_args(out_dir, sample, progress), standalone_mode=False)
    else:
        click.echo("demo: image export not available in this build; skipped")
    click.echo(f"demo: done; see {out_dir / 'report.md'} and {out_dir / 'dataset.toml'}")
    return manifest


def _demo_export_args(out_dir: Path, sample, progress: bool) -> list[str]:
    """Arguments of the registered `export` command (kxl_prep.export.cli) for the demo."""
    return [str(out_dir), "--shards", str(sample.shards)] + ([] if progress else ["--quiet"])


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--demo",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Generate the built-in synthetic sample under DIR/sample and prepare it into DIR.",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, demo_dir: Path | None, no_progress: bool) -> None:
    """danbooru2023 metadata -> Epsilon captions, buckets and an sd-scripts dataset."""
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not no_progress
    if demo_dir is not None:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("--demo runs on its own; drop the command after it")
        run_demo(demo_dir, progress=not no_progress)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command("prepare")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (meta.json, dataset.toml, manifest.json, ...).")
@click.option("--recipe", default=DEFAULT_RECIPE.stem, show_default=True,
              help="Data recipe TOML, or the name of a shipped one (recipes/data/NAME.toml).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Overrides the recipe's seed.")
@click.option("--fill-after-filter/--filter-after-sampling", default=None,
              help="Fill the quotas from posts that pass the filters, or filter the sampled posts "
                   "(the card's way). Default: the recipe's [filters] apply.")
@click.option("--thresholds", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Pinned quality thresholds: a previous manifest.json or a {rating: [...]} JSON/TOML file.")
@click.option("--image-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Image directory written into dataset.toml (default: OUT/images).")
@click.option("--count-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply the recipe's quota counts (try a full-size recipe on a sample).")
@click.option("--reject-warn-share", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Warn loudly when a source rejects more than this share of its records "
                   "(a source with every record rejected always stops the run).")
@click.option("--dry-run", is_flag=True,
              help="Tag-rule recipes: only select, filter and report into OUT, no dataset (= select-tags).")
@click.pass_context
def prepare_cmd(ctx, sources, out, recipe, seed, fill_after_filter, thresholds, image_dir, count_scale,
                reject_warn_share, dry_run):
    """Select, caption and bucket the posts of SOURCES (HakuBooru .db or its parquet tables folder,
    Danbooru .jsonl or .parquet)."""
    if dry_run:
        from kxl_prep.tags.cli import select_tags

        return ctx.invoke(select_tags, sources=sources, recipe=recipe, seed=seed, fill_after_filter=fill_after_filter,
                          count_scale=count_scale, report_dir=out)
    manifest = run_prepare(
        sources, out, recipe, seed, fill_after_filter, thresholds, image_dir, count_scale,
        ctx.obj.get("progress", True) if ctx.obj else True, reject_warn_share,
    )
    click.echo(_summary(manifest))
    click.echo(f"wrote {out}/meta.json, dataset.toml, selection.parquet, manifest.json, report.md")


# Further commands register here (one line each).
from kxl_prep.export.cli import export  # noqa: E402

main.add_command(export)
from kxl_prep.tags.cli import select_tags  # noqa: E402

main.add_command(select_tags)


if __name__ == "__main__":
    sys.exit(main())
