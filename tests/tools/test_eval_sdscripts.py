"""`kxl eval` through sd-scripts' own SDXL inference (the sd-scripts backend).

- the sampler table of the diffusers backend against sd-scripts' get_my_scheduler (needs
  sd-scripts only);
- the full-size random SDXL (KXL_EVAL_SDXL=1; the model at
  KXL_EVAL_SDXL_MODEL, tokenizer cache KXL_EVAL_TOKENIZERS) generating two prompts at a tiny
  size through `kxl eval generate --checkpoint`: deterministic per seed, resumable.
  Heavy (about 7 GB of RAM in bf16): KXL_HEAVY_LOCK=/path/lock serialises it.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kxl_tools.eval.samplers import SAMPLERS, make_scheduler

# A `python -m kxl_testing.sdxl_random` file and a kxl_common.clip_tokenizer cache, made beforehand.
MODEL = Path(os.environ.get("KXL_EVAL_SDXL_MODEL", "/nonexistent/sdxl-random.safetensors"))
TOKENIZERS = Path(os.environ.get("KXL_EVAL_TOKENIZERS", "/nonexistent/tokenizers"))


@pytest.mark.sdscripts
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_table_matches_sd_scripts(train_util, name):
    if name in ("lms", "k_lms"):
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    try:
        theirs = train_util.get_my_scheduler(sample_sampler=name, v_parameterization=False)
    except ValueError as exc:  # "dpmsolver" with diffusers 0.32: sd-scripts' own call fails ...
        with pytest.raises(type(exc)):  # ... and so does ours, the same way
            make_scheduler(name)
        return
    ours = make_scheduler(name)
    assert type(ours) is type(theirs)
    assert dict(ours.config) == dict(theirs.config)


@pytest.fixture(scope="module")
def full_size(sd_scripts):
    if os.environ.get("KXL_EVAL_SDXL") != "1":
        pytest.skip("full-size SDXL generation is heavy: run with KXL_EVAL_SDXL=1")
    if not MODEL.is_file() or not TOKENIZERS.is_dir():
        pytest.skip(f"needs KXL_EVAL_SDXL_MODEL ({MODEL}) and KXL_EVAL_TOKENIZERS ({TOKENIZERS})")
    return sd_scripts


def _generate(prompts: Path, settings: Path, out: Path, *extra: str) -> str:
    from kxl_tools.cli import main

    lock = os.environ.get("KXL_HEAVY_LOCK")
    from kxl_common.lock import file_lock

    with file_lock(lock) if lock else contextlib.nullcontext():
        res = CliRunner().invoke(main, ["eval", "generate", str(prompts), "--checkpoint", str(MODEL),
                                        "--tokenizer-cache-dir", str(TOKENIZERS), "--settings", str(settings),
                                        "--out", str(out), "--device", "cpu", *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.sdscripts
@pytest.mark.slow
def test_full_size_sdxl_through_sd_scripts_is_deterministic_and_resumes(full_size, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": "char-00001", "kind": "character", "prompt": r"1girl, hatsune miku, vocaloid, masterpiece, newest, safe",
             "seeds": [11, 12], "display": "hatsune miku"},
            {"id": "style-01", "kind": "style", "prompt": r"1girl, ask \(askzy\), (torino aqua:1.2), masterpiece",
             "seeds": [11]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = tmp_path / "settings.toml"
    settings.write_text('[generate]\nwidth = 128\nheight = 128\nsteps = 2\ncfg = 5.0\nsampler = "euler_a"\n'
                        'negative_prompt = "worst quality"\nbatch_size = 1\ndtype = "bf16"\n')
    out = tmp_path / "gen"
    first = _generate(prompts, settings, out)
    assert "3 made, 0 already there" in first
    header = json.loads((out / "generate.json").read_text())
    assert header["model"]["backend"] == "sd-scripts"
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 3 and all(Image.open(p).size == (128, 128) for p in images)
    victim = out / "images" / "char-00001" / "12.png"
    before = np.asarray(Image.open(victim).convert("RGB"))
    victim.unlink()
    again = _generate(prompts, settings, out)
    assert "1 made, 2 already there" in again
    after = np.asarray(Image.open(victim).convert("RGB"))
    # same seed and batch size, same image (another batch size moves bf16 pixels by a few levels)
    assert np.array_equal(after, before)
    a = np.asarray(Image.open(out / "images" / "char-00001" / "11.png").convert("RGB"))
    assert not np.array_equal(a, after)  # another seed, another image


@pytest.mark.sdscripts
@pytest.mark.slow
def test_full_size_sdxl_with_a_lokr_applied(full_size, tmp_path):
    """--lokr goes through LyCORIS onto sd-scripts' models: it changes the image, the same LoKr
    gives the same image again, and an output folder made without it is not reused."""
    from kxl_testing.synthetic_checkpoints import write_lokr
    from kxl_train.preset_from import PLAN_PATH

    plan = json.loads(PLAN_PATH.read_text())["modules"]
    # the UNet's output-block attention of our preset: enough to move a 2-step image
    names = [n for n in plan if n.startswith("lora_unet_output_blocks_") and "_attn" in n][:40]
    assert len(names) == 40
    lokr = tmp_path / "lokr.safetensors"
    write_lokr(lokr, {n: {p: tuple(s) for p, s in plan[n].items()} for n in names}, seed=3, std=0.2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "char-00001", "kind": "character", "seeds": [11], "display": "hatsune miku",
                                   "prompt": "1girl, hatsune miku, vocaloid, masterpiece, newest, safe"}) + "\n")
    settings = tmp_path / "settings.toml"
    settings.write_text('[generate]\nwidth = 128\nheight = 128\nsteps = 2\ncfg = 5.0\nsampler = "euler_a"\n'
                        'negative_prompt = ""\nbatch_size = 1\ndtype = "bf16"\n')

    def image(out):
        return np.asarray(Image.open(out / "images" / "char-00001" / "11.png").convert("RGB"))

    _generate(prompts, settings, tmp_path / "plain")
    _generate(prompts, settings, tmp_path / "lokr-a", "--lokr", str(lokr), "--multiplier", "1.0")
    _generate(prompts, settings, tmp_path / "lokr-b", "--lokr", str(lokr), "--multiplier", "1.0")
    header = json.loads((tmp_path / "lokr-a" / "generate.json").read_text())
    assert header["model"]["lokr"] == str(lokr.resolve()) and header["model"]["multiplier"] == 1.0
    assert not np.array_equal(image(tmp_path / "plain"), image(tmp_path / "lokr-a"))
    assert np.array_equal(image(tmp_path / "lokr-a"), image(tmp_path / "lokr-b"))
    from kxl_tools.cli import main

    refused = CliRunner().invoke(main, ["eval", "generate", str(prompts), "--checkpoint", str(MODEL),
                                        "--tokenizer-cache-dir", str(TOKENIZERS), "--settings", str(settings),
                                        "--out", str(tmp_path / "plain"), "--device", "cpu", "--lokr", str(lokr)])
    assert refused.exit_code != 0 and "lokr" in refused.output.lower()
