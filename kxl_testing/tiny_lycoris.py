"""Tiny stand-ins for sd-scripts' SDXL UNet and the two CLIP text encoders, for LyCORIS tests.

LyCORIS picks layers by class name (`module.__class__.__name__`) and module path, so a few
hundred weights with SDXL's class names (Transformer2DModel, CrossAttention, FeedForward,
ResnetBlock2D, Downsample2D) and SGM paths (input_blocks.N.M, time_embed.0, out.2) exercise
everything a preset does on the real model: linear and 3x3 / 1x1 conv layers, class maps,
name targets, factors. The text encoders are real transformers CLIP models of two widths.
The author's config (norm modules, regex names, its class map) is tested on the fuller SDXL-like
tree of kxl_testing.sdxl_like, whose widths keep factors 2, 4 and 8 apart.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

C = 32  # UNet channels


class CrossAttention(nn.Module):
    def __init__(self, dim=C, context=48):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = nn.Linear(context, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class FeedForward(nn.Module):
    def __init__(self, dim=C):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class BasicTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = CrossAttention(context=C)
        self.attn2 = CrossAttention()
        self.ff = FeedForward()


class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(C, C)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock()])
        self.proj_out = nn.Linear(C, C)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin=16, cout=C):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(4 * C, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, cout), nn.SiLU(), nn.Dropout(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1)


class Downsample2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.Conv2d(C, 2 * C, 3, stride=2, padding=1)


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(C, 4 * C), nn.SiLU(), nn.Linear(4 * C, 4 * C))
        self.input_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(4, 16, 3, padding=1)),
            nn.Sequential(ResnetBlock2D(), Transformer2DModel()),
            nn.Sequential(Downsample2D()),
        ])
        self.out = nn.Sequential(nn.GroupNorm(4, 2 * C), nn.SiLU(), nn.Conv2d(2 * C, 4, 3, padding=1))


def tiny_text_encoders():
    """Two CLIP text encoders of different widths and depths (TE2's layers 0-1 share TE1's paths)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def clip(hidden, layers):
        return CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                            num_attention_heads=4, vocab_size=64, max_position_embeddings=8))

    return [clip(32, 2), clip(48, 3)]


def tiny_models(seed: int = 0):
    """(unet, [te1, te2]) with seeded random weights."""
    torch.manual_seed(seed)
    return TinyUNet(), tiny_text_encoders()


def build_network(preset: str | Path, models, network_dim: int = 100000, network_alpha: float = 1.0, **network_args):
    """lycoris.kohya.create_network as sdxl_train_network calls it (both encoders in a list)."""
    from lycoris import kohya

    from kxl_train.lokr_preset import lycoris_class_state

    unet, tes = models
    kwargs = {"algo": "lokr", "preset": str(preset), **{k: str(v) for k, v in network_args.items()}}
    with lycoris_class_state():
        return kohya.create_network(1.0, network_dim, network_alpha, None, tes, unet, **kwargs)


def network_state(network) -> dict[str, torch.Tensor]:
    """The network's state dict as sd-scripts saves it: apply_to registers each module under its
    lora_name (lycoris/kohya.py), so keys are `<lora_name>.<param>`."""
    return {f"{m.lora_name}.{k}": v for m in network.loras for k, v in m.state_dict().items()}


def save_network(network, path: str | Path, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Random factor values (a trained look: w2 not zero), saved as sd-scripts saves a LyCORIS
    network (`<lora_name>.<param>`); returns {key: shape}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in network_state(network).items():
        sd[k] = v.clone() if k.endswith(".alpha") else torch.randn(v.shape, generator=g).to(torch.float16)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return {k: tuple(v.shape) for k, v in sd.items()}


def write_header_only(path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> int:
    """A valid safetensors file of the given shapes whose data is a hole (sparse: no disk used).

    Enough for everything that reads headers only (kxl-train preset-from). Returns its size."""
    import json
    import os
    import struct

    size = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = size
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return os.path.getsize(path)
