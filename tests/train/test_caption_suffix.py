"""--kxl-keep-caption-suffix (kxl_train.caption_suffix) against sd-scripts v0.10.1's own
process_caption and tokenize strategy (skipped without sd-scripts): a caption over the budget
keeps its whole suffix in the token ids sd-scripts produces and loses only general tags, drawn
as before; a caption that fits is bitwise what sd-scripts makes; uninstall gives sd-scripts'
behaviour back. With kxl's columnar dataset and exact resume too. The anchored edit's refusal
runs without sd-scripts."""
from __future__ import annotations

import random
import sys
from types import SimpleNamespace

import pytest
import torch

from kxl_train.resume.items import PatchError

PREFIX = "1girl, hatsune miku, vocaloid, some artist"
SUFFIX = "masterpiece, newest, absurdres, highres, nsfw, explicit"
WORDS = [f"{a} {b}" for a in ("red", "long", "open", "black", "white", "short", "blue")
         for b in ("hair", "eyes", "skirt", "shirt", "gloves", "ribbon", "mouth")]


def caption(n_general: int, offset: int = 0) -> str:
    general = [WORDS[(offset + i) % len(WORDS)] + (f" {i // len(WORDS)}" if i >= len(WORDS) else "")
               for i in range(n_general)]
    return f"{PREFIX} ||| {', '.join(general)} ||| {SUFFIX}"


@pytest.fixture(scope="module")
def sd(sd_scripts, tmp_path_factory):
    if str(sd_scripts) not in sys.path:
        sys.path.insert(0, str(sd_scripts))
    from kxl_common.clip_tokenizer import make_tokenizer_cache
    from kxl_train import torchvision_compat

    torchvision_compat.install()
    return make_tokenizer_cache(tmp_path_factory.mktemp("tok"))


def strategy(tokenizers, max_token_length):
    from library import strategy_sdxl

    return strategy_sdxl.SdxlTokenizeStrategy(max_token_length, str(tokenizers))


def content_ids(input_ids: torch.Tensor, tokenizer) -> list[int]:
    """The content tokens of sd-scripts' (chunks, 77) ids: each chunk's BOS ... EOS/pad stripped."""
    ids = []
    for chunk in input_ids.reshape(-1, input_ids.shape[-1]):
        body = chunk[1:-1].tolist()
        ids += body
    while ids and ids[-1] in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        ids.pop()
    return ids


def split(text: str) -> list[str]:
    return text.split(", ")


SUBSET = dict(caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
              enable_wildcard=False, shuffle_caption=True, token_warmup_step=0, token_warmup_min=1,
              caption_tag_dropout_rate=0.15, keep_tokens_separator="|||", caption_separator=",", keep_tokens=0,
              secondary_separator=None)


@pytest.mark.parametrize("max_token_length", [None, 225])
def test_over_budget_keeps_suffix_fitting_is_bitwise_unchanged(sd, train_util, max_token_length):
    from kxl_train import caption_suffix

    tokenize = strategy(sd, max_token_length)
    budget = 75 if max_token_length is None else max_token_length
    tok = tokenize.tokenizer1
    dataset = SimpleNamespace(current_epoch=1, current_step=0, max_train_steps=100, replacements={},
                              tokenize_strategy=tokenize)
    subset = SimpleNamespace(**SUBSET)
    lengths = [2, 8, 15, 25, 40, 60, 80, 100, 130]
    captions = [caption(n, offset=i) for i, n in enumerate(lengths)]
    suffix_ids = tok(SUFFIX).input_ids[1:-1]

    def run(seed):
        random.seed(seed)
        out = [train_util.BaseDataset.process_caption(dataset, subset, c) for c in captions for _ in range(4)]
        return out, random.getstate()

    original = train_util.BaseDataset.process_caption
    plain, plain_state = run(3)
    patches = caption_suffix.install({"keep_caption_suffix": True}, [])
    try:
        assert train_util.BaseDataset.process_caption is not original
        kept, kept_state = run(3)
    finally:
        patches.uninstall()
    assert train_util.BaseDataset.process_caption is original and not hasattr(train_util, caption_suffix.FIT_NAME)
    assert kept_state == plain_state  # the same random draws, whatever was cut
    again, _ = run(3)
    assert again == plain  # uninstalled: sd-scripts' own captions

    n_fit = n_cut = 0
    for before, after in zip(plain, kept):
        ids_before = content_ids(tokenize.tokenize(before)[0], tok)
        ids_after = content_ids(tokenize.tokenize(after)[0], tok)
        if len(tok.tokenize(before)) <= budget:
            n_fit += 1
            assert after == before
            assert torch.equal(tokenize.tokenize(after)[0], tokenize.tokenize(before)[0])
        else:
            n_cut += 1
            assert ids_before[-len(suffix_ids):] != suffix_ids  # sd-scripts cut the suffix
            assert ids_after[-len(suffix_ids):] == suffix_ids and len(ids_after) <= budget
            b, a = split(before), split(after)
            # the prefix, then the first general tags of the same shuffle, then the whole suffix
            n_prefix, n_suffix = len(split(PREFIX)), len(split(SUFFIX))
            assert a[:n_prefix] == b[:n_prefix] and a[-n_suffix:] == b[-n_suffix:] == split(SUFFIX)
            kept_general = a[n_prefix:-n_suffix]
            assert kept_general == b[n_prefix:n_prefix + len(kept_general)]
            # as many as fit: one more general tag would be over the budget
            one_more = ", ".join(b[:n_prefix + len(kept_general) + 1] + split(SUFFIX))
            assert len(tok.tokenize(one_more)) > budget
    assert n_fit > 0 and n_cut > 0


