"""A tiny SDXL-shaped checkpoint that sd-scripts' own SDXL loader reads: the benchmark's CPU form.

sd-scripts builds SDXL from module constants and literal configs (library/sdxl_original_unet.py
MODEL_CHANNELS / TIME_EMBED_DIM, library/model_util.py VAE_PARAMS_CH, the CLIPTextConfig calls
in library/sdxl_model_util.load_models_from_sdxl_checkpoint). `shrink()` narrows those in a
process before any model is built, so the same classes, layer layout, module names (what the
LyCORIS preset targets), loader and training loop run on small weights. Kept as they are: the
context widths (768 + 1280 = the UNet's literal cross_attention_dim 2048), the size embedding
(ADM 2816), 12 text-encoder-1 layers (sd-scripts reads hidden_states[11]), the VAE's 4 levels.

The benchmark's training processes apply `shrink()` through kxl_testing.train_probe when
KXL_BENCH_TINY=1, for kxl and plain sd-scripts alike; `make_tiny_sdxl` builds the checkpoint
under the same shrink with sd-scripts' own models and save_stable_diffusion_checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

UNET_CHANNELS = 32  # SDXL: 320; GroupNorm(32) and 64-wide heads need a multiple of 32
VAE_CHANNELS = 32  # SDXL: 128
TE_INTERMEDIATE = 256  # SDXL: 3072 / 5120
TE2_LAYERS = 2  # SDXL: 32 (sd-scripts reads the penultimate one)


def shrink(sdxl_original_unet, model_util, sdxl_model_util) -> None:
    """Narrow sd-scripts' SDXL architecture in this process (idempotent)."""
    sdxl_original_unet.MODEL_CHANNELS = UNET_CHANNELS
    sdxl_original_unet.TIME_EMBED_DIM = UNET_CHANNELS * 4
    model_util.VAE_PARAMS_CH = VAE_CHANNELS
    config_class = sdxl_model_util.CLIPTextConfig
    if getattr(config_class, "_kxl_tiny", False):
        return

    def tiny_clip_config(**kw):
        kw["intermediate_size"] = TE_INTERMEDIATE
        if kw.get("hidden_size") == 1280:
            kw["num_hidden_layers"] = TE2_LAYERS
        return config_class(**kw)

    tiny_clip_config._kxl_tiny = True
    sdxl_model_util.CLIPTextConfig = tiny_clip_config


def shrink_loaded() -> None:
    """shrink() on sd-scripts' modules (sd-scripts must be importable)."""
    from library import model_util, sdxl_model_util, sdxl_original_unet

    shrink(sdxl_original_unet, model_util, sdxl_model_util)


def make_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random tiny SDXL-shaped single-file checkpoint (fp16) that sd-scripts loads under
    the same shrink (the caller's process is shrunk too)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from kxl_train.sd_scripts_library import use_sd_scripts_library

    use_sd_scripts_library()
    shrink_loaded()
    from library import model_util, sdxl_model_util, sdxl_original_unet

    torch.manual_seed(seed)
    unet = sdxl_original_unet.SdxlUNet2DConditionModel()
    # the same literal configs the loader builds (sdxl_model_util.load_models_from_sdxl_checkpoint)
    te1 = CLIPTextModel(sdxl_model_util.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    te2 = CLIPTextModelWithProjection(sdxl_model_util.CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
    vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.safetensors")  # sd-scripts picks the format by suffix
    sdxl_model_util.save_stable_diffusion_checkpoint(
        str(tmp), te1, te2, unet, 0, 0, None, vae, torch.tensor(4.6052), {"kxl_fixture": "tiny SDXL"},
        save_dtype=torch.float16)
    os.replace(tmp, path)
    return path
