"""Output writers: meta.json / buckets.json are plain JSON, dataset.toml is what sd-scripts'
config schema accepts, writes are atomic."""
from __future__ import annotations

import json
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
    return pa.array(texts, pa.large_string())


def write_dir(path: Path, texts: list[str], chunk: int = 4) -> list[str]:
    """Rows 0..n-1 through DatasetWriter in chunks; returns their keys."""
    n = len(texts)
    keys = [f"{i}.{'png' if i % 2 else 'jpg'}" for i in range(n)]
    with out.DatasetWriter(path, n) as writer:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            idx = np.arange(start, stop)
            writer.write({
                "id": idx, "image_key": keys[start:stop], "file_ext": [k.split(".")[1] for k in keys[start:stop]],
                "width": (idx + 100).astype(np.int32), "height": (idx + 200).astype(np.int32),
                "bucket_w": np.full(len(idx), 1024, np.int32), "bucket_h": (idx % 3 * 64 + 960).astype(np.int32),
                "md5": ["d41d8cd98f00b204e9800998ecf8427e"] * len(idx), "rating": ["general"] * len(idx),
                "caption": captions(texts[start:stop]),
            })
    return keys


def reference_meta(keys, texts):
    """meta.json as json.dumps writes each entry (ensure_ascii=False), one entry a line."""
    lines = [
        f'{json.dumps(k)}: {json.dumps({"caption": t, "image_size": [i + 100, i + 200]}, ensure_ascii=False)}'
        for i, (k, t) in enumerate(zip(keys, texts))
    ]
    return "{\n" + ",\n".join(lines) + ("\n" if lines else "") + "}\n"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=30), st.integers(1, 7))
def test_dataset_files_round_trip_any_text(texts, chunk):
    with tempfile.TemporaryDirectory(prefix="kxl-meta-") as tmp:
        keys = write_dir(Path(tmp), texts, chunk)
        text = (Path(tmp) / "meta.json").read_text(encoding="utf-8")
        assert text == reference_meta(keys, texts)
        got = json.loads(text)
        assert list(got) == keys and [v["caption"] for v in got.values()] == texts
        buckets = json.loads((Path(tmp) / "buckets.json").read_text())
        assert buckets == {k: [1024, i % 3 * 64 + 960] for i, k in enumerate(keys)}
        table = pq.read_table(Path(tmp) / "selection.parquet")
        assert table.schema.names == ["id", "image_key", "file_ext", "width", "height", "bucket_w", "bucket_h",
                                      "md5", "rating", "caption"]
        assert table.column("caption").to_pylist() == texts
        assert table.column("image_key").to_pylist() == keys


def test_writer_checks_the_row_count(tmp_path):
    with pytest.raises(RuntimeError, match="wrote 4 of 9 rows"):
        with out.DatasetWriter(tmp_path, 9) as writer:
            idx = np.arange(4)
            writer.write({"id": idx, "image_key": [f"{i}.jpg" for i in idx], "file_ext": ["jpg"] * 4,
                          "width": idx, "height": idx, "bucket_w": idx, "bucket_h": idx, "md5": [None] * 4,
                          "rating": ["general"] * 4, "caption": captions(["a"] * 4)})
    assert list(tmp_path.iterdir()) == []


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


def test_failed_write_keeps_the_old_files(tmp_path):
    write_dir(tmp_path, ["old"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyError):
        with out.DatasetWriter(tmp_path, 2) as writer:
            writer.write({"image_key": ["1.jpg"], "caption": captions(["new"])})  # lacks columns
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---- sd-scripts' config schema ------------------------------------------------------------------


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
