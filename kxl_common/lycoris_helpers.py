"""LyCORIS' pure helpers (factorization, the preset schema) without bitsandbytes.

`import lycoris.<anything>` runs lycoris/__init__, which imports its modules and, through
lycoris.utils.quant, bitsandbytes; on a machine without CUDA kernels bitsandbytes then logs
"Failed to load CPU gemm_4bit_forward ..." to stderr. Commands that only read a header (preset-from,
inspect --preset, validate) need none of it: they import LyCORIS here, with bitsandbytes
hidden for the length of the import (LyCORIS then treats quantized layers as unsupported, which
these commands never meet). Training imports LyCORIS the ordinary way, in its own process.
"""
from __future__ import annotations

import contextlib
import importlib
import sys


@contextlib.contextmanager
def _without_bitsandbytes():
    if "bitsandbytes" in sys.modules:  # already loaded by someone who needs it: nothing to hide
        yield
        return
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError meanwhile
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]


def lycoris_module(name: str):
    """`lycoris.<name>` imported without bitsandbytes (when lycoris is not loaded yet)."""
    with _without_bitsandbytes():
        return importlib.import_module(f"lycoris.{name}")
