"""The smallest files that pass kxl's model checks (kxl_common.model_files), for tests that
only render commands and never load a model."""
from __future__ import annotations

from pathlib import Path


def write_sdxl_header_only(path: str | Path) -> Path:
    """A safetensors file with one U-Net and one text-encoder-2 key, as an SDXL checkpoint has."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.diffusion_model.out.2.weight": np.zeros(1, np.float32),
               "conditioner.embedders.1.model.ln_final.weight": np.zeros(1, np.float32)}, str(path))
    return Path(path)
