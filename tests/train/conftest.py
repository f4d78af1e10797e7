"""Fixtures of the kxl_train tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def dataset_settings() -> str:
    """Lines of the [[datasets]] table of `inputs`' dataset.toml (a test module overrides it)."""
    return ""


@pytest.fixture
def inputs(tmp_path, dataset_settings):
    """(data dir with a one-subset dataset.toml, an empty base model file, the output dir): what
    kxl_train.launch.build_plan checks exists; nothing else is read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.toml").write_text(f'[[datasets]]\n{dataset_settings}  [[datasets.subsets]]\n  metadata_file = "m.json"\n')
    model = tmp_path / "base.safetensors"
    model.write_bytes(b"")
    return data, model, tmp_path / "out"
