#!/usr/bin/env bash
# The training benchmark on the GPU machine, in one command, from the repository root with .gpu/
# carried (bench/stage_gpu.sh made it). Installs the staged wheels into /tmp/kxl-site, records the
# versions, builds the random full-size SDXL on the GPU, then runs bench/bench_train.py; the log,
# versions and report.json land in $OUT (or /tmp/kxl-bench-out). Extra arguments go to bench_train.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gpu="$root/.gpu"
py="${KXL_PYTHON_BIN:-$(command -v python3)}"
out="${OUT:-/tmp/kxl-bench-out}"
work="${KXL_BENCH_WORK:-/tmp/kxl-bench}"
mkdir -p "$out" "$work"
[ -d "$gpu/wheels" ] || { echo "no $gpu/wheels: run bench/stage_gpu.sh first and carry .gpu" >&2; exit 2; }
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kxl-site "$gpu"/wheels/*.whl
export PYTHONPATH="/tmp/kxl-site:$root${PYTHONPATH:+:$PYTHONPATH}" KXL_SD_SCRIPTS="$gpu/sd-scripts" \
    KXL_PYTHON_BIN="$py" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$root"
"$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
for name in ("transformers", "tokenizers", "huggingface_hub", "accelerate", "safetensors", "diffusers", "lycoris",
             "bitsandbytes", "lion_pytorch", "einops", "voluptuous", "imagesize", "toml", "ftfy", "cv2", "torchvision"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # report every missing piece, then fail below
        print(name, "MISSING", repr(exc))
PY
model="$work/sdxl_random.safetensors"
if [ ! -f "$model" ]; then  # random weights drawn on the GPU (seconds), streamed to disk
    start=$SECONDS
    "$py" -c "import sys, torch; torch.set_default_device('cuda'); \
from kxl_testing.sdxl_random import make_random_sdxl; make_random_sdxl(sys.argv[1], progress=False)" "$model"
    echo "random SDXL built in $((SECONDS - start)) s: $(du -h "$model" | cut -f1)" | tee "$out/build.txt"
fi
set +e
"$py" bench/bench_train.py --device cuda --work "$work" --model "$model" --tokenizers "$gpu/tokenizers" \
    --timeout 300 "$@" 2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
set -e
cp "$work/report.json" "$out/report.json" 2>/dev/null || true
exit "$rc"
