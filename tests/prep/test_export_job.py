"""The whole export on the built-in sample and on generated shards: meta.json matches the
files, every selected post is exported, rejected or reported not found, reruns redo nothing,
--shard K/N slices add up to one run, a kill -9 mid-way then a rerun leaves every image
exactly once with nothing redone."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from kxl_prep.buckets import BucketGrid
from kxl_prep.export.job import ExportError, ExportOptions, run_export
from kxl_prep.export.process import ExportSettings
from kxl_prep.export.writer import Journal, read_journal
from kxl_testing.export_inputs import encode, photo_like, write_prep_dir
from kxl_testing.sample import member_name, write_tar

REPO = Path(__file__).resolve().parents[2]
N_POSTS = 400


@pytest.fixture(scope="module")
def sample_prep(tmp_path_factory):
    """The built-in sample, prepared by the real pipeline (selection, meta.json, dataset.toml)."""
    from kxl_prep.cli import DANBOORU2023_POSTS
    from kxl_prep.pipeline import prepare
    from kxl_testing.sample import make_sample

    root = tmp_path_factory.mktemp("sample")
    sample = make_sample(root / "sample", n_posts=N_POSTS, seed=3)
    prepare([sample.db], root / "prep", count_scale=N_POSTS / DANBOORU2023_POSTS, progress=False)
    return sample, root / "prep", root / "index"  # the shard index, shared: built by the first test


def _fresh_prep(sample_prep, tmp_path) -> Path:
    prep = tmp_path / "prep"
    shutil.copytree(sample_prep[1], prep)
    return prep


def _files(image_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every visible file."""
    return {e.name: (e.inode(), e.stat().st_mtime_ns) for e in os.scandir(image_dir) if not e.name.startswith(".")}


def _check_consistent(prep: Path, image_dir: Path) -> dict:
    """meta.json lists exactly the files, with their real sizes; every selected post is
    accounted for exactly once (exported, rejected or not found)."""
    meta = json.loads((prep / "meta.json").read_text())
    files = sorted(_files(image_dir))
    assert sorted(meta) == files
    for name, entry in meta.items():
        with Image.open(image_dir / name) as im:
            assert list(im.size) == entry["image_size"], name
        assert entry["caption"]
    assert not [n for n in os.listdir(image_dir) if n.endswith(".tmp")]
    selection = pd.read_parquet(prep / "selection.parquet")
    rejects = pd.read_parquet(prep / "export_rejects.parquet")
    exported_ids = [int(n.split(".")[0]) for n in files]
    assert len(set(exported_ids)) == len(exported_ids)  # one file per post
    rejected_ids = rejects["record"].astype(int).tolist()
    assert sorted(exported_ids + rejected_ids) == sorted(selection["id"].tolist())
    manifest_path = prep / "manifest.json"
    if manifest_path.exists():  # the manifest describes the meta.json now on disk
        entry = json.loads(manifest_path.read_text())["outputs"]["meta.json"]
        assert entry["sha256"] == hashlib.sha256((prep / "meta.json").read_bytes()).hexdigest()
        assert entry["bytes"] == (prep / "meta.json").stat().st_size
        # train_records.arrow follows the rewritten meta.json (kxl_train.dataset reads it)
        from kxl_common.train_records import TrainRecords

        records = TrainRecords(prep / "train_records.arrow")
        records.check_fresh(prep / "meta.json")
        assert [records.key(i) for i in range(records.rows)] == list(meta)
        assert [[records.caption(i), list(records.size(i))] for i in range(records.rows)] == [
            [e["caption"], e["image_size"]] for e in meta.values()]
    return meta


