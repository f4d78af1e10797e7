"""The one base class of the errors a user can fix: bad input, a missing tool, a refused resume.

The command lines (kxl_common.cli_support.KxlGroup) show such an error as one line,
`Error: <message>`, and exit 1; anything else is a bug and keeps its traceback. Each module
keeps its own error class (SafetensorsError, RecipeError, ...) and derives it from KxlError,
so a new error joins by its base class, not by a list in every command.
"""
from __future__ import annotations


class KxlError(Exception):
    """A problem with the user's input or environment; the message names the path/field and why."""
