#!/usr/bin/env bash
# Kohaku XL Epsilon rev2: recipes/epsilon-rev2.toml rendered into an accelerate launch of
# sd-scripts' sdxl_train_network (--network_module lycoris.kohya) through kxl_train.entry.
#
#   launch/epsilon-rev2.sh --dataset DATA_DIR --model BASE.safetensors --output OUT [--gpus N] [--dry-run] \
#       [key=value ...] [--kxl-NAME[=VALUE] ...] [accelerate flags, e.g. --num_machines 2 --machine_rank 0
#        --main_process_ip HOST --main_process_port 29500]
#
# --dry-run prints the exact command and the resolved config and starts nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${KXL_PYTHON_BIN:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m kxl_train.cli launch "$root/recipes/epsilon-rev2.toml" "$@"