def test_sample_copy_export_is_complete_and_consistent(sample_prep, tmp_path):
    sample, _, index_dir = sample_prep
    prep = _fresh_prep(sample_prep, tmp_path)
    image_dir = tmp_path / "images"
    summary = run_export(ExportOptions(prep, [sample.shards], image_dir=image_dir, index_dir=index_dir,
                                       workers=2, progress=False))
    meta = _check_consistent(prep, image_dir)
    assert summary["exported"] == len(meta) > 0
    import hashlib

    assert summary["meta_json_sha256"] == hashlib.sha256((prep / "meta.json").read_bytes()).hexdigest()
    # copy mode: the bytes in image_dir are the tar members' bytes
    import tarfile

    name = sorted(meta)[0]
    pid = int(name.split(".")[0])
    from kxl_testing.sample import sample_member_name as sample_member, shard_of

    shard = sample.shards / shard_of(pid)
    if shard.exists():
        with tarfile.open(shard) as tf:
            names = tf.getnames()
            if sample_member(pid, name.split(".")[1]) in names:
                data = tf.extractfile(sample_member(pid, name.split(".")[1])).read()
                assert (image_dir / name).read_bytes() == data
    # the prep's captions survive the rewrite (same keys: copy mode keeps the extensions)
    prep_meta = json.loads((sample_prep[1] / "meta.json").read_text())
    assert set(meta) <= set(prep_meta)
    for key, entry in meta.items():
        assert entry["caption"] == prep_meta[key]["caption"]
    # the sample's files are small; meta.json now says so (sd-scripts buckets by it)
    assert all(max(e["image_size"]) <= 96 for e in meta.values())

    # manifest.json and report.md count the exported images, as meta.json does, and keep the
    # prepared count beside them; every output's sha256 in the manifest is still true
    manifest = json.loads((prep / "manifest.json").read_text())
    prepared = len(prep_meta)
    assert manifest["counts"]["images"] == len(meta) and manifest["counts"]["images_prepared"] == prepared
    assert manifest["export"]["not_exported"] == prepared - len(meta) > 0  # the sample plants missing tars
    report = (prep / "report.md").read_text()
    assert f"**{len(meta):,} images** after `kxl-prep export` ({prepared:,} prepared" in report
    for name, entry in manifest["outputs"].items():
        assert hashlib.sha256((prep / name).read_bytes()).hexdigest() == entry["sha256"], name

    # a rerun does nothing and changes nothing
    before = _files(image_dir)
    again = run_export(ExportOptions(prep, [sample.shards], image_dir=image_dir, index_dir=index_dir,
                                     workers=2, progress=False))
    assert again["this_run"]["processed"] == 0 and again["this_run"]["recovered"] == 0
    assert again["this_run"]["already_done"] == summary["exported"] + sum(summary["rejected"].values())
    assert again["this_run"]["shards_indexed"] == 0
    assert _files(image_dir) == before
    assert json.loads((prep / "meta.json").read_text()) == meta


def test_sample_webp_cover_keeps_buckets(sample_prep, tmp_path):
    sample, _, index_dir = sample_prep
    prep = _fresh_prep(sample_prep, tmp_path)
    image_dir = tmp_path / "images"
    run_export(ExportOptions(prep, [sample.shards], image_dir=image_dir, index_dir=index_dir,
                             settings=ExportSettings(format="webp", resize="cover"), workers=1, progress=False))
    meta = _check_consistent(prep, image_dir)
    assert meta and all(name.endswith(".webp") for name in meta)


def test_shard_slices_add_up_to_one_run(sample_prep, tmp_path):
    sample, _, index_dir = sample_prep
    prep = _fresh_prep(sample_prep, tmp_path)
    image_dir = tmp_path / "images"
    processed = []
    for k in range(3):
        s = run_export(ExportOptions(prep, [sample.shards], image_dir=image_dir, index_dir=index_dir,
                                     shard=(k, 3), workers=1, progress=False))
        processed.append(s["this_run"]["processed"])
        if k < 2:
            assert s["pending"] > 0 and not s["meta_json_rewritten"]
            assert json.loads((prep / "meta.json").read_text()) == json.loads((sample_prep[1] / "meta.json").read_text())
    assert s["pending"] == 0 and s["meta_json_rewritten"]
    meta = _check_consistent(prep, image_dir)
    assert sum(processed) == len(meta) + sum(s["rejected"].values())
    assert all(p > 0 for p in processed)


def test_changed_settings_are_refused(sample_prep, tmp_path):
    sample, _, index_dir = sample_prep
    prep = _fresh_prep(sample_prep, tmp_path)
    opts = dict(image_dir=tmp_path / "images", index_dir=index_dir, workers=1, progress=False)
    run_export(ExportOptions(prep, [sample.shards], **opts))
    with pytest.raises(ExportError, match="other settings.*format"):
        run_export(ExportOptions(prep, [sample.shards], settings=ExportSettings(format="webp"), **opts))


