"""The columnar-data installer listed in kxl_train.patches.INSTALLERS (cheap to import:
sd-scripts is imported only when it runs)."""
from __future__ import annotations


def install_columnar_data(kxl_options: dict, argv: list) -> None:
    from kxl_train.dataset import sdscripts

    sdscripts.install(kxl_options, argv)
