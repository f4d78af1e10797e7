"""`kxl inspect LOKR --preset [PRESET]`: the file's modules and factors against a LyCORIS preset."""
from __future__ import annotations

import json

from click.testing import CliRunner

from kxl_testing.tiny_lycoris import write_header_only
from kxl_tools.cli import main as kxl
from kxl_train import preset_from as pf


def _ours():
    plan = json.loads(pf.PLAN_PATH.read_text())["modules"]
    return {n: {p: tuple(s) for p, s in ps.items()} for n, ps in plan.items()}


def test_inspect_shows_the_comparison_with_our_preset(tmp_path):
    shapes = _ours()
    gone = "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    del shapes[gone]
    changed = "lora_unet_input_blocks_0_0"  # conv_in, factor 2 in our preset: w1 (2, 2), w2 (160, 2, 3, 3)
    assert shapes[changed]["lokr_w1"] == (2, 2) and shapes[changed]["lokr_w2"] == (160, 2, 3, 3)
    shapes[changed] = {"alpha": (), "lokr_w1": (4, 1), "lokr_w2": (80, 4, 3, 3)}  # factor 4 (4 channels in: 1 x 4)
    f = tmp_path / "author.safetensors"
    write_header_only(f, {f"{n}.{p}": s for n, ps in shapes.items() for p, s in ps.items()}, "F32")
    res = CliRunner().invoke(kxl, ["inspect", str(f), "--preset", "--json", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "against the preset:" in res.output and f"      {gone}" in res.output
    assert f"{changed}: file w1 [4, 1] w2 [80, 4, 3, 3], preset w1 [2, 2] w2 [160, 2, 3, 3]" in res.output
    data = json.loads((tmp_path / "i.json").read_text())["preset_comparison"]
    assert data["only_preset"] == [gone] and data["only_file"] == []
    assert [d["name"] for d in data["factor_differs"]] == [changed] and data["factor_moves"] == {"2->4": 1}
    assert data["preset"]["params"] == 182_995_160
    removed = 160 * 640 + 8 * 8  # fc2 of TE2 (1280 x 5120) at factor 8: w2 160 x 640, w1 8 x 8
    assert data["file"]["params"] == 182_995_160 - removed - (4 + 160 * 18) + (4 + 80 * 36)


def test_without_preset_no_comparison_and_checkpoints_refused(tmp_path):
    f = tmp_path / "ours.safetensors"
    write_header_only(f, {f"{n}.{p}": s for n, ps in _ours().items() for p, s in ps.items()})
    res = CliRunner().invoke(kxl, ["inspect", str(f)])
    assert res.exit_code == 0 and "against the preset" not in res.output
    res = CliRunner().invoke(kxl, ["inspect", str(f), "--preset"])
    assert res.exit_code == 0 and "same modules and factors as the preset" in res.output
    ck = tmp_path / "ckpt.safetensors"
    write_header_only(ck, {"model.diffusion_model.out.2.weight": (4, 320, 3, 3),
                           "conditioner.embedders.1.model.ln_final.weight": (1280,)})
    res = CliRunner().invoke(kxl, ["inspect", str(ck), "--preset"])
    assert res.exit_code != 0 and "compares a LoKr file's modules" in res.output


def test_a_missing_preset_is_one_error_and_no_report(tmp_path):
    f = tmp_path / "lokr.safetensors"
    write_header_only(f, {f"{n}.{p}": s for n, ps in _ours().items() for p, s in ps.items()}, "F32")
    res = CliRunner().invoke(kxl, ["inspect", str(f), "--preset", str(tmp_path / "missing.toml")])
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit)
    assert res.output == f"Error: {tmp_path / 'missing.toml'}: no such LyCORIS preset\n"
