"""What is in a LoKr file or an SDXL checkpoint, from the header (and the tiny alpha tensors)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .keys import BLOCKS, CheckpointIndex, block_of
from .lokr import LokrError, NetworkFile
from .sources import open_file

# sd-scripts metadata values that are JSON and can be huge: summarized, not printed whole.
_BULKY = ("ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_bucket_info")


def _summarize_meta(meta: dict[str, str]) -> dict:
    out = {}
    for k in sorted(meta):
        v = meta[k]
        if k in _BULKY:
            try:
                obj = json.loads(v)
            except json.JSONDecodeError:
                obj = None
            if k == "ss_tag_frequency" and isinstance(obj, dict):
                tags = sum(len(d) for d in obj.values() if isinstance(d, dict))
                out[k] = f"{len(obj)} dataset dirs, {tags} tag entries"
                continue
            if isinstance(obj, (dict, list)):
                out[k] = f"JSON {type(obj).__name__} of {len(obj)} entries ({len(v)} chars)"
                continue
        out[k] = v if len(v) <= 300 else v[:300] + f"... ({len(v)} chars)"
    return out


def _byte_split(header) -> dict:
    """Where the file's bytes go: 8 + the JSON header (the metadata, the tensor index) + the tensor
    data; and the largest metadata values (sd-scripts' ss_tag_frequency can be megabytes)."""
    from kxl_common.safetensors_header import metadata_bytes

    meta = header.metadata_bytes
    by_key = sorted(((k, metadata_bytes({k: v})) for k, v in header.metadata.items()), key=lambda kv: -kv[1])
    return {"file": header.file_size, "tensors": header.tensor_bytes, "header": 8 + header.header_bytes,
            "metadata": meta, "tensor_index": 8 + header.header_bytes - meta,
            "largest_metadata": dict(by_key[:5])}


def inspect_file(path) -> dict:
    kind, reader = open_file(path)
    infos = reader.tensors.values()
    dtypes = Counter(t.dtype for t in infos)
    report = {
        "path": str(path),
        "kind": kind,
        "file_bytes": reader.file_size,
        "tensors": len(reader.tensors),
        "parameters": sum(t.numel for t in infos),
        "dtypes": dict(dtypes),
        "bytes": _byte_split(reader.header),
        "training_metadata": _summarize_meta({k: v for k, v in reader.metadata.items() if k.startswith("ss_")}),
        "other_metadata": _summarize_meta({k: v for k, v in reader.metadata.items() if not k.startswith("ss_")}),
    }
    if kind == "network":
        report.update(_inspect_network(reader))
    else:
        report.update(_inspect_checkpoint(reader))
    return report


def _inspect_network(reader) -> dict:
    net = NetworkFile(reader)
    modules = []
    per_block = {}
    for name, params in net.modules.items():
        algo = net.algorithms[name]
        numel = sum(reader.tensors[k].numel for k in params.values())
        entry = {"name": name, "block": block_of(name), "algorithm": algo, "parameters": numel,
                 "dtypes": sorted({reader.tensors[k].dtype for k in params.values()})}
        if algo == "lokr":
            try:
                entry.update(net.factors_from_header(name).describe())
            except LokrError as exc:
                entry["error"] = str(exc)
        else:
            entry["tensors"] = {p: list(reader.tensors[k].shape) for p, k in params.items()}
        modules.append(entry)
        b = per_block.setdefault(entry["block"], {"modules": 0, "parameters": 0})
        b["modules"] += 1
        b["parameters"] += numel
    lokr = [m for m in modules if m["algorithm"] == "lokr" and "error" not in m]
    summary = {
        "algorithms": dict(Counter(m["algorithm"] for m in modules)),
        "modules": modules,
        "blocks": {b: per_block[b] for b in BLOCKS if b in per_block},
        "loose_keys": net.loose_keys,
    }
    if lokr:
        summary["lokr"] = {
            "full_matrix": sum(1 for m in lokr if not m["w1_low_rank"] and not m["w2_low_rank"]),
            "low_rank_w1": sum(1 for m in lokr if m["w1_low_rank"]),
            "low_rank_w2": sum(1 for m in lokr if m["w2_low_rank"]),
            "tucker": sum(1 for m in lokr if m["tucker"]),
            # The kron factor of a module is the smaller w1 side (factorization(dim, factor)).
            "w1_shapes": dict(Counter("x".join(map(str, m["w1"])) for m in lokr).most_common()),
            "ranks": dict(Counter(str(m["rank"]) for m in lokr)),
            "scales": dict(Counter(f"{m['scale']:g}" for m in lokr)),
            "conv_modules": sum(1 for m in lokr if len(m["delta_shape"]) > 2),
        }
    return summary


def _inspect_checkpoint(reader) -> dict:
    index = CheckpointIndex.from_reader(reader)
    blocks = {}
    for key, parts in index.by_key.items():
        info = reader.tensors[key]
        b = blocks.setdefault(block_of(parts[0].name), {"tensors": 0, "parameters": 0, "dtypes": Counter()})
        b["tensors"] += 1
        b["parameters"] += info.numel
        b["dtypes"][info.dtype] += 1
    for b in blocks.values():
        b["dtypes"] = dict(b["dtypes"])
    return {"blocks": {b: blocks[b] for b in BLOCKS if b in blocks}}


def preset_comparison(path, report: dict, preset=None) -> dict:
    """How a LoKr file's modules and factors differ from a LyCORIS preset (kxl_train.preset_from)."""
    from kxl_train import preset_from as pf

    if report["kind"] != "network":
        raise LokrError(f"{path}: --preset compares a LoKr file's modules; this is a {report['kind']}")
    preset = preset or pf.PRESET_PATH
    try:
        layout, other, facts = pf.read_layout(path)
        cmp, source = pf.compare_with_preset(layout, preset, pf.norm_modules(other))
    except pf.PresetFromError as exc:
        raise LokrError(str(exc)) from exc
    return {"preset": str(preset), "preset_modules_from": source, "facts": facts, **cmp,
            "lines": pf.format_comparison(cmp, Path(path).name, f"{Path(preset).name} [{source}]", facts)}


def format_report(r: dict, modules: bool = False) -> str:
    lines = [
        f"{r['path']}: {r['kind']}",
        f"  size {r['file_bytes'] / 2**20:.1f} MiB, {r['tensors']} tensors, {r['parameters']:,} parameters, dtypes {r['dtypes']}",
    ]
    b = r["bytes"]
    lines.append(f"  bytes: {b['file']:,} = tensors {b['tensors']:,} + metadata {b['metadata']:,} "
                 f"+ tensor index {b['tensor_index']:,} (8 + JSON header {b['header'] - 8:,})")
    if b["largest_metadata"]:
        lines.append("  largest metadata values: " + ", ".join(f"{k} {n:,} B" for k, n in b["largest_metadata"].items()))
    if r["kind"] == "network":
        lines.append(f"  modules {len(r['modules'])}, algorithms {r['algorithms']}")
        if "lokr" in r:
            lk = r["lokr"]
            lines.append(
                f"  LoKr: {lk['full_matrix']} full-matrix, {lk['low_rank_w2']} low-rank w2, {lk['low_rank_w1']} low-rank w1, "
                f"{lk['tucker']} tucker, {lk['conv_modules']} conv; ranks {lk['ranks']}; scales {lk['scales']}"
            )
            lines.append(f"  w1 (kron factor) shapes: {lk['w1_shapes']}")
        for b, v in r["blocks"].items():
            lines.append(f"  {b:<12} {v['modules']:>5} modules {v['parameters']:>14,} parameters")
        if modules:
            lines.append("")
            for m in r["modules"]:
                if m["algorithm"] == "lokr" and "error" not in m:
                    lines.append(
                        f"  {m['name']}: lokr w1 {m['w1']}{' (a@b)' if m['w1_low_rank'] else ''} w2 {m['w2']}"
                        f"{' (tucker)' if m['tucker'] else ' (a@b)' if m['w2_low_rank'] else ''} rank {m['rank']} "
                        f"alpha {m['alpha']} scale {m['scale']:g} -> {m['delta_shape']} ({m['parameters']:,} params, {','.join(m['dtypes'])})"
                    )
                else:
                    lines.append(f"  {m['name']}: {m['algorithm']} {m.get('error') or m.get('tensors')}")
    else:
        for b, v in r["blocks"].items():
            lines.append(f"  {b:<12} {v['tensors']:>5} tensors {v['parameters']:>14,} parameters {v['dtypes']}")
    for title, key in (("training metadata (ss_*)", "training_metadata"), ("other metadata", "other_metadata")):
        if r[key]:
            lines.append(f"  {title}:")
            lines += [f"    {k}: {v}" for k, v in r[key].items()]
    if "preset_comparison" in r:
        lines.append("  against the preset:")
        lines += [f"    {x}" for x in r["preset_comparison"]["lines"]]
    return "\n".join(lines)
