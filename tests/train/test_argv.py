"""kxl_train.argv: the one reader / editor of argument lists (kxl options, values, replacements)."""
from __future__ import annotations

import shlex

from hypothesis import given, strategies as st

from kxl_train import argv as A

names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6).filter(lambda s: not s.startswith("_"))
values = st.one_of(st.just(True), st.text(alphabet="xyz0123 /=.-", min_size=1, max_size=8))


@given(st.dictionaries(names, values, max_size=5))
def test_kxl_option_args_split_back(options):
    """kxl_option_args renders what split_kxl_options reads (the replay of a recorded run)."""
    rendered = A.kxl_option_args(options)
    assert A.split_kxl_options(["--lr", "1", *rendered, "--save_state"]) == (options, ["--lr", "1", "--save_state"])


def test_option_value_takes_the_last_as_argparse_does():
    assert A.option_value(["--mixed_precision", "fp16", "--x", "--mixed_precision=bf16"], "--mixed_precision") == "bf16"
    assert A.option_value(["--mixed_precision"], "--mixed_precision") is None
    assert A.option_value(["--mixed_precision_x", "fp16"], "--mixed_precision") is None
    assert A.has_option(["--seed=3"], "--seed") and not A.has_option(["--seedling", "3"], "--seed")


def test_option_groups_and_replace_options():
    acc = ["--num_processes", "8", "--num_machines", "2", "--multi_gpu", "--machine_rank", "0",
           "--main_process_ip=10.0.0.1", "--main_process_port", "29500"]
    assert A.option_groups(acc)[2:4] == [["--multi_gpu"], ["--machine_rank", "0"]]
    replaced = A.replace_options(acc, ["--machine_rank", "1", "--main_process_ip", "10.0.0.9"])
    assert replaced == ["--num_processes", "8", "--num_machines", "2", "--multi_gpu", "--main_process_port", "29500",
                        "--machine_rank", "1", "--main_process_ip", "10.0.0.9"]
    assert A.replace_options(acc, []) == acc


@given(st.lists(st.sampled_from(["--a", "--b=1", "--c", "v", "--d", "w w", "--e=x=y"]), max_size=10))
def test_option_groups_keep_every_token_in_order(args):
    assert [t for g in A.option_groups(args) for t in g] == args


def test_accelerate_args_travel_through_a_kxl_option():
    acc = ["--num_processes", "2", "--main_process_ip=host a", "--multi_gpu"]
    option = A.accelerate_args_option(acc)
    options, rest = A.split_kxl_options(["--lr", "1", option])
    assert rest == ["--lr", "1"] and A.accelerate_args_of(options) == acc
    assert option == "--kxl-accelerate-args=" + shlex.join(acc)
    assert A.accelerate_args_of({}) is None
