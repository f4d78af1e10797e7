"""Resume a kxl run from a saved state directory: replay the command line recorded in its
kxl_resume.json with `--resume STATE_DIR`, in the directory it ran from, on as many processes.

    python -m kxl_train.resume STATE_DIR [--dry-run] [-- EXTRA_SD_SCRIPTS_ARGS...]

Extra arguments are appended (sd-scripts takes the last value); the resumed process compares
its recipe with the state's and refuses any difference before loading the model.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import click

from kxl_train.resume.state import ResumeRefused, read_state


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` occurrences."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == name:
            skip = True
            continue
        if token.startswith(name + "="):
            continue
        out.append(token)
    return out


def kxl_option_args(options: dict) -> list[str]:
    args = []
    for name, value in sorted(options.items()):
        flag = "--kxl-" + name.replace("_", "-")
        args += [flag] if value is True else [f"{flag}={value}"]
    return args


def resume_command(state_dir: Path, extra: list[str], python: str = sys.executable) -> tuple[list[str], Path]:
    record = read_state(state_dir)
    argv = without_option(list(record["argv"]), "--resume")
    if not any(t == "--seed" or t.startswith("--seed=") for t in argv):
        argv += ["--seed", str(record["seed"])]
    argv += ["--resume", str(state_dir.resolve()), *kxl_option_args(record.get("kxl_options", {})), *extra]
    processes = int(record["num_processes"])
    if processes == 1:
        command = [python, "-m", "kxl_train.entry", *argv]
    else:
        command = [python, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                   "--num_machines", "1", "--multi_gpu", "-m", "kxl_train.entry", *argv]
    return command, Path(record.get("cwd") or os.getcwd())


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("state_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def main(state_dir: Path, dry_run: bool, extra: tuple[str, ...]) -> None:
    """Resume training exactly from STATE_DIR (a state saved by a kxl run)."""
    try:
        command, cwd = resume_command(state_dir, list(extra))
    except ResumeRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"cd {shlex.quote(str(cwd))} && {shlex.join(command)}")
    if dry_run:
        return
    sys.exit(subprocess.call(command, cwd=cwd))
