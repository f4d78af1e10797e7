"""train_records.arrow (kxl_prep.columnar writes, kxl_common.train_records reads) against the
meta.json and buckets.json written in the same DatasetWriter run, and against orders
computed here with Python's own sorted() as sd-scripts uses it."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kxl_common.train_records import TRAIN_RECORDS, StaleRecords, TrainRecords
from kxl_prep import outputs as out
from kxl_prep.buckets import BucketGrid
from kxl_prep.columnar import TrainRecordsWriter
from kxl_prep.outputs import rewrite_from_meta

GRID = BucketGrid((256, 256), 64, 1024, 64)

# meta.json keys are written unescaped (kxl-prep's are `<id>.<ext>`): no quotes, backslashes, controls
key_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters='"\\'),
                   min_size=1, max_size=12)
caption_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ['a "quoted" \\ tag', "tab\there\nnewline", "", "1girl ||| ä, 日本 ||| newest"])


def write_dataset(out_dir: Path, rows: list[tuple[str, str, int, int]], chunk: int) -> None:
    with out.DatasetWriter(out_dir, len(rows), grid=GRID) as writer:
        for start in range(0, max(len(rows), 1), chunk):
            part = rows[start : start + chunk]
            writer.write({
                "id": np.arange(start, start + len(part), dtype=np.int64),
                "image_key": pa.array([r[0] for r in part], pa.string()),
                "file_ext": pa.array(["png"] * len(part), pa.string()),
                "width": np.array([r[2] for r in part], np.int32),
                "height": np.array([r[3] for r in part], np.int32),
                "bucket_w": np.zeros(len(part), np.int32), "bucket_h": np.zeros(len(part), np.int32),
                "md5": pa.array([""] * len(part), pa.string()),
                "rating": pa.array(["g"] * len(part), pa.string()),
                "caption": pa.array([r[1] for r in part], pa.large_string()),
            })


def sd_scripts_bucket(w: int, h: int) -> tuple[int, int]:
    """sd-scripts' documented choice (kxl_prep.buckets has the vectorized one; this is the
    scalar rule: exact candidate, else nearest aspect ratio, first on ties)."""
    resos = [tuple(r) for r in GRID.resolutions().tolist()]
    if (w, h) in resos:
        return w, h
    errors = [abs(rw / rh - w / h) for rw, rh in resos]
    return resos[errors.index(min(errors))]


def check_round_trip(out_dir: Path, rows) -> None:
    meta = json.loads((out_dir / out.META_JSON).read_text(encoding="utf-8"))
    assert list(meta) == [r[0] for r in rows]
    rec = TrainRecords(out_dir / TRAIN_RECORDS)
    assert rec.rows == len(rows)
    assert rec.header["meta_sha256"] == hashlib.sha256((out_dir / out.META_JSON).read_bytes()).hexdigest()
    keys = list(meta)
    for row, key in enumerate(keys):
        assert rec.key(row) == key
        assert rec.caption(row) == meta[key]["caption"]
        assert list(rec.size(row)) == meta[key]["image_size"]
        assert rec.find(key) == row
        assert rec.resos[rec.bucket[row]] == sd_scripts_bucket(*meta[key]["image_size"])
    assert rec.find("\x00 not a key") == -1
    # buckets: the used resolutions sorted as tuples, their counts
    used = sorted({sd_scripts_bucket(*m["image_size"]) for m in meta.values()})
    assert rec.resos == used
    assert rec.counts == [sum(sd_scripts_bucket(*m["image_size"]) == r for m in meta.values()) for r in used]
    # sd-scripts' image_data order: sorted(keys, key=len, reverse=True)
    by_len = sorted(keys, key=len, reverse=True)
    assert [keys[i] for i in rec.data_order] == by_len
    for b, reso in enumerate(used):
        in_bucket = [k for k in by_len if sd_scripts_bucket(*meta[k]["image_size"]) == reso]
        assert [keys[i] for i in rec.bucket_rows(rec.bucket_data_order, b)] == in_bucket
        assert [keys[i] for i in rec.bucket_rows(rec.bucket_key_order, b)] == sorted(in_bucket)
        assert "".join(rec.bucket_keys_json(b)) == json.dumps(sorted(in_bucket), ensure_ascii=False)
    assert [keys[i] for i in rec.key_order] == sorted(keys)
    # the fingerprint kxl_train.resume.state computes for a one-dataset group
    pairs = sorted((k, m["caption"]) for k, m in meta.items())
    expected = hashlib.sha256(json.dumps([pairs], sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert rec.header["captions_sha256"] == expected
    assert "".join(rec.captions_json()) == json.dumps(pairs, ensure_ascii=False)
    errors = [abs(sd_scripts_bucket(*meta[k]["image_size"])[0] / sd_scripts_bucket(*meta[k]["image_size"])[1]
                  - meta[k]["image_size"][0] / meta[k]["image_size"][1]) for k in by_len]
    assert rec.header["mean_ar_error"] == (float(np.mean(np.array(errors))) if errors else 0.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(key_text, caption_text, st.integers(1, 3000), st.integers(1, 3000)),
                  max_size=30, unique_by=lambda r: r[0]),
    chunk=st.integers(1, 7),
)
def test_records_round_trip_against_meta_json(tmp_path_factory, rows, chunk):
    out_dir = tmp_path_factory.mktemp("prep")
    write_dataset(out_dir, rows, chunk)
    check_round_trip(out_dir, rows)


def test_rewrite_from_meta_gives_the_same_file_and_freshness_is_checked(tmp_path):
    rows = [(f"{i}.png", f"1girl ||| tag{i % 3}, \"q\" ||| x", 100 + 37 * i, 300 - 11 * i) for i in range(20)]
    write_dataset(tmp_path, rows, 6)
    first = (tmp_path / TRAIN_RECORDS).read_bytes()
    manifest = {"buckets": {"resolution": [256, 256], "min_reso": 64, "max_reso": 1024, "step": 64},
                "outputs": out.describe_outputs(tmp_path, [out.META_JSON])}
    (tmp_path / out.MANIFEST_JSON).write_text(json.dumps(manifest))
    rec = TrainRecords(tmp_path / TRAIN_RECORDS)
    rec.check_fresh(tmp_path / out.META_JSON)  # written with this meta.json

    rewrite_from_meta(tmp_path)
    assert (tmp_path / TRAIN_RECORDS).read_bytes() == first
    assert json.loads((tmp_path / out.MANIFEST_JSON).read_text())["outputs"][TRAIN_RECORDS]["bytes"] == len(first)

    # meta.json rewritten (as export does) and the manifest updated: the old records are stale
    meta = json.loads((tmp_path / out.META_JSON).read_text())
    meta.pop("3.png")
    (tmp_path / out.META_JSON).write_text(json.dumps(meta))
    out.refresh_output_entry(tmp_path, out.META_JSON, "a test")
    with pytest.raises(StaleRecords, match="rewritten by a test"):
        TrainRecords(tmp_path / TRAIN_RECORDS).check_fresh(tmp_path / out.META_JSON)
    rewrite_from_meta(tmp_path)
    TrainRecords(tmp_path / TRAIN_RECORDS).check_fresh(tmp_path / out.META_JSON)
    # meta.json edited behind the manifest's back
    with open(tmp_path / out.META_JSON, "a") as fh:
        fh.write("\n")
    with pytest.raises(StaleRecords, match="changed after kxl-prep wrote it"):
        TrainRecords(tmp_path / TRAIN_RECORDS).check_fresh(tmp_path / out.META_JSON)
    (tmp_path / out.MANIFEST_JSON).unlink()
    with pytest.raises(StaleRecords, match="no manifest.json"):
        TrainRecords(tmp_path / TRAIN_RECORDS).check_fresh(tmp_path / out.META_JSON)


def test_bad_rows_are_named(tmp_path):
    with TrainRecordsWriter(tmp_path / "a.arrow", GRID) as writer:
        writer.add(["1.png", "2.png", "1.png"], ["a", "b", "c"], [64, 64, 64], [64, 64, 64])
        with pytest.raises(ValueError, match=r"key '1.png' occurs more than once \(rows 0 and 2\)"):
            writer.close("x")
    with TrainRecordsWriter(tmp_path / "b.arrow", GRID) as writer:
        writer.add(["1.png", "2.png"], ["a", "b"], [64, 0], [64, 64])
        with pytest.raises(ValueError, match=r"row 1 \('2.png'\): field 'image_size' is \[0, 64\]"):
            writer.close("x")
    with TrainRecordsWriter(tmp_path / "c.arrow", GRID) as writer:
        with pytest.raises(ValueError, match="row 1: field 'caption' is null"):
            writer.add(pa.array(["1.png", "2.png"]), pa.array(["a", None]), [64, 64], [64, 64])
    assert not list(itertools.chain(tmp_path.glob(".*.captions"), tmp_path.glob("*.arrow")))
