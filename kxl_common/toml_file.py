"""Read a TOML file the user names, with one clear error for each way it can be wrong."""
from __future__ import annotations

from pathlib import Path

from kxl_common.errors import KxlError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class TomlFileError(KxlError, ValueError):
    pass


def read_toml(path, *, what: str = "TOML file", error: type[Exception] = TomlFileError,
              allow_empty: bool = False) -> dict:
    """The parsed document; `error` (a KxlError) names the path and the problem: missing, a
    folder, not UTF-8 text, not TOML, or (unless allow_empty) holding nothing."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such {what}")
    if path.is_dir():
        raise error(f"{path}: is a folder, not a {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a {what} (not UTF-8 text: byte {exc.object[exc.start]:#04x} at {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None
    if not doc and not allow_empty:
        raise error(f"{path}: is empty (no keys): not a {what}")
    return doc
