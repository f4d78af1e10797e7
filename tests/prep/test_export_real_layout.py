"""The export on danbooru2023's real tar layout: flat and `./` members, the updates naming,
side files that must not shadow an image, partial downloads and a readable summary."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from kxl_prep.export.index import discover_shards, ensure_index, load_index, read_tar_members, resolve_duplicates
from kxl_prep.export.job import ExportOptions, run_export
from kxl_prep.export.plan import Plan, make_plan
from kxl_prep.export.summary import Records, build_summary, format_summary
from kxl_testing.sample import RECENT_FROM_ID, UPDATES, make_sample, member_name, shard_of, write_tar


def test_flat_dot_and_bucket_members_and_side_files(tmp_path):
    members = [
        ("123.json", b'{"id": 123}'),  # a side file BEFORE its image
        (member_name(123, "jpg"), b"image 123"),
        ("./124.txt", b"tags of 124"),
        (member_name(124, "png", "dot"), b"image 124"),
        (member_name(125, "webp", "bucket"), b"image 125"),
        (member_name(126, "gif"), b"image 126"),
        ("127.mp4", b"a video"),
        ("notes.md", b"x"),
    ]
    tar = write_tar(tmp_path / "updates" / "20240522" / "dataset-3.tar", members)
    table, skipped = read_tar_members(tar)
    frame = table.to_pandas().set_index("id")
    assert skipped == 4  # the .json, the .txt, the video, the notes
    assert frame["member"].to_dict() == {123: "123.jpg", 124: "./124.png", 125: "0125/125.webp", 126: "126.gif"}
    raw = tar.read_bytes()
    for pid, row in frame.iterrows():
        assert raw[row["offset"]:row["offset"] + row["size"]] == f"image {pid}".encode()


def test_updates_naming_kinds_and_priority(tmp_path):
    root = tmp_path / "danbooru2023"
    write_tar(root / "original" / "data-0007.tar", [(member_name(7, "jpg"), b"orig")])
    write_tar(root / "recent" / "data-1007.tar", [(member_name(7_600_007, "jpg"), b"recent")])
    write_tar(root / "updates" / "20240319" / "dataset-7.tar", [(member_name(7, "jpg", "dot"), b"upd-march")])
    write_tar(root / "updates" / "20240522" / "dataset-7.tar", [(member_name(7, "png"), b"upd-may")])
    shards = discover_shards([root])
    assert {s.rel: (s.kind, s.update_date) for s in shards} == {
        "original/data-0007.tar": ("original", ""),
        "recent/data-1007.tar": ("recent", ""),
        "updates/20240319/dataset-7.tar": ("updates", "20240319"),
        "updates/20240522/dataset-7.tar": ("updates", "20240522"),
    }
    for s in shards:
        ensure_index(s, tmp_path / "idx")
    best = resolve_duplicates(load_index(shards, tmp_path / "idx"), shards).set_index("id")
    assert shards[int(best.loc[7, "shard"])].rel == "updates/20240522/dataset-7.tar"  # the newest update
    assert best.loc[7, "ext"] == "png"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("layout"), n_posts=1500, seed=4)


def _plan(roots, tmp_path, ids):
    shards = discover_shards(roots)
    for s in shards:
        ensure_index(s, tmp_path / "idx")
    index = resolve_duplicates(load_index(shards, tmp_path / "idx"), shards)
    selection = pd.DataFrame({"id": ids, "file_ext": ["jpg"] * len(ids), "md5": ["m"] * len(ids)})
    return make_plan(selection, shards, index), index, shards


@pytest.fixture(scope="module")
def sample_index(sample, tmp_path_factory):
    """The sample's shard index, built once for the tests below."""
    index_dir = tmp_path_factory.mktemp("layout-index")
    shards = discover_shards([sample.shards])
    for s in shards:
        ensure_index(s, index_dir)
    return load_index(shards, index_dir), shards, index_dir


