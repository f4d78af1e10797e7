"""What a LoKr file of the author's config weighs, and why the released one is ~15 MB larger.

    python bench/lokr_size.py metadata [--images 5210319] [--dirs 1]
        The header metadata sd-scripts v0.10.1 would write for an Epsilon-scale run (kxl_testing.
        ss_metadata), over the captions of kxl's own scale generator (kxl_testing.bench_prep_output,
        the Epsilon caption form, 5,210,319 images): ss_tag_frequency (caption-file directories),
        ss_bucket_info, ss_dataset_dirs, the rest; bytes as they land in the safetensors header.
    python bench/lokr_size.py sizes                (needs sd-scripts: KXL_SD_SCRIPTS)
        The author's preset on sd-scripts' SDXL (meta device): parameters, the file at fp16 / fp32,
        the saved state (network + Lion8bit state), the memory of a training step's trainable part.
    python bench/lokr_size.py lion8bit [--numel 4194304]
        bitsandbytes' Lion8bit state measured on a CPU tensor: bytes per parameter.

Figures go to stdout (and --json); docs/lokr-size.md quotes them.
"""
from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RELEASED_BYTES = 784_877_708  # the released Epsilon LoKr (card / hub listing)
EPSILON_IMAGES = 5_210_319
# safetensors' save_file of the author's network at fp16 without metadata (`sizes` computes it; a
# save of zero tensors of those shapes measured the same)
FP16_NO_METADATA = 769_776_396


@click.group()
def cli():
    pass


@cli.command()
@click.option("--images", default=EPSILON_IMAGES, show_default=True)
@click.option("--dirs", default=1, show_default=True, help="Caption directories the images are spread over.")
@click.option("--separator-as-tag", is_flag=True,
              help="Captions written `a, |||, b` (the separator its own comma item) instead of kxl's `a ||| b`, "
                   "whose `x ||| y` pairs sd-scripts' comma split counts as tags.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
def metadata(images, dirs, separator_as_tag, json_out):
    from kxl_common.safetensors_header import metadata_bytes
    from kxl_prep.buckets import BucketAssigner, DEFAULT_GRID
    from kxl_testing import ss_metadata as ssm
    from kxl_testing.bench_prep_output import CHUNK, epsilon_rows

    t0 = time.time()
    assigner = BucketAssigner(DEFAULT_GRID)
    per_dir = [collections.Counter() for _ in range(dirs)]
    dir_images = [0] * dirs
    buckets: collections.Counter = collections.Counter()
    ar_error_sum = 0.0
    row = 0
    for keys, width, height, captions in tqdm(epsilon_rows(images), total=-(-images // CHUNK), unit="chunk",
                                              desc="captions"):
        if separator_as_tag:
            captions = [c.replace("|||", ",|||,") for c in captions]
        bw, bh = assigner.assign(width, height)
        ar_error_sum += float(np.sum(np.abs(width / height - bw / bh)))
        buckets.update(zip(bw.tolist(), bh.tolist()))
        # images spread over `dirs` directories in id order, as a per-range export would do
        which = (np.arange(row, row + len(captions)) * dirs) // images
        for d in range(dirs):
            sel = [c for c, w in zip(captions, which) if w == d] if dirs > 1 else captions
            ssm.count_tags(sel, per_dir[d])
            dir_images[d] += len(sel)
        row += len(captions)
    names = [f"data-{d:04d}" for d in range(dirs)]
    tag_frequency = {n: dict(c) for n, c in zip(names, per_dir)}
    info = ssm.bucket_info(dict(buckets), ar_error_sum / images)
    values = {"num_train_images": images, "output_name": "kohaku-xl-epsilon-lyco", "network_module": "lycoris.kohya",
              "network_args": json.dumps({"conv_dim": "10000", "conv_alpha": "10000", "algo": "lokr", "dropout": "0",
                                          "factor": "8", "train_norm": "True", "preset": "./sdxl-base.toml"}),
              "max_token_length": 225, "batch_size_per_device": 4}
    forms = {
        "caption files, no dataset config": ssm.run_metadata(tag_frequency, dict(zip(names, dir_images)), info, values, False),
        "caption files, dataset config": ssm.run_metadata(tag_frequency, dict(zip(names, dir_images)), info, values, True),
        "kxl meta.json (no tags field)": ssm.run_metadata({"meta.json": {}}, {"meta.json": images}, info, values, True),
    }
    unique = sum(len(c) for c in per_dir)
    out = {"images": images, "dirs": dirs, "separator_as_tag": separator_as_tag, "unique_tags_per_dir": [len(c) for c in per_dir],
           "tag_entries": unique, "buckets_used": len(buckets), "seconds": round(time.time() - t0, 1), "forms": {}}
    for label, meta in forms.items():
        by_key = {k: metadata_bytes({k: v}) for k, v in meta.items()}
        big = {k: n for k, n in sorted(by_key.items(), key=lambda kv: -kv[1])[:4]}
        out["forms"][label] = {"metadata_bytes": metadata_bytes(meta), "largest": big,
                               "rest": metadata_bytes(meta) - sum(big.values())}
    tf_bytes = metadata_bytes({"ss_tag_frequency": json.dumps(tag_frequency)})
    out["bytes_per_tag_entry"] = round(tf_bytes / max(unique, 1), 2)
    gap = RELEASED_BYTES - FP16_NO_METADATA  # the released file minus the same modules at fp16, no metadata
    out["released_gap_bytes"] = gap
    out["tag_entries_for_gap"] = int(gap / out["bytes_per_tag_entry"])
    click.echo(f"{images:,} captions of the Epsilon form over {dirs} director{'y' if dirs == 1 else 'ies'}: "
               f"{unique:,} tag entries, {len(buckets)} buckets ({out['seconds']} s)")
    for label, f in out["forms"].items():
        click.echo(f"  {label:<36} metadata {f['metadata_bytes'] / 1e6:8.3f} MB  ("
                   + ", ".join(f"{k} {n / 1e6:.3f} MB" for k, n in f["largest"].items()) + f", rest {f['rest']:,} B)")
    click.echo(f"ss_tag_frequency: {out['bytes_per_tag_entry']} header bytes per tag entry; the released file's "
               f"{gap / 1e6:.1f} MB would hold ~{out['tag_entries_for_gap']:,} entries")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1))


