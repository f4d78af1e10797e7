"""`kxl`: compare (files or whole runs), merge and inspect LoKr files and SDXL single-file checkpoints;
`kxl eval` benchmarks a model; `kxl fetch` gets what a run needs from the hub."""
from __future__ import annotations

from pathlib import Path

import click

from kxl_common.atomic import write_json, write_text
from kxl_common.model_files import check_sdxl_checkpoint
from kxl_common.cli_support import InputDir, InputFile, KxlGroup, OutputDir, OutputFile


def _fail_clean(fn):
    """Known input problems become a one-line click error, not a traceback."""
    import functools

    from .keys import KeyMapError
    from .lokr import LokrError
    from .merge import MergeError
    from .sources import SourceError
    from .st_io import SafetensorsError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KeyMapError, LokrError, MergeError, SourceError, SafetensorsError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group(cls=KxlGroup)
def main():
    """LoKr / SDXL checkpoint tools: compare (files), compare-run (whole runs), merge, inspect,
    eval (the card's CCIP benchmark), and fetch (metadata, images, the release and CCIP from the
    hub). Tensors are streamed."""


@main.command()
@click.argument("a", type=InputFile())
@click.argument("b", type=InputFile())
@click.option("--base", type=InputFile(),
              help="Base SDXL checkpoint: a full checkpoint is compared as W - W_base.")
@click.option("--out", "out_dir", type=OutputDir(), default=Path("kxl-compare"),
              show_default=True, help="Directory for compare.json, compare.txt and compare.png.")
@click.option("--top", default=20, show_default=True, help="Modules listed with the largest difference.")
@click.option("--same-rel", default=0.01, show_default=True, help="SAME: overall relative Frobenius difference at most this.")
@click.option("--close-cosine", default=0.90, show_default=True, help="CLOSE: overall cosine at least this ...")
@click.option("--close-ratio", default=1.25, show_default=True, help="... and norm ratio within [1/r, r].")
@click.option("--related-cosine", default=0.50, show_default=True, help="RELATED: overall cosine at least this.")
@click.option("--no-plot", is_flag=True, help="Skip the plot.")
@_fail_clean
def compare(a, b, base, out_dir, top, same_rel, close_cosine, close_ratio, related_cosine, no_plot):
    """Compare A with B (the reference), module by module.

    A and B are each a LoKr safetensors file (sd-scripts / LyCORIS names) or an SDXL
    single-file checkpoint. Prints per-block totals, the worst modules and a verdict line.
    """
    from .compare import Thresholds, compare_files, format_table, json_safe, plot

    if base is not None:
        check_sdxl_checkpoint(base, role="--base")
    th = Thresholds(same_rel=same_rel, close_cosine=close_cosine, close_ratio=close_ratio, related_cosine=related_cosine)
    report = compare_files(a, b, base, th)
    table = format_table(report, top=top)
    write_json(out_dir / "compare.json", json_safe(report))
    write_text(out_dir / "compare.txt", table + "\n")
    if not no_plot:
        plot(report, out_dir / "compare.png")
    click.echo(table)
    click.echo(f"written: {out_dir / 'compare.json'}, {out_dir / 'compare.txt'}" + ("" if no_plot else f", {out_dir / 'compare.png'}"))


@main.command("compare-run")
@click.argument("mine", type=InputDir())
@click.argument("released", type=InputDir())
@click.option("--base", type=InputFile(),
              help="Base SDXL checkpoint: also compare each released full checkpoint (NAME-<step>step.safetensors) "
                   "with BASE + the LoKr of its step.")
@click.option("--out", "out_dir", type=OutputDir(), default=Path("kxl-compare-run"),
              show_default=True, help="Directory for trajectory.json, trajectory.txt and trajectory.png.")
@click.option("--mine-name", help="Output name of my run, when MINE holds step files of several.")
@click.option("--released-name", help="Output name of the released run, when RELEASED holds several.")
@click.option("--total-only", is_flag=True, help="Print the TOTAL table only (the files have every block).")
@click.option("--no-plot", is_flag=True, help="Skip the plot.")
@_fail_clean
def compare_run(mine, released, base, out_dir, mine_name, released_name, total_only, no_plot):
    """Compare my run's LoKr files with the released run's, step by step.

    Pairs MINE/NAME-stepNNNNNNNN.safetensors with the same step in RELEASED; a final
    NAME.safetensors counts at the step its ss_steps metadata names (two finals of different
    steps are not paired with each other). Per block: distance, cosine, norm ratio and each
    run's own movement since its previous file. Steps saved by one side only are listed.
    """
    from .compare import json_safe
    from .trajectory import compare_runs, format_report, plot

    if base is not None:  # checked now, not only when a released full checkpoint needs it
        check_sdxl_checkpoint(base, role="--base")
    report = compare_runs(mine, released, base, mine_name, released_name)
    write_json(out_dir / "trajectory.json", json_safe(report))
    write_text(out_dir / "trajectory.txt", format_report(report) + "\n")
    if not no_plot:
        plot(report, out_dir / "trajectory.png")
    click.echo(format_report(report, blocks=not total_only))
    click.echo(f"written: {out_dir / 'trajectory.json'}, {out_dir / 'trajectory.txt'}" + ("" if no_plot else f", {out_dir / 'trajectory.png'}"))


@main.command()
@click.argument("base", type=InputFile())
@click.argument("lokr", type=InputFile())
@click.argument("out", type=OutputFile())
@click.option("--multiplier", "-m", default=1.0, show_default=True, help="Strength of the LoKr delta.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32", "keep"]), default="fp16", show_default=True,
              help="Output dtype of float tensors (keep: as in BASE).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_fail_clean
def merge(base, lokr, out, multiplier, dtype, overwrite):
    """Bake LOKR into the single-file SDXL checkpoint BASE, writing OUT."""
    from .merge import merge as do_merge

    if out.exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    res = do_merge(base, lokr, out, multiplier=multiplier, dtype=dtype)
    click.echo(f"wrote {res['out']}: {res['tensors']} tensors, {res['modules_merged']} LoKr modules merged "
               f"(multiplier {res['multiplier']:g}, {res['dtype']})")


@main.command()
@click.argument("file", type=InputFile())
@click.option("--modules", "show_modules", is_flag=True, help="List every module with its factors.")
@click.option("--json", "json_path", type=OutputFile(), help="Also write the report as JSON.")
@click.option("--preset", "preset", is_flag=False, flag_value="epsilon", default=None, metavar="[PRESET]",
              help="LoKr: compare modules and factors with a LyCORIS preset (alone: recipes/lycoris/epsilon-lokr.toml).")
@_fail_clean
def inspect(file, show_modules, json_path, preset):
    """Modules, algorithms, factors, shapes, parameters, dtypes, size and ss_* metadata of FILE."""
    from .inspect import format_report, inspect_file, preset_comparison

    report = inspect_file(file)
    if preset is not None:
        report["preset_comparison"] = preset_comparison(file, report, None if preset == "epsilon" else Path(preset))
    click.echo(format_report(report, modules=show_modules))
    if json_path:
        write_json(json_path, report)


from .eval.cli import eval_group  # noqa: E402 - the subcommand group lives with its package

main.add_command(eval_group)

from .fetch.cli import fetch_group  # noqa: E402 - the subcommand group lives with its package

main.add_command(fetch_group)

if __name__ == "__main__":
    main()
