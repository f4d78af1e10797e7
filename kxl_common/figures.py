"""Writing a matplotlib figure: atomically, without the version tag matplotlib puts in a PNG (so
the same plot gives the same bytes with any matplotlib), and closed afterwards (pyplot keeps every
open figure alive)."""
from __future__ import annotations

import os
from pathlib import Path

from kxl_common.atomic import atomic_open


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> None:
    """Save `fig` to `path` in the format its suffix names (PNG without one) and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    metadata = {"Software": None} if fmt == "png" else None
    try:
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=dpi if dpi is not None else "figure", metadata=metadata)
    finally:
        plt.close(fig)
