"""`kxl-train tokenizer-cache` writes the offline CLIP tokenizers; launch finds the default cache
without the recipe naming it, and refuses early when offline without one."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from kxl_common import clip_tokenizer as tk  # noqa: E402
from kxl_train.cli import main  # noqa: E402
from kxl_train import launch  # noqa: E402

REV1 = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes" / "epsilon-rev1.toml"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    for var in tk.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "xdg" / "kxl" / "tokenizers"


def test_the_command_writes_both_tokenizers_to_the_default_place(cache_home):
    from transformers import CLIPTokenizer

    assert tk.default_cache_dir() == cache_home and not tk.is_complete(cache_home)
    res = CliRunner().invoke(main, ["tokenizer-cache"])
    assert res.exit_code == 0, res.output
    assert tk.is_complete(cache_home)
    for name, pad in tk.TOKENIZER_DIRS.items():
        tok = CLIPTokenizer.from_pretrained(str(cache_home / name))
        ids = tok("a photo of a cat")["input_ids"]
        assert ids[0] == 49406 and ids[-1] == 49407 and len(tok) == 49408 and tok.pad_token == pad
    assert not [p for p in cache_home.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_launch_uses_the_default_cache_unasked(inputs, cache_home):
    data, model, out = inputs
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out)
    assert "tokenizer_cache_dir" not in plan.values
    assert any("kxl-train tokenizer-cache" in w for w in plan.warnings)
    tk.make_tokenizer_cache(cache_home)
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out)
    assert plan.values["tokenizer_cache_dir"] == str(cache_home)
    assert "--tokenizer_cache_dir" in plan.sd_args
    # a recipe value wins over the default
    plan = launch.build_plan(REV1, dataset=data, model=str(model), output=out,
                             overrides=[f'tokenizer_cache_dir="{out / "mine"}"'])
    assert plan.values["tokenizer_cache_dir"] == str(out / "mine")


def test_offline_without_a_cache_is_refused_before_anything_starts(inputs, cache_home, monkeypatch):
    data, model, out = inputs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["launch", str(REV1), "--dataset", str(data), "--model", str(model),
                                    "--output", str(out), "--dry-run"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "no tokenizer cache at" in res.output and "kxl-train tokenizer-cache" in res.output
