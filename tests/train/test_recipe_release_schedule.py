"""rev1's save schedule and file names pair with the released intermediates step by step.

The release (KBlueLeaf/Kohaku-XL-Epsilon, intermediate/) holds kohaku-xl-epsilon-lyco-step00001700
... -step00018700 and the final kohaku-xl-epsilon-lyco.safetensors; the crash fell between the
8th and 9th saves, 13600 and 15300."""
from __future__ import annotations

import argparse

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_train import recipe as rc

REV1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
REV2 = REPO_ROOT / "recipes" / "epsilon-rev2.toml"
# Written out from the release listing, not computed from the recipe.
RELEASED = [f"kohaku-xl-epsilon-lyco-step000{s:05d}.safetensors" for s in
            (1700, 3400, 5100, 6800, 8500, 10200, 11900, 13600, 15300, 17000, 18700)] + ["kohaku-xl-epsilon-lyco.safetensors"]


def save_steps(values) -> list[int]:
    """Steps at which sd-scripts' train loop saves (`global_step % save_every_n_steps == 0`)."""
    every, last = values["save_every_n_steps"], values["max_train_steps"]
    return [s for s in range(1, last + 1) if s % every == 0]


def test_rev1_saves_where_the_release_did():
    v = rc.load(REV1).values
    steps = save_steps(v)
    assert 13600 in steps and steps.index(13600) == 7 and steps[8] == 15300  # the 8th and 9th saves
    assert steps == [1700 * k for k in range(1, 12)] and v["max_train_steps"] == 20354
    assert v["save_state"]  # a state beside every LoKr: the run can resume from 13600
    names = [f"{v['output_name']}-step{s:08d}.{v['save_model_as']}" for s in steps] + [f"{v['output_name']}.{v['save_model_as']}"]
    assert names == RELEASED


def test_rev2_keeps_its_own_schedule():
    v = rc.load(REV2).values
    assert v["output_name"] == "epsilon-rev2" and v["max_train_steps"] == 15015
    assert 15300 > v["max_train_steps"]  # rev2 never reached the crash window: it was rev1's


def test_rev1_names_from_sd_scripts_own_naming(train_util):
    v = rc.load(REV1).values
    args = argparse.Namespace(output_name=v["output_name"])
    ext = "." + v["save_model_as"]
    ours = [train_util.get_step_ckpt_name(args, ext, s) for s in save_steps(v)] + [train_util.get_last_ckpt_name(args, ext)]
    assert ours == RELEASED
    assert train_util.STEP_STATE_NAME.format(v["output_name"], 13600) == "kohaku-xl-epsilon-lyco-step00013600-state"


@pytest.mark.parametrize("path", [REV1, REV2], ids=["rev1", "rev2"])
def test_comments_tell_no_rev2_crash_story(path):
    text = path.read_text()
    assert "rev2's released" not in text and "rev2's 13600" not in text
