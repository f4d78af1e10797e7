"""Where kohya-ss/sd-scripts lives: the pinned submodule, or KXL_SD_SCRIPTS."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from kxl_common.errors import KxlError

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBMODULE = REPO_ROOT / "third_party" / "sd-scripts"
PINNED_TAG = "v0.10.1"
PINNED_COMMIT = "ae72efb92babe89ff8e70f057e42db68440e8d61"
ENV_VAR = "KXL_SD_SCRIPTS"

HOW_TO_GET = (
    f"sd-scripts {PINNED_TAG} not found. Either run `git submodule update --init "
    f"third_party/sd-scripts` (needs access to GitHub) or point {ENV_VAR} at a checkout of "
    f"kohya-ss/sd-scripts at {PINNED_COMMIT}."
)


class SdScriptsNotFound(KxlError, RuntimeError):
    pass


def _looks_like_sd_scripts(path: Path) -> bool:
    return (path / "sdxl_train_network.py").is_file() and (path / "library").is_dir()


def find_sd_scripts() -> Path | None:
    """Return the sd-scripts directory, or None. KXL_SD_SCRIPTS wins over the submodule."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.exists():
            raise SdScriptsNotFound(f"{ENV_VAR}={env}: does not exist")
        if not path.is_dir():
            raise SdScriptsNotFound(f"{ENV_VAR}={env}: is a file, not the sd-scripts folder")
        if not _looks_like_sd_scripts(path):
            raise SdScriptsNotFound(
                f"{ENV_VAR}={env} does not look like sd-scripts (no sdxl_train_network.py / library/)"
            )
        return path
    if _looks_like_sd_scripts(SUBMODULE):
        return SUBMODULE
    return None


def require_sd_scripts() -> Path:
    path = find_sd_scripts()
    if path is None:
        raise SdScriptsNotFound(HOW_TO_GET)
    return path


def use_sd_scripts(path: str | os.PathLike | None = None) -> Path:
    """Put sd-scripts' folder on sys.path (the given one, else the one require_sd_scripts finds).
    Its library also imports torchvision at module level: training code uses
    kxl_train.sd_scripts_library, which adds a stand-in where no torchvision works."""
    resolved = Path(path).resolve() if path is not None else require_sd_scripts()
    if str(resolved) not in sys.path:
        sys.path.insert(0, str(resolved))
    return resolved
