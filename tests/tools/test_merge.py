"""kxl merge: W' = W + m * delta, TE2 q/k/v into the fused in_proj, streamed output."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kxl_tools.cli import main
from kxl_tools.compare import compare_files
from kxl_tools.merge import MergeError, merge
from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_checkpoint, write_lokr

TE2 = "conditioner.embedders.1.model.transformer.resblocks.{}.attn.in_proj_weight"


def _kron(w1, w2):
    a, c = w1.shape
    b, d = w2.shape[:2]
    rest = w2.shape[2:]
    out = w1.reshape(a, 1, c, 1, *([1] * len(rest))) * w2[None, :, None, :]
    return out.reshape(a * b, c * d, *rest)


@pytest.fixture(scope="module")
def base32(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    layout = tiny_layout()
    write_checkpoint(d / "base.safetensors", layout, seed=1, dtype=torch.float32, metadata={"modelspec.title": "tiny"})
    return d, layout


def test_fp32_merge_matches_independent_sum(base32, tmp_path):
    d, layout = base32
    plan = lokr_plan(layout, factor=2)
    write_lokr(tmp_path / "l.safetensors", plan, seed=4, dtype=torch.float32)
    res = merge(d / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "m.safetensors", multiplier=0.75, dtype="fp32", progress=False)
    assert res["modules_merged"] == len(plan)
    base = load_file(str(d / "base.safetensors"))
    lokr = load_file(str(tmp_path / "l.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert set(merged) == set(base)
    expected = {k: v.clone() for k, v in base.items()}
    for name in plan:
        delta = _kron(lokr[f"{name}.lokr_w1"], lokr[f"{name}.lokr_w2"])
        key, rows = _expected_target(name, layout)
        view = expected[key] if rows is None else expected[key][rows[0]:rows[1]]
        view += 0.75 * delta.reshape(view.shape)
    for k in base:
        assert torch.allclose(merged[k], expected[k], rtol=1e-6, atol=1e-7), k
    # untouched tensors are bit-identical; int tensors keep their dtype
    assert torch.equal(merged["first_stage_model.encoder.conv_in.weight"], base["first_stage_model.encoder.conv_in.weight"])
    assert merged["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny"
    assert json.loads(meta["kxl_merge"])["multiplier"] == 0.75


def _expected_target(name: str, layout):
    """Test-side naming table (written out by hand from sd-scripts' TE2 conversion rules)."""
    if name.startswith("lora_te2_text_model_encoder_layers_"):
        layer, sub = name[len("lora_te2_text_model_encoder_layers_"):].split("_", 1)
        head = f"conditioner.embedders.1.model.transformer.resblocks.{layer}."
        qkv = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2}
        if sub in qkv:
            return head + "attn.in_proj_weight", (qkv[sub] * 8, qkv[sub] * 8 + 8)
        return head + {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}[sub] + ".weight", None
    prefix, root = ("lora_unet_", "model.diffusion_model.") if name.startswith("lora_unet_") else (
        "lora_te1_", "conditioner.embedders.0.transformer.")
    for key in layout:
        if key.startswith(root) and key.endswith(".weight"):
            path = key[len(root):-len(".weight")]
            if prefix + path.replace(".", "_") == name:
                return key, None
    raise KeyError(name)


@pytest.mark.parametrize("rank,tucker", [(2, False), (2, True)])
def test_low_rank_merge_then_compare_is_same(base32, tmp_path, rank, tucker):
    d, layout = base32
    plan = lokr_plan(layout, factor=2, rank=rank, tucker=tucker)
    write_lokr(tmp_path / "l.safetensors", plan, seed=6, dtype=torch.float32, alpha=3.0)
    merge(d / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "m.safetensors", dtype="fp32", progress=False)
    r = compare_files(tmp_path / "m.safetensors", tmp_path / "l.safetensors", base=d / "base.safetensors", progress=False)
    assert r["counts"]["both"] == len(plan)
    assert r["only_a"] == [] and r["only_b"] == []
    assert r["total"]["rel_fro"] < 1e-5
    assert r["verdict"]["level"] == "SAME"
    # The scale is applied once: the LyCORIS merge (scale twice) would give norm ratio 1.5 here.
    assert r["total"]["norm_ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype,eps", [("fp16", torch.float16, 2.0**-11), ("bf16", torch.bfloat16, 2.0**-8)])
