"""kxl compare on small generated files with known answers."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from kxl_tools.cli import main
from kxl_tools.compare import Thresholds, compare_files, pair_sums
from kxl_tools.keys import block_of
from kxl_tools.synthetic import lokr_plan, tiny_layout, write_checkpoint, write_lokr


def _kron(w1, w2):
    """Independent kron: outer product with the axes interleaved."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    rest = w2.shape[2:]
    out = w1[:, None, :, None].reshape(a, 1, c, 1, *([1] * len(rest))) * w2[None, :, None, :]
    return out.reshape(a * b, c * d, *rest)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    layout = tiny_layout()
    write_checkpoint(d / "base.safetensors", layout, seed=1, dtype=torch.float32)
    plan = lokr_plan(layout, factor=2)
    write_lokr(d / "b.safetensors", plan, seed=2, dtype=torch.float32)
    return d, layout, plan


def _metrics(a: torch.Tensor, b: torch.Tensor):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return (
        float((a - b).norm() / b.norm()),
        float(a @ b / (a.norm() * b.norm())),
        float(a.norm() / b.norm()),
    )


def test_identical_files_distance_zero(files, tmp_path):
    d, _, plan = files
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((d / "b.safetensors").read_bytes())
    r = compare_files(copy, d / "b.safetensors", progress=False)
    assert r["total"]["rel_fro"] == 0.0
    assert r["total"]["cosine"] == pytest.approx(1.0)
    assert r["total"]["norm_ratio"] == pytest.approx(1.0)
    assert r["counts"]["both"] == len(plan)
    assert r["only_a"] == [] and r["only_b"] == []
    assert all(m["rel_fro"] == 0.0 for m in r["modules"])
    assert r["verdict"]["level"] == "SAME"


def test_known_perturbation_of_one_module(files, tmp_path):
    d, _, plan = files
    sd = load_file(str(d / "b.safetensors"))
    target = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
    eps = 0.125
    sd[f"{target}.lokr_w2"] = sd[f"{target}.lokr_w2"] * (1 + eps)  # delta scales by 1 + eps
    save_file(sd, str(tmp_path / "a.safetensors"))
    r = compare_files(tmp_path / "a.safetensors", d / "b.safetensors", progress=False)
    mods = {m["name"]: m for m in r["modules"]}
    m = mods[target]
    assert m["rel_fro"] == pytest.approx(eps, rel=1e-6)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6)  # float32 chunk reductions: ~1e-7 relative
    assert m["norm_ratio"] == pytest.approx(1 + eps, rel=1e-6)
    assert all(v["rel_fro"] == 0.0 for k, v in mods.items() if k != target)
    # Totals: only this module differs, by eps * its norm.
    ref = load_file(str(d / "b.safetensors"))
    norms2 = {}
    for name in plan:
        delta = _kron(ref[f"{name}.lokr_w1"], ref[f"{name}.lokr_w2"])
        norms2[name] = float(delta.double().norm() ** 2)
    total_b = math.sqrt(sum(norms2.values()))
    assert r["total"]["rel_fro"] == pytest.approx(eps * math.sqrt(norms2[target]) / total_b, rel=1e-6)
    te2 = math.sqrt(sum(v for k, v in norms2.items() if block_of(k) == "TE2"))
    assert r["blocks"]["TE2"]["rel_fro"] == pytest.approx(eps * math.sqrt(norms2[target]) / te2, rel=1e-6)
    assert r["blocks"]["TE1"]["rel_fro"] == 0.0


