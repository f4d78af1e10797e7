"""The one way kxl starts training: `accelerate launch -m kxl_train.entry ...`, for a new run
(a recipe + dataset dir + model path) and for a resume (a state's kxl_resume.json).

Single node by default (`--num_processes` = the recipe's `kxl.gpus`, `--multi_gpu` when > 1);
multi-GPU / multi-node go through accelerate's own flags, given after `--`. Every sd-scripts
value goes on the command line (not --config_file), so sd-scripts' parser checks types too.
The accelerate arguments also go to the entry (`--kxl-accelerate-args`), which records them in
every saved state, so a resume launches as the run did, on every machine of a multi-node run.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kxl_common.cli_support import output_problem
from kxl_common.errors import KxlError
from kxl_common.model_files import check_sdxl_checkpoint
from kxl_common.toml_file import read_toml
from kxl_common.check_env import bnb_refusal
from kxl_train import recipe as recipes
from kxl_train.argv import accelerate_args_option, has_option, kxl_option_args, option_name, option_value, \
    replace_options, without_option

# accelerate flags kxl sets unless the user's own accelerate arguments name them
ACCELERATE_DEFAULTS = ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend")
ENTRY = "kxl_train.entry"


class LaunchError(KxlError, ValueError):
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
        return accelerate_command(self.accelerate_args, [*self.sd_args, *self.kxl_options], self.python)

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
    if not Path(dataset_config).is_file():
        return None  # a dry run for elsewhere: reported as a missing input already
    data = read_toml(dataset_config, what="dataset config", error=LaunchError, allow_empty=True)
    sizes = {d["batch_size"] for d in data.get("datasets", []) if "batch_size" in d}
    general = data.get("general", {}).get("batch_size")
    if len(sizes) > 1:
        return max(sizes)
    return next(iter(sizes), general)


def _resolve_dataset(dataset: str | os.PathLike) -> Path:
    path = Path(dataset).expanduser().resolve()
    if path.is_file() and path.suffix != ".toml":
        raise LaunchError(f"--dataset {dataset}: is a file, not a kxl-prep output folder or a dataset .toml")
    return path / "dataset.toml" if path.is_dir() or not path.suffix else path


def token_budget_mismatch(values: dict) -> str | None:
    """A warning when kxl-prep counted the dataset's captions against another max_token_length
    than this run trains with (its manifest.json "tokens"): the report's suffix counts then do
    not describe this run."""
    manifest = Path(values["dataset_config"]).with_name("manifest.json")
    try:
        counted = json.loads(manifest.read_text(encoding="utf-8")).get("tokens", {}).get("max_token_length")
    except (OSError, ValueError, AttributeError):
        return None
    trained = values.get("max_token_length") or 75  # sd-scripts' default when unset
    if counted is None or counted == trained:
        return None
    return (f"{manifest.parent} was counted against max_token_length {counted} (kxl-prep, manifest.json \"tokens\") "
            f"but this run trains with {trained}: its report's caption-suffix counts do not apply; rerun kxl-prep "
            f"prepare with --max-token-length {trained}, or set max_token_length = {counted} in the recipe")


def check_bitsandbytes(values: dict) -> None:
    """Refuse a broken bitsandbytes before anything starts, when an 8-bit optimizer is asked for."""
    problem = bnb_refusal(str(values.get("optimizer_type", "")))
    if problem:
        raise LaunchError(problem)


def attention_problems(values: dict) -> list[str]:
    """--xformers (kxl.attention = "xformers", the author's choice) needs the xformers package."""
    import importlib.util

    if values.get("xformers") and importlib.util.find_spec("xformers") is None:
        return ['attention "xformers" (kxl.attention) needs the xformers package, which is not installed; '
                "fix: install an xformers build for this torch, or kxl.attention=sdpa"]
    return []


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


def accelerate_launch_args(processes: int, mixed_precision: str, user_args: list[str] = ()) -> list[str]:
    """accelerate launch arguments: kxl's defaults for what `user_args` does not name, then them."""
    user_flags = {option_name(a) for a in user_args if a.startswith("--")}
    defaults = {"--num_processes": str(processes), "--num_machines": "1",
                "--mixed_precision": mixed_precision, "--dynamo_backend": "no"}
    acc: list[str] = []
    for flag in ACCELERATE_DEFAULTS:
        if flag not in user_flags:
            acc += [flag, defaults[flag]]
    if processes > 1 and "--multi_gpu" not in user_flags:
        acc.append("--multi_gpu")
    acc += cpu_thread_args([*acc, *user_args])
    return acc + list(user_args)


def accelerate_command(acc: list[str], entry_argv: list[str], python: str = sys.executable) -> list[str]:
    """`accelerate launch ACC -m kxl_train.entry ARGV`, the accelerate arguments handed on too."""
    return [python, "-m", "accelerate.commands.launch", *acc, "-m", ENTRY, accelerate_args_option(acc),
            *entry_argv]


def _use_tokenizer_cache(values: dict) -> list[str]:
    """Point sd-scripts at the default offline tokenizer cache when the recipe names none and it
    exists (kxl-train tokenizer-cache); refuse early when offline without one. Returns warnings."""
    from kxl_common import clip_tokenizer as tk

    if values.get("tokenizer_cache_dir"):
        return []
    found = tk.find_cache()
    if found is not None:
        values["tokenizer_cache_dir"] = str(found)
        return []
    if tk.offline():
        raise LaunchError(tk.missing_cache_message())
    return [f"no tokenizer cache at {tk.default_cache_dir()}: sd-scripts downloads the tokenizers from the hub; "
            "for a machine without internet run `kxl-train tokenizer-cache` first"]


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
    warnings.extend(_use_tokenizer_cache(values))
    from kxl_train.samples import resolve_sampling

    warnings.extend(resolve_sampling(values, recipe.path, recipe.kxl))
    problems = []
    if not Path(values["dataset_config"]).is_file():
        problems.append(f"dataset config {values['dataset_config']} does not exist (run kxl-prep first)")
    if not Path(values["pretrained_model_name_or_path"]).exists():
        problems.append(f"model {values['pretrained_model_name_or_path']} does not exist")
    else:  # a wrong file fails here in one line, not in sd-scripts' loader after minutes
        check_sdxl_checkpoint(values["pretrained_model_name_or_path"], diffusers_ok=True)
    if Path(values["output_dir"]).exists() and not Path(values["output_dir"]).is_dir():
        problems.append(f"output {values['output_dir']} is a file, not a folder")
    elif output_problem(Path(values["output_dir"]), want_dir=True):
        problems.append(f"output {values['output_dir']}: {output_problem(Path(values['output_dir']), want_dir=True)}")
    for item in values.get("network_args", []):
        key, value = item.split("=", 1)
        if key == "preset" and value.endswith(".toml") and not Path(value).is_file():
            problems.append(f"LyCORIS preset {value} does not exist")
    problems.extend(attention_problems(values))
    if problems and check_paths:
        raise LaunchError("; ".join(problems))
    warnings.extend(problems)
    values = recipes.validate_values(values)  # inputs included
    check_bitsandbytes(values)

    batch = dataset_batch_size(Path(values["dataset_config"]))
    mismatch = token_budget_mismatch(values)
    warnings.extend([mismatch] if mismatch else [])
    acc = accelerate_launch_args(recipe.gpus, values.get("mixed_precision", "no"), list(accelerate_args))
    kxl_options = list(kxl_options)
    for option in kxl_options:
        if not option.startswith("--kxl-"):
            raise LaunchError(f"{option!r}: kxl options start with --kxl-")
    if recipe.kxl.get("low_memory_load") and not has_option(kxl_options, "--kxl-low-memory-load"):
        kxl_options.append("--kxl-low-memory-load")
    if recipe.kxl.get("keep_caption_suffix") and not has_option(kxl_options, "--kxl-keep-caption-suffix"):
        kxl_options.append("--kxl-keep-caption-suffix")
    return LaunchPlan(recipe=recipe, values=values, sd_args=render_args(values), accelerate_args=acc,
                      kxl_options=kxl_options, dataset_batch_size=batch, warnings=warnings)


def run(plan: LaunchPlan, *, env: dict | None = None) -> int:
    """Start the launch (sd-scripts must be present: the submodule or KXL_SD_SCRIPTS)."""
    from kxl_common.upstream import require_sd_scripts

    require_sd_scripts()
    return subprocess.call(plan.command, env=env)


def resume_command(state_dir: Path, extra: list[str], python: str = sys.executable,
                   accelerate: list[str] = ()) -> tuple[list[str], Path]:
    """The command that resumes STATE_DIR, and the directory to run it in: the recorded command
    line with `--resume STATE_DIR` (`extra` appended: sd-scripts takes the last value), launched
    with the recorded accelerate arguments (`accelerate` replaces those it names, e.g.
    `--machine_rank 1` on the second machine). A state of a run not started by kxl-train launch
    (no accelerate arguments recorded) runs the entry directly on one process, else through
    accelerate with kxl's defaults for its process count."""
    from kxl_train.resume.state import RESUME_FILE, ResumeRefused, read_state

    if Path(state_dir).is_dir() and not (Path(state_dir) / RESUME_FILE).is_file():
        # no record: no command line to rerun. sd-scripts' own (inexact) resume goes through launch,
        # so say that, whether or not --kxl-inexact-resume was passed here
        raise ResumeRefused(
            f"resume state {state_dir} has no {RESUME_FILE}: it was not saved by a kxl run, so there is no "
            f"recorded command for `kxl-train resume` to rerun, and its sample order cannot be reproduced. "
            f"For sd-scripts' own (inexact) resume, launch the run again with it: `kxl-train launch RECIPE "
            f"--dataset DATA --model BASE --output OUT resume={Path(state_dir)} --kxl-inexact-resume`")
    record = read_state(state_dir)
    argv = without_option(list(record["argv"]), "--resume")
    if not has_option(argv, "--seed"):
        argv += ["--seed", str(record["seed"])]
    argv += ["--resume", str(state_dir.resolve()), *kxl_option_args(record.get("kxl_options", {})), *extra]
    acc = record.get("accelerate_args")
    if acc is None:
        processes = int(record["num_processes"])
        if processes == 1 and not accelerate:
            return [python, "-m", ENTRY, *argv], Path(record.get("cwd") or os.getcwd())
        acc = accelerate_launch_args(processes, option_value(argv, "--mixed_precision") or "no")
    command = accelerate_command(replace_options(list(acc), list(accelerate)), argv, python)
    return command, Path(record.get("cwd") or os.getcwd())


def run_resume(command: list[str], cwd: Path, *, env: dict | None = None) -> int:
    """Start a resume command (resume_command) in its directory."""
    return subprocess.call(command, cwd=cwd, env=env)


def parse_with_sd_scripts(sd_args: list[str], sd_scripts: Path):
    """sd-scripts' own parser on rendered arguments (the check tests make)."""
    from kxl_train.sdxl_args import live_parser

    return live_parser(sd_scripts).parse_args(sd_args)
