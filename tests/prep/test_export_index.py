"""Shard index and plan: offsets read back the member bytes, the cache is reused until the tar
changes, duplicates resolve by priority, --shard K/N slices partition the work, posts not
found get a reason."""
from __future__ import annotations

import os
import tarfile

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kxl_prep.export.index import (
    discover_shards,
    ensure_index,
    load_index,
    read_tar_members,
    resolve_duplicates,
)
from kxl_prep.export.plan import Plan, Unit, make_plan, parse_shard_spec
from kxl_prep.export.reader import ShardReader
from kxl_testing.sample import member_name, write_tar


def _payload(post_id: int, n: int = 700) -> bytes:
    return (f"post {post_id};".encode() * n)[: n + post_id % 300]


def test_member_offsets_read_back_the_bytes(tmp_path):
    ids = [5, 1005, 123456, 7000001]
    members = [(member_name(i, "jpg", "bucket"), _payload(i)) for i in ids]  # `NNNN/<id>.<ext>`
    members.append(("README.txt", b"not a post"))
    members.append(("0005/notes.json", b"{}"))
    members.append(("77.png", _payload(77)))  # flat member name (webp-4Mpixel style)
    tar = write_tar(tmp_path / "original" / "data-0005.tar", members)
    table, skipped = read_tar_members(tar)
    assert skipped == 2
    frame = table.to_pandas().set_index("id")
    assert sorted(frame.index) == sorted(ids + [77])
    assert frame.loc[77, "ext"] == "png" and frame.loc[1005, "member"] == "0005/1005.jpg"
    with ShardReader(str(tar)) as reader:
        for i in ids + [77]:
            assert reader.read(int(frame.loc[i, "offset"]), int(frame.loc[i, "size"])) == _payload(i)
    # the same offsets tarfile itself reports
    with tarfile.open(tar) as tf:
        for info in tf:
            if info.name.endswith(".jpg"):
                pid = int(info.name.rsplit("/", 1)[1].split(".")[0])
                assert frame.loc[pid, "offset"] == info.offset_data


def test_compressed_tars_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "data-0000.tar"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("1.jpg")
        info.size = 0
        tf.addfile(info)
    with pytest.raises(ValueError, match="not a plain"):
        read_tar_members(path)


def test_index_is_cached_until_the_tar_changes(tmp_path):
    tar = write_tar(tmp_path / "shards" / "original" / "data-0001.tar", [(member_name(1, "jpg"), _payload(1))])
    (shard,) = discover_shards([tmp_path / "shards"])
    index_dir = tmp_path / "index"
    assert ensure_index(shard, index_dir)[1] is True
    assert ensure_index(shard, index_dir)[1] is False
    st_before = os.stat(tar)
    os.utime(tar, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 10**9))  # touched
    assert ensure_index(shard, index_dir)[1] is True
    write_tar(tar, [(member_name(1, "jpg"), _payload(1)), (member_name(1001, "png"), _payload(1001))])
    assert ensure_index(shard, index_dir)[1] is True
    assert sorted(load_index([shard], index_dir)["id"]) == [1, 1001]