def test_columnar_exact_resume_batches(sd, tmp_path):
    """Through kxl's columnar dataset and exact resume (sd-scripts' own __getitem__ and tokenize
    strategy, max_token_length unset): fitting items bitwise equal, long ones keep the suffix."""
    from library import config_util, strategy_base, strategy_sd, train_util
    from library.config_util import BlueprintGenerator, ConfigSanitizer
    import sdxl_train_network

    from kxl_testing.accelerator import FakeAccelerator
    from kxl_testing.prep_output import make_prep_output
    from kxl_train import caption_suffix
    from kxl_train.dataset import sdscripts as columnar_patch
    from kxl_train.resume import sdscripts as resume_patch
    from kxl_train.resume.sampler import EpochItem

    captions = [caption(n, offset=i) for i, n in enumerate([3, 40, 5, 60, 10, 30, 8, 50, 2, 45, 6, 35])]
    toml = make_prep_output(tmp_path / "data", n_images=12, captions=captions)

    def load(keep_suffix: bool):
        installed = [columnar_patch.install({}, [])]
        runtime = resume_patch.install({}, [])
        installed += [runtime, caption_suffix.install({"keep_caption_suffix": keep_suffix}, [])]
        try:
            args = sdxl_train_network.setup_parser().parse_args(
                ["--dataset_config", str(toml), "--tokenizer_cache_dir", str(sd), "--seed", "42",
                 "--max_train_steps", "6"])
            train_util.prepare_dataset_args(args, True)
            strategy_base.TokenizeStrategy._strategy = None
            strategy_base.TokenizeStrategy.set_strategy(strategy(sd, None))
            strategy_base.LatentsCachingStrategy._strategy = None
            strategy_base.LatentsCachingStrategy.set_strategy(
                strategy_sd.SdSdxlLatentsCachingStrategy(False, False, 1, False))
            blueprint = BlueprintGenerator(ConfigSanitizer(True, True, False, True)).generate(
                config_util.load_user_config(str(toml)), args)
            random.seed(1234)
            group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
            group.set_current_strategies()
            assert type(group.datasets[0]).__name__ == "ColumnarFineTuningDataset"
            runtime.group, runtime.args = group, None
            runtime.set_up(args, FakeAccelerator())
            return [group[EpochItem(e, p, p)] for e in (0, 1) for p in range(len(group))]
        finally:
            for patch in reversed(installed):
                if patch is not None:
                    patch.uninstall()

    plain, kept = load(False), load(True)
    tok = strategy(sd, None).tokenizer1
    suffix_ids = tok(SUFFIX).input_ids[1:-1]
    n_fit = n_cut = 0
    for a, b in zip(plain, kept, strict=True):
        assert a["kxl_keys"] == b["kxl_keys"] and torch.equal(a["images"], b["images"])
        for i, (ca, cb) in enumerate(zip(a["captions"], b["captions"], strict=True)):
            ids_a, ids_b = a["input_ids_list"][0][i], b["input_ids_list"][0][i]
            if len(tok.tokenize(ca)) <= 75:
                n_fit += 1
                assert ca == cb and torch.equal(ids_a, ids_b) and torch.equal(a["input_ids_list"][1][i],
                                                                             b["input_ids_list"][1][i])
            else:
                n_cut += 1
                assert content_ids(ids_b, tok)[-len(suffix_ids):] == suffix_ids
                assert cb.split(", ")[:5] == ca.split(", ")[:5]  # the same shuffle, cut later
    assert n_fit and n_cut


