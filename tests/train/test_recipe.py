"""Recipes: the card's hyperparameters, strict validation, overrides, effective batch."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from kxl_common.upstream import REPO_ROOT
from kxl_train import recipe as rc

REV1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
REV2 = REPO_ROOT / "recipes" / "epsilon-rev2.toml"

# The model card's table (spec: kohaku-xl-epsilon.md), written out independently of the recipes.
CARD = {
    REV1: dict(steps=20354, ga=16, lr_unet=2e-5, lr_te=5e-6, scheduler="constant_with_warmup", eff=256),
    REV2: dict(steps=15015, ga=32, lr_unet=1e-5, lr_te=2e-6, scheduler="cosine", eff=512),
}


@pytest.mark.parametrize("path", [REV1, REV2], ids=["rev1", "rev2"])
def test_recipe_holds_the_card(path):
    recipe = rc.load(path)
    v, card = recipe.values, CARD[path]
    assert v["optimizer_type"] == "Lion8bit"
    assert v["unet_lr"] == card["lr_unet"] and v["learning_rate"] == card["lr_unet"]
    assert v["text_encoder_lr"] == [card["lr_te"]]
    assert v["lr_scheduler"] == card["scheduler"] and v["lr_warmup_steps"] == 1000
    opt = dict(item.split("=", 1) for item in v["optimizer_args"])
    assert float(opt["weight_decay"]) == 0.1
    assert tuple(float(b) for b in opt["betas"].split(",")) == (0.9, 0.95)
    assert v["min_snr_gamma"] == 5 and v["noise_offset"] == 0.0357
    assert v["mixed_precision"] == "fp16" and not v.get("full_fp16")
    assert v["train_batch_size"] == 4 and v["gradient_accumulation_steps"] == card["ga"] and recipe.gpus == 4
    assert recipe.effective_batch() == card["eff"]
    assert v["max_train_steps"] == card["steps"]
    assert v["resolution"] == "1024,1024" and v["enable_bucket"]
    assert (v["min_bucket_reso"], v["max_bucket_reso"]) == (256, 4096)
    assert v["shuffle_caption"] and v["caption_tag_dropout_rate"] == 0.15 and v["keep_tokens_separator"] == "|||"
    assert v["save_state"] and v["save_every_n_steps"] >= 1
    # LoKr through LyCORIS, full matrix, both text encoders trained
    assert v["network_module"] == "lycoris.kohya"
    args = dict(item.split("=", 1) for item in v["network_args"])
    assert args["algo"] == "lokr" and args["full_matrix"] == "True"
    assert (Path(path).parent / args["preset"]).is_file()
    assert not v.get("network_train_unet_only") and not v.get("cache_text_encoder_outputs")


def test_rev1_steps_cover_one_epoch():
    # 5,210,319 images in one epoch at effective batch 256: 20353 full steps; the card's 20354
    # includes the partial batches that bucketing leaves (one step more here)
    steps = rc.load(REV1).values["max_train_steps"]
    assert 0 <= steps * 256 - 5_210_319 < 2 * 256


def test_summary_prints_batch_and_steps():
    lines = "\n".join(rc.load(REV2).summary())
    assert "4 per GPU x 32 accumulation x 4 GPUs = 512" in lines
    assert "total steps: 15015" in lines


def test_dataset_batch_size_wins():
    recipe = rc.load(REV1)
    assert recipe.effective_batch(dataset_batch_size=2) == 2 * 16 * 4


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_typo_names_key_and_closest(tmp_path):
    path = write(tmp_path, '[optimizer]\nlerning_rate = 1e-4\n')
    with pytest.raises(rc.RecipeError, match=r"'lerning_rate' is not an sdxl_train_network argument; did you mean 'learning_rate'"):
        rc.load(path)


def test_unknown_kxl_key(tmp_path):
    with pytest.raises(rc.RecipeError, match=r"\[kxl\] 'gpu' is not a kxl setting; did you mean 'gpus'"):
        rc.load(write(tmp_path, "[kxl]\ngpu = 2\n"))


@pytest.mark.parametrize("line,message", [
    ("train_batch_size = 2.5", "expected an integer"),
    ("train_batch_size = 0", "outside"),
    ("gradient_checkpointing = 1", "expected true or false"),
    ('mixed_precision = "fp8"', "is not one of"),
    ("caption_tag_dropout_rate = 1.5", "outside"),
    ("learning_rate = 0", "outside"),
    ('learning_rate = "fast"', "expected a number"),
    ("network_args = \"algo=lokr\"\nnetwork_dim = [4]", "takes one value"),
    ('optimizer_type = "Lion8bitt"', "did you mean 'Lion8bit'"),
    ('lr_scheduler = "cosine_warmup"', "not a scheduler"),
    ("min_bucket_reso = 250", "not a multiple of bucket_reso_steps"),
    ("min_bucket_reso = 2048\nmax_bucket_reso = 1024", "exceeds max_bucket_reso"),
    ('resolution = "1024x1024"', "expected \"W,H\""),
    ('full_fp16 = true\nmixed_precision = "bf16"', "full_fp16 needs"),
    ("cache_text_encoder_outputs = true", "needs network_train_unet_only"),
    ('network_args = ["algo=lokr", "decompose_both=False"]', "turns it ON"),
    ('optimizer_args = ["weight_decay"]', "not key=value"),
])
def test_bad_values_are_errors(tmp_path, line, message):
    with pytest.raises(rc.RecipeError, match=message):
        rc.load(write(tmp_path, f"[s]\n{line}\n"))


def test_duplicate_key_across_sections(tmp_path):
    with pytest.raises(rc.RecipeError, match=r"set twice \(\[a\] and \[b\]\)"):
        rc.load(write(tmp_path, "[a]\nseed = 1\n[b]\nseed = 2\n"))


def test_overrides_apply_and_are_validated():
    recipe = rc.load(REV1, ["max_train_steps=10", 'mixed_precision="bf16"', "kxl.gpus=2",
                            "optimizer_args=[\"weight_decay=0.0\"]", "lr_scheduler=cosine"])
    assert recipe.values["max_train_steps"] == 10 and recipe.values["mixed_precision"] == "bf16"
    assert recipe.gpus == 2 and recipe.values["optimizer_args"] == ["weight_decay=0.0"]
    assert recipe.values["lr_scheduler"] == "cosine"  # bare words are strings
    assert recipe.effective_batch() == 4 * 16 * 2
    with pytest.raises(rc.RecipeError, match="did you mean 'max_train_steps'"):
        rc.load(REV1, ["max_train_step=10"])
    with pytest.raises(rc.RecipeError, match="expected key=value"):
        rc.load(REV1, ["max_train_steps"])


def test_scalar_for_list_argument_is_wrapped(tmp_path):
    assert rc.load(write(tmp_path, "[o]\ntext_encoder_lr = 1e-6\n")).values["text_encoder_lr"] == [1e-6]


@given(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=64),
       st.integers(min_value=1, max_value=16))
def test_effective_batch_is_the_product(batch, ga, gpus):
    recipe = rc.load(REV1, [f"train_batch_size={batch}", f"gradient_accumulation_steps={ga}", f"kxl.gpus={gpus}"])
    assert recipe.effective_batch() == batch * ga * gpus
    assert f"= {batch * ga * gpus}" in recipe.summary()[1]


def test_preset_path_resolves_against_recipe_folder():
    values = rc.load_recipe(REV1)
    args = rc.resolved_network_args(values, REV1)
    preset = dict(a.split("=", 1) for a in args)["preset"]
    assert Path(preset).is_absolute() and Path(preset) == REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"


def test_committed_table_has_sd_scripts_core_arguments():
    table = rc.arguments()
    assert table["network_args"].nargs == "*" and table["text_encoder_lr"].kind == "float"
    assert table["mixed_precision"].choices == ["no", "fp16", "bf16"]
    assert table["shuffle_caption"].kind == "bool"


@pytest.mark.sdscripts
def test_committed_table_matches_live_parser(sd_scripts):
    """A pin upgrade that changes sdxl_train_network's arguments must regenerate sdxl_args.json."""
    from kxl_train.sdxl_args import live_parser, load_table, table_from_parser

    assert table_from_parser(live_parser(sd_scripts)) == load_table(), (
        "kxl_train/sdxl_args.json is stale: run kxl-train sdxl-args --write")