def lion8bit_state_bytes(numel: int) -> int:
    """Bytes of bitsandbytes' Lion8bit state for one parameter of `numel` elements, measured: a
    CPU tensor, one step, the state's tensors summed (the shared quantization map not counted)."""
    import bitsandbytes as bnb
    import torch

    p = torch.nn.Parameter(torch.zeros(numel))
    p.grad = torch.ones(numel)
    opt = bnb.optim.Lion8bit([p], lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    opt.step()
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "qmap1")


@cli.command()
@click.option("--numel", default=4_194_304, show_default=True)
def lion8bit(numel):
    import bitsandbytes as bnb

    for n in (numel, 4095, 4096):
        b = lion8bit_state_bytes(n)
        click.echo(f"bitsandbytes {bnb.__version__} Lion8bit, {n:,} elements: state {b:,} bytes = {b / n:.6f} B/element")


def safetensors_header_bytes(shapes: dict[str, tuple[int, ...]], dtype: str, size: int, metadata=None) -> int:
    """8 + the JSON header safetensors writes for these tensors (compact JSON, padded to 8)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for k in sorted(shapes):
        n = size * int(np.prod(shapes[k], dtype=np.int64)) if shapes[k] else size
        header[k] = {"dtype": dtype, "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + raw + (-raw % 8)


@cli.command()
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
def sizes(json_out):
    """The author's preset on sd-scripts' SDXL: file, saved state and training memory."""
    from kxl_common.upstream import require_sd_scripts
    from kxl_testing import sdxl_like as sx
    from kxl_train import lokr_preset as lp
    from kxl_train.sdxl_shapes import meta_models

    sd = require_sd_scripts()
    count = lp.count_network(sd, sx.AUTHOR_NETWORK_ARGS + [f"preset={sx.AUTHOR_PRESET}"], sx.AUTHOR_NETWORK_DIM,
                             float(sx.AUTHOR_NETWORK_ALPHA))
    tensors = {f"{m.name}.{p}": s for m in count.modules for p, s in m.tensors.items()}
    params = {k: s for k, s in tensors.items() if not k.endswith(".alpha")}  # alpha is a buffer
    numel = {k: int(np.prod(s, dtype=np.int64)) for k, s in params.items()}
    n_params = sum(numel.values())
    n_alpha = len(tensors) - len(params)
    lokr = sum(1 for m in count.modules if m.w1)
    fp16 = 2 * (n_params + n_alpha) + safetensors_header_bytes(tensors, "F16", 2)
    fp32 = 4 * (n_params + n_alpha) + safetensors_header_bytes(tensors, "F32", 4)
    # the optimizer state, measured once per distinct size
    by_size = collections.Counter(numel.values())
    state = {n: lion8bit_state_bytes(n) for n in tqdm(sorted(by_size), desc="Lion8bit sizes")}
    opt_bytes = sum(by_size[n] * state[n] for n in by_size)
    small = sum(c for n, c in by_size.items() if n < 4096)
    unet, te1, te2 = meta_models(sd)
    frozen = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("te1", te1), ("te2", te2))}
    out = {"lokr_modules": lokr, "norm_modules": len(count.modules) - lokr, "parameters": n_params,
           "tensors": len(tensors), "file_fp16_bytes": fp16, "file_fp32_bytes": fp32,
           "lion8bit_state_bytes": opt_bytes, "lion8bit_bytes_per_param": opt_bytes / n_params,
           "params_with_32bit_state": small, "distinct_sizes": len(by_size),
           "saved_state_network_fp32_bytes": fp32, "frozen_params": frozen}
    gib = 2 ** 30
    rows = [("LoKr + norm weights, fp32 (mixed precision fp16)", 4 * n_params),
            ("their gradients, fp32", 4 * n_params),
            ("Lion8bit state (measured)", opt_bytes),
            ("frozen UNet, fp16", 2 * frozen["unet"]),
            ("frozen text encoders, fp16", 2 * (frozen["te1"] + frozen["te2"]))]
    out["memory_rows"] = rows
    click.echo(f"author's preset on SDXL: {lokr} LoKr + {out['norm_modules']} norm modules, {n_params:,} parameters, "
               f"{len(tensors)} tensors")
    click.echo(f"file (no metadata): fp16 {fp16:,} bytes, fp32 {fp32:,} bytes")
    click.echo(f"Lion8bit state: {opt_bytes:,} bytes ({opt_bytes / n_params:.4f} B/param; {small} tensors under "
               f"4096 elements keep a 32-bit state; {len(by_size)} distinct sizes measured)")
    for label, b in rows:
        click.echo(f"  {label:<50} {b / gib:6.2f} GiB")
    click.echo(f"  {'total before activations':<50} {sum(b for _, b in rows) / gib:6.2f} GiB")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    cli()
