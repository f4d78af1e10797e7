"""Random-weight SDXL-layout checkpoints and LoKr files, for tests and benchmarks.

`sdxl_layout()` lists every key and shape of a real SDXL single-file checkpoint as
sd-scripts v0.10.1 writes it (save_stable_diffusion_checkpoint), by building its models on
the meta device: nothing large is allocated. `tiny_layout()` is a hand-made miniature with
the same naming (U-Net input/middle/output blocks, TE1, TE2 with fused in_proj, VAE, a
position_ids buffer, logit_scale) for fast tests. Files are written one tensor at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from kxl_train.sd_scripts_library import use_sd_scripts_library
from kxl_train.sdxl_shapes import meta_models

from kxl_tools.keys import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointIndex
from kxl_tools.st_io import PlannedTensor, StreamingWriter

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def tiny_layout(dim: int = 8) -> Layout:
    d, f = dim, torch.float32
    L: Layout = {}

    def add(key, *shape, dtype=f):
        L[key] = (tuple(shape), dtype)

    u = UNET_PREFIX
    add(u + "time_embed.0.weight", 4 * d, d)
    add(u + "time_embed.0.bias", 4 * d)
    add(u + "input_blocks.0.0.weight", d, 4, 3, 3)
    add(u + "input_blocks.1.0.in_layers.0.weight", d)
    add(u + "input_blocks.1.0.in_layers.2.weight", d, d, 3, 3)
    add(u + "input_blocks.1.0.in_layers.2.bias", d)
    add(u + "input_blocks.1.0.emb_layers.1.weight", d, 4 * d)
    add(u + "input_blocks.1.1.proj_in.weight", d, d)
    add(u + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", d, d)
    add(u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", d, 2 * d)
    add(u + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", 8 * d, d)
    add(u + "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", d, 4 * d)
    add(u + "input_blocks.2.0.op.weight", d, d, 3, 3)
    add(u + "middle_block.0.in_layers.2.weight", d, d, 3, 3)
    add(u + "middle_block.1.transformer_blocks.0.attn1.to_out.0.weight", d, d)
    add(u + "middle_block.1.transformer_blocks.0.attn1.to_out.0.bias", d)
    add(u + "output_blocks.0.0.out_layers.3.weight", d, d, 3, 3)
    add(u + "output_blocks.0.0.skip_connection.weight", d, 2 * d, 1, 1)
    add(u + "output_blocks.0.1.transformer_blocks.0.attn2.to_v.weight", d, 2 * d)
    add(u + "output_blocks.0.2.conv.weight", d, d, 3, 3)
    add(u + "out.2.weight", 4, d, 3, 3)
    t1 = TE1_PREFIX + "text_model."
    add(t1 + "embeddings.position_ids", 1, 77, dtype=torch.int64)
    add(t1 + "embeddings.token_embedding.weight", 64, d)
    add(t1 + "encoder.layers.0.self_attn.q_proj.weight", d, d)
    add(t1 + "encoder.layers.0.self_attn.q_proj.bias", d)
    add(t1 + "encoder.layers.0.self_attn.out_proj.weight", d, d)
    add(t1 + "encoder.layers.0.mlp.fc1.weight", 4 * d, d)
    add(t1 + "encoder.layers.0.mlp.fc2.weight", d, 4 * d)
    add(t1 + "final_layer_norm.weight", d)
    t2 = TE2_PREFIX
    add(t2 + "positional_embedding", 77, d)
    add(t2 + "token_embedding.weight", 64, d)
    add(t2 + "text_projection", d, d)
    add(t2 + "logit_scale")
    add(t2 + "ln_final.weight", d)
    for i in range(2):
        r = f"{t2}transformer.resblocks.{i}."
        add(r + "attn.in_proj_weight", 3 * d, d)
        add(r + "attn.in_proj_bias", 3 * d)
        add(r + "attn.out_proj.weight", d, d)
        add(r + "ln_1.weight", d)
        add(r + "mlp.c_fc.weight", 4 * d, d)
        add(r + "mlp.c_proj.weight", d, 4 * d)
    add(VAE_PREFIX + "encoder.conv_in.weight", d, 3, 3, 3)
    add(VAE_PREFIX + "decoder.conv_out.weight", 3, d, 3, 3)
    return L


def lycoris_lokr_plan(sd_scripts: str | Path, **network_kwargs) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {param: shape}} of the LoKr file LyCORIS would save for SDXL in sd-scripts.

    Runs lycoris.kohya.create_network (as sdxl_train_network does, both text encoders in a
    list) on the meta-device models, e.g. algo="lokr", factor=4, full_matrix=True, preset="full".
    """
    from lycoris.kohya import create_network

    unet, te1, te2 = meta_models(sd_scripts)
    kwargs = {"algo": "lokr", **network_kwargs}
    with torch.device("meta"):
        net = create_network(1.0, kwargs.pop("network_dim", 100000), kwargs.pop("network_alpha", 1.0), None, [te1, te2], unet, **kwargs)
    plan = {}
    for m in net.text_encoder_loras + net.unet_loras:
        plan[m.lora_name] = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    return plan


