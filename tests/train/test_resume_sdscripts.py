"""Exact resume through the real sd-scripts v0.10.1 (skipped without it).

Light tests build sd-scripts' own dataset (DreamBooth-style subset with caption files, buckets,
`|||` keep-tokens separator, caption shuffle, tag dropout, flips) and check the patches on it;
the heavy test trains the real sdxl_train_network through kxl_train.entry on a random-weight
SDXL: straight 4 steps vs resumed from the state at step 3 (GA 2, epochs of 3 micro-batches,
so the resume lands mid-epoch in epoch 2 after a short step).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from multiprocessing import Value
from pathlib import Path

import pytest

from kxl_testing.accelerator import FakeAccelerator
from kxl_train.resume import state as state_mod
from kxl_train.resume.sampler import EpochItem, epoch_order

REPO = Path(__file__).resolve().parents[2]

CAPTIONS = [
    "1girl, solo ||| red hair, smile, outdoors, sky, cloud, dress ||| masterpiece, newest",
    "1boy ||| black hair, glasses, indoors, book, sitting ||| best quality",
    "2girls ||| holding hands, school uniform, cherry blossoms, petals ||| masterpiece",
    "no humans ||| scenery, mountain, river, sunset, tree, grass ||| newest",
    "1girl ||| cat ears, tail, hoodie, night, city lights ||| masterpiece",
]
SIZES = [(64, 64), (64, 64), (64, 64), (128, 32), (128, 32)]  # two buckets: 64x64 and 128x32


def make_dataset(root: Path, extra_image: bool = False) -> Path:
    from PIL import Image
    import numpy as np

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = list(zip(CAPTIONS, SIZES)) + ([("1girl ||| extra ||| x", (64, 64))] if extra_image else [])
    for i, (caption, (w, h)) in enumerate(entries):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(caption)
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens_separator = \"|||\"\ncaption_extension = \".txt\"\n"
        "caption_tag_dropout_rate = 0.2\nflip_aug = true\nenable_bucket = true\nresolution = 64\n"
        "min_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\nbatch_size = 2\n\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"{images}\"\nnum_repeats = 1\n"
    )
    return toml


@pytest.fixture()
def patched(sd_scripts, tmp_path_factory):
    if str(sd_scripts) not in sys.path:
        sys.path.insert(0, str(sd_scripts))
    from kxl_train import torchvision_compat
    from kxl_common.clip_tokenizer import make_tokenizer_cache
    from kxl_train.resume import sdscripts

    torchvision_compat.install()
    tokenizers = make_tokenizer_cache(tmp_path_factory.mktemp("tok"))
    runtime = sdscripts.install({}, [])
    try:
        yield runtime, tokenizers
    finally:
        runtime.uninstall()


def build(runtime, tokenizers, toml: Path, *extra: str):
    """What NetworkTrainer.train does up to prepare_accelerator, with sd-scripts' own code."""
    import sdxl_train_network
    from library import config_util, strategy_base, strategy_sdxl, train_util
    from library.config_util import BlueprintGenerator, ConfigSanitizer

    args = sdxl_train_network.setup_parser().parse_args(
        ["--dataset_config", str(toml), "--tokenizer_cache_dir", str(tokenizers), "--seed", "42",
         "--max_train_steps", "6", "--gradient_accumulation_steps", "2", *extra])
    train_util.prepare_dataset_args(args, True)
    strategy_base.TokenizeStrategy._strategy = None  # a process-wide singleton in sd-scripts
    strategy_base.TokenizeStrategy.set_strategy(strategy_sdxl.SdxlTokenizeStrategy(None, str(tokenizers)))
    blueprint = BlueprintGenerator(ConfigSanitizer(True, True, False, True)).generate(
        config_util.load_user_config(str(toml)), args)
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    group.set_current_strategies()
    runtime.group, runtime.args = group, None
    runtime.set_up(args, FakeAccelerator())
    return args, group


def test_train_source_patch_applies_and_uninstalls(sd_scripts, patched):
    import train_network

    runtime, _ = patched
    train = train_network.NetworkTrainer.train
    assert train._kxl_patched and train.__code__.co_filename.endswith("train_network.py")
    original = train._kxl_original
    assert "global_step = 0" in __import__("inspect").getsource(original)
    runtime.uninstall()
    assert train_network.NetworkTrainer.train is original
    assert not hasattr(train_network, "_kxl_resume_runtime")


