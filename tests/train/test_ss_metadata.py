"""The sd-scripts header metadata kxl builds for the LoKr size estimate (kxl_testing.ss_metadata,
bench/lokr_size.py metadata): tag counts as sd-scripts' own dataset counts them, sizes as the
safetensors header holds them, and the scale generator's rows as its written output."""
from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import save_file

from kxl_common.safetensors_header import read_header
from kxl_testing import ss_metadata as ssm
from kxl_testing.bench_prep_output import epsilon_rows, make_bench_prep_output
from kxl_tools.inspect import inspect_file

CAPTIONS = ["1girl, Solo, hatsune miku ||| long hair, twintails ||| masterpiece, newest, safe",
            "2girls,  solo ,, smile ||| LONG HAIR ||| best quality, old, nsfw", "", "Émilie, ☆, smile"]


def test_tag_counts_match_sd_scripts_own_dataset(train_util):
    dataset = types.SimpleNamespace(tag_frequency={})
    train_util.BaseDataset.set_tag_frequency(dataset, "images", CAPTIONS)
    assert dict(ssm.count_tags(CAPTIONS)) == dataset.tag_frequency["images"]


def test_header_bytes_and_what_inspect_reads_back(tmp_path):
    counts = ssm.count_tags(CAPTIONS * 3)
    info = ssm.bucket_info({(1024, 1024): 3, (832, 1216): 2, (640, 640): 0}, 0.0123)
    assert list(info["buckets"].values()) == [{"resolution": [832, 1216], "count": 2},
                                              {"resolution": [1024, 1024], "count": 3}]
    meta = ssm.run_metadata({"images": dict(counts)}, {"images": 12}, info, {"seed": 1337}, dataset_config=False)
    assert json.loads(meta["ss_tag_frequency"]) == {"images": dict(counts)} and meta["ss_seed"] == "1337"
    with_config = ssm.run_metadata({"images": dict(counts)}, {"images": 12}, info, {}, dataset_config=True)
    assert json.loads(with_config["ss_datasets"])[0]["tag_frequency"] == {"images": dict(counts)}  # twice
    f = tmp_path / "l.safetensors"
    save_file({"lora_unet_a.lokr_w1": torch.ones(2, 2)}, str(f), metadata=meta)
    header = read_header(f)
    assert header.metadata == meta
    assert header.header_bytes - header.metadata_bytes < 200  # the one tensor's index entry and padding
    assert inspect_file(f)["training_metadata"]["ss_tag_frequency"] == f"1 dataset dirs, {len(counts)} tag entries"


def test_generator_rows_are_the_written_captions(tmp_path):
    make_bench_prep_output(tmp_path / "d", 300, seed=3, progress=False)
    written = json.loads((tmp_path / "d" / "meta.json").read_text())
    rows = [(k, c, int(w), int(h)) for keys, ws, hs, caps in epsilon_rows(300, seed=3)
            for k, c, w, h in zip(keys, caps, ws, hs)]
    assert [(k, e["caption"], *e["image_size"]) for k, e in written.items()] == rows
