#!/usr/bin/env bash
# Stage the GPU benchmark's inputs into .gpu/ (ignored by git; the device tool carries it):
# sd-scripts' files, the offline tokenizer cache, the wheels of bench/gpu_wheels.txt.
#   KXL_SD_SCRIPTS=/path/to/sd-scripts bench/stage_gpu.sh [--tokenizers DIR] [--wheels-from DIR] [--cuda 130,132]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${KXL_PYTHON_BIN:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m kxl_testing.gpu_stage --dest "$root/.gpu" "$@"
