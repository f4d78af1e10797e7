"""kxl-train: validate recipes and launch Epsilon training over sd-scripts.

    kxl-train validate recipes/epsilon-rev1.toml [key=value ...]
    kxl-train preset-from LOKR.safetensors [--out PRESET.toml] [--against PRESET]
    kxl-train launch recipes/epsilon-rev1.toml --dataset DATA --model BASE.safetensors --output OUT \
        [--gpus N] [--dry-run] [key=value ...] [--kxl-NAME[=VALUE] ...] [accelerate flags ...]
    kxl-train resume STATE_DIR [--dry-run] [--accelerate "FLAGS"] [-- EXTRA_SD_SCRIPTS_ARGS...]
    kxl-train lokr-count [--recipe TOML] [--modules]      kxl-train sdxl-args [--write]
    kxl-train tokenizer-cache [DIR]   (the offline CLIP tokenizers; default ~/.cache/kxl/tokenizers)

Extra arguments: `key=value` overrides a recipe value (`kxl.gpus=2` too), `--kxl-*` options go to
kxl_train.entry (run-time patches), any other `--flag [value]` is an accelerate launch flag
(`--num_machines 2 --machine_rank 0 --main_process_ip HOST --main_process_port 29500`).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from kxl_common.cli_support import InputDir, InputFile, KxlGroup, OutputDir, OutputFile
from kxl_train import argv as argvs
from kxl_train import launch as launching
from kxl_train import recipe as recipes


OWN_OPTIONS = {"--dataset", "--model", "--output", "--gpus", "--dry-run"}


def accelerate_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {s for a in launch_command_parser()._actions for s in a.option_strings}


def split_extra(extra: list[str], known_accelerate: set[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """(overrides, kxl options, accelerate args) from the free arguments of `launch`."""
    return argvs.split_extra(extra, known_accelerate, OWN_OPTIONS)


@click.group(cls=KxlGroup)
def main():
    """Recipes and launch for Kohaku XL Epsilon (LyCORIS LoKr over kohya-ss/sd-scripts)."""


@main.command()
@click.argument("recipe", type=InputFile())
@click.argument("overrides", nargs=-1)
def validate(recipe, overrides):
    """Check RECIPE (every key a real sd-scripts argument, types, ranges) and print its batch/steps."""
    try:
        loaded = recipes.load(recipe, list(overrides))
    except recipes.RecipeError as exc:
        raise click.ClickException(str(exc)) from exc
    if "network_module" not in loaded.values:  # e.g. a file of comments only: it would train nothing
        raise click.ClickException(f"{recipe}: sets no network_module: not a training recipe "
                                   "(start from recipes/epsilon-rev1.toml)")
    for line in loaded.summary():
        click.echo(line)
    for line in network_check(loaded):
        click.echo(line)
    click.echo("ok")


def network_check(loaded: recipes.Recipe, *, need: bool = False) -> list[str]:
    """Build the recipe's LyCORIS network on sd-scripts' SDXL (meta device) and stop on a target
    name that matches nothing or a factor that does not divide a layer; lines to print. Without
    sd-scripts the check is skipped with a note (or refused when `need`)."""
    from kxl_common.upstream import SdScriptsNotFound, find_sd_scripts
    from kxl_train.lokr_preset import PresetError, check_recipe_network, one_line, target_lines

    if loaded.values.get("network_module") != "lycoris.kohya":
        return []
    try:
        sd_scripts = find_sd_scripts()
    except SdScriptsNotFound:  # KXL_SD_SCRIPTS names no sd-scripts: a launch stops on it, with the way out
        sd_scripts = None
    if sd_scripts is None:
        if need:
            return []  # launching without sd-scripts stops on its own, with the way to get it
        return ["note: the network check (target names, factors on SDXL's layers) needs sd-scripts: skipped"]
    try:
        count, problems = check_recipe_network(loaded.values, loaded.path, sd_scripts)
    except PresetError as exc:
        raise click.ClickException(str(exc)) from exc
    if problems:
        raise click.ClickException(f"{loaded.path}: " + "; ".join(problems))
    return [f"network: {line}" for line in [one_line(count), *target_lines(count)]]


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.argument("recipe", type=InputFile())
@click.option("--dataset", help="kxl-prep output directory (its dataset.toml) or a dataset .toml.")
@click.option("--model", help="Base SDXL checkpoint (single .safetensors file or diffusers directory).")
@click.option("--output", help="Output directory (LoKr files, states, logs).")
@click.option("--gpus", type=int, help="DDP processes in all (overrides the recipe's kxl.gpus).")
@click.option("--dry-run", is_flag=True, help="Check everything a real launch checks, print the exact command and the "
              "resolved config; start nothing.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def launch(recipe, dataset, model, output, gpus, dry_run, extra):
    """Render RECIPE + dataset + model into `accelerate launch -m kxl_train.entry ...` and run it."""
    overrides, kxl_options, acc = split_extra(list(extra), accelerate_flags())
    try:
        plan = launching.build_plan(recipe, dataset=dataset, model=model, output=output, overrides=overrides,
                                    accelerate_args=acc, kxl_options=kxl_options, gpus=gpus)
    except (recipes.RecipeError, launching.LaunchError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in plan.summary() + network_check(plan.recipe, need=True):
        click.echo(line, err=not dry_run)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        click.echo("# resolved config")
        click.echo(plan.resolved_config().rstrip())
        click.echo("# command")
        click.echo(plan.shell())
        return
    from kxl_common.upstream import SdScriptsNotFound

    try:
        rc = launching.run(plan)
    except SdScriptsNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(rc)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("state_dir", type=InputDir())
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@click.option("--accelerate", "accelerate", default="", metavar="FLAGS",
              help="accelerate launch flags that replace the recorded ones they name, e.g. "
                   "--accelerate '--machine_rank 1' on the second machine of a multi-node run.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def resume(state_dir, dry_run, accelerate, extra):
    """Resume training exactly from STATE_DIR (a state saved by a kxl run): its recorded command line
    with `--resume STATE_DIR`, in the directory it ran from, launched as it was. EXTRA arguments go
    to sd-scripts after the recorded ones (it takes the last value); the resumed run refuses a
    recipe that differs from the state's before the model loads."""
    from kxl_train.resume.state import ResumeRefused

    overrides, kxl_options, acc = split_extra(shlex.split(accelerate), accelerate_flags() if accelerate else None)
    if overrides or kxl_options:
        raise click.UsageError(f"--accelerate takes accelerate launch flags only, not {overrides + kxl_options}")
    try:
        command, cwd = launching.resume_command(state_dir, list(extra), accelerate=acc)
    except ResumeRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"cd {shlex.quote(str(cwd))} && {shlex.join(command)}")
    if dry_run:
        return
    sys.exit(launching.run_resume(command, cwd))


