"""sdxl_train_network's arguments, as a committed table, so recipes validate without sd-scripts.

`kxl_train/sdxl_args.json` is generated from sd-scripts' real parser
(sdxl_train_network.setup_parser):  kxl-train sdxl-args --write
A gated test regenerates it from the live parser and compares, so a pin upgrade is caught.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kxl_common.atomic import write_json
from kxl_common.upstream import PINNED_COMMIT
from kxl_train.sd_scripts_library import use_sd_scripts_library

TABLE_PATH = Path(__file__).with_name("sdxl_args.json")


def _kind(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool"
    if action.type is None:
        return "str"
    return {"str": "str", "int": "int", "float": "float", "Path": "path",
            "int_or_float": "int_or_float"}.get(getattr(action.type, "__name__", ""), "str")


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def table_from_parser(parser: argparse.ArgumentParser) -> dict:
    arguments = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        arguments[action.dest] = {
            "flag": max(action.option_strings, key=len),
            "kind": _kind(action),
            "nargs": action.nargs if action.nargs in ("*", "+", "?") else None,
            "choices": _jsonable(list(action.choices)) if action.choices is not None else None,
            "default": _jsonable(action.default),
        }
    return {"script": "sdxl_train_network.py", "sd_scripts_commit": PINNED_COMMIT,
            "arguments": dict(sorted(arguments.items()))}


def live_parser(sd_scripts: Path) -> argparse.ArgumentParser:
    use_sd_scripts_library(sd_scripts)
    import sdxl_train_network

    return sdxl_train_network.setup_parser()


def load_table(path: Path = TABLE_PATH) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> None:
    import click

    from kxl_common.upstream import require_sd_scripts

    @click.command()
    @click.option("--write", is_flag=True, help=f"Write {TABLE_PATH.name}; otherwise print it.")
    def cli(write):
        """Regenerate the table of sdxl_train_network arguments from sd-scripts' parser."""
        table = table_from_parser(live_parser(require_sd_scripts()))
        if write:
            write_json(TABLE_PATH, table)
            click.echo(f"{TABLE_PATH}: {len(table['arguments'])} arguments")
        else:
            click.echo(json.dumps(table, indent=2))

    cli.main(args=argv, standalone_mode=True)
