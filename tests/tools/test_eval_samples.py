"""recipes/samples/epsilon-card.txt: the card's prompts in sd-scripts' sample-prompt format,
agreeing with `kxl eval`'s style set."""
from __future__ import annotations

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_tools.eval.prompts import CARD_STYLE_PROMPTS, STYLE_PEOPLE

SAMPLES = REPO_ROOT / "recipes" / "samples" / "epsilon-card.txt"


def prompt_lines() -> list[str]:
    return [line.strip() for line in SAMPLES.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def test_sample_file_holds_every_card_style_prompt():
    prompts = [line.split(" --")[0] for line in prompt_lines()]
    for style in CARD_STYLE_PROMPTS:
        assert f"{STYLE_PEOPLE}, {style}, masterpiece, newest, safe" in prompts
    assert all(p.endswith("masterpiece, newest, safe") for p in prompts)
    seeds = [line.split(" --d ")[1] for line in prompt_lines()]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.sdscripts
def test_sd_scripts_reads_every_option(train_util):
    for line in prompt_lines():
        d = train_util.line_to_prompt_dict(line)
        assert d["width"] == d["height"] == 1024 and d["sample_steps"] == 24 and d["scale"] == 6.0
        assert isinstance(d["seed"], int) and d["negative_prompt"].startswith("worst quality")
        assert d["prompt"] == line.split(" --")[0]
