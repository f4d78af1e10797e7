"""The file names of a run's saves, as sd-scripts writes them and the rev1 release uses them:
LoKr step files `{name}-step{step:08d}.safetensors` (the final one `{name}.safetensors`) and
full checkpoints `{name}-{step}step.safetensors` (`kohaku-xl-epsilon-13600step.safetensors`).
Shared by `kxl compare-run` (kxl_tools.trajectory) and `kxl fetch release`; torch-free."""
from __future__ import annotations

import re

STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d+)\.safetensors$")
CHECKPOINT_FILE = re.compile(r"^(?P<name>.+)-(?P<step>\d+)step\.safetensors$")