def test_real_dataset_items_are_functions_of_seed_epoch_and_position(sd_scripts, patched, tmp_path):
    runtime, tokenizers = patched
    _, group = build(runtime, tokenizers, make_dataset(tmp_path))
    assert len(group) == 3  # square bucket: 3 images -> 2 batches; 128x32 bucket: 2 images -> 1 batch
    assert sorted(len(b) for b in group.datasets[0].bucket_manager.buckets if b) == [2, 3]
    first = {i: group[EpochItem(1, i, i)] for i in range(3)}
    for i in reversed(range(3)):  # other epochs, other order in between
        group[EpochItem(0, i, i)], group[EpochItem(3, i, i)]
    for i in range(3):
        again = group[EpochItem(1, i, i)]
        assert again["captions"] == first[i]["captions"] and again["flippeds"] == first[i]["flippeds"]
        assert again["kxl_keys"] == first[i]["kxl_keys"]
        assert again["images"].equal(first[i]["images"])
    for example in first.values():
        for caption in example["captions"]:
            assert "|||" not in caption  # the keep-tokens split ran
            prefix, suffix = caption.split(", ")[0], caption.split(", ")[-1]
            assert prefix in {"1girl", "1boy", "2girls", "no humans"}
            assert suffix in {"newest", "best quality", "masterpiece"}
    # caption randomness varies across epochs for the same image
    per_epoch = []
    for epoch in range(8):
        captions = {}
        for i in range(3):
            ex = group[EpochItem(epoch, i, i)]
            captions.update(zip(ex["kxl_keys"], zip(ex["captions"], ex["flippeds"])))
        per_epoch.append(captions)
    some_key = next(iter(per_epoch[0]))
    assert len({pe[some_key] for pe in per_epoch}) > 1


def test_real_dataloader_is_replaced_by_the_exact_sampler(sd_scripts, patched, tmp_path):
    import torch
    from library import train_util

    runtime, tokenizers = patched
    args, group = build(runtime, tokenizers, make_dataset(tmp_path))
    epoch, step = Value("i", 0), Value("i", 0)
    original = torch.utils.data.DataLoader(group, batch_size=1, shuffle=True,
                                           collate_fn=train_util.collator_class(epoch, step, group))
    loader = runtime.replace_dataloader(original)
    assert loader is not original and len(loader) == 3
    epoch.value = 2  # train_network.py:1403 sets epoch + 1 before iterating
    torch.manual_seed(0)
    before = torch.get_rng_state()
    positions = [batch["kxl_item"] for batch in loader]
    assert torch.equal(before, torch.get_rng_state())  # no global torch RNG drawn by the epoch
    assert [p[2] for p in positions] == epoch_order(42, 1, 3)


def test_recipe_mismatch_is_refused_before_the_model_loads(sd_scripts, patched, tmp_path):
    runtime, tokenizers = patched
    toml = make_dataset(tmp_path / "a")
    build(runtime, tokenizers, toml)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_mod.write_resume_record(state_dir, {"global_step": 2, "recipe": runtime.recipe, "argv": [],
                                              "kxl_options": {}, "num_processes": 1, "seed": 42})
    (state_dir / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 2}))
    build(runtime, tokenizers, toml, "--resume", str(state_dir))  # same recipe: accepted
    assert runtime.start_step == 2 and runtime.resumption.epoch == 1  # 3 micro-batches, GA 2: 2 steps/epoch
    with pytest.raises(state_mod.ResumeRefused, match="gradient_accumulation_steps: state has 2, this run has 4"):
        build(runtime, tokenizers, toml, "--resume", str(state_dir), "--gradient_accumulation_steps", "4")
    with pytest.raises(state_mod.ResumeRefused, match="lr_warmup_steps"):
        build(runtime, tokenizers, toml, "--resume", str(state_dir), "--lr_warmup_steps", "3")
    with pytest.raises(state_mod.ResumeRefused, match="items_sha256"):
        build(runtime, tokenizers, make_dataset(tmp_path / "b", extra_image=True), "--resume", str(state_dir))
    with pytest.raises(state_mod.ResumeRefused, match="skip_until_initial_step"):
        build(runtime, tokenizers, toml, "--resume", str(state_dir), "--skip_until_initial_step")


