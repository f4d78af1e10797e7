"""One launcher: a new run and a resume both become `accelerate launch ... -m kxl_train.entry`,
and a state records the accelerate arguments, so a resume launches as the run did."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace as NS

from click.testing import CliRunner

from kxl_common.upstream import REPO_ROOT
from kxl_testing.model_stubs import write_sdxl_header_only
from kxl_train import argv as A
from kxl_train import cli, launch
from kxl_train.resume import state as state_mod

REV1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
MULTI_NODE = ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "10.1.2.3",
              "--main_process_port", "29500", "--num_processes", "8"]


def entry_options(command):
    """The `--kxl-*` options the entry would take off the command."""
    return A.split_kxl_options(command[command.index(launch.ENTRY) + 1:])[0]


def test_new_run_hands_its_accelerate_args_to_the_entry(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.toml").write_text("[general]\n")
    write_sdxl_header_only(tmp_path / "base.safetensors")
    plan = launch.build_plan(REV1, dataset=data, model=str(tmp_path / "base.safetensors"), output=tmp_path / "o",
                             accelerate_args=MULTI_NODE)
    command = plan.command
    acc = command[3:command.index(launch.ENTRY) - 1]
    assert acc == plan.accelerate_args
    assert A.accelerate_args_of(entry_options(command)) == acc
    assert acc[acc.index("--mixed_precision") + 1] == "fp16"


def record(tmp_path, **extra):
    state_mod.write_resume_record(tmp_path, {
        "global_step": 2, "recipe": {}, "argv": ["--dataset_config", "d.toml", "--mixed_precision", "bf16"],
        "kxl_options": {"trace": "t.jsonl"}, "num_processes": 8, "seed": 4, "cwd": "/run", **extra})


def test_resume_launches_with_the_recorded_accelerate_args(tmp_path):
    acc = launch.accelerate_launch_args(4, "fp16", MULTI_NODE)
    record(tmp_path, accelerate_args=acc)
    command, cwd = launch.resume_command(tmp_path, ["--max_grad_norm", "2"], python="py")
    i = command.index(launch.ENTRY)
    assert command[:3] == ["py", "-m", "accelerate.commands.launch"] and command[3:i - 1] == acc
    assert A.accelerate_args_of(entry_options(command)) == acc  # the resumed run records them again
    assert command[-2:] == ["--max_grad_norm", "2"] and str(cwd) == "/run"
    # on the second machine: the same command but its own rank
    command, _ = launch.resume_command(tmp_path, [], python="py", accelerate=["--machine_rank", "1"])
    acc1 = command[3:command.index(launch.ENTRY) - 1]
    assert acc1.count("--machine_rank") == 1 and acc1[acc1.index("--machine_rank") + 1] == "1"
    assert A.without_option(acc1, "--machine_rank") == A.without_option(acc, "--machine_rank")


def test_resume_of_an_older_state_gets_the_defaults_with_its_mixed_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "cuda_available", lambda: True)  # a GPU machine: no CPU thread flag
    record(tmp_path)
    command, _ = launch.resume_command(tmp_path, [], python="py")
    acc = command[3:command.index(launch.ENTRY) - 1]
    assert acc == ["--num_processes", "8", "--num_machines", "1", "--mixed_precision", "bf16",
                   "--dynamo_backend", "no", "--multi_gpu"]


def test_resume_on_a_cpu_machine_gets_the_cores_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "cuda_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    record(tmp_path)  # 8 processes on one machine
    command, _ = launch.resume_command(tmp_path, [], python="py")
    acc = command[3:command.index(launch.ENTRY) - 1]
    assert acc[acc.index("--num_cpu_threads_per_process") + 1] == "2"


def test_kxl_train_resume_dry_run(tmp_path):
    record(tmp_path, accelerate_args=launch.accelerate_launch_args(4, "fp16", MULTI_NODE))
    result = CliRunner().invoke(cli.main, ["resume", str(tmp_path), "--dry-run", "--accelerate", "--machine_rank 1",
                                           "--", "--output_dir", "o2"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("cd /run && ")
    argv = shlex.split(line.split(" && ", 1)[1])
    i = argv.index(launch.ENTRY)
    assert argv[:i].count("--machine_rank") == 1 and argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[-2:] == ["--output_dir", "o2"] and argv[argv.index("--resume") + 1] == str(tmp_path.resolve())
    bad = CliRunner().invoke(cli.main, ["resume", str(tmp_path), "--dry-run", "--accelerate", "--machine_rnk 1"])
    assert bad.exit_code != 0 and "did you mean '--machine_rank'" in bad.output


def test_saved_state_records_the_accelerate_args(tmp_path):
    from kxl_train.resume.sdscripts import Runtime

    acc = ["--num_processes", "1", "--mixed_precision", "bf16"]
    options, argv = A.split_kxl_options(["--seed", "3", A.accelerate_args_option(acc), "--kxl-trace=t.jsonl"])
    runtime = Runtime(options, argv)
    runtime.geometry, runtime.args, runtime.recipe, runtime.global_step = NS(num_processes=1), NS(seed=3), {}, 5
    runtime.save_hook([], [], tmp_path)
    saved = json.loads((tmp_path / state_mod.RESUME_FILE).read_text())
    assert saved["accelerate_args"] == acc and saved["kxl_options"] == {"trace": "t.jsonl"}
    assert saved["argv"] == ["--seed", "3"]


def test_a_state_without_a_record_points_to_the_launch_that_works(tmp_path, inputs, monkeypatch):
    """`kxl-train resume` of a state kxl did not save: the advice is a command that runs (it used
    to say pass --kxl-inexact-resume, and passing it gave the same error)."""
    monkeypatch.setenv("KXL_TOKENIZER_CACHE", str(tmp_path / "no-cache"))
    state = tmp_path / "state"
    state.mkdir()
    for extra in ([], ["--kxl-inexact-resume"]):
        res = CliRunner().invoke(cli.main, ["resume", str(state), "--dry-run", *extra])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert "kxl-train launch RECIPE" in res.output and f"resume={state} --kxl-inexact-resume" in res.output
    data, model, out = inputs
    rev1 = Path(launch.__file__).resolve().parents[1] / "recipes" / "epsilon-rev1.toml"
    res = CliRunner().invoke(cli.main, ["launch", str(rev1), "--dataset", str(data), "--model", str(model),
                                        "--output", str(out), f"resume={state}", "--kxl-inexact-resume", "--dry-run"])
    assert res.exit_code == 0, res.output
    command = shlex.split(res.output.strip().splitlines()[-1])
    assert command[command.index("--resume") + 1] == str(state) and "--kxl-inexact-resume" in command
