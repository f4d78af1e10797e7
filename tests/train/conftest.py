"""Fixtures of the kxl_train tests."""
from __future__ import annotations

import pytest

from kxl_testing.model_stubs import write_sdxl_header_only


@pytest.fixture
def dataset_settings() -> str:
    """Lines of the [[datasets]] table of `inputs`' dataset.toml (a test module overrides it)."""
    return ""


@pytest.fixture
def inputs(tmp_path, dataset_settings):
    """(data dir with a one-subset dataset.toml, a base model file with SDXL keys, the output dir): what
    kxl_train.launch.build_plan checks exists; nothing else is read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.toml").write_text(f'[[datasets]]\n{dataset_settings}  [[datasets.subsets]]\n  metadata_file = "m.json"\n')
    model = tmp_path / "base.safetensors"
    write_sdxl_header_only(model)
    return data, model, tmp_path / "out"
