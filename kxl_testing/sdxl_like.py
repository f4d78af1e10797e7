"""A small module tree with SDXL's module classes and names, for LyCORIS preset tests.

It mirrors sd-scripts' SDXL UNet (library/sdxl_original_unet.py) where a LyCORIS preset looks:
the classes (Transformer2DModel, BasicTransformerBlock, CrossAttention, FeedForward, GEGLU,
ResnetBlock2D, Downsample2D, Upsample2D, GroupNorm32, LayerNorm), the SGM paths (time_embed.0,
label_emb.0.0, input_blocks.0.0, input_blocks.N.M, middle_block, output_blocks, out.0 / out.2)
and the containers between them (ModuleList / Sequential). The text encoders are real
transformers CLIP models (CLIPAttention, CLIPMLP, layer norms), narrow.

Widths are 64 and up so that factors 2, 4 and 8 give different LoKr shapes (on a 32-wide layer
factors 4 and 8 both split 4 x 8).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kxl_common.upstream import REPO_ROOT

# The author's published LyCORIS config (Kohaku XL Delta docs/lyco_config.toml), value for value,
# and the network settings of the author's docs/train_script.sh. The one name tests and benches
# use for "the author's preset".
AUTHOR_PRESET = REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"
AUTHOR_NETWORK_DIM = 10000
AUTHOR_NETWORK_ALPHA = 10000
AUTHOR_NETWORK_ARGS = ["conv_dim=10000", "conv_alpha=10000", "algo=lokr", "dropout=0", "factor=8", "train_norm=True"]

C = 64  # model channels (SDXL: 320)
TIME = 4 * C  # time embedding width (SDXL: 1280)
ADM = 3 * C  # label_emb input (SDXL: 2816)
CONTEXT = 64 + 96  # cross-attention context: both encoders' widths (SDXL: 768 + 1280)


class GroupNorm32(nn.GroupNorm):
    pass


class CrossAttention(nn.Module):
    def __init__(self, dim, context):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = nn.Linear(context, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)


class Transformer2DModel(nn.Module):
    def __init__(self, dim, depth=1):
        super().__init__()
        self.norm = nn.GroupNorm(32, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, CONTEXT) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(TIME, cout))
        self.out_layers = nn.Sequential(GroupNorm32(32, cout), nn.SiLU(), nn.Identity(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()


class Downsample2D(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)


class Upsample2D(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)


class SdxlLikeUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(C, TIME), nn.SiLU(), nn.Linear(TIME, TIME))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(ADM, TIME), nn.SiLU(), nn.Linear(TIME, TIME)))
        self.input_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(4, C, 3, padding=1)),
            nn.ModuleList([ResnetBlock2D(C, C)]),
            nn.ModuleList([Downsample2D(C)]),
            nn.ModuleList([ResnetBlock2D(C, 2 * C), Transformer2DModel(2 * C, depth=2)]),
        ])
        self.middle_block = nn.ModuleList([ResnetBlock2D(2 * C, 2 * C), Transformer2DModel(2 * C), ResnetBlock2D(2 * C, 2 * C)])
        self.output_blocks = nn.ModuleList([
            nn.ModuleList([ResnetBlock2D(4 * C, 2 * C), Transformer2DModel(2 * C), Upsample2D(2 * C)]),
            nn.ModuleList([ResnetBlock2D(3 * C, C)]),
        ])
        self.out = nn.ModuleList([GroupNorm32(32, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1)])


def text_encoders():
    """CLIP text encoders 64 and 96 wide (TE2's layers 0-1 share TE1's paths), as sd-scripts'
    SDXL has CLIPTextModel and CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(hidden, layers):
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, vocab_size=64, max_position_embeddings=8, projection_dim=hidden)

    return [CLIPTextModel(config(64, 2)), CLIPTextModelWithProjection(config(96, 3))]


def sdxl_like_models(seed: int = 0, device: str | None = None):
    """(unet, [te1, te2]); `device="meta"` builds them without memory."""
    torch.manual_seed(seed)
    if device is None:
        return SdxlLikeUNet(), text_encoders()
    with torch.device(device):
        return SdxlLikeUNet(), text_encoders()


def author_network(models, preset=AUTHOR_PRESET):
    """lycoris.kohya.create_network with the author's network settings and preset, as
    sdxl_train_network calls it (both encoders in a list)."""
    from kxl_testing.tiny_lycoris import build_network
    from kxl_train.lokr_preset import network_kwargs

    return build_network(preset, models, AUTHOR_NETWORK_DIM, AUTHOR_NETWORK_ALPHA, **network_kwargs(AUTHOR_NETWORK_ARGS))
