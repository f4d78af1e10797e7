#!/usr/bin/env python3
"""Data prep entry point: kxl-prep's command line (see `--help`) plus the demo.

    python prepare_dataset.py --demo OUT_DIR
    python prepare_dataset.py prepare SOURCES... --out DIR [--recipe TOML] [--seed N]
"""
from kxl_testing.demo import main

if __name__ == "__main__":
    main()
