"""`kxl-train preset-from`: a LoKr file made by LyCORIS with a known preset gives that preset back
(the same modules, the same factors), and LyCORIS builds the same keys and shapes from it."""
from __future__ import annotations

import json
import re
import sys
import subprocess

import pytest

pytest.importorskip("lycoris")

from kxl_common.digest import sha256_file
from kxl_common.upstream import REPO_ROOT
from kxl_testing import tiny_lycoris as tl
from kxl_train import preset_from as pf
from kxl_train.lokr_preset import load_preset

# The known preset: a factor per class and per name, written out once here.
FACTORS = {"CrossAttention": 4, "FeedForward": 8, "Transformer2DModel": 2, "ResnetBlock2D": 4, "Downsample2D": 8,
           "CLIPAttention": 4, "CLIPMLP": 8}
NAME_FACTORS = {"input_blocks.0.0": 2, "out.2": 2, "time_embed.0": 4}  # time_embed.2 is left untrained


def known_preset(low_rank_attention: bool = False) -> str:
    lines = ['enable_conv = true',
             'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D"]',
             f'unet_target_name = {json.dumps(list(NAME_FACTORS))}',
             'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]']
    for cls, f in FACTORS.items():
        extra = "full_matrix = false\ndim = 2" if (low_rank_attention and cls == "CrossAttention") else "full_matrix = true"
        lines.append(f'[module_algo_map.{cls}]\nalgo = "lokr"\nfactor = {f}\n{extra}')
    for name, f in NAME_FACTORS.items():
        lines.append(f'[name_algo_map."{name}"]\nalgo = "lokr"\nfactor = {f}\nfull_matrix = true')
    return "\n".join(lines) + "\n"


def expected_factor(name: str) -> int:
    """The factor the known preset gives a module, from its name alone."""
    rest = re.sub(r"^lora_(unet|te\d)_", "", name)
    for path, f in NAME_FACTORS.items():
        if rest == path.replace(".", "_"):
            return f
    if name.startswith("lora_te"):
        return FACTORS["CLIPAttention"] if "_self_attn_" in name else FACTORS["CLIPMLP"]
    if re.search(r"_attn[12]_", rest):
        return FACTORS["CrossAttention"]
    if "_ff_net_" in rest:
        return FACTORS["FeedForward"]
    if rest.endswith(("proj_in", "proj_out")):
        return FACTORS["Transformer2DModel"]
    if rest.endswith("_op"):
        return FACTORS["Downsample2D"]
    return FACTORS["ResnetBlock2D"]


@pytest.fixture(params=[False, True], ids=["full-matrix", "low-rank-attention"])
def made(request, tmp_path):
    preset = tmp_path / "known.toml"
    preset.write_text(known_preset(low_rank_attention=request.param))
    load_preset(preset)  # LyCORIS accepts it strictly
    models = tl.tiny_models()
    net = tl.build_network(preset, models, full_matrix=True, factor=16)
    lokr = tmp_path / "made-by-lycoris.safetensors"
    shapes = tl.save_network(net, lokr)
    return preset, lokr, shapes, models, request.param


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kxl_train.cli", "preset-from", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)


def test_preset_back_from_a_lycoris_file(made, tmp_path):
    preset, lokr, shapes, models, low_rank = made
    names = sorted({k.split(".")[0] for k in shapes})
    # the file covers UNet and both encoders, linear and conv layers, several factors
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert "lora_unet_time_embed_0" in names and "lora_unet_time_embed_2" not in names
    assert len({expected_factor(n) for n in names}) == 3

    out = tmp_path / "derived.toml"
    res = run_cli(lokr, "--out", out, "--no-compare")
    assert res.returncode == 0, res.stderr
    derived = load_preset(out)  # LyCORIS accepts the derived preset strictly
    layout, _, _ = pf.read_layout(lokr)
    got = pf.derive_preset(layout).module_configs
    assert sorted(got) == names  # the same modules: nothing added, nothing dropped
    for n, conf in got.items():
        assert conf["factor"] == expected_factor(n), n
        attention = bool(re.search(r"_attn[12]_", n)) and n.startswith("lora_unet_")
        assert conf["full_matrix"] is not (low_rank and attention), n
        if low_rank and attention:
            assert conf["dim"] == 2
    assert derived["unet_target_module"] == [] and derived["use_fnmatch"] is True

    # LyCORIS builds the very same keys and shapes from the derived preset (default network_args
    # of the recipe: full_matrix=True, another factor; the preset's per-module values win)
    rebuilt = tl.build_network(out, models, full_matrix=True, factor=16)
    assert {k: tuple(v.shape) for k, v in tl.network_state(rebuilt).items()} == shapes


def test_comparison_against_the_known_preset_is_empty(made, tmp_path):
    preset, lokr, _, models, _ = made
    layout, _, _ = pf.read_layout(lokr)
    ref, _ = pf.layout_from_shapes(pf.expand_preset(preset, models=models,
                                                    network_args=["algo=lokr", "full_matrix=True", "factor=16"]))
    cmp = pf.compare_layouts(layout, ref)
    assert cmp["same"] and cmp["only_file"] == cmp["only_preset"] == cmp["factor_differs"] == []


