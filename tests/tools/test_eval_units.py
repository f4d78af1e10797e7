"""kxl eval's small parts: character counting, prompt text, the prompt file's checks,
settings, shards, the derangement and the bootstrap interval."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from kxl_prep.recipe import load_recipe
from kxl_tools.eval.errors import EvalError
from kxl_common.shard import ShardError, parse_shard
from kxl_tools.eval.generate import all_jobs, shard_jobs
from kxl_tools.eval.prompts import (CARD_STYLE_PROMPTS, Prompt, PromptText, character_prompts, character_table,
                                    read_prompt_file, seeds_for, style_prompts, webui_escape, webui_unescape,
                                    write_prompt_file)
from kxl_tools.eval.report import bootstrap_ci
from kxl_tools.eval.score import _derangement
from kxl_tools.eval.settings import load_settings

RECIPE = load_recipe()


def posts_frame(rows):
    cols = ["tags_general", "tags_artist", "tags_character", "tags_copyright", "tags_meta"]
    return pd.DataFrame([{"id": i, **{c: r.get(c, []) for c in cols}} for i, r in rows])


POSTS = posts_frame([
    (1, {"tags_character": ["hatsune_miku"], "tags_copyright": ["vocaloid"], "tags_general": ["1girl", "smile"]}),
    (2, {"tags_character": ["hatsune_miku", "kagamine_rin"], "tags_copyright": ["vocaloid", "project_diva"],
         "tags_general": ["2girls"]}),
    (3, {"tags_character": ["hatsune_miku"], "tags_copyright": ["vocaloid"], "tags_general": ["1girl"]}),
    (4, {"tags_character": ["kagamine_rin"], "tags_copyright": ["vocaloid"], "tags_general": ["1girl"]}),
    (5, {"tags_character": ["banned_artist"], "tags_general": []}),
    (6, {"tags_character": ["o_o"], "tags_general": ["1boy"]}),
    (7, {"tags_character": ["not_selected"], "tags_general": ["1girl"]}),
])


def test_character_table_counts_selected_posts_only():
    table = character_table(POSTS, np.array([1, 2, 3, 4, 5, 6]), RECIPE.captions, n=10)
    assert table["character"].tolist() == ["hatsune_miku", "kagamine_rin", "o_o"]
    assert table["posts"].tolist() == [3, 2, 1]
    assert table["copyright"].tolist() == ["vocaloid", "vocaloid", None]
    # miku: 1girl twice, 2girls once; rin: 2girls once, 1girl once -> tie broken by the recipe's order
    assert table["people"].tolist() == ["1girl", "1girl", "1boy"]
    assert character_table(POSTS, np.array([1, 2, 3, 4]), RECIPE.captions, n=1)["character"].tolist() == ["hatsune_miku"]


def test_character_table_refuses_ids_missing_from_sources():
    with pytest.raises(EvalError, match="id 99"):
        character_table(POSTS, np.array([1, 99]), RECIPE.captions, n=3)


def test_prompts_follow_the_caption_rules():
    table = character_table(POSTS, np.array([1, 2, 3, 4, 6]), RECIPE.captions, n=10)
    prompts = character_prompts(table, PromptText(RECIPE), seeds_per_prompt=2, base_seed=0)
    assert [p.prompt for p in prompts] == [
        "1girl, hatsune miku, vocaloid, masterpiece, newest, safe",
        "1girl, kagamine rin, vocaloid, masterpiece, newest, safe",
        "1boy, o_o, masterpiece, newest, safe",  # short names keep their underscores
    ]
    assert [p.display for p in prompts] == ["hatsune miku", "kagamine rin", "o_o"]
    styles = style_prompts(PromptText(RECIPE), seeds_per_prompt=1, base_seed=0)
    assert [s.prompt for s in styles] == [f"1girl, {c}, masterpiece, newest, safe" for c in CARD_STYLE_PROMPTS]


def test_seeds_are_fixed_by_key_not_position():
    assert seeds_for("character:a", 3, 0) == seeds_for("character:a", 3, 0)
    assert seeds_for("character:a", 3, 0)[:2] == seeds_for("character:a", 2, 0)
    assert seeds_for("character:a", 1, 0) != seeds_for("character:b", 1, 0) != seeds_for("character:a", 1, 1)


@given(st.text(alphabet="ab()\\: ,", max_size=30))
@hsettings(max_examples=200, deadline=None)
def test_webui_escape_round_trips(text):
    assert webui_unescape(webui_escape(text)) == text


def test_parenthesised_tag_is_escaped():
    assert webui_escape("ask (askzy)") == r"ask \(askzy\)"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x", "seeds": [1]}', "field 'id'"),
    ('{"id": "a", "prompt": "x", "seeds": []}', "field 'seeds'"),
    ('{"id": "a", "prompt": "x", "seeds": [1, 1]}', "repeats a seed"),
    ('{"id": "a", "prompt": "x", "seeds": [-1]}', "field 'seeds'"),
    ('{"id": "a/b", "prompt": "x", "seeds": [1]}', "folder name"),
    ('{"id": "a", "kind": "character", "prompt": "x", "seeds": [1]}', "field 'display'"),
    ('{"id": "a", "kind": "other", "prompt": "x", "seeds": [1]}', "field 'kind'"),
])
def test_prompt_file_errors_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "prompt": "fine", "seeds": [3]}\n' + line + "\n")
    with pytest.raises(EvalError, match=message) as err:
        read_prompt_file(path)
    assert f"{path}:2" in str(err.value)


def test_prompt_file_round_trip_and_duplicate_ids(tmp_path):
    items = [Prompt(id="a", kind="custom", prompt="x", seeds=[1, 2], extra={"note": "kept"}),
             Prompt(id="b", kind="character", prompt="y", seeds=[3], display="y", character="y")]
    write_prompt_file(tmp_path / "p.jsonl", items)
    back = read_prompt_file(tmp_path / "p.jsonl")
    assert [(p.id, p.seeds, p.extra) for p in back] == [("a", [1, 2], {"note": "kept"}), ("b", [3], {})]
    (tmp_path / "d.jsonl").write_text((tmp_path / "p.jsonl").read_text() + json.dumps({"id": "a", "prompt": "z", "seeds": [1]}))
    with pytest.raises(EvalError, match="repeats line 1"):
        read_prompt_file(tmp_path / "d.jsonl")


def test_settings_errors(tmp_path):
    path = tmp_path / "s.toml"
    for body, message in [("[generate]\nwidth = 100\n", "width"), ("[generate]\nsampler = 'k_magic'\n", "sampler"),
                          ("[generate]\nstepz = 3\n", "unknown key"), ("[other]\n", r"\[generate\]")]:
        path.write_text(body)
        with pytest.raises(EvalError, match=message):
            load_settings(path)
    path.write_text("[generate]\nsteps = 3\nsampler = 'k_euler'\n")
    s = load_settings(path, batch_size=2)
    assert (s.steps, s.batch_size, s.width) == (3, 2, 1024)
    assert s.digest() == load_settings(path, batch_size=7).digest()  # batch size changes no pixel
    assert s.digest() != load_settings(path, steps=4).digest()


@given(st.integers(1, 40), st.integers(1, 6))
@hsettings(max_examples=60, deadline=None)
def test_shards_partition_the_jobs(n_prompts, n_shards):
    items = [Prompt(id=f"p{i}", kind="custom", prompt="x", seeds=[i, i + 100]) for i in range(n_prompts)]
    jobs = all_jobs(items)
    parts = [shard_jobs(jobs, (k, n_shards)) for k in range(n_shards)]
    assert Counter((j.prompt.id, j.seed) for part in parts for j in part) == Counter((j.prompt.id, j.seed) for j in jobs)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["2/2", "3/2", "-1/2", "x", "1/0", "1-2"])
def test_bad_shards(text):
    with pytest.raises(ShardError):
        parse_shard(text)


@given(st.integers(2, 50), st.integers(0, 1000))
def test_derangement_has_no_fixed_point(n, seed):
    d = _derangement(n, seed)
    assert sorted(d.tolist()) == list(range(n)) and not np.any(d == np.arange(n))


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    values = rng.random(400)
    lo, hi = bootstrap_ci(values, reps=4000)
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert lo < values.mean() < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_full_size_generation_on_a_cpu_warns_as_launch_does(tmp_path):
    from click.testing import CliRunner

    from kxl_tools.cli import main
    from kxl_tools.eval.generate import cpu_warning
    from kxl_tools.eval.settings import load_settings

    full = load_settings(None)
    assert (full.width, full.height) == (1024, 1024)
    assert "1024x1024 px on a CPU" in cpu_warning(full, "cpu")
    assert cpu_warning(full, "cuda") is None
    assert cpu_warning(load_settings(None, width=256, height=256), "cpu") is None
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "p0", "kind": "custom", "prompt": "x", "seeds": [0]}\n')
    model = tmp_path / "m"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    res = CliRunner().invoke(main, ["eval", "generate", str(prompts), "--out", str(tmp_path / "o"),
                                    "--diffusers", str(model), "--device", "cpu"])
    assert "warning: generating 1024x1024 px on a CPU" in res.output
