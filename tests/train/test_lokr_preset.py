"""The Epsilon LoKr preset: keys LyCORIS accepts, layers that exist in sd-scripts' SDXL UNet,
factor 2..8 per module class, module and parameter counts, file under 800 MB."""
from __future__ import annotations

import re

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_train import lokr_preset as lp

PRESET = REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"
# Factor per module class, as the preset's comments promise (written out independently).
FACTOR_BY_KIND = {"attn": 4, "ff": 4, "proj": 4, "resnet": 4, "resample": 8, "named": 2,
                  "te_attn": 4, "te_mlp": 8}


def test_preset_is_accepted_by_lycoris_strictly():
    data = lp.load_preset(PRESET)
    assert data["enable_conv"] is True
    for table in ("module_algo_map", "name_algo_map"):
        for name, conf in data[table].items():
            assert conf["algo"] == "lokr" and conf["full_matrix"] is True, name
            assert 2 <= conf["factor"] <= 8, name
    # both text encoders' attention and MLPs are targeted (text encoders trained)
    assert set(data["text_encoder_target_module"]) == {"CLIPAttention", "CLIPMLP"}
    # LyCORIS' built-in `full` preset names diffusers layers absent from sd-scripts' SGM UNet
    assert not {"conv_in", "conv_out", "time_embedding.linear_1"} & set(data["unet_target_name"])
    assert set(data["name_algo_map"]) == set(data["unet_target_name"])


def test_unknown_preset_key_is_rejected(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("unet_target_modules = []\n" + PRESET.read_text())
    with pytest.raises(ValueError, match="Unknown preset keys: unet_target_modules"):
        lp.load_preset(bad)
    # an option LoKr does not take, inside a per-class table, is rejected too
    bad.write_text(PRESET.read_text() + "ranks = 4\n")
    with pytest.raises(ValueError, match="Unsupported option 'ranks' for algo 'lokr'"):
        lp.load_preset(bad)


def comment_numbers() -> dict[str, int]:
    text = PRESET.read_text()
    found = {}
    for label in ("UNet", "TE1", "TE2", "total"):
        m = re.search(rf"#\s+{label}\s+(\d+) modules\s+([\d,]+) params", text)
        found[label] = (int(m.group(1)), int(m.group(2).replace(",", "")))
    return found


def kind_of(name: str) -> str:
    if name.startswith("lora_te"):
        return "te_attn" if "_self_attn_" in name else "te_mlp"
    if re.search(r"_(attn1|attn2)_", name):
        return "attn"
    if "_ff_net_" in name:
        return "ff"
    if name.endswith(("_proj_in", "_proj_out")):
        return "proj"
    if name.endswith(("_in_layers_2", "_emb_layers_1", "_out_layers_3", "_skip_connection")):
        return "resnet"
    if name.endswith(("_op", "_conv")):
        return "resample"
    return "named"


@pytest.fixture(scope="module")
def count(sd_scripts):
    values_recipe = REPO_ROOT / "recipes" / "epsilon-rev1.toml"
    from kxl_train.recipe import load_recipe, resolved_network_args

    values = load_recipe(values_recipe)
    return lp.count_network(sd_scripts, resolved_network_args(values, values_recipe),
                            int(values["network_dim"]), float(values["network_alpha"]))


@pytest.mark.sdscripts
def test_named_layers_exist_in_sd_scripts_unet(count):
    assert count.missing_unet_names == [] and count.missing_te_names == []


@pytest.mark.sdscripts
def test_module_counts_from_the_sdxl_architecture(count):
    # SDXL: 70 transformer blocks x (attn1 q/k/v/out + attn2 q/k/v/out + ff in/out) + 11 transformers'
    # proj_in/out + 17 ResNet blocks x 3 layers + 11 skip convs + 2 down + 2 up + 6 named layers.
    unet = 70 * 10 + 11 * 2 + 17 * 3 + 11 + 2 + 2 + 6
    te1, te2 = 12 * 6, 32 * 6  # per layer: q, k, v, out, fc1, fc2
    by = count.by_prefix()
    assert (by["unet"][0], by["te1"][0], by["te2"][0]) == (unet, te1, te2) == (794, 72, 192)
    kinds = {}
    for m in count.modules:
        kinds[kind_of(m.name)] = kinds.get(kind_of(m.name), 0) + 1
    assert kinds == {"attn": 560, "ff": 140, "proj": 22, "resnet": 62, "resample": 4, "named": 6,
                     "te_attn": 176, "te_mlp": 88}


@pytest.mark.sdscripts
def test_factors_shapes_and_full_w2_per_module(count):
    total = 0
    for m in count.modules:
        f = FACTOR_BY_KIND[kind_of(m.name)]
        out_dim, in_dim, *kernel = m.org_shape
        # LyCORIS factorization(dim, f) = (f, dim // f) when f divides dim (and f <= dim // f)
        assert m.w1 == (f, f), m.name
        assert m.w2 == (out_dim // f, in_dim // f, *kernel), m.name  # a FULL matrix: no rank
        assert m.params == f * f + (out_dim // f) * (in_dim // f) * (kernel[0] * kernel[1] if kernel else 1)
        total += m.params
    assert total == count.params


@pytest.mark.sdscripts
def test_counts_match_the_preset_comments_and_fit_800_mb(count):
    noted = comment_numbers()
    by = count.by_prefix()
    assert noted["UNet"] == by["unet"] and noted["TE1"] == by["te1"] and noted["TE2"] == by["te2"]
    assert noted["total"] == (len(count.modules), count.params) == (1058, 182_995_160)
    assert count.file_bytes(4) < lp.FILE_LIMIT_BYTES  # even at fp32
    assert f"{count.file_bytes(2) / 1e6:.1f} MB at save_precision fp16" in PRESET.read_text()
