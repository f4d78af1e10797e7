"""The one error a source reader raises for input it cannot read (not per record: those are rejects)."""
from __future__ import annotations

from kxl_common.errors import KxlError


class SourceError(KxlError, ValueError):
    """A source that is not one of the supported forms, or is incomplete; the message names
    the file and what was expected of it."""
