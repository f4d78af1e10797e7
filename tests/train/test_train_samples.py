"""Training-time samples: the recipes' sample_prompts file and the CPU switch (kxl_train.samples)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_train import launch
from kxl_train.samples import resolve_sampling

RECIPES = [REPO_ROOT / "recipes" / f"epsilon-{r}.toml" for r in ("rev1", "rev2")]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("cuda", [True, False])
def test_recipes_sample_on_gpu_only(recipe, cuda, inputs, monkeypatch):
    monkeypatch.setattr("kxl_train.samples.cuda_available", lambda: cuda)
    data, model, out = inputs
    plan = launch.build_plan(recipe, dataset=data, model=model, output=out)
    prompts = Path(plan.values["sample_prompts"])
    assert prompts.is_absolute() and prompts == REPO_ROOT / "recipes" / "samples" / "epsilon-card.txt"
    assert f"--sample_prompts={prompts}" in plan.sd_args or str(prompts) in plan.sd_args
    if cuda:
        assert plan.values["sample_every_n_steps"] == 1700
        assert not any("samples are off" in w for w in plan.warnings)
    else:
        assert "sample_every_n_steps" not in plan.values
        assert not any(a.startswith("--sample_every_n_steps") for a in plan.sd_args)
        assert any("samples are off" in w for w in plan.warnings)


def test_sample_on_cpu_keeps_the_schedule(tmp_path):
    values = {"sample_prompts": "p.txt", "sample_every_n_steps": 10, "sample_at_first": True}
    warnings = resolve_sampling(values, tmp_path / "r.toml", {"sample_on_cpu": True}, cuda=False)
    assert warnings == [] and values["sample_every_n_steps"] == 10 and values["sample_at_first"] is True
    assert values["sample_prompts"] == str((tmp_path / "p.txt").resolve())


def test_no_schedule_no_warning(tmp_path):
    values = {"sample_prompts": "/abs/p.txt"}
    assert resolve_sampling(values, tmp_path / "r.toml", {}, cuda=False) == []
    assert values == {"sample_prompts": "/abs/p.txt"}
