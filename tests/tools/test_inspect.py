"""kxl inspect: what a LoKr file or a checkpoint holds, from the header."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from kxl_tools.cli import main
from kxl_tools.inspect import inspect_file
from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_checkpoint, write_lokr

META = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_args": json.dumps({"algo": "lokr", "factor": "8", "full_matrix": "True"}),
    "ss_steps": "13600",
    "ss_tag_frequency": json.dumps({"1_img": {"1girl": 5, "solo": 3}, "2_img": {"smile": 1}}),
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
}


def test_inspect_lokr_file(tmp_path):
    layout = tiny_layout()
    full = lokr_plan(layout, factor=2)
    tucker = lokr_plan(layout, factor=2, rank=2, tucker=True)
    # Half the modules full-matrix, the conv ones as tucker.
    plan = {n: (tucker[n] if "lokr_t2" in tucker[n] else full[n]) for n in full}
    write_lokr(tmp_path / "l.safetensors", plan, dtype=torch.float16, alpha=4.0, metadata=META)
    r = inspect_file(tmp_path / "l.safetensors")
    assert r["kind"] == "network"
    assert r["algorithms"] == {"lokr": len(plan)}
    n_tucker = sum("lokr_t2" in p for p in plan.values())
    assert n_tucker == 5
    assert r["lokr"]["tucker"] == n_tucker and r["lokr"]["low_rank_w2"] == n_tucker
    assert r["lokr"]["full_matrix"] == len(plan) - n_tucker
    sd = load_file(str(tmp_path / "l.safetensors"))
    assert r["parameters"] == sum(v.numel() for v in sd.values())
    assert r["tensors"] == len(sd)
    assert r["dtypes"] == {"F16": len(sd)}
    assert r["file_bytes"] == (tmp_path / "l.safetensors").stat().st_size
    mods = {m["name"]: m for m in r["modules"]}
    conv = mods["lora_unet_output_blocks_0_2_conv"]
    assert conv["tucker"] and conv["rank"] == 2 and conv["scale"] == 2.0 and conv["delta_shape"] == [8, 8, 3, 3]
    fc1 = mods["lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    assert fc1["w1"] == [2, 2] and fc1["w2"] == [16, 4] and fc1["scale"] == 1.0 and fc1["delta_shape"] == [32, 8]
    assert fc1["block"] == "TE2" and fc1["parameters"] == 4 + 64 + 1
    assert r["blocks"]["TE2"]["modules"] == 12
    meta = r["training_metadata"]
    assert meta["ss_steps"] == "13600"
    assert meta["ss_tag_frequency"] == "2 dataset dirs, 3 tag entries"
    assert "ss_network_args" in meta and "modelspec.architecture" in r["other_metadata"]


def test_inspect_mixed_algorithms(tmp_path):
    sd = {
        "lora_unet_a.lokr_w1": torch.ones(2, 2),
        "lora_unet_a.lokr_w2": torch.ones(2, 2),
        "lora_unet_a.alpha": torch.tensor(1.0),
        "lora_te1_b.lora_up.weight": torch.ones(4, 1),
        "lora_te1_b.lora_down.weight": torch.ones(1, 4),
        "lora_te1_b.alpha": torch.tensor(1.0),
        "lora_te2_c.hada_w1_a": torch.ones(4, 1),
        "lora_te2_c.hada_w1_b": torch.ones(1, 4),
    }
    save_file(sd, str(tmp_path / "m.safetensors"))
    r = inspect_file(tmp_path / "m.safetensors")
    assert r["algorithms"] == {"lokr": 1, "lora": 1, "loha": 1}
    assert {m["name"]: m["block"] for m in r["modules"]} == {"lora_unet_a": "UNet other", "lora_te1_b": "TE1", "lora_te2_c": "TE2"}


def test_inspect_checkpoint_and_cli(tmp_path):
    layout = tiny_layout()
    write_checkpoint(tmp_path / "c.safetensors", layout, dtype=torch.float16)
    r = inspect_file(tmp_path / "c.safetensors")
    assert r["kind"] == "checkpoint"
    assert sum(b["tensors"] for b in r["blocks"].values()) == len(layout)
    assert r["blocks"]["VAE"]["tensors"] == 2
    assert r["dtypes"] == {"F16": len(layout) - 1, "I64": 1}
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "c.safetensors"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "checkpoint" in res.output and "UNet input" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["tensors"] == len(layout)
    write_lokr(tmp_path / "l.safetensors", lokr_plan(layout, factor=2), metadata=META)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "l.safetensors"), "--modules"])
    assert res.exit_code == 0, res.output
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj: lokr w1 [2, 2] w2 [4, 4]" in res.output
    assert "ss_steps: 13600" in res.output


def test_weight_decomposed_lokr_is_flagged_not_compared(tmp_path):
    from kxl_tools.compare import compare_files

    sd = {
        "lora_unet_a.lokr_w1": torch.ones(2, 2),
        "lora_unet_a.lokr_w2": torch.ones(2, 2),
        "lora_unet_b.lokr_w1": torch.ones(2, 2),
        "lora_unet_b.lokr_w2": torch.ones(2, 2),
        "lora_unet_b.dora_scale": torch.ones(4, 1),
    }
    save_file(sd, str(tmp_path / "d.safetensors"))
    r = inspect_file(tmp_path / "d.safetensors")
    assert r["algorithms"] == {"lokr": 1, "lokr+dora": 1}
    c = compare_files(tmp_path / "d.safetensors", tmp_path / "d.safetensors", progress=False)
    assert c["counts"]["both"] == 1
    assert c["a"]["unsupported_modules"] == {"lora_unet_b": "lokr+dora"}


def test_inspect_splits_metadata_bytes_from_tensor_bytes(tmp_path):
    """The metadata's header bytes: what the same file without metadata lacks (up to safetensors'
    8-byte header padding); the file is tensors + metadata + tensor index to the byte."""
    sd = {"lora_unet_a.lokr_w1": torch.ones(4, 4, dtype=torch.float16), "lora_unet_a.lokr_w2": torch.ones(8, 6),
          "lora_unet_a.alpha": torch.tensor(1.0)}
    tags = {"1_img": {f"tag_{i}": i for i in range(5000)}, "2_img": {"émoji_☆": 1}}
    meta = {**META, "ss_tag_frequency": json.dumps(tags)}
    save_file(sd, str(tmp_path / "with.safetensors"), metadata=meta)
    save_file(sd, str(tmp_path / "without.safetensors"))
    extra = (tmp_path / "with.safetensors").stat().st_size - (tmp_path / "without.safetensors").stat().st_size
    r = inspect_file(tmp_path / "with.safetensors")
    b = r["bytes"]
    assert b["tensors"] == 16 * 2 + 48 * 4 + 4
    assert b["file"] == r["file_bytes"] == b["tensors"] + b["metadata"] + b["tensor_index"]
    assert abs(b["metadata"] - extra) < 8
    assert list(b["largest_metadata"])[0] == "ss_tag_frequency"
    assert b["largest_metadata"]["ss_tag_frequency"] > len(json.dumps(tags))  # escaped once more as a string
    assert inspect_file(tmp_path / "without.safetensors")["bytes"]["metadata"] == 0
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "with.safetensors")])
    assert res.exit_code == 0 and f"metadata {b['metadata']:,}" in res.output
    assert f"ss_tag_frequency {b['largest_metadata']['ss_tag_frequency']:,} B" in res.output
