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
    # LoKr through LyCORIS, both text encoders trained (the author's network settings: test_lokr_preset)
    assert v["network_module"] == "lycoris.kohya"
    args = dict(item.split("=", 1) for item in v["network_args"])
    assert args["algo"] == "lokr" and (Path(path).parent / args["preset"]).is_file()
    assert not v.get("network_train_unet_only") and not v.get("cache_text_encoder_outputs")


@pytest.mark.parametrize("path", [REV1, REV2], ids=["rev1", "rev2"])
def test_recipe_takes_the_authors_script_where_the_card_is_silent(path):
    """Delta's docs/train_script.sh (spec: "The author's published configuration")."""
    v = rc.load(path).values
    assert v["max_token_length"] == 225 and v["gradient_checkpointing"] and v["save_precision"] == "fp16"
    assert v["ddp_gradient_as_bucket_view"] and v["ddp_timeout"] == 10080
    assert v["seed"] == 1337 and "Delta" in path.read_text().split("seed = 1337", 1)[1].splitlines()[0]
    # the two deliberate deviations, each one key away from the author's choice
    assert v["sdpa"] and "xformers" not in v and v["full_fp16"] is False
    author = rc.load(path, ["kxl.attention=xformers", "kxl.full_fp16=true"]).values
    assert author["xformers"] and "sdpa" not in author and author["full_fp16"] is True


@pytest.mark.parametrize("path", [REV1, REV2], ids=["rev1", "rev2"])
def test_full_fp16_reason_holds_for_the_recipes_learning_rates(path):
    """The recipe says a Lion step of lr rounds away in fp16 above a magnitude: check it in fp16."""
    np = pytest.importorskip("numpy")
    v = rc.load(path).values
    comment = path.read_text()
    for lr in (v["unet_lr"], v["text_encoder_lr"][0]):
        # the smallest power of two from which w + lr == w in fp16
        lost_from = next(2.0 ** e for e in range(-20, 1) if np.float16(2.0 ** e) + np.float16(lr) == np.float16(2.0 ** e))
        assert np.float16(lost_from / 2) + np.float16(lr) != np.float16(lost_from / 2)  # below it the step lands
        assert f">= {lost_from:.4f}"[:8] in comment or f">= {lost_from:.3g}" in comment, (lr, lost_from)


def test_kxl_switch_conflicts_and_values_are_errors(tmp_path):
    with pytest.raises(rc.RecipeError, match=r"sdpa = false disagrees with \[kxl\] attention = 'sdpa'; fix: set only kxl.attention"):
        rc.load(REV1, ["sdpa=false"])
    with pytest.raises(rc.RecipeError, match=r"full_fp16 = true disagrees with \[kxl\] full_fp16 = false; fix: set only kxl.full_fp16"):
        rc.load(REV1, ["full_fp16=true"])
    with pytest.raises(rc.RecipeError, match=r"\[kxl\] attention = 'flash' is not one of \['sdpa', 'xformers'\]; fix: "):
        rc.load(REV1, ["kxl.attention=flash"])
    with pytest.raises(rc.RecipeError, match="full_fp16 needs mixed_precision"):
        rc.load(REV1, ["kxl.full_fp16=true", 'mixed_precision="bf16"'])
    # a recipe without the switches keeps its own sd-scripts flags
    assert rc.load(write(tmp_path, "[t]\nxformers = true\n")).values == {"xformers": True}


@pytest.mark.parametrize("value", [75, 100, 300])
def test_max_token_length_outside_sd_scripts_choices(value):
    with pytest.raises(rc.RecipeError, match=rf"max_token_length: {value} is not one of \[150, 225\]; fix: use 150 or 225, "
                                             r"or leave max_token_length unset for 75 tokens"):
        rc.load(REV1, [f"max_token_length={value}"])
    assert rc.load(REV1, ["max_token_length=150"]).values["max_token_length"] == 150


def test_bad_preset_stops_the_recipe(tmp_path):
    (tmp_path / "lycoris").mkdir()
    good = (REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml").read_text()
    (tmp_path / "lycoris" / "p.toml").write_text("unet_target_modules = []\n" + good)
    recipe = write(tmp_path, '[n]\nnetwork_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "preset=lycoris/p.toml"]\n')
    with pytest.raises(rc.RecipeError, match=r"r.toml: network_args preset: .*p.toml: preset key unet_target_modules = \[\] "
                                             r"is not one LyCORIS reads; fix: did you mean 'unet_target_module'"):
        rc.load(recipe)
    (tmp_path / "lycoris" / "p.toml").unlink()
    with pytest.raises(rc.RecipeError, match="no such LyCORIS preset file"):
        rc.load(recipe)


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


def validate_cli(*args):
    from click.testing import CliRunner

    from kxl_train import cli

    return CliRunner().invoke(cli.main, ["validate", *map(str, args)])


def test_validate_stops_on_bad_input_with_the_fix(tmp_path):
    result = validate_cli(REV1, "max_token_length=75")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "max_token_length: 75 is not one of [150, 225]; fix: use 150 or 225, or leave max_token_length unset" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml").read_text() + "ranks = 4\n")
    args = ["conv_dim=10000", "conv_alpha=10000", "algo=lokr", "dropout=0", "factor=8", "train_norm=True", f"preset={bad}"]
    result = validate_cli(REV1, "network_args=" + repr(args).replace("'", '"'))
    assert result.exit_code != 0 and "[module_algo_map.CLIPMLP] ranks = 4: algo 'lokr' takes no option 'ranks'" in result.output


@pytest.mark.sdscripts
def test_validate_reports_the_network_and_what_each_pattern_matched(sd_scripts):
    result = validate_cli(REV1)
    assert result.exit_code == 0, result.output
    assert "network: 1058 LoKr + 256 norm modules, 384,645,360 parameters" in result.output
    assert "network: unet_target_name '.*input_blocks\\\\.0.+' matched input_blocks.0.0\n" in result.output
    args = ["conv_dim=10000", "conv_alpha=10000", "algo=lokr", "dropout=0", "factor=5", "train_norm=True",
            "preset=lycoris/epsilon-lokr.toml"]
    result = validate_cli(REV1, "network_args=" + repr(args).replace("'", '"'))
    assert result.exit_code != 0 and "network_args factor=5: 5 does not divide the layer side(s)" in result.output
