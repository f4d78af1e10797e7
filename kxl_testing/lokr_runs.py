"""Training runs on disk as sd-scripts leaves them: LoKr files `NAME-stepNNNNNNNN.safetensors`
and a final `NAME.safetensors`, with chosen factor values (for `kxl compare-run` tests)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def write_lokr_file(path: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int | None = None) -> None:
    """A full-matrix LoKr file: {module: (lokr_w1, lokr_w2)} (alpha 1; full matrix has scale 1)."""
    sd = {}
    for name, (w1, w2) in factors.items():
        sd[f"{name}.lokr_w1"] = w1.contiguous()
        sd[f"{name}.lokr_w2"] = w2.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(1.0, dtype=w1.dtype)
    save_file(sd, str(path), metadata={"ss_steps": str(steps)} if steps is not None else None)


def write_run(directory: str | Path, name: str, steps: dict[int, dict], final: tuple[int, dict] | None = None) -> Path:
    """`steps`: {step: factors}; `final`: (its step, factors) saved as NAME.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for step, factors in steps.items():
        write_lokr_file(directory / f"{name}-step{step:08d}.safetensors", factors, step)
    if final is not None:
        write_lokr_file(directory / f"{name}.safetensors", final[1], final[0])
    return directory
