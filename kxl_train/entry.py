"""The process that `accelerate launch` starts: sd-scripts' sdxl_train_network with our patches.

    accelerate launch [accelerate flags] -m kxl_train.entry <sd-scripts args> [--kxl-* options]

Steps: make sd-scripts importable (its folder on sys.path, torchvision's transforms via
kxl_train.sd_scripts_library), take our `--kxl-*` options off the argument list, refuse a
broken bitsandbytes, call every installer in `kxl_train.patches.INSTALLERS`, then run
sdxl_train_network's main exactly as `python sdxl_train_network.py <args>` does (its
`if __name__ == "__main__"` block: setup_parser, parse_args, verify_command_line_training_args,
read_config_from_file, SdxlNetworkTrainer().train).

`--kxl-*` syntax: kxl_train.argv (`--kxl-name value`, `--kxl-name=value`, or a bare `--kxl-name`).
`--kxl-accelerate-args` is what kxl-train launch ran accelerate with; exact resume records it in
kxl_resume.json, so `kxl-train resume` launches the same way.

Options of the installers: exact resume (kxl_train.resume.sdscripts: --kxl-trace, --kxl-resume,
--kxl-inexact-resume, --kxl-upstream-data-order), --kxl-low-memory-load, and
--kxl-no-columnar-data (sd-scripts' own dataset even for a kxl-prep output with
train_records.arrow; kxl_train.dataset).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from kxl_common.check_env import bnb_refusal
from kxl_train.argv import split_kxl_options
from kxl_train.sd_scripts_library import use_sd_scripts_library


def check_bitsandbytes() -> None:
    """Refuse the bitsandbytes releases whose 8-bit optimizers are broken (the card's warning)."""
    problem = bnb_refusal()
    if problem:
        raise SystemExit(f"kxl: {problem}")


def prepare(argv: list[str]) -> tuple[Path, dict, list[str]]:
    """sys.path, options, bnb check and installers; returns (sd-scripts dir, options, argv)."""
    sd_scripts = use_sd_scripts_library()
    options, rest = split_kxl_options(argv)
    check_bitsandbytes()
    from kxl_train import patches

    patches.install_all(options, rest)
    return sd_scripts, options, rest


def run_sdxl_train_network(sd_scripts: Path, argv: list[str]) -> None:
    """sdxl_train_network.py's `__main__` block, with argv as its command line."""
    sys.argv = [str(sd_scripts / "sdxl_train_network.py"), *argv]
    script = importlib.import_module("sdxl_train_network")
    from library import train_util

    parser = script.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = script.SdxlNetworkTrainer()
    trainer.train(args)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    sd_scripts, _options, rest = prepare(argv)
    run_sdxl_train_network(sd_scripts, rest)


if __name__ == "__main__":
    main()
