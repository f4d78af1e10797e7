"""CPU launches use the cores they have: kxl_train.launch passes --num_cpu_threads_per_process
where accelerate would export OMP_NUM_THREADS=1 (accelerate's own launcher code decides the env)."""
from __future__ import annotations

import os

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_train import launch

REV1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
CORES = len(os.sched_getaffinity(0))


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(launch, "cuda_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def child_env(accelerate_args: list[str]) -> dict:
    """The environment accelerate's launcher gives the training process for these flags."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args([*accelerate_args, "-m", "kxl_train.entry"])
    args, _defaults, _mp = _validate_launch_command(args)
    _cmd, env = prepare_simple_launcher_cmd_env(args)
    return env


def threads_flag(acc: list[str]) -> str | None:
    return acc[acc.index("--num_cpu_threads_per_process") + 1] if "--num_cpu_threads_per_process" in acc else None


def test_accelerate_alone_gives_a_cpu_process_one_thread(cpu_only):
    # the defect being fixed, read off accelerate itself
    assert child_env(["--num_processes", "1", "--num_machines", "1"])["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("gpus,machines", [(1, None), (2, None), (4, "2")])
def test_cpu_launch_gets_the_cores_per_process(inputs, cpu_only, gpus, machines):
    data, model, out = inputs
    user = ["--num_machines", machines] if machines else []
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out, gpus=gpus, accelerate_args=user)
    per_machine = gpus // int(machines or 1)
    want = str(max(CORES // per_machine, 1))
    assert threads_flag(plan.accelerate_args) == want
    assert child_env(plan.accelerate_args)["OMP_NUM_THREADS"] == want
    if machines:  # user flags stay last
        assert plan.accelerate_args[-2:] == ["--num_machines", machines]


def test_user_threads_cpu_flag_and_gpu_launches_are_left_alone(inputs, cpu_only, monkeypatch):
    data, model, out = inputs

    def plan(**kw):
        return launch.build_plan(REV1, dataset=data, model=str(model), output=out, gpus=1, **kw).accelerate_args

    assert threads_flag(plan(accelerate_args=["--num_cpu_threads_per_process", "3"])) == "3"
    assert plan(accelerate_args=["--num_cpu_threads_per_process", "3"]).count("--num_cpu_threads_per_process") == 1
    assert threads_flag(plan(accelerate_args=["--cpu"])) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads_flag(plan()) is None
    assert child_env(plan())["OMP_NUM_THREADS"] == "5"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(launch, "cuda_available", lambda: True)
    acc = plan()
    assert threads_flag(acc) is None
    assert child_env(acc)["OMP_NUM_THREADS"] == "1"  # accelerate's GPU default, as for plain sd-scripts
