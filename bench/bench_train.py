"""Training benchmark: kxl's launch vs plain sd-scripts on the same scaled Epsilon workload, and
a straight-vs-resumed check (see kxl_testing/bench_train.py and bench/README.md).

  KXL_SD_SCRIPTS=/path/to/sd-scripts python bench/bench_train.py                 # CUDA
  KXL_SD_SCRIPTS=/path/to/sd-scripts python bench/bench_train.py --device cpu --tiny
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kxl_testing.bench_train import main  # noqa: E402

if __name__ == "__main__":
    main()
