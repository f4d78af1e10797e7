"""Render a recipe + dataset dir + model path into `accelerate launch -m kxl_train.entry ...`.

Single node by default (`--num_processes` = the recipe's `kxl.gpus`, `--multi_gpu` when > 1);
multi-GPU / multi-node go through accelerate's own flags, given after `--`. Every sd-scripts
value goes on the command line (not --config_file), so sd-scripts' parser checks types too.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kxl_common.check_env import installed_bnb_problem, installed_bnb_version
from kxl_train import recipe as recipes

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# accelerate flags kxl sets unless the user's own accelerate arguments name them
ACCELERATE_DEFAULTS = ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend")


class LaunchError(ValueError):
    pass


@dataclass
class LaunchPlan:
    recipe: recipes.Recipe
    values: dict  # sd-scripts values, inputs included, paths resolved
    sd_args: list[str]
    accelerate_args: list[str]
    kxl_options: list[str]
    dataset_batch_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    python: str = sys.executable

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "accelerate.commands.launch", *self.accelerate_args,
                "-m", "kxl_train.entry", *self.sd_args, *self.kxl_options]

    def shell(self) -> str:
        return shlex.join(self.command)

    def resolved_config(self) -> str:
        import tomli_w

        kxl = {k: v for k, v in self.recipe.kxl.items()}
        return tomli_w.dumps({"kxl": kxl, "sdxl_train_network": self.values})

    def summary(self) -> list[str]:
        return self.recipe.summary(self.dataset_batch_size)


def render_args(values: dict, table: dict | None = None) -> list[str]:
    """sd-scripts command-line arguments for validated values (argparse's own syntax)."""
    table = table or recipes.arguments()
    out: list[str] = []
    for key, value in values.items():
        arg = table[key]
        if arg.kind == "bool":
            if value:
                out.append(arg.flag)
            continue
        items = value if isinstance(value, list) else [value]
        out.append(arg.flag)
        out.extend(_render_scalar(v) for v in items)
    return out


def _render_scalar(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def dataset_batch_size(dataset_config: Path) -> int | None:
    """batch_size set in a dataset.toml ([general] or every [[datasets]]), which sd-scripts
    prefers over --train_batch_size; None if it sets none."""
    try:
        with open(dataset_config, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    sizes = {d["batch_size"] for d in data.get("datasets", []) if "batch_size" in d}
    general = data.get("general", {}).get("batch_size")
    if len(sizes) > 1:
        return max(sizes)
    return next(iter(sizes), general)


def _resolve_dataset(dataset: str | os.PathLike) -> Path:
    path = Path(dataset).expanduser().resolve()
    return path / "dataset.toml" if path.is_dir() or not path.suffix else path


def check_bitsandbytes(values: dict) -> None:
    """Refuse a broken bitsandbytes before anything starts, when an 8-bit optimizer is asked for."""
    if "8bit" not in str(values.get("optimizer_type", "")).lower():
        return
    if installed_bnb_version() is None:
        raise LaunchError(f"optimizer_type {values['optimizer_type']} needs bitsandbytes>=0.41.1, "
                          "which is not installed (./setup.sh installs it)")
    problem = installed_bnb_problem()
    if problem:
        raise LaunchError(problem)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_thread_args(accelerate_args: list[str], env: dict | None = None) -> list[str]:
    """`--num_cpu_threads_per_process N` (the cores this machine gives each process) for a CPU
    launch. accelerate 1.6.0's launcher exports OMP_NUM_THREADS=1 to the training process unless
    OMP_NUM_THREADS is set or `--cpu` is given (commands/launch.py `_validate_launch_command`,
    utils/launch.py `prepare_simple_launcher_cmd_env`): on a machine without CUDA that leaves one
    core working. Nothing for GPU launches, a user's own OMP_NUM_THREADS, `--cpu` or thread flag."""
    env = os.environ if env is None else env
    flags = {a.split("=", 1)[0] for a in accelerate_args if a.startswith("--")}
    if env.get("OMP_NUM_THREADS") or flags & {"--cpu", "--num_cpu_threads_per_process"} or cuda_available():
        return []
    values = {}
    for i, token in enumerate(accelerate_args):
        name, eq, value = token.partition("=")
        if name in ("--num_processes", "--num_machines"):
            values[name] = value if eq else (accelerate_args[i + 1:i + 2] or ["1"])[0]
    per_machine = max(int(values.get("--num_processes", 1)) // max(int(values.get("--num_machines", 1)), 1), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ["--num_cpu_threads_per_process", str(max(cores // per_machine, 1))]


def build_plan(recipe_path: str | os.PathLike, *, dataset: str | os.PathLike | None, model: str | None,
               output: str | os.PathLike | None, overrides: list[str] = (), accelerate_args: list[str] = (),
               kxl_options: list[str] = (), gpus: int | None = None, check_paths: bool = True) -> LaunchPlan:
    overrides = list(overrides) + ([f"kxl.gpus={gpus}"] if gpus else [])
    recipe = recipes.load(recipe_path, overrides)
    values = dict(recipe.values)
    warnings: list[str] = []
    inputs = {"dataset": dataset, "model": model, "output": output}
    recipe_keys = {"dataset": "dataset_config", "model": "pretrained_model_name_or_path", "output": "output_dir"}
    for name, given in inputs.items():
        if given is None and recipe_keys[name] not in values:
            raise LaunchError(f"--{name} is required (the recipe does not set {recipe_keys[name]})")
    if dataset is not None:
        values["dataset_config"] = str(_resolve_dataset(dataset))
    if model is not None:
        values["pretrained_model_name_or_path"] = str(Path(model).expanduser().resolve())
    if output is not None:
        values["output_dir"] = str(Path(output).expanduser().resolve())
    if values.get("logging_dir") and not Path(values["logging_dir"]).is_absolute():
        values["logging_dir"] = str(Path(values["output_dir"]) / values["logging_dir"])
    if "network_args" in values:
        values["network_args"] = recipes.resolved_network_args(values, recipe.path)
    problems = []
    if not Path(values["dataset_config"]).is_file():
        problems.append(f"dataset config {values['dataset_config']} does not exist (run kxl-prep first)")
    if not Path(values["pretrained_model_name_or_path"]).exists():
        problems.append(f"model {values['pretrained_model_name_or_path']} does not exist")
    for item in values.get("network_args", []):
        key, value = item.split("=", 1)
        if key == "preset" and value.endswith(".toml") and not Path(value).is_file():
            problems.append(f"LyCORIS preset {value} does not exist")
    if problems and check_paths:
        raise LaunchError("; ".join(problems))
    warnings.extend(problems)
    values = recipes.validate_values(values)  # inputs included
    check_bitsandbytes(values)

    batch = dataset_batch_size(Path(values["dataset_config"]))
    user_flags = {a.split("=", 1)[0] for a in accelerate_args if a.startswith("--")}
    acc: list[str] = []
    defaults = {"--num_processes": str(recipe.gpus), "--num_machines": "1",
                "--mixed_precision": values.get("mixed_precision", "no"), "--dynamo_backend": "no"}
    for flag in ACCELERATE_DEFAULTS:
        if flag not in user_flags:
            acc += [flag, defaults[flag]]
    if recipe.gpus > 1 and "--multi_gpu" not in user_flags:
        acc.append("--multi_gpu")
    acc += cpu_thread_args([*acc, *accelerate_args])
    acc += list(accelerate_args)
    kxl_options = list(kxl_options)
    for option in kxl_options:
        if not option.startswith("--kxl-"):
            raise LaunchError(f"{option!r}: kxl options start with --kxl-")
    if recipe.kxl.get("low_memory_load") and not any(o.split("=")[0] == "--kxl-low-memory-load" for o in kxl_options):
        kxl_options.append("--kxl-low-memory-load")
    return LaunchPlan(recipe=recipe, values=values, sd_args=render_args(values), accelerate_args=acc,
                      kxl_options=kxl_options, dataset_batch_size=batch, warnings=warnings)


def run(plan: LaunchPlan, *, env: dict | None = None) -> int:
    """Start the launch (sd-scripts must be present: the submodule or KXL_SD_SCRIPTS)."""
    from kxl_common.upstream import require_sd_scripts

    require_sd_scripts()
    return subprocess.call(plan.command, env=env)


def parse_with_sd_scripts(sd_args: list[str], sd_scripts: Path):
    """sd-scripts' own parser on rendered arguments (the check tests make)."""
    from kxl_train.sdxl_args import live_parser

    return live_parser(sd_scripts).parse_args(sd_args)