def test_half_precision_merge_within_dtype_precision(tmp_path, dtype, torch_dtype, eps):
    layout = tiny_layout()
    write_checkpoint(tmp_path / "base.safetensors", layout, seed=1, dtype=torch_dtype)
    plan = lokr_plan(layout, factor=2)
    write_lokr(tmp_path / "l.safetensors", plan, seed=7, dtype=torch_dtype)
    merge(tmp_path / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "m.safetensors", dtype=dtype, progress=False)
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert all(v.dtype == torch_dtype for v in merged.values() if v.dtype.is_floating_point)
    r = compare_files(tmp_path / "m.safetensors", tmp_path / "l.safetensors", base=tmp_path / "base.safetensors", progress=False)
    assert r["counts"]["both"] == len(plan) and r["only_a"] == [] and r["only_b"] == []
    # Rounding W + delta to the dtype moves each value by at most eps * |W + delta|.
    for m in r["modules"]:
        key, rows = _locate(m["name"], layout)
        w = merged[key].float()
        if rows is not None:
            w = w[rows[0]:rows[1]]
        bound = eps * float(w.double().norm()) * 1.001
        assert m["rel_fro"] * m["norm_b"] <= bound, m["name"]


def _locate(name: str, layout):
    from kxl_tools.keys import CheckpointIndex

    part = CheckpointIndex({k: s for k, (s, _) in layout.items()})[name]
    return part.ckpt_key, part.rows


