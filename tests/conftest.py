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


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A started kxl_testing.hub_server.HubServer over tmp_path/"hub", stopped after the test.

    huggingface_hub is pointed at it both ways: HF_ENDPOINT (for child processes and code that
    passes the endpoint it reads) and huggingface_hub's import-time constants (for code that
    relies on the defaults). The user's token, cache and offline switch are kept out: HF_HOME
    and HF_HUB_CACHE go to tmp_path, HF_TOKEN is unset."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants, file_download

    from kxl_testing.hub_server import HubServer

    server = HubServer(tmp_path / "hub").start()
    home = tmp_path / "hf_home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        yield server
    finally:
        server.stop()
