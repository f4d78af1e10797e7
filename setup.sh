#!/usr/bin/env bash
# Set up kxl on a fresh machine: a virtual environment in .venv with data prep, the training
# stack that sd-scripts v0.10.1 pins, LyCORIS, bitsandbytes, the eval tools (onnxruntime), the
# hub client of `kxl fetch` and the test tools.
# Usage: ./setup.sh            (idempotent; rerun after pulling)
#        KXL_PYTHON=python3.11 ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
py=${KXL_PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: the CPU build lies on local disk here; a bare `torch` from the
# registry is a multi-GB CUDA build. Set KXL_TORCH to choose another (e.g. "torch==2.6.0").
"${pip[@]}" install -q "${KXL_TORCH:-torch==2.13.0}"
"${pip[@]}" install -q -e ".[train,bench,dev,ray,eval,fetch]"
# open-clip-torch only supplies the CLIP BPE vocabulary (sd-scripts' offline tokenizer cache,
# kxl-prep's caption token count); its
# torchvision dependency would replace torch, so it comes without dependencies.
"${pip[@]}" install -q --no-deps "open-clip-torch>=2.20"
# sd-scripts is a pinned submodule; without network access to GitHub it stays empty and
# data prep still works (training commands explain how to get it).
if git rev-parse --git-dir >/dev/null 2>&1; then
  timeout 300 git submodule update --init third_party/sd-scripts >/dev/null 2>&1 \
    || echo "setup: sd-scripts submodule not fetched (no access to GitHub?); data prep works," \
            "training needs it or KXL_SD_SCRIPTS (see README)." >&2
fi
.venv/bin/python -m kxl_common.check_env
