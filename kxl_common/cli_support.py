"""What every kxl command line shares: one error policy and checked path parameters.

- `KxlGroup`: the click group class of kxl-prep, kxl-train and kxl. A KxlError or an OSError
  raised by any subcommand becomes one `Error: ...` line naming the path and the problem
  (exit 1), never a traceback; `-h` works like `--help`.
- `InputFile` / `InputDir` / `OutputFile` / `OutputDir`: click path types that refuse, before
  the command does any work, a missing or empty input, a file given for a folder (and the
  reverse), and an output that cannot be written (under a file, in a read-only folder). Nothing
  is created by the check, so a refused run leaves nothing behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from kxl_common.errors import KxlError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def describe_os_error(exc: OSError) -> str:
    """`PATH: reason` for an OSError (the reason alone when it names no path)."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    extra = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{extra}: {reason}"


class KxlGroup(click.Group):
    """A click group whose subcommands' known errors print as one line (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("context_settings", dict(CONTEXT_SETTINGS))
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KxlError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(describe_os_error(exc)) from exc


def _writable(path: Path) -> bool:
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def output_problem(path: Path, want_dir: bool) -> str | None:
    """Why `path` cannot be written as a file (want_dir False) or a folder; None when it can."""
    if path.exists():
        if want_dir and not path.is_dir():
            return "exists and is a file, not a folder"
        if not want_dir and path.is_dir():
            return "is a folder, not a file"
        folder = path if want_dir else path.parent
        if not _writable(folder if folder != Path("") else Path(".")):
            return f"cannot write in {folder}: permission denied"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is a file, not a folder"
    if not _writable(ancestor):
        return f"cannot be created: {ancestor} is not writable (permission denied)"
    return None


def check_output(path: str | os.PathLike, want_dir: bool) -> None:
    """Raise KxlError when `path` cannot be written (for callers outside click)."""
    problem = output_problem(Path(path), want_dir)
    if problem:
        raise KxlError(f"{path}: {problem}")


class _Checked(click.Path):
    """click.Path that also runs `extra_check(path) -> problem or None` after its own checks."""

    def convert(self, value, param, ctx):
        converted = super().convert(value, param, ctx)
        problem = self.extra_check(Path(os.fsdecode(converted)))
        if problem:
            self.fail(f"{click.format_filename(converted)}: {problem}", param, ctx)
        return converted

    def extra_check(self, path: Path) -> str | None:  # pragma: no cover - overridden
        return None


class InputFile(_Checked):
    """An existing, readable, non-empty file (allow_empty=True where empty is meaningful)."""

    def __init__(self, allow_empty: bool = False, **kwargs):
        kwargs.setdefault("path_type", Path)
        super().__init__(exists=True, dir_okay=False, readable=True, **kwargs)
        self.allow_empty = allow_empty

    def extra_check(self, path):
        if not self.allow_empty and path.stat().st_size == 0:
            return "is empty"
        return None


class InputDir(_Checked):
    """An existing, readable folder."""

    def __init__(self, **kwargs):
        kwargs.setdefault("path_type", Path)
        super().__init__(exists=True, file_okay=False, readable=True, **kwargs)


class OutputFile(_Checked):
    """A file kxl will write: not a folder, and its folder writable or creatable."""

    def __init__(self, **kwargs):
        kwargs.setdefault("path_type", Path)
        super().__init__(dir_okay=False, **kwargs)

    def extra_check(self, path):
        return output_problem(path, want_dir=False)


class OutputDir(_Checked):
    """A folder kxl will write into: not a file, and writable or creatable."""

    def __init__(self, **kwargs):
        kwargs.setdefault("path_type", Path)
        super().__init__(file_okay=False, **kwargs)

    def extra_check(self, path):
        return output_problem(path, want_dir=True)


class InputPath(_Checked):
    """An existing, readable file (not empty) or folder, e.g. a source that is either."""

    def __init__(self, **kwargs):
        kwargs.setdefault("path_type", Path)
        super().__init__(exists=True, readable=True, **kwargs)

    def extra_check(self, path):
        if path.is_file() and path.stat().st_size == 0:
            return "is empty"
        return None
