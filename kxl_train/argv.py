"""Command-line argument lists, read and edited the one way kxl does it everywhere.

Option syntax (argparse's and accelerate's): `--name value` or `--name=value`; a flag is a bare
`--name`. kxl's own options are `--kxl-*`: `--kxl-name value`, `--kxl-name=value`, or a bare
`--kxl-name` (True) when the next token is another option or the end; their names keep no
prefix and use underscores.
"""
from __future__ import annotations

import difflib
import shlex
from typing import Iterable

import click

KXL_PREFIX = "--kxl-"
# `--kxl-accelerate-args=ARGS`: what kxl-train launch ran accelerate with (shell-quoted), handed
# to the entry so that exact resume records it and a resume launches the same way.
ACCELERATE_ARGS = "accelerate_args"


def option_name(option: str) -> str:
    """The option's name: `--name=value` -> `--name`."""
    return option.split("=", 1)[0]


def has_option(argv: Iterable[str], name: str) -> bool:
    return any(option_name(token) == name for token in argv)


def option_value(argv: list[str], name: str) -> str | None:
    """The value of `name VALUE` / `name=VALUE`; the last one, as argparse takes it."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


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


def split_kxl_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Return ({name: value}, remaining argv) with every `--kxl-*` option removed."""
    options: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(KXL_PREFIX):
            body = token[len(KXL_PREFIX):]
            if "=" in body:
                name, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                name, value = body, argv[i + 1]
                i += 1
            else:
                name, value = body, True
            if not name:
                raise SystemExit(f"kxl: empty option name in {token!r}")
            options[name.replace("-", "_")] = value
        else:
            rest.append(token)
        i += 1
    return options, rest


def kxl_option_args(options: dict) -> list[str]:
    """`--kxl-*` arguments for options as split_kxl_options returns them (sorted by name)."""
    args = []
    for name, value in sorted(options.items()):
        flag = KXL_PREFIX + name.replace("_", "-")
        args += [flag] if value is True else [f"{flag}={value}"]
    return args


def accelerate_args_option(args: list[str]) -> str:
    return f"{KXL_PREFIX}{ACCELERATE_ARGS.replace('_', '-')}={shlex.join(args)}"


def accelerate_args_of(options: dict) -> list[str] | None:
    """The accelerate arguments a `--kxl-accelerate-args` option carries, or None."""
    value = options.get(ACCELERATE_ARGS)
    return shlex.split(value) if isinstance(value, str) else None


def split_extra(extra: list[str], known_flags: set[str] | None = None,
                own_options: Iterable[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """(key=value overrides, `--kxl-*` options, other flags with their values) from free
    arguments. With `known_flags`, any other flag is refused, naming the nearest known one
    (`own_options` included in the suggestions)."""
    overrides, kxl, flags = [], [], []
    i = 0
    while i < len(extra):
        token = extra[i]
        if token.startswith(KXL_PREFIX):
            kxl.append(token)
        elif token.startswith("-"):
            flag = option_name(token)
            if known_flags is not None and flag not in known_flags:
                near = difflib.get_close_matches(flag, sorted(known_flags | set(own_options)), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise click.UsageError(f"{flag} is neither a kxl-train option nor an accelerate launch flag{hint}")
            flags.append(token)
            if "=" not in token and i + 1 < len(extra) and not extra[i + 1].startswith("-") \
                    and "=" not in extra[i + 1]:
                flags.append(extra[i + 1])
                i += 1
        elif "=" in token:
            overrides.append(token)
        else:
            raise click.UsageError(f"{token!r}: expected key=value, --kxl-NAME[=VALUE] or an accelerate flag")
        i += 1
    return overrides, kxl, flags


def option_groups(args: list[str]) -> list[list[str]]:
    """Flags with their values: `[--flag, value]`, `[--flag=value]` or a bare `[--flag]`."""
    groups: list[list[str]] = []
    for token in args:
        if not token.startswith("-") and groups and len(groups[-1]) == 1 and "=" not in groups[-1][0]:
            groups[-1].append(token)
        else:
            groups.append([token])
    return groups


def replace_options(args: list[str], replacements: list[str]) -> list[str]:
    """args with every option that `replacements` names taken out, then `replacements` appended."""
    replaced = {option_name(group[0]) for group in option_groups(replacements)}
    kept = [group for group in option_groups(args) if option_name(group[0]) not in replaced]
    return [token for group in kept for token in group] + list(replacements)
