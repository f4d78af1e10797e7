"""Output writers: meta.json / buckets.json are plain JSON, dataset.toml is what sd-scripts'
config schema accepts, writes are atomic."""
from __future__ import annotations

import json
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep import outputs as out
from kxl_prep.recipe import BucketSpec, DataRecipe, DatasetSpec, load_recipe


def captions(texts):
    return pa.chunked_array([pa.array(texts, pa.large_string())])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=30))
def test_meta_json_round_trips_any_text(texts):
    keys = [f"{i}.png" for i in range(len(texts))]
    w = np.arange(len(texts)) + 100
    h = np.arange(len(texts)) + 200
    with tempfile.TemporaryDirectory(prefix="kxl-meta-") as tmp:
        path = Path(tmp) / "meta.json"
        out.write_meta_json(path, keys, captions(texts), w, h)
        got = json.loads(path.read_text(encoding="utf-8"))
    assert list(got) == keys
    for k, t, a, b in zip(keys, texts, w.tolist(), h.tolist()):
        assert got[k] == {"caption": t, "image_size": [a, b]}


def test_meta_json_many_rows_cross_write_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(out, "WRITE_ROWS", 7)
    n = 50
    texts = [f'a "quoted" \\ caption ✓ {i}' for i in range(n)]
    keys = [f"{i}.jpg" for i in range(n)]
    out.write_meta_json(tmp_path / "m.json", keys, captions(texts), np.ones(n, int), np.ones(n, int))
    got = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert [v["caption"] for v in got.values()] == texts


def test_buckets_json(tmp_path):
    out.write_buckets_json(tmp_path / "b.json", ["1.jpg", "2.png"], np.array([1024, 768]), np.array([1024, 1344]))
    assert json.loads((tmp_path / "b.json").read_text()) == {"1.jpg": [1024, 1024], "2.png": [768, 1344]}
    out.write_buckets_json(tmp_path / "e.json", [], np.array([]), np.array([]))
    assert json.loads((tmp_path / "e.json").read_text()) == {}


def test_selection_parquet_schema(tmp_path):
    cols = {
        "id": np.array([5, 9]),
        "image_key": ["5.jpg", "9.png"],
        "file_ext": ["jpg", "png"],
        "width": np.array([10, 20], np.int32),
        "height": np.array([30, 40], np.int32),
        "bucket_w": np.array([256, 512], np.int32),
        "bucket_h": np.array([4096, 2048], np.int32),
        "md5": ["a" * 32, "b" * 32],
        "rating": ["general", "explicit"],
        "caption": captions(["x ||| y ||| z", "||| ||| safe"]),
    }
    out.write_selection(tmp_path / "s.parquet", cols)
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.schema.names == ["id", "image_key", "file_ext", "width", "height", "bucket_w", "bucket_h", "md5",
                                  "rating", "caption"]
    assert table.column("image_key").to_pylist() == ["5.jpg", "9.png"]


def test_rejects_csv(tmp_path):
    rej = pd.DataFrame({"source": ["a.db"], "record": ["17"], "field": ["rating"], "reason": ["x, \"y\""]})
    assert out.write_rejects(tmp_path / "r.csv", rej) == 1
    assert pd.read_csv(tmp_path / "r.csv", dtype=str).to_dict("records") == rej.to_dict("records")
    assert out.write_rejects(tmp_path / "e.csv", None) == 0
    assert (tmp_path / "e.csv").read_text() == "source,record,field,reason\n"


def test_dataset_toml_content(tmp_path):
    recipe = load_recipe()
    config = out.dataset_config(recipe, tmp_path / "meta.json", tmp_path / "images")
    out.write_dataset_toml(tmp_path / "dataset.toml", config)
    parsed = tomllib.loads((tmp_path / "dataset.toml").read_text())
    assert parsed == config
    assert parsed["general"] == {"shuffle_caption": True, "keep_tokens_separator": "|||", "caption_tag_dropout_rate": 0.15}
    ds = parsed["datasets"][0]
    assert (ds["resolution"], ds["min_bucket_reso"], ds["max_bucket_reso"], ds["bucket_reso_steps"]) == (1024, 256, 4096, 64)
    assert ds["enable_bucket"] is True and ds["bucket_no_upscale"] is False
    assert ds["subsets"] == [{"metadata_file": str(tmp_path / "meta.json"), "image_dir": str(tmp_path / "images")}]


def test_dataset_toml_non_square_and_odd_paths(tmp_path):
    recipe = DataRecipe(name="x", buckets=BucketSpec(resolution=(896, 1152)), dataset=DatasetSpec())
    weird = tmp_path / 'dir "with" quotes\\ and é'
    config = out.dataset_config(recipe, weird / "meta.json", weird / "images")
    text = out.render_dataset_toml(config)
    parsed = tomllib.loads(text)
    assert parsed["datasets"][0]["resolution"] == [896, 1152]
    assert parsed["datasets"][0]["subsets"][0]["image_dir"] == str(weird / "images")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")

    broken = pa.chunked_array([pa.array(["a", None], pa.large_string())])  # fails on row 2
    with pytest.raises(TypeError):
        out.write_meta_json(target, ["1.jpg", "2.jpg"], broken, np.array([1, 1]), np.array([1, 1]))
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


# ---- sd-scripts' config schema ------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_util(sd_scripts):
    from kxl_train import torchvision_compat

    torchvision_compat.install()
    if str(sd_scripts) not in sys.path:
        sys.path.insert(0, str(sd_scripts))
    import library.config_util as cu

    return cu


@pytest.mark.sdscripts
def test_sd_scripts_schema_accepts_dataset_toml(config_util, tmp_path):
    import argparse

    recipe = load_recipe()
    config = out.dataset_config(recipe, tmp_path / "meta.json", tmp_path / "images")
    out.write_dataset_toml(tmp_path / "dataset.toml", config)
    user_config = config_util.load_user_config(str(tmp_path / "dataset.toml"))  # sd-scripts' own loader
    sanitizer = config_util.ConfigSanitizer(True, True, False, True)  # as train_network.py builds it
    sanitizer.sanitize_user_config(user_config)
    args = argparse.Namespace(
        train_batch_size=4, resolution=None, enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024,
        bucket_reso_steps=64, bucket_no_upscale=False, shuffle_caption=False, keep_tokens=0,
        caption_tag_dropout_rate=0.0, caption_extension=".caption", debug_dataset=False, max_token_length=None,
        prior_loss_weight=1.0,
    )
    blueprint = config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
    ds = blueprint.dataset_group.datasets[0]
    assert not ds.is_dreambooth and not ds.is_controlnet
    assert ds.params.resolution == (1024, 1024)
    assert (ds.params.enable_bucket, ds.params.min_bucket_reso, ds.params.max_bucket_reso) == (True, 256, 4096)
    assert (ds.params.bucket_reso_steps, ds.params.bucket_no_upscale, ds.params.batch_size) == (64, False, 4)
    sub = ds.subsets[0].params
    assert (sub.shuffle_caption, sub.keep_tokens_separator, sub.caption_tag_dropout_rate) == (True, "|||", 0.15)
    assert sub.metadata_file == str(tmp_path / "meta.json") and sub.image_dir == str(tmp_path / "images")
