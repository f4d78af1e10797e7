"""A LyCORIS preset file, read and checked against LyCORIS' own schema (lycoris/config_sdk.py):
the keys it reads, each algorithm's options, the factors. Each problem names the file, the key,
the value and the fix. Used by the recipe check (before a run) and by the counts (lokr_preset).
"""
from __future__ import annotations

import difflib
from pathlib import Path

from kxl_common.errors import KxlError
from kxl_common.lycoris_helpers import lycoris_module
from kxl_common.toml_file import read_toml
from kxl_common.upstream import REPO_ROOT

PRESET_PATH = REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"


class PresetError(KxlError, ValueError):
    """A preset (or network_args) problem: the file, the key, the value and the fix."""


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}?" if match else "valid: " + ", ".join(candidates)


def preset_problems(data: dict, path: str | Path) -> list[str]:
    """What LyCORIS' preset schema (lycoris/config_sdk.py) rejects in `data`, one line each with
    the key, its value and the fix."""
    config_sdk = lycoris_module("config_sdk")
    ALGO_REGISTRY, VALID_PRESET_KEYS = config_sdk.ALGO_REGISTRY, config_sdk.VALID_PRESET_KEYS

    problems = []
    for key, value in data.items():
        if key not in VALID_PRESET_KEYS:
            problems.append(f"{path}: preset key {key} = {value!r} is not one LyCORIS reads; "
                            f"fix: {_closest(key, VALID_PRESET_KEYS)}")
    for table in ("module_algo_map", "name_algo_map"):
        for name, conf in (data.get(table) or {}).items():
            if not isinstance(conf, dict):
                problems.append(f"{path}: [{table}.{name}] = {conf!r} must be a table of algo options")
                continue
            algo = str(conf.get("algo", "")).lower()
            if "algo" in conf and algo not in ALGO_REGISTRY:
                problems.append(f"{path}: [{table}.{name}] algo = {conf['algo']!r} is not a LyCORIS algorithm; "
                                f"fix: {_closest(algo, ALGO_REGISTRY)}")
                continue
            supported = ALGO_REGISTRY[algo].supported_args if "algo" in conf else ()
            for option, value in conf.items():
                if option != "algo" and "algo" in conf and option not in supported:
                    problems.append(f"{path}: [{table}.{name}] {option} = {value!r}: algo {algo!r} takes no "
                                    f"option {option!r}; fix: {_closest(option, supported)}")
            factor = conf.get("factor")
            if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int)
                                       or (factor < 1 and factor != -1)):
                problems.append(f"{path}: [{table}.{name}] factor = {factor!r} is not a Kronecker factor; "
                                "fix: a positive integer that divides the layers (2, 4 or 8 on SDXL), or -1")
    return problems


def load_preset(path: str | Path = PRESET_PATH) -> dict:
    """The preset as LyCORIS reads it; PresetError names what LyCORIS would reject."""
    config_sdk = lycoris_module("config_sdk")
    PresetConfig, PresetValidationError = config_sdk.PresetConfig, config_sdk.PresetValidationError

    data = read_toml(path, what="LyCORIS preset", error=PresetError)
    problems = preset_problems(data, path)
    if problems:
        raise PresetError("; ".join(problems))
    try:  # LyCORIS' own strict check, in case it knows more than the lines above
        PresetConfig.from_dict(data, strict=True)
    except PresetValidationError as exc:
        raise PresetError(f"{path}: {exc}") from None
    return data