def test_other_sd_scripts_is_refused():
    """The edit needs sd-scripts' exact line, once (no sd-scripts needed)."""
    from kxl_train.caption_suffix import EDITS
    from kxl_train.source_edits import edit_function

    def process_caption(self, subset, caption):
        caption = ", ".join(fixed_tokens + flex_tokens)  # noqa: F821  (another join: not v0.10.1)
        return caption

    with pytest.raises(PatchError, match="not v0.10.1"):
        edit_function(process_caption, EDITS, "kxl keep caption suffix")

    def same_line(self, subset, fixed_tokens, flex_tokens, fixed_suffix_tokens):
        caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)
        return caption

    edited = edit_function(same_line, [(EDITS[0][0], 'caption = "|".join(fixed_tokens + fixed_suffix_tokens)')], "t")
    assert edited(None, None, ["a"], ["b"], ["c"]) == "a|c" and edited._kxl_original is same_line
    assert edited.__code__.co_firstlineno == same_line.__code__.co_firstlineno  # tracebacks: same lines


def test_off_unless_asked():
    from kxl_train import caption_suffix

    assert caption_suffix.install({}, []) is None


# ---- the recipe key and the launch (no sd-scripts needed) ----------------------------------------


def test_recipe_key_turns_the_patch_on(inputs):
    from kxl_common.upstream import REPO_ROOT
    from kxl_train import launch

    data, model, out = inputs
    rev1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
    plan = launch.build_plan(rev1, dataset=data, model=str(model), output=out)
    assert "--kxl-keep-caption-suffix" not in plan.command  # not the reproduction's default
    plan = launch.build_plan(rev1, dataset=data, model=str(model), output=out,
                             overrides=["kxl.keep_caption_suffix=true"])
    assert plan.command[-1] == "--kxl-keep-caption-suffix"
    from kxl_train.recipe import RecipeError

    with pytest.raises(RecipeError, match="keep_caption_suffix: expected true or false"):
        launch.build_plan(rev1, dataset=data, model=str(model), output=out, overrides=["kxl.keep_caption_suffix=3"])


@pytest.mark.parametrize("counted,trained,warned", [(225, "225", False), (225, "150", True), (75, None, False),
                                                    (225, None, True)])
def test_launch_warns_when_the_dataset_was_counted_for_another_budget(inputs, counted, trained, warned):
    import json

    from kxl_common.upstream import REPO_ROOT
    from kxl_train import launch

    data, model, out = inputs
    (data / "manifest.json").write_text(json.dumps({"tokens": {"max_token_length": counted}}))
    rev1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
    # the recipe without max_token_length (sd-scripts' 75), or with the value given
    text = "\n".join(line for line in rev1.read_text().splitlines() if not line.startswith("max_token_length"))
    recipe = data.parent / "recipe.toml"
    recipe.write_text(text + "\n")
    (data.parent / "lycoris").mkdir(exist_ok=True)
    for preset in (REPO_ROOT / "recipes" / "lycoris").glob("*.toml"):
        (data.parent / "lycoris" / preset.name).write_text(preset.read_text())
    (data.parent / "samples").mkdir(exist_ok=True)
    for sample in (REPO_ROOT / "recipes" / "samples").glob("*"):
        (data.parent / "samples" / sample.name).write_text(sample.read_text())
    overrides = [] if trained is None else [f"max_token_length={trained}"]
    plan = launch.build_plan(recipe, dataset=data, model=str(model), output=out, overrides=overrides)
    messages = [w for w in plan.warnings if "max_token_length" in w]
    assert bool(messages) == warned
    if warned:
        assert f"counted against max_token_length {counted}" in messages[0]