def test_sample_layout_every_file_found_where_shard_of_says(sample_index):
    index, shards, _ = sample_index
    where = {int(i): shards[int(k)].rel for i, k in zip(index["id"], index["shard"])}
    assert len(where) == len(index) > 1000  # each file in exactly one tar
    assert all(shard_of(pid) == rel for pid, rel in where.items())
    kinds = {rel.split("/")[0] for rel in where.values()}
    assert kinds == {"original", "recent", "updates"}
    assert {rel.split("/")[1] for rel in where.values() if rel.startswith("updates/")} == {u for u, _ in UPDATES}


def test_partial_download_reasons_never_name_an_original_tar_for_newer_ids(sample, sample_index, tmp_path):
    # a partial download: half the original tars, no 20240522 update, no recent/
    part = tmp_path / "part"
    shutil.copytree(sample.shards / "original", part / "original",
                    ignore=lambda d, names: [n for n in names if n.endswith(".tar") and int(n[5:9]) % 2])
    shutil.copytree(sample.shards / "updates" / UPDATES[0][0], part / "updates" / UPDATES[0][0])
    ids = sorted(int(i) for i in sample_index[0]["id"])
    plan, _, _ = _plan([part], tmp_path, ids)
    reasons = dict(zip(plan.not_found["id"], plan.not_found["reason"]))
    assert reasons, "the partial download lacks files"
    for pid in ids:
        rel = shard_of(pid)
        if rel.startswith("original/") and int(rel[14:18]) % 2:
            assert reasons[pid] == f"shard_missing:{rel}"
        elif pid >= UPDATES[1][1]:  # 20240522 and recent/: not downloaded
            assert reasons[pid] == "beyond_original_range"
        else:
            assert pid not in reasons  # found
    assert any(pid >= RECENT_FROM_ID for pid in reasons)


def test_summary_of_a_partial_8tb_download_stays_short(tmp_path):
    ids = list(range(1, 30_001))
    reasons = [f"shard_missing:original/data-{i % 1000:04d}.tar" if i % 3 else "beyond_original_range" for i in ids]
    reasons[:40] = ["not_a_still_image:mp4"] * 25 + ["not_a_still_image:zip"] * 15
    plan = Plan([], pd.DataFrame({"id": ids, "reason": reasons}), len(ids))
    summary = build_summary(plan, Records())
    assert sum(summary["not_found"].values()) == len(ids)
    assert len(summary["not_found"]) == 1000 + 1 + 2  # the full list stays in export_summary.json
    by_kind = summary["not_found_by_kind"]
    assert by_kind == {"shard_missing": sum(r.startswith("shard_missing:") for r in reasons),
                       "beyond_original_range": reasons.count("beyond_original_range"),
                       "not_a_still_image": 40}
    text = format_summary({**summary, "this_run": None})
    lines = text.splitlines()
    assert len(lines) <= 10
    assert f"not found: {len(ids):,}" in text
    shard_line = next(line for line in lines if line.strip().startswith("shard_missing:"))
    assert shard_line.count("original/data-") == 10 and shard_line.endswith(" and 990 more)")
    assert "not_a_still_image: 40 (mp4 25, zip 15)" in text
    assert "beyond_original_range: " in text
    json.dumps(summary)  # what export_summary.json holds


def test_sample_export_accounts_for_every_post(sample, sample_index, tmp_path):
    from kxl_prep.pipeline import prepare

    prep = tmp_path / "prep"
    prepare([sample.db], prep, count_scale=1500 / 7_600_000, progress=False)
    summary = run_export(ExportOptions(prep, [sample.shards], index_dir=sample_index[2], workers=1,
                                       progress=False))
    assert summary["exported"] > 0
    assert summary["exported"] + sum(summary["rejected"].values()) + sum(summary["not_found"].values()) \
        == summary["selected"]
    # every file of the sample sits where its id says: only the posts the sample left out are missing
    assert set(summary["not_found_by_kind"]) <= {"not_in_shards", "beyond_original_range"}
    meta = json.loads((prep / "meta.json").read_text())
    assert len(meta) == summary["exported"]
