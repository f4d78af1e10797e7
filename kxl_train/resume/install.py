"""The exact-resume installer listed in kxl_train.patches.INSTALLERS (cheap to import: torch
and sd-scripts are imported only when it runs)."""
from __future__ import annotations


def install_exact_resume(kxl_options: dict, argv: list) -> None:
    from kxl_train.resume import sdscripts

    sdscripts.install(kxl_options, argv)
