#!/usr/bin/env python3
"""Data prep entry point: the same command line as `kxl-prep` (see `--help`).

    python prepare_dataset.py --demo OUT_DIR
    python prepare_dataset.py prepare SOURCES... --out DIR [--recipe TOML] [--seed N]
"""
from kxl_prep.cli import main

if __name__ == "__main__":
    main()
