"""A run that would produce nothing exits non-zero, says why, and leaves an earlier output alone;
a high reject share is a loud warning. Through the real command line (a child process)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kxl_prep.recipe import REPO_ROOT
from kxl_testing.sample import make_sample
from kxl_testing.source_forms import danbooru_records, write_jsonl


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "kxl_prep.cli", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("empty-sample"), n_posts=400, seed=3, images=False)


@pytest.fixture
def previous_output(sample, tmp_path):
    out = tmp_path / "out"
    res = cli("prepare", sample.db, "--out", out, "--count-scale", 0.001)
    assert res.returncode == 0, res.stderr
    before = digests(out)
    assert "manifest.json" in before and "meta.json" in before
    return out, before


def test_all_rejected_source_stops_and_leaves_the_output(sample, previous_output, tmp_path):
    out, before = previous_output
    # the failure that used to pass silently: Danbooru-field records holding HakuBooru's integer ratings
    records = danbooru_records(sample.jsonl)
    for r in records:
        r["rating"] = "gsqe".index(r["rating"])
    path = tmp_path / "int-ratings.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    res = cli("prepare", path, "--out", out, "--count-scale", 0.001)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"{path}: all {len(records):,} records rejected" in res.stderr
    # the reason kind with its count and one example record
    counts = {k: sum(r["rating"] == k for r in records) for k in range(4)}
    assert f"{len(records):>12,}  rating: unknown rating   e.g. record {records[0]['id']}: unknown rating: " \
           f"{records[0]['rating']}" in res.stderr
    assert all(counts.values())
    assert digests(out) == before  # nothing written, nothing removed


def test_all_rejected_dates_and_a_mixed_run(sample, previous_output, tmp_path):
    out, before = previous_output
    records = danbooru_records(sample.jsonl)
    for r in records:
        r["created_at"] = r["created_at"][8:10] + "/" + r["created_at"][5:7] + "/" + r["created_at"][:4]
    bad = write_jsonl(tmp_path / "dates.jsonl", records)
    # a good source next to it does not hide the broken one
    res = cli("prepare", sample.db, bad, "--out", out, "--count-scale", 0.001)
    assert res.returncode == 1
    assert f"{bad}: all {len(records):,} records rejected" in res.stderr
    assert f"created_at: not an ISO N date   e.g. record {records[0]['id']}:" in res.stderr
    assert digests(out) == before


def test_empty_selection_stops_and_leaves_the_output(sample, previous_output, tmp_path):
    out, before = previous_output
    records = danbooru_records(sample.jsonl)
    for r in records:
        r["file_ext"] = "mp4"  # every post is a video: the filters keep none
    path = write_jsonl(tmp_path / "videos.jsonl", records)
    res = cli("prepare", path, "--out", out, "--count-scale", 0.001)
    assert res.returncode == 1
    assert "the dataset would be empty" in res.stderr
    assert f"{len(records):,} posts read" in res.stderr and "filter not_still_image removed" in res.stderr
    assert digests(out) == before


def test_high_reject_share_warns_with_the_breakdown(sample, tmp_path):
    records = danbooru_records(sample.jsonl)
    n_bad = len(records) // 20  # 5%
    for r in records[:n_bad]:
        r["image_width"] = -1
    path = write_jsonl(tmp_path / "some-bad.jsonl", records)
    res = cli("prepare", path, "--out", tmp_path / "o1", "--count-scale", 0.001)
    assert res.returncode == 0, res.stderr
    assert "WARNING" in res.stderr
    assert f"{n_bad:,} of {len(records):,} records rejected ({n_bad / len(records):.1%}, above the 1.0% warning threshold)" \
        in res.stderr
    assert f"{n_bad:>12,}  image_width: negative   e.g. record {records[0]['id']}: negative: -1" in res.stderr
    manifest = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert len(manifest["warnings"]) == 1
    quiet = cli("prepare", path, "--out", tmp_path / "o2", "--count-scale", 0.001, "--reject-warn-share", 0.1)
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr
    assert (tmp_path / "o1" / "meta.json").read_bytes() == (tmp_path / "o2" / "meta.json").read_bytes()


def test_a_folder_without_tables_is_an_error_not_a_traceback(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    res = cli("prepare", folder, "--out", tmp_path / "o")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "post.parquet" in res.stderr and "readme.txt" in res.stderr
    assert not (tmp_path / "o").exists()
