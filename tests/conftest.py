"""Shared test fixtures. Tests that need sd-scripts use the `sd_scripts` fixture: it skips
with the reason when neither the submodule nor KXL_SD_SCRIPTS provides it."""
from __future__ import annotations

import pytest

from kxl_common.upstream import HOW_TO_GET, find_sd_scripts


@pytest.fixture(scope="session")
def sd_scripts():
    path = find_sd_scripts()
    if path is None:
        pytest.skip(HOW_TO_GET)
    return path
