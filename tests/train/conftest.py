"""Fixtures of the kxl_train tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def dataset_settings() -> str:
    """Lines of the [[datasets]] table of `inputs`' dataset.toml (a test module overrides it)."""
    return ""


def write_sdxl_header_only(path) -> None:
    """A tiny file with the SDXL checkpoint keys launch checks for (kxl_common.model_files)."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.diffusion_model.out.2.weight": np.zeros(1, np.float32),
               "conditioner.embedders.1.model.ln_final.weight": np.zeros(1, np.float32)}, str(path))


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