def test_cli_export_through_kxl_prep(sample_prep, tmp_path):
    from kxl_prep.cli import main

    sample, _, index_dir = sample_prep
    prep = _fresh_prep(sample_prep, tmp_path)
    result = CliRunner().invoke(main, ["export", str(prep), "--shards", str(sample.shards), "--image-dir",
                                       str(tmp_path / "img"), "--index-dir", str(index_dir),
                                       "--format", "jpeg", "--quality", "80", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "export:" in result.output and "selected posts" in result.output
    meta = _check_consistent(prep, tmp_path / "img")
    assert all(n.endswith(".jpg") for n in meta)
    bad = CliRunner().invoke(main, ["export", str(prep), "--shards", str(sample.shards), "--shard", "3/3"])
    assert bad.exit_code != 0 and "0 <= K < N" in bad.output


def test_ray_path(sample_prep, tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra (pip install 'kxl[ray]'); not installed")
    sample, _, index_dir = sample_prep
    prep = _fresh_prep(sample_prep, tmp_path)
    run_export(ExportOptions(prep, [sample.shards], image_dir=tmp_path / "images", index_dir=index_dir,
                             use_ray=True, progress=False))
    _check_consistent(prep, tmp_path / "images")


def test_journal_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"id":1,"status":"ok","file":"1.jpg","size":[1,1]}\n{"id":2,"sta')
    assert set(read_journal(path)) == {1}
    journal = Journal(path)
    journal.add({"id": 3, "status": "rejected", "reason": "corrupt"})
    journal.close()
    assert set(read_journal(path)) == {1, 3}


def test_bad_images_in_shards_are_rejected_with_reasons(tmp_path):
    good = encode(photo_like(64, 48, 1), "jpg")
    members = [
        (member_name(1, "jpg"), good),
        (member_name(2, "jpg"), good[: len(good) // 3]),  # truncated
        (member_name(3, "png"), b"this is not a png"),
        (member_name(4, "jpg"), encode(photo_like(64, 48, 2), "png")),  # wrong extension
        (member_name(5, "jpg"), encode(photo_like(64, 48, 3).convert("CMYK"), "jpg")),
    ]
    write_tar(tmp_path / "shards" / "original" / "data-0001.tar", members)
    prep = write_prep_dir(tmp_path / "prep", [{"id": i, "ext": "jpg"} for i in (1, 2, 3, 4, 5, 6)])
    summary = run_export(ExportOptions(prep, [tmp_path / "shards"], index_dir=tmp_path / "idx", workers=1,
                                       progress=False))
    rejects = pd.read_parquet(prep / "export_rejects.parquet").set_index("record")
    assert rejects.loc["2", "reason"].startswith("truncated")
    assert rejects.loc["3", "reason"].startswith("not_an_image")
    assert rejects.loc["6", "reason"] == "not_found:shard_missing:original/data-0006.tar"
    meta = _check_consistent(prep, prep / "images")
    assert sorted(meta) == ["1.jpg", "4.png", "5.png"]
    assert summary["conversions"]["ext_fixed"] == 1 and summary["conversions"]["cmyk"] == 1


def _slow_shards(root: Path, n_tars: int, per_tar: int) -> list[dict]:
    rows = []
    for t in range(n_tars):
        members = []
        for j in range(per_tar):
            pid = 1000 * j + t
            members.append((member_name(pid, "jpg"), encode(photo_like(320, 240, pid), "jpg")))
            rows.append({"id": pid, "ext": "jpg"})
        write_tar(root / "original" / f"data-{t:04d}.tar", members)
    return rows


def test_kill_9_then_rerun_finishes_with_every_image_once(tmp_path):
    rows = _slow_shards(tmp_path / "shards", 4, 60)
    prep = write_prep_dir(tmp_path / "prep", rows)
    image_dir = prep / "images"
    cmd = [sys.executable, "-m", "kxl_prep.cli", "export", str(prep), "--shards", str(tmp_path / "shards"),
           "--index-dir", str(tmp_path / "idx"), "--format", "webp", "--webp-method", "6", "--workers", "2",
           "--quiet"]
    # A session of its own, so kill -9 takes the workers down with the parent at one instant
    # (what an OOM kill or a lost machine does); the files on disk are then final.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if image_dir.exists() and len([n for n in os.listdir(image_dir) if n.endswith(".webp")]) >= 40:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the export finished before it could be killed: make the work slower"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _files(image_dir)
    assert 40 <= len(at_kill) < len(rows)

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = _files(image_dir)
    assert sorted(after) == sorted(f"{r['id']}.webp" for r in rows)  # every image, exactly once
    for name, stamp in at_kill.items():
        assert after[name] == stamp, f"{name} was written again"  # nothing redone
    summary = json.loads((prep / "export_summary.json").read_text())
    run = summary["this_run"]
    assert run["processed"] + run["recovered"] + run["already_done"] == len(rows)
    assert run["processed"] == len(rows) - len(at_kill)
    _check_consistent(prep, image_dir)


def test_bucket_params_come_from_dataset_toml(tmp_path):
    from kxl_prep.export.job import read_dataset_toml

    prep = tmp_path / "p"
    prep.mkdir()
    (prep / "dataset.toml").write_text(
        '[general]\nshuffle_caption = true\n\n[[datasets]]\nresolution = [1024, 768]\nmin_bucket_reso = 320\n'
        'max_bucket_reso = 2048\nbucket_reso_steps = 32\n\n  [[datasets.subsets]]\n  image_dir = "imgs"\n'
        '  metadata_file = "meta.json"\n')
    image_dir, params = read_dataset_toml(prep)
    assert image_dir == prep / "imgs"
    assert params == BucketGrid((1024, 768), 320, 2048, 32)


def test_files_renamed_before_their_journal_line_are_adopted_not_redone(tmp_path):
    """The window a kill -9 can hit: image renamed into place, journal line not yet written."""
    rows = _slow_shards(tmp_path / "shards", 2, 5)
    prep = write_prep_dir(tmp_path / "prep", rows)
    opts = dict(index_dir=tmp_path / "idx", workers=1, progress=False, settings=ExportSettings(format="webp"))
    run_export(ExportOptions(prep, [tmp_path / "shards"], **opts))
    image_dir = prep / "images"
    before = _files(image_dir)
    journals = sorted((image_dir / ".kxl-export" / "journal").glob("*.jsonl"))
    lines = journals[0].read_text().splitlines(keepends=True)
    journals[0].write_text("".join(lines[:2]))  # the last 3 posts of this shard lost their lines
    (image_dir / f".kxl-{rows[0]['id']}.webp.0badc0de.tmp").write_bytes(b"half")  # a killed write
    summary = run_export(ExportOptions(prep, [tmp_path / "shards"], **opts))
    assert summary["this_run"]["recovered"] == 3 and summary["this_run"]["processed"] == 0
    assert _files(image_dir) == before
    assert not [n for n in os.listdir(image_dir) if n.endswith(".tmp")]
    _check_consistent(prep, image_dir)


def test_concurrent_slices_cover_everything_once(tmp_path):
    """Two --shard jobs at the same time into one image_dir (a Slurm array on one node)."""
    rows = _slow_shards(tmp_path / "shards", 6, 8)
    prep = write_prep_dir(tmp_path / "prep", rows)
    base = [sys.executable, "-m", "kxl_prep.cli", "export", str(prep), "--shards", str(tmp_path / "shards"),
            "--index-dir", str(tmp_path / "idx"), "--format", "jpeg", "--workers", "1", "--quiet"]
    jobs = [subprocess.Popen(base + ["--shard", f"{k}/2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for k in range(2)]
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    summary = json.loads((prep / "export_summary.json").read_text())
    assert summary["pending"] == 0 and summary["exported"] == len(rows)
    meta = _check_consistent(prep, prep / "images")
    assert sorted(meta) == sorted(f"{r['id']}.jpg" for r in rows)
    journals = list((prep / "images" / ".kxl-export" / "journal").glob("*.jsonl"))
    lines = [json.loads(line)["id"] for j in journals for line in j.read_text().splitlines()]
    assert sorted(lines) == sorted(r["id"] for r in rows)  # each post processed by one job, once


def test_a_full_disk_stops_the_export_and_a_rerun_completes_it(tmp_path, monkeypatch):
    """ENOSPC at a write stops the whole job (the pool is stopped), not unit after unit."""
    import errno

    import kxl_prep.export.unit as unit

    rows = _slow_shards(tmp_path / "shards", 6, 3)
    prep = write_prep_dir(tmp_path / "prep", rows)
    opts = dict(index_dir=tmp_path / "idx", workers=2, progress=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = unit.write_image
    monkeypatch.setattr(unit, "write_image", full)  # forked workers inherit it
    summary = run_export(ExportOptions(prep, [tmp_path / "shards"], **opts))
    run = summary["this_run"]
    assert "No space left" in run["stopped"] and len(run["failed_units"]) == 1
    from kxl_prep.export.summary import format_summary

    assert summary["pending"] == len(rows) and "STOPPED" in format_summary(summary)
    monkeypatch.setattr(unit, "write_image", real)
    again = run_export(ExportOptions(prep, [tmp_path / "shards"], **opts))
    assert again["pending"] == 0 and again["exported"] == len(rows) and again["this_run"]["stopped"] is None
    _check_consistent(prep, prep / "images")
