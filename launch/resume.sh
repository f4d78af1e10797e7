#!/usr/bin/env bash
# Resume a kxl training run exactly from a state directory saved with --save_state:
#   launch/resume.sh STATE_DIR [--dry-run] [-- extra sd-scripts args]
# Replays the recorded command line with --resume STATE_DIR; the run refuses a state whose
# recipe (lr schedule, batch sizes, dataset, seed) differs from its own. See docs/resume.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${KXL_PYTHON:-$repo/.venv/bin/python}"
exec "$python" -m kxl_train.resume "$@"
