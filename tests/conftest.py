"""Shared test fixtures. Tests that need sd-scripts use the `sd_scripts` fixture: it skips
with the reason when neither the submodule nor KXL_SD_SCRIPTS provides it; `sd_scripts_library`
also makes its modules importable (sys.path, and torchvision's transforms or kxl's stand-in)."""
from __future__ import annotations

import importlib

import pytest

from kxl_common.upstream import HOW_TO_GET, find_sd_scripts


@pytest.fixture(scope="session")
def sd_scripts():
    path = find_sd_scripts()
    if path is None:
        pytest.skip(HOW_TO_GET)
    return path


@pytest.fixture(scope="session")
def sd_scripts_library(sd_scripts):
    """The sd-scripts folder, with its modules importable (`import library.train_util` works)."""
    from kxl_train.sd_scripts_library import use_sd_scripts_library

    return use_sd_scripts_library(sd_scripts)


@pytest.fixture(scope="session")
def train_util(sd_scripts_library):
    return importlib.import_module("library.train_util")


@pytest.fixture(scope="session")
def config_util(sd_scripts_library):
    return importlib.import_module("library.config_util")
