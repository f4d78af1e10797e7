#!/usr/bin/env bash
# Resume a kxl training run exactly from a state directory saved with --save_state:
#   launch/resume.sh STATE_DIR [--dry-run] [--accelerate "FLAGS"] [-- extra sd-scripts args]
# = kxl-train resume: replays the recorded command line with --resume STATE_DIR, launched with the
# recorded accelerate arguments (--accelerate "--machine_rank 1" on another machine of a multi-node
# run); the run refuses a state whose recipe (lr schedule, batch sizes, dataset, seed) differs from
# its own. See docs/resume.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${KXL_PYTHON:-$repo/.venv/bin/python}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m kxl_train.cli resume "$@"
