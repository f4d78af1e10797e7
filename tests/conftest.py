"""Shared test fixtures. Tests that need sd-scripts use the `sd_scripts` fixture: it skips
with the reason when neither the submodule nor KXL_SD_SCRIPTS provides it."""
from __future__ import annotations

import importlib

import pytest

from kxl_common.upstream import HOW_TO_GET, find_sd_scripts, use_sd_scripts


@pytest.fixture(scope="session")
def sd_scripts():
    path = find_sd_scripts()
    if path is None:
        pytest.skip(HOW_TO_GET)
    return path


def _import_sd_scripts_module(sd_scripts, name: str):
    """Import one of sd-scripts' `library.*` modules."""
    use_sd_scripts(sd_scripts)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def train_util(sd_scripts):
    return _import_sd_scripts_module(sd_scripts, "library.train_util")


@pytest.fixture(scope="session")
def config_util(sd_scripts):
    return _import_sd_scripts_module(sd_scripts, "library.config_util")