def sdxl_layout(sd_scripts: str | Path) -> Layout:
    """Every key of an SDXL single-file checkpoint as sd-scripts saves it, with its shape.

    Builds sd-scripts' U-Net, transformers' CLIP text models (sd-scripts' configs) and
    diffusers' VAE on the meta device and runs sd-scripts' own key conversions.
    """
    from diffusers import AutoencoderKL

    use_sd_scripts_library(sd_scripts)
    from library import model_util, sdxl_model_util

    unet, te1, te2 = meta_models(sd_scripts)
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    layout: Layout = {}

    def put(prefix, sd):
        for k, v in sd.items():
            layout[prefix + k] = (tuple(v.shape), torch.float32 if v.dtype.is_floating_point else v.dtype)

    put(UNET_PREFIX, unet.state_dict())
    put(TE1_PREFIX, te1.state_dict())
    logit_scale = torch.empty((), device="meta")
    put(TE2_PREFIX, sdxl_model_util.convert_text_encoder_2_state_dict_to_sdxl(te2.state_dict(), logit_scale))
    put(VAE_PREFIX, model_util.convert_vae_state_dict(vae.state_dict()))
    return layout


def write_checkpoint(path, layout: Layout, seed: int = 0, dtype: torch.dtype | None = None, std: float = 0.02,
                     progress: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Random normal(0, std) floats (int tensors: zeros), one tensor at a time."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    plan = [PlannedTensor(k, dtype if (dtype is not None and dt.is_floating_point) else dt, shape)
            for k, (shape, dt) in layout.items()]
    with StreamingWriter(path, plan, metadata) as w:
        for p in tqdm(plan, desc=f"write {Path(path).name}", unit="tensor", disable=not progress):
            if p.dtype.is_floating_point:
                t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(p.dtype)
            else:
                t = torch.zeros(p.shape, dtype=p.dtype)
            w.write(p.name, t)


def _split(dim: int, factor: int) -> tuple[int, int]:
    """(small, large) with small * large = dim and small = factor when it divides dim."""
    if factor > 0 and dim % factor == 0:
        a, b = factor, dim // factor
        return (a, b) if a <= b else (b, a)
    return 1, dim


def _is_lokr_target(name: str, shape: tuple[int, ...]) -> bool:
    """Linear / conv weights of the modules an SDXL LyCORIS preset trains (blocks and TE layers)."""
    if len(shape) not in (2, 4) or name.endswith(".bias"):
        return False
    if name.startswith("lora_unet_"):
        rest = name[len("lora_unet_"):]
        return rest.startswith(("input_blocks_", "middle_block_", "output_blocks_")) and not rest.startswith("input_blocks_0_0")
    if name.startswith(("lora_te1_", "lora_te2_")):
        return "_encoder_layers_" in name and ("_self_attn_" in name or "_mlp_" in name)
    return False


def lokr_plan(layout: Layout, factor: int = 4, rank: int | None = None, tucker: bool = False,
              names: Iterable[str] | None = None) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {param: shape}}: full-matrix LoKr (rank None) or low-rank w2 of `rank`."""
    index = CheckpointIndex({k: s for k, (s, _) in layout.items()})
    wanted = set(names) if names is not None else None
    plan = {}
    for name, part in index.parts.items():
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and not _is_lokr_target(name, part.shape):
            continue
        out_dim, in_dim, *k = part.shape
        a, b = _split(out_dim, factor)
        c, d = _split(in_dim, factor)
        params = {"lokr_w1": (a, c), "alpha": ()}
        if rank is None:
            params["lokr_w2"] = (b, d, *k)
        elif tucker and k and any(x != 1 for x in k):
            params.update(lokr_t2=(rank, rank, *k), lokr_w2_a=(rank, b), lokr_w2_b=(rank, d))
        else:
            params.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d * (k[0] * k[1] if k else 1)))
        plan[name] = params
    return plan


def write_lokr(path, plan: dict[str, dict[str, tuple[int, ...]]], seed: int = 0, dtype: torch.dtype = torch.float16,
               alpha: float = 1.0, std: float = 0.05, metadata: dict[str, str] | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for name, params in plan.items():
        for p, shape in params.items():
            entries.append(PlannedTensor(f"{name}.{p}", dtype, shape))
    with StreamingWriter(path, entries, metadata) as w:
        for e in entries:
            if e.name.endswith(".alpha"):
                t = torch.tensor(alpha, dtype=dtype)
            else:
                t = torch.empty(e.shape).normal_(0.0, std, generator=gen).to(dtype)
            w.write(e.name, t)
