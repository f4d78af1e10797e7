"""sd-scripts' own modules made importable for kxl_train: its folder on sys.path
(kxl_common.upstream.use_sd_scripts) and torchvision's transforms, which its library imports at
module level (library/utils.py, library/train_util.py). kxl_train.torchvision_compat puts in a
stand-in where no torchvision works; kxl_common stays free of that, as the lowest layer."""
from __future__ import annotations

import os
from pathlib import Path

from kxl_common.upstream import use_sd_scripts
from kxl_train import torchvision_compat


def use_sd_scripts_library(path: str | os.PathLike | None = None) -> Path:
    """use_sd_scripts(path), then the torchvision stand-in where needed; returns the folder."""
    resolved = use_sd_scripts(path)
    torchvision_compat.install()
    return resolved
