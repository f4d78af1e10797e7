"""One error type for every `kxl eval` input problem (the CLI turns it into a one-line message)."""
from __future__ import annotations


class EvalError(ValueError):
    pass
