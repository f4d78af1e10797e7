"""`kxl-prep select-tags`: dry run of a tag-rule data recipe (rev2) on a source.

    kxl-prep select-tags SOURCES... [--recipe epsilon-rev2] [--seed N] [--report-dir DIR]

Reads the source, runs the recipe's tag selection and filters with the step `prepare` uses
(kxl_prep.select.select_and_filter), and prints how many posts each rule matches, the
overlaps between rules, and the final count per rule, per rating and per year. With --report-dir it also writes tag_selection.json (the same
record `prepare` puts in manifest.json under "selection_details"), tag_selection.png and
tag_selection_ids.txt (the final post ids). Writes no dataset.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np

from kxl_common.atomic import write_json, write_text
from kxl_common.cli_support import InputPath, OutputDir
from kxl_prep.recipe import RecipeError, load_recipe
from kxl_prep.tags.rules import METHOD

REV2 = "epsilon-rev2"


@click.command("select-tags")
@click.argument("sources", nargs=-1, required=True, type=InputPath())
@click.option("--recipe", default=REV2, show_default=True,
              help="Data recipe TOML with [selection] method = \"tags\", or a shipped recipe name.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Overrides the recipe's seed.")
@click.option("--fill-after-filter/--filter-after-sampling", default=None,
              help="Select from posts that pass the filters, or filter the selected posts. "
                   "Default: the recipe's [filters] apply.")
@click.option("--count-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply the rules' caps (try a full-size recipe on a sample).")
@click.option("--report-dir", type=OutputDir(), default=None,
              help="Also write tag_selection.json, tag_selection.png and tag_selection_ids.txt here.")
@click.pass_context
def select_tags(ctx, sources, recipe, seed, fill_after_filter, count_scale, report_dir):
    """Dry run: which posts a tag-rule recipe selects from SOURCES, and why."""
    from kxl_prep.select import SelectContext, select_and_filter
    from kxl_prep.sources import SourceError, read_posts
    from kxl_prep.tags.report import TAG_SELECTION_PNG, format_tag_report, plot_tag_report

    progress = ctx.obj.get("progress", True) if ctx.obj else True
    try:
        data_recipe = load_recipe(recipe)
    except RecipeError as exc:
        raise click.ClickException(str(exc)) from exc
    if data_recipe.selection.get("method") != METHOD:
        raise click.ClickException(
            f"{data_recipe.source}: [selection] method is {data_recipe.selection.get('method')!r}; "
            f"select-tags needs method = {METHOD!r}"
        )
    if seed is not None:
        data_recipe = data_recipe.replace(seed=seed)
    if fill_after_filter is not None:
        apply = "before-sampling" if fill_after_filter else "after-sampling"
        data_recipe = data_recipe.replace(filters=dataclasses.replace(data_recipe.filters, apply=apply))

    from kxl_prep.reject_summary import check_sources

    try:
        read = read_posts(list(sources), progress=progress)
    except SourceError as exc:  # a source of no known form: a clean error, like prepare's
        raise click.ClickException(str(exc)) from exc
    unusable, _ = check_sources(read.stats, read.rejects, warn_share=1.0)  # a source that gave no post: as prepare
    if unusable:
        raise click.ClickException("\n".join(unusable))
    posts = read.posts.reset_index(drop=True)
    sel_ctx = SelectContext(seed=data_recipe.seed, count_scale=count_scale,
                            recipe_path=data_recipe.source, progress=progress)
    try:
        chosen = select_and_filter(posts, data_recipe.selection, data_recipe.filters, sel_ctx)
    except RecipeError as exc:
        raise click.ClickException(str(exc)) from exc
    details, filter_counts, kept_rows = chosen.details, chosen.filter_counts, chosen.positions
    details["filters"] = filter_counts
    details["filters_apply"] = data_recipe.filters.apply
    details["recipe"] = {"name": data_recipe.name, "source": data_recipe.source, "sha256": data_recipe.digest()}

    click.echo(f"recipe {data_recipe.name} ({data_recipe.source}), filters {data_recipe.filters.apply}")
    click.echo(format_tag_report(details))
    for name, f in filter_counts.items():
        click.echo(f"  filter {name:<16} removed {f['removed']:,} (matched {f['matched']:,})")
    if report_dir is not None:
        final_ids = np.sort(posts["id"].to_numpy(dtype=np.int64)[kept_rows])
        write_json(report_dir / "tag_selection.json", details)
        plot_tag_report(details, report_dir / TAG_SELECTION_PNG)
        write_text(report_dir / "tag_selection_ids.txt", "".join(f"{i}\n" for i in final_ids))
        click.echo(f"wrote {report_dir}/tag_selection.json, {TAG_SELECTION_PNG}, tag_selection_ids.txt")