def test_discovery_kinds_and_duplicate_priority(tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    write_tar(root_a / "original" / "data-0001.tar", [(member_name(1, "jpg"), b"orig"), (member_name(1001, "jpg"), b"o2")])
    write_tar(root_a / "recent" / "data-1001.tar", [(member_name(2001, "jpg"), b"recent")])
    write_tar(root_a / "updates" / "2024-01-01" / "data-0000.tar", [(member_name(1, "jpg"), b"upd-old")])
    write_tar(root_a / "updates" / "2024-06-01" / "data-0000.tar", [(member_name(1, "png"), b"upd-new")])
    write_tar(root_b / "images" / "data-0001.tar", [(member_name(1001, "webp"), b"webp"), (member_name(3001, "webp"), b"w3")])
    shards = discover_shards([root_a, root_b])
    kinds = {s.rel: s.kind for s in shards}
    assert kinds == {
        "original/data-0001.tar": "original",
        "recent/data-1001.tar": "recent",
        "updates/2024-01-01/data-0000.tar": "updates",
        "updates/2024-06-01/data-0000.tar": "updates",
        "images/data-0001.tar": "other",
    }
    index_dir = tmp_path / "index"
    for s in shards:
        ensure_index(s, index_dir)
    best = resolve_duplicates(load_index(shards, index_dir), shards).set_index("id")
    source = {i: shards[int(best.loc[i, "shard"])].rel for i in best.index}
    assert source[1] == "updates/2024-06-01/data-0000.tar"  # newest update wins
    assert best.loc[1, "ext"] == "png"
    assert source[1001] == "original/data-0001.tar"  # the first root wins over the second
    assert source[3001] == "images/data-0001.tar"  # only in the second root
    assert source[2001] == "recent/data-1001.tar"


def _selection(rows):
    return pd.DataFrame(rows, columns=["id", "file_ext", "md5"])


def test_plan_reasons_for_posts_not_found(tmp_path):
    root = tmp_path / "shards"
    write_tar(root / "original" / "data-0001.tar", [(member_name(1, "jpg"), b"x"), (member_name(1001, "jpg"), b"y"),
                                                    (member_name(5001, "jpg"), b"w")])
    write_tar(root / "original" / "data-0002.tar", [(member_name(2, "jpg"), b"z")])
    shards = discover_shards([root])
    for s in shards:
        ensure_index(s, tmp_path / "idx")
    index = resolve_duplicates(load_index(shards, tmp_path / "idx"), shards)
    selection = _selection([
        (1, "jpg", "a"), (1001, "jpg", "b"), (2, "jpg", "c"),
        (2001, "jpg", "d"),  # shard 0001 exists but lacks it
        (3, "png", "e"),  # original/data-0003.tar was never downloaded
        (4, "mp4", "f"),  # a video
        (5, "jpg", None),  # restricted (gold only)
        (5001, "jpg", "g"),
        # past the original/ range (1000 above its largest id, 5001): a recent/ or updates/
        # post, whose reason never names an original/ tar, downloaded (0002) or not (0003)
        (9002, "jpg", "h"), (9003, "jpg", "i"),
    ])
    plan = make_plan(selection, shards, index)
    reasons = dict(zip(plan.not_found["id"], plan.not_found["reason"]))
    assert reasons == {
        2001: "not_in_shards",
        3: "shard_missing:original/data-0003.tar",
        4: "not_a_still_image:mp4",
        5: "restricted_no_md5",
        9002: "beyond_original_range",
        9003: "beyond_original_range",
    }
    assert [(u.shard.rel, [p.id for p in u.posts]) for u in plan.units] == [
        ("original/data-0001.tar", [1, 1001, 5001]),
        ("original/data-0002.tar", [2]),
    ]
    with pytest.raises(ValueError, match="more than once"):
        make_plan(_selection([(1, "jpg", "a"), (1, "jpg", "a")]), shards, index)


@given(st.integers(0, 40), st.integers(1, 12))
def test_slices_partition_the_units(n_units, n_jobs):
    units = [Unit(shard=None) for _ in range(n_units)]  # type: ignore[arg-type]
    plan = Plan(units, pd.DataFrame(columns=["id", "reason"]), 0)
    seen = [id(u) for k in range(n_jobs) for u in plan.slice(k, n_jobs)]
    assert sorted(seen) == sorted(id(u) for u in units)  # every unit once: no gap, no overlap
    sizes = [len(plan.slice(k, n_jobs)) for k in range(n_jobs)]
    assert max(sizes) - min(sizes) <= 1


def test_shard_spec_parsing():
    assert parse_shard_spec(None) == (0, 1)
    assert parse_shard_spec("3/16") == (3, 16)
    for bad in ("16/16", "-1/4", "a/b", "3", "1/0"):
        with pytest.raises(ValueError):
            parse_shard_spec(bad)
