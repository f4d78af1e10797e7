"""Network module names <-> SGM checkpoint keys, checked against sd-scripts and LyCORIS code."""
from __future__ import annotations

import math

import pytest
import torch

from kxl_tools.keys import CheckpointIndex, KeyMapError, block_of, checkpoint_parts, te2_hf_paths
from kxl_testing.synthetic_checkpoints import tiny_layout


def test_te2_fused_in_proj_splits_in_q_k_v_rows():
    parts = checkpoint_parts("conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight", (3840, 1280))
    assert [(p.name, p.rows, p.shape) for p in parts] == [
        ("lora_te2_text_model_encoder_layers_7_self_attn_q_proj", (0, 1280), (1280, 1280)),
        ("lora_te2_text_model_encoder_layers_7_self_attn_k_proj", (1280, 2560), (1280, 1280)),
        ("lora_te2_text_model_encoder_layers_7_self_attn_v_proj", (2560, 3840), (1280, 1280)),
    ]
    bias = checkpoint_parts("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias", (3840,))
    assert [p.name for p in bias] == [f"lora_te2_text_model_encoder_layers_0_self_attn_{x}_proj.bias" for x in "qkv"]
    with pytest.raises(KeyMapError, match="three"):
        checkpoint_parts("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (10, 4))


@pytest.mark.parametrize(
    "key,name",
    [
        ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        ("model.diffusion_model.output_blocks.2.2.conv.bias", "lora_unet_output_blocks_2_2_conv.bias"),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight", "lora_te1_text_model_encoder_layers_11_mlp_fc2"),
        ("conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight", "lora_te2_text_model_encoder_layers_3_mlp_fc1"),
        ("conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.bias", "lora_te2_text_model_encoder_layers_3_mlp_fc2.bias"),
        ("conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj.weight", "lora_te2_text_model_encoder_layers_3_self_attn_out_proj"),
        ("conditioner.embedders.1.model.transformer.resblocks.3.ln_2.weight", "lora_te2_text_model_encoder_layers_3_layer_norm2"),
        ("conditioner.embedders.1.model.text_projection", "lora_te2_text_projection"),
        ("conditioner.embedders.1.model.logit_scale", "conditioner.embedders.1.model.logit_scale"),
        ("first_stage_model.decoder.conv_out.weight", "first_stage_model.decoder.conv_out.weight"),
    ],
)
def test_names(key, name):
    (part,) = checkpoint_parts(key, (4, 4))
    assert part.name == name and part.ckpt_key == key and part.rows is None


def test_blocks():
    assert block_of("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "TE1"
    assert block_of("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "TE2"
    assert block_of("lora_unet_input_blocks_8_0_in_layers_2") == "UNet input"
    assert block_of("lora_unet_middle_block_1_proj_in") == "UNet middle"
    assert block_of("lora_unet_output_blocks_8_0_skip_connection") == "UNet output"
    assert block_of("lora_unet_time_embed_0") == "UNet other"
    assert block_of("first_stage_model.encoder.conv_in.weight") == "VAE"


def test_unexpected_te2_key_is_an_error():
    with pytest.raises(KeyMapError, match="resblocks.0.attn.foo"):
        te2_hf_paths("conditioner.embedders.1.model.transformer.resblocks.0.attn.foo")


def test_tiny_index_is_unique_and_complete():
    layout = tiny_layout()
    idx = CheckpointIndex({k: s for k, (s, _) in layout.items()})
    assert sum(len(p) for p in idx.by_key.values()) == len(idx.parts)
    assert len(idx.by_key) == len(layout)
    # fused q/k/v gives two extra parts per in_proj tensor (2 layers, weight and bias)
    assert len(idx.parts) == len(layout) + 2 * 2 * 2


def test_colliding_names_are_refused():
    with pytest.raises(KeyMapError, match="both map to"):
        CheckpointIndex({"model.diffusion_model.a.b_c.weight": (1,), "model.diffusion_model.a_b.c.weight": (1,)})


# ---- against the upstream code (sd-scripts v0.10.1 + LyCORIS 4.1.3) ----


@pytest.mark.sdscripts
def test_te2_mapping_equals_sd_scripts_conversion(sd_scripts_library):
    """Our (key, rows) for every TE2 parameter selects exactly what sd-scripts' converter gives it."""
    from library.sdxl_model_util import convert_sdxl_text_encoder_2_checkpoint

    g = torch.Generator().manual_seed(0)
    sgm = {k: torch.randn(s or (1,), generator=g).reshape(s) for k, (s, _) in tiny_layout().items()
           if k.startswith("conditioner.embedders.1.model.")}
    hf, logit_scale = convert_sdxl_text_encoder_2_checkpoint(dict(sgm), max_length=77)
    assert torch.equal(logit_scale, sgm["conditioner.embedders.1.model.logit_scale"])
    idx = CheckpointIndex({k: tuple(v.shape) for k, v in sgm.items()})
    for hf_key, value in hf.items():
        module_path, _, param = hf_key.rpartition(".")
        name = "lora_te2_" + module_path.replace(".", "_") + ("" if param == "weight" else "." + param)
        part = idx[name]
        got = sgm[part.ckpt_key] if part.rows is None else sgm[part.ckpt_key][part.rows[0]:part.rows[1]]
        assert torch.equal(got, value), hf_key
    assert len(hf) == sum(1 for p in idx.parts.values() if p.ckpt_key != "conditioner.embedders.1.model.logit_scale")


@pytest.mark.sdscripts
def test_every_lycoris_sdxl_module_names_a_checkpoint_weight(sd_scripts):
    """LyCORIS's own network (kohya wrapper, preset full) on sd-scripts' SDXL models, on meta."""
    pytest.importorskip("lycoris")
    from kxl_testing.synthetic_checkpoints import lycoris_lokr_plan, sdxl_layout

    layout = sdxl_layout(sd_scripts)
    assert len(layout) == 2514
    assert sum(math.prod(s) for s, _ in layout.values()) == 3_468_837_868
    idx = CheckpointIndex({k: s for k, (s, _) in layout.items()})
    plan = lycoris_lokr_plan(sd_scripts, factor=4, full_matrix=True, preset="full")
    blocks = {}
    for name, params in plan.items():
        assert name in idx, name
        w1, w2 = params["lokr_w1"], params["lokr_w2"]
        assert idx[name].shape == (w1[0] * w2[0], w1[1] * w2[1], *w2[2:]), name
        blocks[block_of(name)] = blocks.get(block_of(name), 0) + 1
    assert blocks["TE1"] == 12 * 6 and blocks["TE2"] == 32 * 6
    # The built-in "full" preset names diffusers modules (time_embedding, conv_in ...) that the
    # SGM U-Net does not have, so nothing outside the input/middle/output blocks is trained.
    assert set(blocks) == {"TE1", "TE2", "UNet input", "UNet middle", "UNet output"}
