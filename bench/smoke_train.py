"""Offline CPU smoke training of the Epsilon recipe with real sd-scripts; prints step time and
peak memory.  KXL_SD_SCRIPTS=/path/to/sd-scripts python bench/smoke_train.py [--work DIR] [--steps 3]
[--lock /path/to/lockfile]   (see kxl_testing/train_smoke.py)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's code first, installed or not

from kxl_testing.train_smoke import main  # noqa: E402 - after the sys.path line

if __name__ == "__main__":
    main()
