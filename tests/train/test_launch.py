"""launch/epsilon*.sh and kxl_train.launch: rendering, dry run, accelerate flags, refusals."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kxl_common import check_env
from kxl_common.upstream import REPO_ROOT, find_sd_scripts
from kxl_train import cli, launch
from kxl_train.sdxl_args import load_table

REV1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"


@pytest.fixture
def dataset_settings():
    """`inputs`' dataset.toml (tests/train/conftest.py) sets batch_size 2."""
    return "batch_size = 2\n"


def table_parser() -> argparse.ArgumentParser:
    """An argparse parser built from the committed table (types, nargs, choices) — sd-scripts'
    parser stand-in for CI; the gated test below uses the real one."""
    kinds = {"str": str, "int": int, "float": float, "path": Path, "int_or_float": float}
    parser = argparse.ArgumentParser()
    for name, spec in load_table()["arguments"].items():
        if spec["kind"] == "bool":
            parser.add_argument(spec["flag"], dest=name, action="store_true")
        else:
            parser.add_argument(spec["flag"], dest=name, type=kinds[spec["kind"]], nargs=spec["nargs"],
                                choices=spec["choices"])
    return parser


def test_rendered_args_parse_back_to_the_values(inputs):
    data, model, out = inputs
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out)
    parsed = vars(table_parser().parse_args(plan.sd_args))
    for key, value in plan.values.items():
        got = parsed[key]
        assert (str(got) if isinstance(got, Path) else got) == value, key
    assert plan.values["dataset_config"] == str(data / "dataset.toml")
    assert plan.values["logging_dir"] == str(out / "logs")


def test_command_shape_and_defaults(inputs):
    data, model, out = inputs
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out, kxl_options=["--kxl-trace=t.jsonl"])
    cmd = plan.command
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    i = cmd.index("kxl_train.entry")
    assert cmd[i - 1] == "-m" and cmd[-2:] == ["--kxl-trace=t.jsonl", "--kxl-low-memory-load"]
    acc = cmd[3:i - 1]
    assert acc[acc.index("--num_processes") + 1] == "4" and "--multi_gpu" in acc
    assert acc[acc.index("--num_machines") + 1] == "1"
    assert acc[acc.index("--mixed_precision") + 1] == "fp16"
    assert "--network_module" in cmd and cmd[cmd.index("--network_module") + 1] == "lycoris.kohya"
    # dataset.toml's batch_size (2) is what sd-scripts uses per GPU
    assert "2 per GPU x 16 accumulation x 4 GPUs = 128" in "\n".join(plan.summary())


def test_single_gpu_and_user_accelerate_flags(inputs):
    data, model, out = inputs
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out, gpus=1)
    assert "--multi_gpu" not in plan.accelerate_args
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out,
                             accelerate_args=["--num_machines", "2", "--machine_rank", "1",
                                              "--main_process_ip", "10.1.2.3", "--num_processes", "8"])
    acc = plan.accelerate_args
    assert acc.count("--num_machines") == 1 and acc.count("--num_processes") == 1
    assert acc[acc.index("--num_processes") + 1] == "8"
    assert acc[-6:] == ["--machine_rank", "1", "--main_process_ip", "10.1.2.3", "--num_processes", "8"]


def test_missing_inputs_and_paths(inputs, tmp_path):
    data, model, out = inputs
    with pytest.raises(launch.LaunchError, match="--model is required"):
        launch.build_plan(REV1, dataset=data, model=None, output=out)
    with pytest.raises(launch.LaunchError, match="does not exist"):
        launch.build_plan(REV1, dataset=tmp_path / "nowhere", model=str(model), output=out)
    plan = launch.build_plan(REV1, dataset=tmp_path / "nowhere", model=str(model), output=out, check_paths=False)
    assert any("nowhere" in w for w in plan.warnings)


