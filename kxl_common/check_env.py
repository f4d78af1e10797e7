"""Print what the environment holds and refuse known-bad versions (run by setup.sh)."""
from __future__ import annotations

import importlib.metadata as md
import sys

from kxl_common.upstream import HOW_TO_GET, find_sd_scripts

# bitsandbytes issue 659: 8-bit optimizers are broken in these releases (the model card's warning).
BAD_BNB = ((0, 36, 0), (0, 41, 0))


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def bnb_version_problem(version: str) -> str | None:
    """A reason to refuse this bitsandbytes version, or None when it is fine."""
    v = _version_tuple(version)
    lo, hi = BAD_BNB
    if lo <= v <= hi:
        return (
            f"bitsandbytes {version} is in 0.36.0..0.41.0, whose 8-bit optimizers (Lion8bit) are "
            "broken (bitsandbytes issue 659); install bitsandbytes>=0.41.1"
        )
    return None


def installed_bnb_version() -> str | None:
    try:
        return md.version("bitsandbytes")
    except md.PackageNotFoundError:
        return None


def installed_bnb_problem() -> str | None:
    """A reason to refuse the installed bitsandbytes, or None (fine, or not installed)."""
    version = installed_bnb_version()
    return bnb_version_problem(version) if version is not None else None


def bnb_refusal(optimizer_type: str | None = None) -> str | None:
    """Why bitsandbytes stops a training run before it starts, or None: the one check of kxl-train
    launch and of the training entry. `optimizer_type` known (the launch): only an 8-bit optimizer
    needs bitsandbytes, installed and not broken. Unknown (None, the entry): a broken installed
    release is refused; a missing one is sd-scripts' to report when an 8-bit optimizer asks."""
    if optimizer_type is not None:
        if "8bit" not in optimizer_type.lower():
            return None
        if installed_bnb_version() is None:
            return (f"optimizer_type {optimizer_type} needs bitsandbytes>=0.41.1, which is not installed "
                    "(./setup.sh installs it)")
    return installed_bnb_problem()


def main() -> int:
    rc = 0
    for name in ("torch", "transformers", "diffusers", "accelerate", "lycoris-lora", "bitsandbytes"):
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            print(f"  {name:14s} not installed")
            continue
        print(f"  {name:14s} {version}")
        if name == "bitsandbytes" and (why := bnb_version_problem(version)):
            print(f"error: {why}", file=sys.stderr)
            rc = 1
    try:
        path = find_sd_scripts()
    except Exception as exc:  # a bad KXL_SD_SCRIPTS is worth a clear line, not a traceback
        path, note = None, str(exc)
    else:
        note = HOW_TO_GET
    print(f"  {'sd-scripts':14s} {path if path else 'absent: ' + note}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
