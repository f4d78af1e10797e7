"""Run-time patches of sd-scripts, installed by kxl_train.entry before sd-scripts builds anything.

An installer is a callable `(kxl_options: dict, argv: list[str]) -> None`. `kxl_options` holds the
`--kxl-*` options taken off the command line (name without the `--kxl-` prefix, dashes turned
into underscores; a bare flag is True); `argv` is the sd-scripts argument list (read-only by
convention: an installer that must change it mutates it in place and says why). Installers run
in list order with sd-scripts already on sys.path, so they may import `library.*`,
`train_network` or `sdxl_train_network` and wrap what they need. The submodule is never edited.
"""
from __future__ import annotations

from typing import Callable

from kxl_train.caption_suffix import install as install_keep_caption_suffix
from kxl_train.dataset.install import install_columnar_data
from kxl_train.low_memory import install_low_memory_load
from kxl_train.resume.install import install_exact_resume

Installer = Callable[[dict, list], None]

# columnar data (kxl_train.dataset): kxl-prep outputs load memory-mapped, --kxl-no-columnar-data
# (first: it checks its anchors in sd-scripts' code before other patches wrap it);
# exact resume (kxl_train.resume): deterministic data order, step-exact --resume, --kxl-trace;
# --kxl-low-memory-load (kxl_train.low_memory): the UNet loads straight into the training dtype;
# --kxl-keep-caption-suffix (kxl_train.caption_suffix): over-budget captions drop general tags
INSTALLERS: list[Installer] = [install_columnar_data, install_exact_resume, install_low_memory_load,
                               install_keep_caption_suffix]


def install_all(kxl_options: dict, argv: list[str]) -> None:
    for installer in list(INSTALLERS):
        installer(kxl_options, argv)