@pytest.mark.parametrize("version,refused", [("0.38.0", True), ("0.41.0", True), ("0.41.1", False)])
def test_launch_refuses_broken_bitsandbytes(inputs, monkeypatch, version, refused):
    data, model, out = inputs
    monkeypatch.setattr(check_env.md, "version", lambda name: version)
    if refused:
        with pytest.raises(launch.LaunchError, match="bitsandbytes issue 659"):
            launch.build_plan(REV1, dataset=data, model=str(model), output=out)
    else:
        launch.build_plan(REV1, dataset=data, model=str(model), output=out)
    # a non-8-bit optimizer does not need bitsandbytes at all
    launch.build_plan(REV1, dataset=data, model=str(model), output=out, overrides=["optimizer_type=AdamW"])


def test_split_extra():
    known = {"--num_machines", "--machine_rank", "--multi_gpu", "--main_process_ip"}
    o, k, a = cli.split_extra(["lr_scheduler=cosine", "--kxl-exact", "--num_machines", "2", "--multi_gpu",
                               "seed=3", "--main_process_ip=h", "--kxl-trace=x"], known)
    assert o == ["lr_scheduler=cosine", "seed=3"]
    assert k == ["--kxl-exact", "--kxl-trace=x"]
    assert a == ["--num_machines", "2", "--multi_gpu", "--main_process_ip=h"]
    import click

    with pytest.raises(click.UsageError, match="did you mean '--dry-run'"):
        cli.split_extra(["--dryrun"], known)


def run_script(script, *args, env=None):
    return subprocess.run(["bash", str(REPO_ROOT / "launch" / script), *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {}), KXL_PYTHON_BIN=sys.executable), timeout=120)


@pytest.mark.parametrize("script,name,ga", [("epsilon.sh", "kohaku-xl-epsilon-lyco", "16"), ("epsilon-rev2.sh", "epsilon-rev2", "32")])
def test_dry_run_prints_command_and_config_and_starts_nothing(inputs, script, name, ga):
    data, model, out = inputs
    result = run_script(script, "--dataset", data, "--model", model, "--output", out, "--dry-run", "seed=7")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "# resolved config" in text and "seed = 7" in text and f'output_name = "{name}"' in text
    command = text.strip().splitlines()[-1]
    argv = shlex.split(command)
    assert "kxl_train.entry" in argv and argv[argv.index("--gradient_accumulation_steps") + 1] == ga
    assert argv[argv.index("--seed") + 1] == "7"
    assert not out.exists()  # nothing started


def test_script_reports_recipe_errors(inputs):
    data, model, out = inputs
    result = run_script("epsilon.sh", "--dataset", data, "--model", model, "--output", out, "noise_ofset=0.1")
    assert result.returncode != 0 and "did you mean 'noise_offset'" in result.stderr


@pytest.mark.skipif(find_sd_scripts() is not None, reason="sd-scripts present: a launch would start training")
def test_launch_without_sd_scripts_explains(inputs):
    data, model, out = inputs
    env = {k: v for k, v in os.environ.items() if k != "KXL_SD_SCRIPTS"}
    result = subprocess.run(["bash", str(REPO_ROOT / "launch" / "epsilon.sh"), "--dataset", str(data), "--model",
                             str(model), "--output", str(out)], capture_output=True, text=True,
                            env=dict(env, KXL_PYTHON_BIN=sys.executable), timeout=120)
    assert result.returncode != 0 and "git submodule update --init" in result.stderr


@pytest.mark.sdscripts
@pytest.mark.parametrize("recipe", ["epsilon-rev1.toml", "epsilon-rev2.toml"])
def test_rendered_args_parse_with_sd_scripts(sd_scripts, inputs, recipe):
    data, model, out = inputs
    plan = launch.build_plan(REPO_ROOT / "recipes" / recipe, dataset=data, model=str(model), output=out)
    args = launch.parse_with_sd_scripts(plan.sd_args, sd_scripts)
    for key, value in plan.values.items():
        got = getattr(args, key)
        assert (str(got) if isinstance(got, Path) else got) == value, key


def launch_cli(inputs, monkeypatch, *extra):
    """`kxl-train launch` in process, with the start of accelerate recorded instead of run."""
    from click.testing import CliRunner

    started = []
    monkeypatch.setattr(launch, "run", lambda plan, **kw: started.append(plan) or 0)
    data, model, out = inputs
    result = CliRunner().invoke(cli.main, ["launch", str(REV1), "--dataset", str(data), "--model", str(model),
                                           "--output", str(out), *extra])
    return result, started


