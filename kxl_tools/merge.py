"""Bake a LoKr into an SDXL single-file checkpoint, one tensor at a time.

W' = W + multiplier * scale * kron(w1, w2), computed in float32, then cast to the output
dtype. The scale is applied once, as in training (kxl_tools.lokr explains LyCORIS's
merge_to, which applies a low-rank module's scale twice). TE2's q/k/v deltas are written
into their row blocks of the fused attn.in_proj_weight. Non-float tensors are copied as is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from kxl_common.errors import KxlError

from .keys import CheckpointIndex
from .lokr import NetworkFile
from .sources import open_file
from .st_io import PlannedTensor, StreamingWriter

OUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}


class MergeError(KxlError, ValueError):
    pass


def merge(base_path, lokr_path, out_path, multiplier: float = 1.0, dtype: str = "fp16", progress: bool = True) -> dict:
    if dtype not in OUT_DTYPES:
        raise MergeError(f"--dtype {dtype!r}: choose one of {sorted(OUT_DTYPES)}")
    if Path(out_path).resolve() in (Path(base_path).resolve(), Path(lokr_path).resolve()):
        raise MergeError(f"output {out_path} would overwrite an input")
    kind, base = open_file(base_path)
    if kind != "checkpoint":
        raise MergeError(f"BASE {base_path}: expected an SDXL single-file checkpoint, got a {kind} file")
    kind, lok = open_file(lokr_path)
    if kind != "network":
        raise MergeError(f"LOKR {lokr_path}: expected a LoKr network file, got a {kind}")
    net = NetworkFile(lok)
    unsupported = net.unsupported()
    if unsupported:
        first = next(iter(unsupported.items()))
        raise MergeError(
            f"{lokr_path}: {len(unsupported)} modules are not LoKr (first: {first[0]} is {first[1]}); only LoKr is merged"
        )
    index = CheckpointIndex.from_reader(base)
    targets: dict[str, list[tuple[str, object]]] = {}
    missing = []
    for name in net.delta_names():  # LoKr weights, and norm weights and biases (train_norm)
        part = index.parts.get(name)
        if part is None:
            missing.append(name)
            continue
        targets.setdefault(part.ckpt_key, []).append((name, part))
    if missing:
        raise MergeError(
            f"{lokr_path}: {len(missing)} LoKr / norm modules name no tensor of {base_path} (first: {missing[0]}); "
            "expected sd-scripts SDXL names lora_unet_* (SGM U-Net), lora_te1_text_model_*, lora_te2_text_model_*"
        )
    out_dtype = OUT_DTYPES[dtype]
    keys = list(index.by_key)
    plan = []
    for k in keys:
        info = base.tensors[k]
        dt = info.torch_dtype
        if out_dtype is not None and dt.is_floating_point:
            dt = out_dtype
        plan.append(PlannedTensor(k, dt, info.shape))
    meta = dict(base.metadata)
    meta["kxl_merge"] = json.dumps(
        {"base": Path(base_path).name, "lokr": Path(lokr_path).name, "multiplier": multiplier, "dtype": dtype, "modules": len(net.lokr_names()) + len(net.norm_names())}
    )
    merged = 0
    with StreamingWriter(out_path, plan, meta) as writer:
        for p in tqdm(plan, desc="merge", unit="tensor", disable=not progress):
            t = base.read(p.name)
            if p.name in targets:
                if not t.dtype.is_floating_point:
                    raise MergeError(f"{p.name}: LoKr delta for a non-float tensor ({t.dtype})")
                w = t.float() if t.dtype != torch.float32 else t
                for name, part in targets[p.name]:
                    delta = net.delta(name, part.shape)
                    view = w if part.rows is None else w[part.rows[0]:part.rows[1]]
                    view.add_(delta, alpha=multiplier)
                    merged += 1
                t = w
            writer.write(p.name, t.to(p.dtype))
    return {"out": str(out_path), "tensors": len(plan), "modules_merged": merged, "dtype": dtype, "multiplier": multiplier}
