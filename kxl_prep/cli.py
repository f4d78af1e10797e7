"""kxl-prep: danbooru2023 metadata -> Epsilon captions, buckets, meta.json, dataset.toml.

    kxl-prep prepare SOURCES... --out DIR [--recipe TOML] [--seed N] [--fill-after-filter]
                     [--thresholds FILE] [--image-dir DIR] [--count-scale F]
                     [--reject-warn-share F] [--max-token-length 75|150|225]
                     [--token-sample N] [--token-warn-share F]
    kxl-prep select-tags ... / kxl-prep export ...

`prepare_dataset.py` at the repository root is the same command line plus `--demo OUT_DIR`
(the synthetic sample is test and demo support, kxl_testing.demo).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from kxl_common.cli_support import InputDir, InputFile, InputPath, KxlGroup, OutputDir
from kxl_prep.recipe import DEFAULT_RECIPE, RecipeError
from kxl_prep.tokens import ALLOWED_MAX_TOKEN_LENGTHS, DEFAULT_WARN_SHARE

# The size of danbooru2023 the shipped recipes' quotas are written for; a sample's run scales
# the quotas by sample size / this, so the sample is sampled like the full dump.
DANBOORU2023_POSTS = 7_600_000


def summary_text(manifest: dict) -> str:
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
    tokens = manifest.get("tokens", {})
    if tokens.get("counted"):
        cut = tokens["suffix_cut"]
        what = "sampled " if tokens["sampled"] else ""
        lines.append(f"  caption tokens: {cut['count']:,} of {tokens['counted']:,} {what}captions "
                     f"({100 * cut['share']:.2f}%) over max_token_length {tokens['max_token_length']} "
                     f"(suffix cut); longest {tokens['length']['max']}")
    elif tokens:
        lines.append(f"  caption tokens: not counted ({tokens.get('skipped')})")
    lines.append(f"  buckets in use {len(manifest['buckets']['histogram'])}; total {manifest['timings_s']['total']:.1f} s")
    return "\n".join(lines)


def run_prepare(sources, out, recipe, seed, fill_after_filter, thresholds, image_dir, count_scale, progress,
                reject_warn_share: float = 0.01, max_token_length: int | None = None, token_sample: int = 0,
                token_warn_share: float = DEFAULT_WARN_SHARE) -> dict:
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
            max_token_length=max_token_length,
            token_sample=token_sample,
            token_warn_share=token_warn_share,
        )
    except (PrepError, RecipeError, SourceError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(cls=KxlGroup, invoke_without_command=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, no_progress: bool) -> None:
    """danbooru2023 metadata -> Epsilon captions, buckets and an sd-scripts dataset."""
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not no_progress
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command("prepare")
@click.argument("sources", nargs=-1, required=True, type=InputPath())
@click.option("--out", "out", required=True, type=OutputDir(),
              help="Output directory (meta.json, dataset.toml, manifest.json, ...).")
@click.option("--recipe", default=DEFAULT_RECIPE.stem, show_default=True,
              help="Data recipe TOML, or the name of a shipped one (recipes/data/NAME.toml).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Overrides the recipe's seed.")
@click.option("--fill-after-filter/--filter-after-sampling", default=None,
              help="Fill the quotas from posts that pass the filters, or filter the sampled posts "
                   "(the card's way). Default: the recipe's [filters] apply.")
@click.option("--thresholds", type=InputFile(), default=None,
              help="Pinned quality thresholds: a previous manifest.json or a {rating: [...]} JSON/TOML file.")
@click.option("--image-dir", type=OutputDir(), default=None,
              help="Image directory written into dataset.toml (default: OUT/images).")
@click.option("--count-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply the recipe's quota counts (try a full-size recipe on a sample).")
@click.option("--reject-warn-share", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Warn loudly when a source rejects more than this share of its records "
                   "(a source with every record rejected always stops the run).")
@click.option("--max-token-length", type=click.Choice([str(v) for v in ALLOWED_MAX_TOKEN_LENGTHS]), default=None,
              help="The token budget the captions are counted against; must equal the training recipe's "
                   "max_token_length (75 = sd-scripts' default). Default: the recipe's captions.max_token_length.")
@click.option("--token-sample", type=click.IntRange(min=0), default=0, show_default=True,
              help="Count the tokens of a seeded sample of this many captions (with a 95% interval) instead "
                   "of every caption (0).")
@click.option("--token-warn-share", type=click.FloatRange(0, 1), default=DEFAULT_WARN_SHARE, show_default=True,
              help="Warn loudly when more than this share of the captions are longer than max_token_length "
                   "(they lose the end of their quality / year / meta / rating suffix).")
@click.option("--dry-run", is_flag=True,
              help="Tag-rule recipes: only select, filter and report into OUT, no dataset (= select-tags).")
@click.pass_context
def prepare_cmd(ctx, sources, out, recipe, seed, fill_after_filter, thresholds, image_dir, count_scale,
                reject_warn_share, max_token_length, token_sample, token_warn_share, dry_run):
    """Select, caption and bucket the posts of SOURCES (HakuBooru .db or its parquet tables folder,
    Danbooru .jsonl or .parquet)."""
    if dry_run:
        from kxl_prep.tags.cli import select_tags

        return ctx.invoke(select_tags, sources=sources, recipe=recipe, seed=seed, fill_after_filter=fill_after_filter,
                          count_scale=count_scale, report_dir=out)
    manifest = run_prepare(
        sources, out, recipe, seed, fill_after_filter, thresholds, image_dir, count_scale,
        ctx.obj.get("progress", True) if ctx.obj else True, reject_warn_share,
        None if max_token_length is None else int(max_token_length), token_sample, token_warn_share,
    )
    click.echo(summary_text(manifest))
    click.echo(f"wrote {out}/meta.json, dataset.toml, selection.parquet, manifest.json, report.md")


# Further commands register here (one line each).
from kxl_prep.export.cli import export  # noqa: E402

main.add_command(export)


@main.command("train-records")
@click.argument("data_dir", type=InputDir())
def train_records(data_dir):
    """(Re)write DATA_DIR/train_records.arrow, the trainer's memory-mapped records, from its
    meta.json (for an output made before kxl wrote them, or a meta.json edited by hand)."""
    from kxl_prep.columnar import TRAIN_RECORDS
    from kxl_prep.outputs import rewrite_from_meta

    try:
        written = rewrite_from_meta(data_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise click.ClickException(f"{data_dir}: {exc}") from exc
    click.echo(f"{Path(data_dir) / TRAIN_RECORDS}: {written['rows']} rows, {len(written['buckets'])} buckets")
from kxl_prep.tags.cli import select_tags  # noqa: E402

main.add_command(select_tags)


if __name__ == "__main__":
    sys.exit(main())
