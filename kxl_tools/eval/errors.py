"""One error type for every `kxl eval` input problem (the CLI turns it into a one-line message)."""
from __future__ import annotations

from kxl_common.errors import KxlError


class EvalError(KxlError, ValueError):
    pass