def test_random_perturbation_matches_direct_formula(files, tmp_path):
    d, _, _ = files
    sd = load_file(str(d / "b.safetensors"))
    name = "lora_unet_output_blocks_0_2_conv"  # a 3x3 conv module
    g = torch.Generator().manual_seed(5)
    w1_new = sd[f"{name}.lokr_w1"] + 0.3 * torch.randn(sd[f"{name}.lokr_w1"].shape, generator=g)
    expected = _metrics(_kron(w1_new, sd[f"{name}.lokr_w2"]), _kron(sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"]))
    sd[f"{name}.lokr_w1"] = w1_new
    save_file(sd, str(tmp_path / "a.safetensors"))
    r = compare_files(tmp_path / "a.safetensors", d / "b.safetensors", progress=False)
    m = next(m for m in r["modules"] if m["name"] == name)
    assert (m["rel_fro"], m["cosine"], m["norm_ratio"]) == pytest.approx(expected, rel=1e-6)
    assert m["block"] == "UNet output" and m["shape"] == [8, 8, 3, 3]


def test_modules_on_one_side_are_listed_and_counted(files, tmp_path):
    d, _, plan = files
    sd = load_file(str(d / "b.safetensors"))
    dropped = "lora_unet_middle_block_0_in_layers_2"
    for p in list(sd):
        if p.startswith(dropped + "."):
            del sd[p]
    save_file(sd, str(tmp_path / "a.safetensors"))
    r = compare_files(tmp_path / "a.safetensors", d / "b.safetensors", progress=False)
    assert r["only_b"] == [dropped] and r["only_a"] == []
    assert r["counts"]["both"] == len(plan) - 1
    mid = r["blocks"]["UNet middle"]
    assert mid["only_b"] == 1
    # A lacks the module: the middle block's ||A - B||^2 is exactly that module's ||B||^2.
    full = load_file(str(d / "b.safetensors"))
    dn = float(_kron(full[f"{dropped}.lokr_w1"], full[f"{dropped}.lokr_w2"]).double().norm())
    assert mid["rel_fro"] == pytest.approx(dn / mid["norm_b"], rel=1e-6)
    r2 = compare_files(d / "b.safetensors", tmp_path / "a.safetensors", progress=False)
    assert r2["only_a"] == [dropped]


def test_checkpoint_vs_lokr_needs_base(files):
    d, _, _ = files
    with pytest.raises(ValueError, match="--base"):
        compare_files(d / "base.safetensors", d / "b.safetensors", progress=False)


def test_checkpoint_delta_with_known_te2_change(files, tmp_path):
    """A checkpoint that differs from the base only in TE2 layer 0's k rows of the fused in_proj."""
    d, layout, _ = files
    base = load_file(str(d / "base.safetensors"))
    a = dict(base)
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    dk = torch.full((8, 8), 0.5)
    w = a[key].clone()
    w[8:16] += dk
    a[key] = w
    save_file(a, str(tmp_path / "a.safetensors"))
    b = dict(base)
    w = b[key].clone()
    w[8:16] += 2 * dk
    b[key] = w
    save_file(b, str(tmp_path / "b.safetensors"))
    r = compare_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", base=d / "base.safetensors", progress=False)
    assert [m["name"] for m in r["modules"]] == ["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"]
    m = r["modules"][0]
    assert m["rel_fro"] == pytest.approx(0.5, rel=1e-6)
    assert m["norm_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6)  # float32 chunk reductions: ~1e-7 relative
    assert r["counts"]["unchanged"] > 0
    # Without a base the raw weights are compared: every float tensor is present on both sides.
    raw = compare_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=False)
    assert raw["counts"]["only_a"] == raw["counts"]["only_b"] == 0
    assert raw["counts"]["both"] > 40


def test_verdict_levels_and_thresholds_are_stated(files, tmp_path):
    d, _, _ = files
    sd = load_file(str(d / "b.safetensors"))
    scaled = {k: (v * 1.1 if k.endswith(".lokr_w2") else v) for k, v in sd.items()}
    save_file(scaled, str(tmp_path / "a.safetensors"))
    r = compare_files(tmp_path / "a.safetensors", d / "b.safetensors", progress=False)
    assert r["total"]["rel_fro"] == pytest.approx(0.1, rel=1e-5)
    assert r["verdict"]["level"] == "CLOSE"
    line = r["verdict"]["line"]
    for text in ("SAME if <= 0.01", "CLOSE if cosine >= 0.9", "[0.80, 1.25]", "RELATED if cosine >= 0.5"):
        assert text in line
    strict = compare_files(tmp_path / "a.safetensors", d / "b.safetensors", thresholds=Thresholds(close_ratio=1.05), progress=False)
    assert strict["verdict"]["level"] == "RELATED"
    loose = compare_files(tmp_path / "a.safetensors", d / "b.safetensors", thresholds=Thresholds(same_rel=0.2), progress=False)
    assert loose["verdict"]["level"] == "SAME"
    neg = {k: (-v if k.endswith(".lokr_w2") else v) for k, v in sd.items()}
    save_file(neg, str(tmp_path / "neg.safetensors"))
    r = compare_files(tmp_path / "neg.safetensors", d / "b.safetensors", progress=False)
    assert r["total"]["cosine"] == pytest.approx(-1.0) and r["verdict"]["level"] == "DIFFERENT"


def test_cli_writes_table_json_and_plot(files, tmp_path):
    d, _, plan = files
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["compare", str(d / "b.safetensors"), str(d / "b.safetensors"), "--out", str(out), "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "verdict: SAME" in res.output
    report = json.loads((out / "compare.json").read_text())
    assert report["counts"]["both"] == len(plan)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdict: SAME" in (out / "compare.txt").read_text()


def test_cli_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"garbage")
    res = CliRunner().invoke(main, ["compare", str(bad), str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "not a safetensors file" in res.output
    assert "Traceback" not in res.output


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    c=st.floats(-3, 3).filter(lambda x: abs(x) > 1e-3),
    seed=st.integers(0, 2**16),
)
def test_pair_sums_scaled_copy(n, c, seed):
    """a = c * b: rel = |1 - c|, cosine = sign(c), ratio = |c|."""
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)).double()
    m = pair_sums((c * b), b).metrics()
    assert m["rel_fro"] == pytest.approx(abs(1 - c), rel=1e-9, abs=1e-12)
    assert m["cosine"] == pytest.approx(math.copysign(1.0, c), abs=1e-9)
    assert m["norm_ratio"] == pytest.approx(abs(c), rel=1e-9)


def test_pair_sums_chunking_equals_one_pass(monkeypatch):
    import kxl_tools.compare as cmp

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    whole = cmp.pair_sums(a, b)
    monkeypatch.setattr(cmp, "CHUNK", 7)
    chunked = cmp.pair_sums(a, b)
    exact = cmp.pair_sums(a.double(), b.double())  # float64 inputs are reduced in float64
    for f in ("a2", "b2", "ab", "d2"):
        # float32 chunks, float64 accumulation: within float32 rounding of the exact sums
        assert getattr(chunked, f) == pytest.approx(getattr(exact, f), rel=1e-6)
        assert getattr(whole, f) == pytest.approx(getattr(exact, f), rel=1e-6)
    assert cmp.pair_sums(a, a.clone()).d2 == 0.0
