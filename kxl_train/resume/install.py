"""Registers the exact-resume patches with kxl_train.patches (listed in INSTALLER_MODULES)."""
from __future__ import annotations

from kxl_train import patches


def install_exact_resume(kxl_options: dict, argv: list) -> None:
    from kxl_train.resume import sdscripts  # imports torch and sd-scripts: only when installing

    sdscripts.install(kxl_options, argv)


patches.register(install_exact_resume)