def test_comparison_names_every_difference(tmp_path):
    """Against the preset of record on SDXL (its committed plan): drop modules, change factors,
    add one. Expectations come from the plan itself, whichever preset it is."""
    from lycoris.functional.general import factorization

    plan = json.loads(pf.PLAN_PATH.read_text())["modules"]
    shapes = {n: {p: tuple(s) for p, s in ps.items()} for n, ps in plan.items()}
    lokr = [n for n, ps in shapes.items() if "lokr_w1" in ps]
    dropped = ["lora_unet_time_embed_0", "lora_te1_text_model_encoder_layers_11_mlp_fc2"]
    # two modules of one class (CrossAttention): one factor in any preset
    refactored = ["lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
                  "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k"]
    for n in dropped:
        del shapes[n]
    old = {max(shapes[n]["lokr_w1"]) for n in refactored}
    assert len(old) == 1
    old = old.pop()
    new = 8 if old != 8 else 4
    for n in refactored:  # 1280 x 1280 at factor `new`
        (a, c), (b, d) = shapes[n]["lokr_w1"], shapes[n]["lokr_w2"]
        (a2, b2), (c2, d2) = factorization(a * b, new), factorization(c * d, new)
        shapes[n] = {"alpha": (), "lokr_w1": (a2, c2), "lokr_w2": (b2, d2)}
    added = "lora_unet_time_embed_1_extra"
    shapes[added] = {"alpha": (), "lokr_w1": (4, 4), "lokr_w2": (80, 80)}
    f = tmp_path / "author.safetensors"
    size = tl.write_header_only(f, {f"{n}.{p}": s for n, ps in shapes.items() for p, s in ps.items()}, "F32")
    res = run_cli(f, "--out", tmp_path / "p.toml", "--json", tmp_path / "cmp.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["only_preset"] == dropped and cmp["only_file"] == [added]
    assert [d["name"] for d in cmp["factor_differs"]] == refactored
    assert cmp["factor_moves"] == {f"{old}->{new}": 2}
    ours = sum(_numel(shp) for n in lokr for p, shp in plan[n].items() if p != "alpha")
    assert cmp["preset"]["params"] == ours and cmp["preset"]["modules"] == len(lokr)
    theirs = sum(_numel(shp) for ps in shapes.values() if "lokr_w1" in ps for p, shp in ps.items() if p != "alpha")
    assert cmp["file"]["params"] == theirs and cmp["file"]["modules"] == len(lokr) - 2 + 1
    assert cmp["file_facts"]["file_bytes"] == size
    assert cmp["file_facts"]["dtypes"] == {"F32": sum(len(ps) for ps in shapes.values())}
    assert cmp["norms"]["only_file"] == cmp["norms"]["only_preset"] == []  # the plan's norm modules, if any, kept
    assert f"params file - preset: {theirs - ours:+,}" in res.stdout
    assert "modules only in the preset: 2" in res.stdout and "differs from the preset" in res.stdout


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_not_a_lokr_file_is_a_clear_error(tmp_path):
    f = tmp_path / "ckpt.safetensors"
    tl.write_header_only(f, {"model.diffusion_model.out.2.weight": (4, 320, 3, 3)})
    res = run_cli(f, "--out", tmp_path / "p.toml")
    assert res.returncode != 0 and "not a LoKr / LyCORIS network file" in res.stderr
    assert not (tmp_path / "p.toml").exists()


def test_no_factor_fits_is_reported():
    from kxl_common.lokr_layout import lokr_shape

    # TE1 and TE2 share the path; w1 (4, 4) for 32 and (8, 8) for 48 wide: no one factor does both
    layout = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": lokr_shape("a", {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}),
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": lokr_shape("b", {"lokr_w1": (8, 8), "lokr_w2": (6, 6)})}
    with pytest.raises(pf.PresetFromError, match="no LoKr factor"):
        pf.derive_preset(layout)


@pytest.mark.sdscripts
def test_committed_plan_matches_lycoris_on_sdxl(sd_scripts):
    plan = json.loads(pf.PLAN_PATH.read_text())
    live = pf.expand_preset(pf.PRESET_PATH, sd_scripts)
    assert plan["preset_sha256"] == sha256_file(pf.PRESET_PATH), "run kxl-train lokr-plan --write"
    assert {n: {p: tuple(s) for p, s in ps.items()} for n, ps in plan["modules"].items()} == live


@pytest.mark.sdscripts
def test_our_sdxl_preset_round_trips(sd_scripts, tmp_path):
    """Our preset on sd-scripts' SDXL -> file header -> derived preset -> the same 1058 modules."""
    shapes = pf.expand_preset(pf.PRESET_PATH, sd_scripts)
    f = tmp_path / "ours.safetensors"
    tl.write_header_only(f, {f"{n}.{p}": s for n, ps in shapes.items() for p, s in ps.items()})
    out = tmp_path / "derived.toml"
    res = run_cli(f, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "same modules and factors as the preset" in res.stdout
    assert pf.expand_preset(out, sd_scripts) == shapes
