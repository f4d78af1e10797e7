"""Offline fixtures: tokenizer cache (fast, CI) and the SDXL checkpoint layout (gated)."""
from __future__ import annotations

import importlib.util

import pytest

from kxl_common import clip_tokenizer as tk


def _open_clip_simple_tokenizer():
    """open_clip's own tokenizer module, loaded from its file (its package imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = list(spec.submodule_search_locations)[0] + "/tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_only", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tk.make_tokenizer_cache(tmp_path_factory.mktemp("tok"))


def test_cache_layout_and_special_tokens(cache):
    from transformers import CLIPTokenizer

    t1 = CLIPTokenizer.from_pretrained(str(cache / "openai_clip-vit-large-patch14"))
    t2 = CLIPTokenizer.from_pretrained(str(cache / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    for t in (t1, t2):
        assert len(t) == 49408 and t.model_max_length == 77
        assert (t.bos_token_id, t.eos_token_id) == (49406, 49407)
    assert t1.pad_token == "<|endoftext|>" and t1.pad_token_id == 49407
    assert t2.pad_token == "!" and t2.pad_token_id == 0
    # OpenAI CLIP's published ids for this sentence
    assert t1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("text", ["1girl, hatsune miku, ^_^, looking at viewer",
                                  "masterpiece, best quality, newest, nsfw, explicit",
                                  "Ünïcödé 12345 pvc figure (photo)"])
def test_ids_match_open_clip(cache, text):
    from transformers import CLIPTokenizer

    pytest.importorskip("ftfy")
    reference = _open_clip_simple_tokenizer()
    t1 = CLIPTokenizer.from_pretrained(str(cache / "openai_clip-vit-large-patch14"))
    ours = t1(text).input_ids
    assert ours[0] == 49406 and ours[-1] == 49407
    assert ours[1:-1] == reference.encode(text)


@pytest.mark.sdscripts
def test_random_sdxl_layout_is_what_sd_scripts_loads(sd_scripts):
    """Every tensor of the file lands in sd-scripts' SDXL models with the right shape (meta)."""
    import torch

    from kxl_testing import sdxl_random as sx

    header, _order = sx._layout(sx._components())
    meta = {k: torch.empty(v["shape"], dtype=torch.float16, device="meta") for k, v in header.items()}
    from library import model_util, sdxl_model_util, sdxl_original_unet
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = sdxl_original_unet.SdxlUNet2DConditionModel()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**sx.TE2_CONFIG))
    pick = lambda prefix: {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}  # noqa: E731

    def same(model_sd, file_sd):
        assert set(model_sd) == set(file_sd)
        assert all(tuple(model_sd[k].shape) == tuple(file_sd[k].shape) for k in model_sd)

    same(unet.state_dict(), pick("model.diffusion_model."))
    te2_sd, logit_scale = sdxl_model_util.convert_sdxl_text_encoder_2_checkpoint(
        {k: v for k, v in meta.items() if k.startswith("conditioner.embedders.1.model.")}, max_length=77)
    same(te2.state_dict(), te2_sd)
    assert logit_scale is not None
    vae_sd = model_util.convert_ldm_vae_checkpoint(meta, model_util.create_vae_diffusers_config())
    assert len(vae_sd) == len(pick("first_stage_model."))
    n_params = sum(torch.Size(v["shape"]).numel() for v in header.values())
    assert 3.4e9 < n_params < 3.6e9  # SDXL base: UNet 2.57B + TE 0.82B + VAE 0.08B


def test_smoke_check_reads_norm_modules_of_the_authors_config(tmp_path):
    """The smoke's file check on a network of the author's config (LoKr + train_norm) made by
    LyCORIS on an SDXL-like tree: shapes against the count, what moved and what did not."""
    pytest.importorskip("lycoris")
    import torch
    from safetensors.torch import save_file

    from kxl_testing import sdxl_like as sx
    from kxl_testing.tiny_lycoris import network_state
    from kxl_testing.train_smoke import check_lokr_files
    from kxl_train.lokr_preset import count_network

    models = sx.sdxl_like_models()
    expected = count_network(None, sx.AUTHOR_NETWORK_ARGS + [f"preset={sx.AUTHOR_PRESET}"], sx.AUTHOR_NETWORK_DIM,
                             float(sx.AUTHOR_NETWORK_ALPHA), models=models)
    start = {k: v.detach().clone().contiguous() for k, v in network_state(sx.author_network(models)).items()}
    assert all(not v.any() for k, v in start.items() if k.endswith((".lokr_w2", ".w_norm", ".b_norm")))
    still = "lora_unet_out_0"  # one norm module left at zero, one w2 left at zero
    frozen_w2 = "lora_unet_time_embed_0"
    last = {k: (v if k.startswith((still + ".", frozen_w2 + ".")) or k.endswith(".alpha") else v + 0.01)
            for k, v in start.items()}
    save_file(start, str(tmp_path / "first.safetensors"))
    save_file(last, str(tmp_path / "last.safetensors"))
    check = check_lokr_files(tmp_path / "first.safetensors", tmp_path / "last.safetensors", expected)
    lokr = [m for m in expected.modules if m.w1]
    assert check["modules"] == len(lokr) and check["norm_modules"] == len(expected.modules) - len(lokr) > 0
    assert check["keys"] == len(start)
    assert check["unmoved_norms"] == [still] and check["unmoved_w2"] == [frozen_w2]
    assert check["moved_w1"] == len(lokr) - 1
    del last["lora_unet_out_0.b_norm"]
    save_file(last, str(tmp_path / "cut.safetensors"))
    with pytest.raises(AssertionError, match="lora_unet_out_0"):
        check_lokr_files(tmp_path / "first.safetensors", tmp_path / "cut.safetensors", expected)
