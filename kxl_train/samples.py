"""Training-time sample images through sd-scripts' own --sample_prompts / --sample_every_n_steps.

A recipe names its prompt file relative to its own folder (recipes/samples/epsilon-card.txt:
a few of the card's prompts in sd-scripts' text format). Sampling is off on a machine without
CUDA unless the recipe's [kxl] sample_on_cpu = true: one 1024 px SDXL image takes minutes on
a CPU, and CPU runs here are smoke tests.
"""
from __future__ import annotations

from pathlib import Path

SCHEDULE_KEYS = ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_sampling(values: dict, recipe_path: Path, kxl: dict, *, cuda: bool | None = None) -> list[str]:
    """Make a relative sample_prompts absolute (recipe folder) and drop the sampling schedule
    on a CPU-only machine; edits `values` in place, returns warnings."""
    prompts = values.get("sample_prompts")
    if prompts and not Path(prompts).is_absolute():
        values["sample_prompts"] = str((Path(recipe_path).resolve().parent / prompts).resolve())
    scheduled = [k for k in SCHEDULE_KEYS if values.get(k)]
    if not scheduled or kxl.get("sample_on_cpu"):
        return []
    if cuda if cuda is not None else cuda_available():
        return []
    for key in scheduled:
        values.pop(key)
    return [f"no CUDA here: training-time samples are off ({', '.join(scheduled)} dropped; "
            "[kxl] sample_on_cpu = true keeps them)"]
