"""`kxl fetch images` against the loopback hub (kxl_testing.hub_server), through huggingface_hub's
own code: the result equals `kxl-prep export` over the same tars downloaded whole (files,
meta.json, rejects), with or without published indexes, under faults (a cut connection,
corrupted bytes, 429 / 503, kill -9 then resume, ENOSPC then resume), and bad input gets one
clear line."""
from __future__ import annotations

import errno
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

pytest.importorskip("huggingface_hub")

from kxl_prep.export.job import ExportOptions, run_export  # noqa: E402
from kxl_prep.export.process import ExportSettings  # noqa: E402
from kxl_testing.export_inputs import encode, photo_like, write_prep_dir  # noqa: E402
from kxl_testing.hub_pools import copy_tars, hfutils_index, publish_pool, tars_with_members  # noqa: E402
from kxl_testing.sample import member_name, write_tar  # noqa: E402
from kxl_tools.fetch.images import FetchError, FetchOptions, run_fetch  # noqa: E402
from kxl_tools.fetch.pools import PoolError, get_pool  # noqa: E402
from kxl_tools.fetch.ranged import Retry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N_POSTS = 150
FAST = Retry(attempts=4, base_wait=0.01, max_wait=0.05, timeout=5)


@pytest.fixture(scope="module")
def sample_prep(tmp_path_factory):
    """The built-in sample (danbooru2023's original / recent / updates layout), prepared."""
    from kxl_prep.cli import DANBOORU2023_POSTS
    from kxl_prep.pipeline import prepare
    from kxl_testing.sample import make_sample

    root = tmp_path_factory.mktemp("fetch-sample")
    sample = make_sample(root / "sample", n_posts=N_POSTS, seed=5)
    prepare([sample.db], root / "prep", count_scale=N_POSTS / DANBOORU2023_POSTS, progress=False)
    return sample, root / "prep", tars_with_members(sample.shards)


@pytest.fixture(scope="module")
def exported(sample_prep, tmp_path_factory):
    """The reference: kxl-prep export over every tar of the sample downloaded whole
    (outcome, its image_dir)."""
    tmp = tmp_path_factory.mktemp("fetch-reference")
    return _exported(sample_prep, tmp, sample_prep[2]), tmp / "img-export"


