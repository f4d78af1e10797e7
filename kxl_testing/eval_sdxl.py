"""A tiny random-weight SDXL in diffusers format, for `kxl eval` tests and benchmarks.

The real architecture's wiring at toy width: two CLIP text encoders (the second with a
projection, penultimate hidden states concatenated for cross-attention, its pooled output
plus the six size numbers as the "text_time" added condition), a UNet2DConditionModel with
cross-attention blocks and an AutoencoderKL with SDXL's 8x downscale. The tokenizers are the
real CLIP BPE vocabulary built offline (kxl_common.clip_tokenizer). Same seed -> same
weights. `save_tiny_sdxl` writes it as a diffusers folder (what `kxl eval generate
--diffusers` loads).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def build_tiny_sdxl(seed: int = 0, *, width: int = 32, text_width: int = 32):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from kxl_common.clip_tokenizer import make_tokenizer_cache

    def text_config(proj: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, hidden_size=text_width, intermediate_size=2 * text_width,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              projection_dim=proj, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

    torch.manual_seed(seed)
    te1 = CLIPTextModel(text_config(text_width))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(text_config(text_width))
    time_dim = 8
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * text_width, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_width,
        transformer_layers_per_block=(1, 1), norm_num_groups=min(32, width),
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, sample_size=64,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer_cache(tmp)
        tok1 = CLIPTokenizer.from_pretrained(str(Path(tmp) / "openai_clip-vit-large-patch14"))
        tok2 = CLIPTokenizer.from_pretrained(str(Path(tmp) / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    from kxl_tools.eval.samplers import make_scheduler

    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=make_scheduler("euler_a"),
                                     force_zeros_for_empty_prompt=False, add_watermarker=False)


def save_tiny_sdxl(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    folder = Path(folder)
    build_tiny_sdxl(seed, **kwargs).save_pretrained(str(folder), safe_serialization=True)
    return folder
