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


def _lokr_params(shapes) -> int:
    return sum(_numel(s) for ps in shapes.values() if "lokr_w1" in ps for p, s in ps.items() if p != "alpha")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_inspect_shows_the_comparison_with_the_preset_of_record(tmp_path):
    """Against the preset of record (its committed SDXL plan); expectations from the plan itself."""
    shapes = _ours()
    preset_params = _lokr_params(shapes)
    gone = "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    removed = _lokr_params({gone: shapes.pop(gone)})
    changed = "lora_unet_input_blocks_0_0"  # conv_in (320 x 4 x 3 x 3); at factor 4: w1 (4, 1), w2 (80, 4, 3, 3)
    before = shapes[changed]
    assert (before["lokr_w1"], before["lokr_w2"]) != ((4, 1), (80, 4, 3, 3))
    shapes[changed] = {"alpha": (), "lokr_w1": (4, 1), "lokr_w2": (80, 4, 3, 3)}
    f = tmp_path / "author.safetensors"
    write_header_only(f, {f"{n}.{p}": s for n, ps in shapes.items() for p, s in ps.items()}, "F32")
    res = CliRunner().invoke(kxl, ["inspect", str(f), "--preset", "--json", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "against the preset:" in res.output and f"      {gone}" in res.output
    assert (f"{changed}: file w1 [4, 1] w2 [80, 4, 3, 3], preset w1 {list(before['lokr_w1'])} "
            f"w2 {list(before['lokr_w2'])}") in res.output
    data = json.loads((tmp_path / "i.json").read_text())["preset_comparison"]
    assert data["only_preset"] == [gone] and data["only_file"] == []
    assert [d["name"] for d in data["factor_differs"]] == [changed]
    assert data["factor_moves"] == {f"{max(before['lokr_w1'])}->4": 1}
    assert data["preset"]["params"] == preset_params
    assert data["file"]["params"] == preset_params - removed - _lokr_params({changed: before}) + (4 + 80 * 36)


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