def _copy_prep(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _outcome(prep: Path, image_dir: Path) -> dict:
    """What must be equal: every file's bytes, meta.json's bytes, the rejects."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in image_dir.iterdir() if p.is_file()
             and not p.name.startswith(".")}
    rejects = pd.read_parquet(prep / "export_rejects.parquet")
    return {"files": files, "meta": (prep / "meta.json").read_bytes(),
            "rejects": rejects.sort_values("record").to_dict("records")}


def _exported(sample_prep, tmp_path, rels, settings=ExportSettings()) -> dict:
    sample, prep_src, _ = sample_prep
    downloaded = copy_tars(sample.shards, rels, tmp_path / "downloaded")
    prep = _copy_prep(prep_src, tmp_path / "prep-export")
    run_export(ExportOptions(prep, [downloaded], image_dir=tmp_path / "img-export", index_dir=tmp_path / "idx-export",
                             settings=settings, workers=1, progress=False))
    return _outcome(prep, tmp_path / "img-export")


def _fetch(prep_src, tmp_path, name="fetch", **kw) -> tuple[dict, dict, Path]:
    prep = tmp_path / f"prep-{name}"
    if not prep.exists():
        _copy_prep(prep_src, prep)
    # the hub index cache is keyed by each tar's size and sha256: shared by the module's tests
    opts = dict(image_dir=tmp_path / f"img-{name}", index_dir=prep_src.parent / "idx-hub", workers=1, progress=False,
                retry=FAST)
    opts.update(kw)
    summary = run_fetch(FetchOptions(prep, "danbooru2023", **opts))
    return summary, _outcome(prep, tmp_path / f"img-{name}"), prep


@pytest.fixture
def published(hub_server, sample_prep):
    sample, _, rels = sample_prep
    publish_pool(hub_server, get_pool("danbooru2023"), sample.shards, rels)
    return hub_server


def test_fetch_equals_export_over_the_whole_tars(published, sample_prep, tmp_path, exported):
    sample, prep_src, rels = sample_prep
    expected = exported[0]
    assert len(expected["files"]) > 30 and expected["rejects"]  # the sample has missing files and videos
    published.clear_log()
    summary, got, _ = _fetch(prep_src, tmp_path, max_gap=0)
    assert got == expected
    assert summary["pending"] == 0 and not summary["this_run"]["failed_units"]
    # only the selected members were read: one range request per member (no coalescing), and
    # the bytes served are the members' bytes, not the tars'
    tar_requests = [r for r in published.requests(file="*.tar") if r.status == 206]
    assert len(tar_requests) == len(expected["files"]) + 1  # + the access probe (1 byte)
    assert published.bytes_served(file="*.tar") == summary["bytes_in"] + 1
    whole = sum((sample.shards / rel).stat().st_size for rel in rels)
    assert published.bytes_served(file="*.tar") < whole / 2
    # one resolve per tar (its CDN address is reused for every range), + the probe's
    resolves = [r for r in published.requests(file="*.tar") if r.status == 302]
    assert len(resolves) == len(_touched(exported[1])) + 1


def test_coalescing_merges_requests_and_gives_the_same_result(published, sample_prep, tmp_path):
    _, prep_src, rels = sample_prep
    base, expected, _ = _fetch(prep_src, tmp_path, "apart", max_gap=0)
    n_apart = len([r for r in published.requests(file="*.tar") if r.status == 206])
    published.clear_log()
    merged, got, _ = _fetch(prep_src, tmp_path, "merged", max_gap=1 << 20)
    n_merged = len([r for r in published.requests(file="*.tar") if r.status == 206])
    assert got["files"] == expected["files"] and got["meta"] == expected["meta"]
    assert n_merged < n_apart  # tars with several selected members: one request each


def test_without_published_indexes_tar_headers_are_read_once(hub_server, sample_prep, tmp_path):
    sample, prep_src, rels = sample_prep
    publish_pool(hub_server, get_pool("danbooru2023"), sample.shards, rels, index=False)
    expected = _exported(sample_prep, tmp_path, rels)
    summary, got, prep = _fetch(prep_src, tmp_path, index_dir=tmp_path / "idx-headers")
    assert got == expected
    assert summary["this_run"]["shards_indexed"] > 0
    # a second run reads no header again (the shard index is cached) and fetches nothing
    hub_server.clear_log()
    again, got2, _ = _fetch(prep_src, tmp_path, index_dir=tmp_path / "idx-headers")
    assert got2 == expected and again["this_run"]["shards_indexed"] == 0
    assert again["this_run"]["processed"] == 0
    reads = [r for r in hub_server.requests(file="*.tar") if r.status == 206]
    assert [r.range for r in reads] == ["bytes=0-0"]  # the 1-byte access probe only


def test_faults_give_the_clean_result(published, sample_prep, tmp_path, exported):
    _, prep_src, rels = sample_prep
    clean = exported[0]
    published.fault("cut", file="original/*.tar", after_bytes=300, times=2)
    published.fault("corrupt", file="recent/*.tar", at=5, times=2)
    published.fault("status", file="updates/*.tar", status=503, times=2)
    published.fault("status", file="original/*.tar", status=429, times=2)
    # a CDN address that expired (403 on a read; resolves are HEADs): resolved again
    expired = sorted(r for r in _touched(exported[1]) if r.startswith("original/"))[-1]
    published.fault("status", file=expired, status=403, methods=("GET",))
    summary, got, _ = _fetch(prep_src, tmp_path, "faulty")
    assert got == clean
    assert not summary["this_run"]["failed_units"]
    assert all(f.times == 0 for f in published.faults)  # every fault was met


def test_index_that_disagrees_with_its_tar(hub_server, sample_prep, tmp_path):
    sample, prep_src, rels = sample_prep
    pool = get_pool("danbooru2023")
    publish_pool(hub_server, pool, sample.shards, rels)
    rel = next(r for r in rels if r.startswith("original/"))
    doc = hfutils_index(sample.shards / rel)
    name = next(iter(doc["files"]))
    doc["files"][name]["sha256"] = "0" * 64  # a member's hash that the tar's bytes never give
    hub_server.add_file(pool.index_repo, pool.index_file_for(rel), json.dumps(doc).encode(), repo_type="dataset")
    summary, _, _ = _fetch(prep_src, tmp_path, index_dir=tmp_path / "idx-own")
    failed = summary["this_run"]["failed_units"]
    assert len(failed) == 1 and rel in failed[0] and "index disagrees with the tar" in failed[0]
    assert name.lstrip("./") in failed[0]
    # an index made from another version of the tar is refused before anything is read
    doc = hfutils_index(sample.shards / rel)
    doc["filesize"] += 512
    hub_server.add_file(pool.index_repo, pool.index_file_for(rel), json.dumps(doc).encode(), repo_type="dataset")
    with pytest.raises(Exception, match="filesize"):
        _fetch(prep_src, tmp_path, "other", index_dir=tmp_path / "idx-fresh")


def test_member_missing_from_its_tar_is_reported_as_the_export_does(hub_server, tmp_path):
    pool = get_pool("danbooru2023")
    good = encode(photo_like(64, 48, 1), "jpg")
    tars = tmp_path / "tars"
    write_tar(tars / "original" / "data-0001.tar", [(member_name(1001, "jpg"), good), (member_name(3001, "jpg"), good)])
    write_tar(tars / "original" / "data-0002.tar", [(member_name(2, "png"), encode(photo_like(40, 40, 2), "png"))])
    rels = ["original/data-0001.tar", "original/data-0002.tar"]
    publish_pool(hub_server, pool, tars, rels)
    rows = [{"id": i, "ext": "jpg"} for i in (1001, 2001, 3001, 5)] + [{"id": 2, "ext": "png"}]
    prep_e = write_prep_dir(tmp_path / "prep-e", rows)
    run_export(ExportOptions(prep_e, [tars], index_dir=tmp_path / "ie", workers=1, progress=False))
    prep_f = write_prep_dir(tmp_path / "prep-f", rows)
    run_fetch(FetchOptions(prep_f, "danbooru2023", index_dir=tmp_path / "if", workers=1, progress=False, retry=FAST))
    assert _outcome(prep_f, prep_f / "images") == _outcome(prep_e, prep_e / "images")
    rejects = pd.read_parquet(prep_f / "export_rejects.parquet").set_index("record")["reason"].to_dict()
    assert rejects == {"2001": "not_found:not_in_shards", "5": "not_found:shard_missing:original/data-0005.tar"}


def test_bad_input_one_line_errors(hub_server, tmp_path):
    from click.testing import CliRunner

    from kxl_tools.fetch.images_cli import images

    prep = write_prep_dir(tmp_path / "prep", [{"id": 1, "ext": "jpg"}])
    with pytest.raises(PoolError, match="unknown pool.*danbooru2023"):
        run_fetch(FetchOptions(prep, "danbooru1999"))
    result = CliRunner().invoke(images, [str(prep), "--pool", "danbooru1999"])
    assert result.exit_code != 0 and "unknown pool" in result.output and "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(images, [str(empty), "--pool", "danbooru2023"])
    assert result.exit_code != 0 and "selection.parquet: not found" in result.output
    # a gated pool without a token: a clear error naming HF_TOKEN, nothing written
    result = CliRunner().invoke(images, [str(prep), "--pool", "danbooru2024-webp-4Mpixel", "--quiet"])
    assert result.exit_code != 0 and "HF_TOKEN" in result.output and "Traceback" not in result.output
    assert not (prep / "images").exists()


def test_disk_full_stops_cleanly_and_a_rerun_resumes(published, sample_prep, tmp_path, monkeypatch, exported):
    _, prep_src, rels = sample_prep
    clean = exported[0]
    import kxl_prep.export.unit as unit

    real_write = unit.write_image
    written = []

    def filling_disk(image_dir, post_id, ext, data, fsync=True):
        if len(written) >= 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(post_id)
        return real_write(image_dir, post_id, ext, data, fsync=fsync)

    monkeypatch.setattr(unit, "write_image", filling_disk)
    summary, _, _ = _fetch(prep_src, tmp_path, "full")
    assert summary["this_run"]["stopped"] and "No space left" in summary["this_run"]["stopped"]
    assert len(summary["this_run"]["failed_units"]) == 1  # stopped at the first full write
    assert summary["pending"] > 0
    monkeypatch.setattr(unit, "write_image", real_write)
    published.clear_log()
    again, got, _ = _fetch(prep_src, tmp_path, "full")
    assert got == clean
    assert again["this_run"]["already_done"] >= 20


def _touched(image_dir: Path) -> list[str]:
    """The tars a run took a post from (its journals' names)."""
    return [p.name[len("r0-"):-len(".jsonl")].replace("__", "/")
            for p in (image_dir / ".kxl-export" / "journal").glob("*.jsonl")]


def _journal_ids(image_dir: Path) -> set[int]:
    ids = set()
    for path in (image_dir / ".kxl-export" / "journal").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            ids.add(json.loads(line)["id"])
    return ids


def test_kill_9_mid_fetch_then_resume_loses_nothing_and_fetches_nothing_twice(published, sample_prep, tmp_path, exported):
    from kxl_prep.export.index import read_tar_members

    sample, prep_src, rels = sample_prep
    clean = exported[0]
    published.clear_log()
    prep = _copy_prep(prep_src, tmp_path / "prep-killed")
    image_dir = tmp_path / "img-killed"
    # a tar late in the order stalls in the middle of its first answer: earlier tars are done
    touched = sorted(_touched(exported[1]))
    stalled = [r for r in touched if r.startswith("original/")][len(touched) // 3]
    published.fault("stall", file=stalled, after_bytes=100)
    cmd = [sys.executable, "-m", "kxl_tools.cli", "fetch", "images", str(prep), "--pool", "danbooru2023",
           "--image-dir", str(image_dir), "--index-dir", str(prep_src.parent / "idx-hub"), "--workers", "1",
           "--requests", "2", "--max-gap", "0", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert published.stalled.wait(120), "the fetch never reached the stalled tar"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    published.release_stalls()
    done_at_kill = _journal_ids(image_dir)
    assert done_at_kill, "nothing finished before the kill: stall a later tar"
    files_at_kill = {e.name: e.stat().st_mtime_ns for e in os.scandir(image_dir) if not e.name.startswith(".")}

    published.clear_log()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _outcome(prep, image_dir) == clean  # nothing lost
    for name, mtime in files_at_kill.items():  # nothing written again
        assert os.stat(image_dir / name).st_mtime_ns == mtime, name
    # nothing fetched twice: no range of the rerun covers a member finished before the kill
    spans = {}
    for rel in rels:
        table, _ = read_tar_members(sample.shards / rel)
        for pid, offset, size in zip(table["id"].to_pylist(), table["offset"].to_pylist(), table["size"].to_pylist()):
            spans[pid] = (rel, offset, offset + size)
    for req in published.requests(file="*.tar"):
        if req.status != 206 or req.range == "bytes=0-0":
            continue
        lo, hi = (int(x) for x in req.range[len("bytes="):].split("-"))
        for pid in done_at_kill:
            rel, start, end = spans[pid]
            assert not (rel == req.file and start <= hi and lo < end), f"post {pid} fetched again"


def test_shard_slices_and_dry_run(published, sample_prep, tmp_path, exported):
    from click.testing import CliRunner

    from kxl_tools.cli import main

    sample, prep_src, rels = sample_prep
    clean = exported[0]
    prep = _copy_prep(prep_src, tmp_path / "prep-sliced")
    args = ["fetch", "images", str(prep), "--pool", "danbooru2023", "--image-dir", str(tmp_path / "img-sliced"),
            "--index-dir", str(prep_src.parent / "idx-hub"), "--workers", "1", "--quiet", "--retry-wait", "0.01"]
    dry = CliRunner().invoke(main, args + ["--dry-run", "--max-gap", "0"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: pool danbooru2023" in dry.output and "the whole tars they are in" in dry.output
    assert not (tmp_path / "img-sliced").exists()  # a dry run writes nothing
    report = run_fetch(FetchOptions(prep, "danbooru2023", image_dir=tmp_path / "img-sliced", dry_run=True,
                                    index_dir=prep_src.parent / "idx-hub", max_gap=0, progress=False))
    touched = _touched(exported[1])
    whole = sum((sample.shards / rel).stat().st_size for rel in touched)
    assert report["images"] == len(clean["files"]) + sum(
        1 for r in clean["rejects"] if not r["reason"].startswith("not_found"))
    assert report["tars_touched"] == len(touched) and report["whole_tar_bytes"] == whole
    assert report["requests"] == report["images"]
    assert report["bytes"] == report["member_bytes"] < whole / 2
    for k in range(3):
        result = CliRunner().invoke(main, args + ["--shard", f"{k}/3"])
        assert result.exit_code == 0, result.output
    assert _outcome(prep, tmp_path / "img-sliced") == clean
    again = run_fetch(FetchOptions(prep, "danbooru2023", image_dir=tmp_path / "img-sliced", dry_run=True,
                                   index_dir=prep_src.parent / "idx-hub", progress=False))
    assert again["images"] == 0 and again["bytes"] == 0


def _hand_made_pool(tars: Path, layout: dict[str, list[int]]) -> list[dict]:
    rows = []
    for rel, ids in layout.items():
        members = []
        for pid in ids:
            members.append((member_name(pid, "webp"), encode(photo_like(48 + pid % 17, 40, pid), "webp")))
            rows.append({"id": pid, "ext": "webp"})
        write_tar(tars / rel, members)
    return rows


@pytest.mark.parametrize("pool_name, layout", [
    # the author's set: images/data-0NNN.tar and images/data-1NNN.tar by id % 1000
    ("danbooru2023-webp-4Mpixel", {"images/data-0007.tar": [7, 1007], "images/data-1007.tar": [6_001_007],
                                   "images/data-0042.tar": [42, 5042, 9042], "images/data-1042.tar": [7_000_042]}),
    # the successor set (gated): images/0NNN.tar with images/0NNN.json beside it (an assumption)
    ("danbooru2024-webp-4Mpixel", {"images/0007.tar": [7, 1007, 8_100_007], "images/0042.tar": [42, 9042]}),
])
def test_each_pool_layout_equals_the_export(hub_server, tmp_path, monkeypatch, pool_name, layout):
    pool = get_pool(pool_name)
    tars = tmp_path / "tars"
    rows = _hand_made_pool(tars, layout)
    rows.append({"id": 77, "ext": "webp"})  # in no tar of the pool
    publish_pool(hub_server, pool, tars, sorted(layout))
    if pool.gated:
        token = hub_server.gate(pool.repo, repo_type="dataset", token="hf_granted")
        prep = write_prep_dir(tmp_path / "prep-denied", rows)
        with pytest.raises(FetchError, match="HF_TOKEN"):
            run_fetch(FetchOptions(prep, pool_name, index_dir=tmp_path / "if", workers=1, progress=False, retry=FAST))
        assert not (prep / "images").exists()  # nothing written
        monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
        with pytest.raises(FetchError, match="HF_TOKEN"):
            run_fetch(FetchOptions(prep, pool_name, index_dir=tmp_path / "if", workers=1, progress=False, retry=FAST))
        assert not (prep / "images").exists()
        monkeypatch.setenv("HF_TOKEN", token)
    prep_e = write_prep_dir(tmp_path / "prep-e", rows)
    run_export(ExportOptions(prep_e, [tars], index_dir=tmp_path / "ie", workers=1, progress=False))
    prep_f = write_prep_dir(tmp_path / "prep-f", rows)
    summary = run_fetch(FetchOptions(prep_f, pool_name, index_dir=tmp_path / "if", workers=1, progress=False,
                                     retry=FAST))
    assert _outcome(prep_f, prep_f / "images") == _outcome(prep_e, prep_e / "images")
    assert summary["exported"] == len(rows) - 1
    assert summary["pool"]["tars_indexed"] == len(layout)
    # each member came by its own range request out of its tar, checked against the index
    assert len([r for r in hub_server.requests(file="*.tar") if r.status == 206]) <= len(rows)


def test_pool_table_routes_ids_to_the_real_file_names():
    d23 = get_pool("danbooru2023")
    listed = ["original/data-0123.tar", "recent/data-1123.tar", "updates/20240319/dataset-3.tar",
              "updates/20240522/dataset-3.tar", "updates/20240522/dataset-4.tar", "original/data-0124.tar"]
    assert d23.candidates([7_000_123], listed) == {"original/data-0123.tar", "recent/data-1123.tar",
                                                   "updates/20240319/dataset-3.tar", "updates/20240522/dataset-3.tar"}
    assert d23.index_file_for("updates/20240319/dataset-3.tar") == "updates/20240319/dataset-3.json"
    webp = get_pool("danbooru2023-webp-4Mpixel")
    assert webp.candidates([5], ["images/data-0005.tar", "images/data-1005.tar", "images/data-0006.tar"]) == {
        "images/data-0005.tar", "images/data-1005.tar"}
    assert get_pool("danbooru2024").candidates([8_000_999], ["images/0999.tar", "images/0998.tar"]) == {"images/0999.tar"}
    assert get_pool("danbooru2024").index_file_for("images/0999.tar") == "images/0999.json"


def test_ray_path(published, sample_prep, tmp_path, exported):
    pytest.importorskip("ray", reason="ray is an optional extra (pip install 'kxl[ray]'); not installed")
    _, prep_src, _ = sample_prep
    clean = exported[0]
    summary, got, _ = _fetch(prep_src, tmp_path, "ray", use_ray=True)
    assert got == clean and not summary["this_run"]["failed_units"]