@main.command("lokr-count", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lokr_count(args):
    """Count the LoKr modules / parameters a recipe's preset creates (needs sd-scripts)."""
    from kxl_train.lokr_preset import main as count_main

    count_main(list(args))


@main.command("sdxl-args")
@click.option("--write", is_flag=True, help="Write kxl_train/sdxl_args.json; otherwise print the table.")
def sdxl_args(write):
    """Regenerate the table of sdxl_train_network's arguments from sd-scripts' parser (after a pin
    upgrade; needs sd-scripts)."""
    from kxl_train.sdxl_args import main as table_main

    table_main(["--write"] if write else [])


@main.command("lokr-plan")
@click.option("--write", is_flag=True, required=True,
              help="Write kxl_train/epsilon_lokr_plan.json from sd-scripts' SDXL (needs sd-scripts).")
def lokr_plan(write):
    """Regenerate the committed module plan of recipes/lycoris/epsilon-lokr.toml (after a preset
    change), so preset-from compares without sd-scripts."""
    from kxl_common.upstream import require_sd_scripts
    from kxl_train import preset_from as pf

    click.echo(f"wrote {pf.PLAN_PATH}: {pf.write_plan(require_sd_scripts())} modules")


@main.command("tokenizer-cache")
@click.argument("directory", required=False, type=OutputDir())
def tokenizer_cache(directory):
    """Write the offline CLIP tokenizer cache sd-scripts needs (both SDXL tokenizers, built from
    open-clip-torch's BPE vocabulary: no internet) into DIRECTORY [default: ~/.cache/kxl/tokenizers,
    or $KXL_TOKENIZER_CACHE]. launch and kxl eval generate use the default one without being told."""
    from kxl_common import clip_tokenizer as tk

    target = directory or tk.default_cache_dir()
    tk.make_tokenizer_cache(target)
    click.echo(f"wrote {target}: {', '.join(tk.TOKENIZER_DIRS)}")
    if directory and Path(directory).resolve() != tk.default_cache_dir().resolve():
        where = Path(directory).resolve()
        click.echo(f"(not the default location: set tokenizer_cache_dir=\"{where}\" in the recipe, "
                   f"or {tk.ENV_VAR}={where})")


@main.command("preset-from")
@click.argument("lokr", type=InputFile())
@click.option("--out", "out_path", type=OutputFile(),
              help="Preset TOML to write (default: <LOKR stem>.preset.toml in the current directory).")
@click.option("--against", default=None, metavar="PRESET",
              help="Preset to compare with (default recipes/lycoris/epsilon-lokr.toml).")
@click.option("--no-compare", is_flag=True, help="Only write the preset.")
@click.option("--json", "json_path", type=OutputFile(), help="Also write the comparison as JSON.")
@click.option("--limit", default=12, show_default=True, help="Modules listed per difference.")
@click.option("--per-module", is_flag=True,
              help="One name per module, even where the class-level form (a factor per module class) fits.")
def preset_from(lokr, out_path, against, no_compare, json_path, limit, per_module):
    """Derive the LyCORIS preset of LOKR from its header and show how it differs from our preset.

    With sd-scripts at hand (SDXL's module tree on the meta device) the preset is written the way
    an author writes one: target classes, a factor per module class and the default factor,
    checked by rebuilding the file's keys and shapes with LyCORIS; else one name per module.
    Norm modules (train_norm) are kept."""
    from pathlib import Path

    from kxl_common.atomic import write_json, write_text
    from kxl_train import preset_from as pf

    try:
        shapes, facts = pf.read_shapes(lokr)
        layout, other = pf.layout_from_shapes(shapes)
        if per_module:
            derived = pf.derive_preset(layout, other)
        else:
            derived = pf.derive_best(layout, other, shapes, pf.sdxl_tree(), preferred_factor=pf.recipe_default_factor())
        preset = Path(against) if against else pf.PRESET_PATH
        # compare before writing anything: a bad --against leaves no half-done output
        cmp, source = (None, None) if no_compare else pf.compare_with_preset(layout, preset, pf.norm_modules(other))
    except (pf.PresetFromError, pf.LokrError, pf.SafetensorsError) as exc:
        raise click.ClickException(str(exc)) from exc
    out = Path(out_path) if out_path else Path(Path(lokr).stem + ".preset.toml")
    write_text(out, pf.preset_toml(derived, Path(lokr).name, facts))
    click.echo(f"wrote {out}: {derived.form} form, {derived.modules} LoKr modules, {derived.norms} norm modules, "
               f"{derived.params:,} LoKr params; network_args {' '.join(derived.network_args)}")
    for note in derived.notes:
        click.echo(f"note: {note}")
    if no_compare:
        return
    for line in pf.format_comparison(cmp, Path(lokr).name, f"{preset.name} [{source}]", facts, limit=limit):
        click.echo(line)
    if json_path:
        write_json(json_path, {"file_facts": facts, "preset_path": str(preset), "preset_modules_from": source, **cmp})

if __name__ == "__main__":
    main()