@pytest.mark.parametrize("override,message", [
    ("max_token_length=100", "max_token_length: 100 is not one of [150, 225]; fix: use 150 or 225, or leave"),
    ("kxl.attention=flash", "[kxl] attention = 'flash' is not one of ['sdpa', 'xformers']; fix:"),
])
def test_bad_input_stops_launch_before_accelerate(inputs, monkeypatch, override, message):
    result, started = launch_cli(inputs, monkeypatch, override)
    assert result.exit_code != 0 and message in result.output and not started
    assert "Traceback" not in result.output


def test_bad_preset_stops_launch_before_accelerate(inputs, monkeypatch, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("unet_target_modules = []\n" + (REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml").read_text())
    args = ["conv_dim=10000", "conv_alpha=10000", "algo=lokr", "dropout=0", "factor=8", "train_norm=True", f"preset={bad}"]
    result, started = launch_cli(inputs, monkeypatch, "network_args=" + repr(args).replace("'", '"'))
    assert result.exit_code != 0 and not started
    assert "preset key unet_target_modules = [] is not one LyCORIS reads; fix: did you mean 'unet_target_module'" in result.output


@pytest.mark.skipif(__import__("importlib").util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_switch_without_the_package_is_refused(inputs, monkeypatch):
    result, started = launch_cli(inputs, monkeypatch, "kxl.attention=xformers")
    assert result.exit_code != 0 and not started
    assert 'attention "xformers" (kxl.attention) needs the xformers package' in result.output
    # a dry run checks what a real launch checks, so it refuses the same way
    result, started = launch_cli(inputs, monkeypatch, "kxl.attention=xformers", "--dry-run")
    assert result.exit_code != 0 and not started
    assert 'attention "xformers" (kxl.attention) needs the xformers package' in result.output
    # the switch itself renders the author's flag in place of ours
    from kxl_train import recipe as recipes

    values = recipes.load(REV1, ["kxl.attention=xformers"]).values
    assert values.get("xformers") is True and not values.get("sdpa")


@pytest.mark.sdscripts
def test_nondividing_factor_stops_launch_before_accelerate(sd_scripts, inputs, monkeypatch):
    args = ["conv_dim=10000", "conv_alpha=10000", "algo=lokr", "dropout=0", "factor=6", "train_norm=True",
            "preset=lycoris/epsilon-lokr.toml"]
    result, started = launch_cli(inputs, monkeypatch, "network_args=" + repr(args).replace("'", '"'))
    assert result.exit_code != 0 and not started
    assert "network_args factor=6: 6 does not divide the layer side(s) 320, 640, 1280" in result.output
    assert "fix: a factor that divides them all: 2, 4, 8" in result.output
    result, started = launch_cli(inputs, monkeypatch)  # the recipe as it is: starts
    assert result.exit_code == 0, result.output
    assert len(started) == 1 and "1058 LoKr + 256 norm modules, 384,645,360 parameters" in result.output


@pytest.mark.sdscripts
@pytest.mark.parametrize("recipe", ["epsilon-rev1.toml", "epsilon-rev2.toml"])
def test_dry_run_command_parses_with_sd_scripts(sd_scripts, inputs, recipe):
    """The printed command's sd-scripts arguments, through sd-scripts v0.10.1's own parser."""
    data, model, out = inputs
    result = run_script("epsilon.sh" if recipe.endswith("rev1.toml") else "epsilon-rev2.sh",
                        "--dataset", data, "--model", model, "--output", out, "--dry-run")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    sd_args = argv[argv.index(launch.ENTRY) + 1:]
    sd_args = [a for a in sd_args if not a.startswith("--kxl-")]
    args = launch.parse_with_sd_scripts(sd_args, sd_scripts)
    assert (args.max_token_length, args.ddp_timeout, args.ddp_gradient_as_bucket_view) == (225, 10080, True)
    assert args.sdpa and not args.xformers and not args.full_fp16 and args.seed == 1337
    assert args.network_dim == 10000 and "train_norm=True" in args.network_args