def test_merge_refuses_unknown_module_and_non_lokr(base32, tmp_path):
    d, layout = base32
    plan = lokr_plan(layout, factor=2)
    write_lokr(tmp_path / "l.safetensors", plan, seed=1, dtype=torch.float32)
    sd = load_file(str(tmp_path / "l.safetensors"))
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1"] = torch.ones(2, 2)
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w2"] = torch.ones(4, 4)
    save_file(sd, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(MergeError, match="lora_unet_down_blocks_0_attentions_0_proj_in"):
        merge(d / "base.safetensors", tmp_path / "unknown.safetensors", tmp_path / "o.safetensors", progress=False)
    sd = load_file(str(tmp_path / "l.safetensors"))
    sd["lora_unet_out_2.lora_up.weight"] = torch.ones(4, 1)
    sd["lora_unet_out_2.lora_down.weight"] = torch.ones(1, 8)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(MergeError, match="not LoKr"):
        merge(d / "base.safetensors", tmp_path / "mixed.safetensors", tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_shape_mismatch_is_named(base32, tmp_path):
    d, layout = base32
    plan = {"lora_unet_input_blocks_1_1_proj_in": {"lokr_w1": (2, 2), "lokr_w2": (4, 8), "alpha": ()}}  # 8x16, target 8x8
    write_lokr(tmp_path / "l.safetensors", plan, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora_unet_input_blocks_1_1_proj_in.*\[8, 8\]"):
        merge(d / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_merge(base32, tmp_path):
    d, layout = base32
    write_lokr(tmp_path / "l.safetensors", lokr_plan(layout, factor=2), dtype=torch.float32)
    out = tmp_path / "m.safetensors"
    args = ["merge", str(d / "base.safetensors"), str(tmp_path / "l.safetensors"), str(out), "--dtype", "bf16", "-m", "0.5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "LoKr modules merged" in res.output
    assert load_file(str(out))["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "l.safetensors"), str(tmp_path / "l.safetensors"), str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "expected an SDXL single-file checkpoint" in res.output


def test_a_refused_file_closes_its_descriptor_once(tmp_path):
    """A header that fails to parse closes the file; the reader's __del__ must not close that
    descriptor number again, by then another file's (it was: 'Bad file descriptor' later)."""
    import gc
    import os

    from kxl_tools.st_io import SafetensorsError, SafetensorsReader

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    holder = []
    try:
        holder.append(SafetensorsReader(bad))
    except SafetensorsError as exc:
        kept = exc  # the traceback keeps the half-made reader alive
    other = os.open(tmp_path, os.O_RDONLY)  # likely reuses the number just closed
    try:
        del kept
        gc.collect()
        os.fstat(other)  # still open
    finally:
        os.close(other)


def test_norm_modules_merge_as_lycoris_applies_them(tmp_path):
    """train_norm files (the author's config) carry w_norm / b_norm per norm layer: merged into the
    layer's weight and bias as LyCORIS's NormModule applies them (make_weight at the multiplier),
    TE2's layer_norm1 into OpenCLIP's ln_1; compare sees the same deltas."""
    norms = pytest.importorskip("lycoris.modules.norms")
    layout = dict(tiny_layout())
    unet_norm = "model.diffusion_model.input_blocks.1.0.in_layers.0"
    te2_norm = "conditioner.embedders.1.model.transformer.resblocks.0.ln_1"
    for key in (unet_norm, te2_norm):
        assert f"{key}.weight" in layout
        layout[f"{key}.bias"] = ((8,), torch.float32)
    write_checkpoint(tmp_path / "base.safetensors", layout, seed=2, dtype=torch.float32)
    plan = lokr_plan(tiny_layout(), factor=2)
    plan["lora_unet_input_blocks_1_0_in_layers_0"] = {"w_norm": (8,), "b_norm": (8,)}
    plan["lora_te2_text_model_encoder_layers_0_layer_norm1"] = {"w_norm": (8,), "b_norm": (8,)}
    write_lokr(tmp_path / "l.safetensors", plan, seed=5, dtype=torch.float32)
    res = merge(tmp_path / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "m.safetensors",
                multiplier=0.5, dtype="fp32", progress=False)
    assert res["modules_merged"] == len(plan) + 2  # each norm module: weight and bias
    base, lokr = load_file(str(tmp_path / "base.safetensors")), load_file(str(tmp_path / "l.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    for key, name in ((unet_norm, "lora_unet_input_blocks_1_0_in_layers_0"),
                      (te2_norm, "lora_te2_text_model_encoder_layers_0_layer_norm1")):
        layer = torch.nn.LayerNorm(8)
        with torch.no_grad():
            layer.weight.copy_(base[f"{key}.weight"])
            layer.bias.copy_(base[f"{key}.bias"])
            module = norms.NormModule(name, layer)
            module.w_norm.copy_(lokr[f"{name}.w_norm"])
            module.b_norm.copy_(lokr[f"{name}.b_norm"])
            w, b = module.make_weight(scale=0.5)
        assert torch.allclose(merged[f"{key}.weight"], w, atol=1e-6) and torch.allclose(merged[f"{key}.bias"], b, atol=1e-6)
    # a file of norm modules alone: compare finds its deltas in the merged checkpoint, at half size
    only = {n: p for n, p in plan.items() if "w_norm" in p}
    write_lokr(tmp_path / "n.safetensors", only, seed=6, dtype=torch.float32)
    merge(tmp_path / "base.safetensors", tmp_path / "n.safetensors", tmp_path / "mn.safetensors", multiplier=0.5,
          dtype="fp32", progress=False)
    report = compare_files(tmp_path / "n.safetensors", tmp_path / "mn.safetensors", base=tmp_path / "base.safetensors",
                           progress=False)
    assert report["a"]["norm_modules"] == 2 and report["a"]["lokr_modules"] == 0
    assert report["total"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert report["total"]["norm_ratio"] == pytest.approx(2.0, rel=1e-5)