# ----------------------------------------------------------------------------- heavy
def random_sdxl(tmp_path_factory) -> Path:
    env = os.environ.get("KXL_RANDOM_SDXL")
    if env:
        return Path(env)
    if os.environ.get("KXL_BUILD_RANDOM_SDXL") != "1":
        pytest.skip("heavy: set KXL_RANDOM_SDXL=PATH (a kxl_testing.sdxl_random file) or "
                    "KXL_BUILD_RANDOM_SDXL=1 to build one (7 GB); the run peaks near 23 GB RAM")
    import contextlib

    from kxl_common.lock import file_lock
    from kxl_testing.sdxl_random import make_random_sdxl

    lock = os.environ.get("KXL_HEAVY_LOCK")  # building peaks at several GB, like the training runs
    with file_lock(lock) if lock else contextlib.nullcontext():
        return make_random_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl_random.safetensors")


def run_heavy(command: list[str], log: Path) -> None:
    lock = ["flock", os.environ["KXL_HEAVY_LOCK"]] if os.environ.get("KXL_HEAVY_LOCK") else []  # one heavy job at a time
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with open(log, "w") as fh:
        rc = subprocess.call(lock + command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    assert rc == 0, f"{command[:4]}... failed, log {log}:\n" + log.read_text()[-4000:]


@pytest.mark.slow
def test_real_training_straight_vs_resumed(sd_scripts, tmp_path, tmp_path_factory):
    import torch
    from safetensors.torch import load_file

    from kxl_common.clip_tokenizer import make_tokenizer_cache
    from kxl_train.resume.trace import read_trace

    model = random_sdxl(tmp_path_factory)
    tokenizers = make_tokenizer_cache(tmp_path / "tok")
    toml = make_dataset(tmp_path / "data")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(tokenizers),
        "--dataset_config", str(toml), "--output_name", "lokr", "--save_model_as", "safetensors",
        "--network_module", "lycoris.kohya", "--network_dim", "4", "--network_alpha", "1",
        "--network_args", "algo=lokr", "preset=attn-only", "factor=16",
        # bf16 keeps the UNet at 5 GB (fp32 SDXL training peaked at 22 GB and was OOM-killed on a
        # shared 24 GB machine); the text encoders stay fp32 on CPU, the LoKr weights are fp32
        "--network_train_unet_only", "--mixed_precision", "bf16", "--save_precision", "float",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "1", "--max_train_steps", "4", "--gradient_accumulation_steps", "2",
        "--seed", "42", "--save_every_n_steps", "1", "--save_state", "--max_data_loader_n_workers", "0",
        "--sdpa", "--no_half_vae",
    ]
    run_heavy([sys.executable, "-m", "kxl_train.entry", *common, "--output_dir", str(straight),
               f"--kxl-trace={straight / 'trace.jsonl'}"], tmp_path / "straight.log")
    state = straight / "lokr-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 3
    run_heavy(["bash", str(REPO / "launch" / "resume.sh"), str(state), "--", "--output_dir", str(resumed),
               f"--kxl-trace={resumed / 'trace.jsonl'}"], tmp_path / "resumed.log")

    straight_trace, resumed_trace = read_trace(straight / "trace.jsonl"), read_trace(resumed / "trace.jsonl")
    assert [r["step"] for r in straight_trace] == [1, 2, 3, 4]
    assert resumed_trace == straight_trace[3:]
    # checkpoint names and the next state continue the count
    assert (resumed / "lokr-step00000004.safetensors").is_file()
    assert not (resumed / "lokr-step00000001.safetensors").exists()
    a, b = load_file(straight / "lokr.safetensors"), load_file(resumed / "lokr.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    step4_a = load_file(straight / "lokr-step00000004.safetensors")
    assert any(not torch.equal(step4_a[k], load_file(straight / "lokr-step00000003.safetensors")[k]) for k in a)
