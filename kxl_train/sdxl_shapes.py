"""The SDXL base 1.0 architecture as kxl builds it: the configs of the text encoders and the
(diffusers) UNet, and sd-scripts' models of it on the meta device (no memory).

The shapes are stabilityai/stable-diffusion-xl-base-1.0's; sd-scripts hard codes the same
architecture (library/sdxl_original_unet.py, library/sdxl_model_util.py).
"""
from __future__ import annotations

from pathlib import Path

UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", upcast_attention=False,
)
TE1_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=768)
TE2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def meta_models(sd_scripts: Path):
    """sd-scripts' SDXL UNet and the two CLIP text encoders, on the meta device."""
    import torch

    from kxl_train.sd_scripts_library import use_sd_scripts_library

    use_sd_scripts_library(sd_scripts)
    from library import sdxl_original_unet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = sdxl_original_unet.SdxlUNet2DConditionModel()
        te1 = CLIPTextModel(CLIPTextConfig(**TE1_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG))
    return unet, te1, te2
