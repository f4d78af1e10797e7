"""The pieces of `kxl fetch images` that need no pool: coalescing members into ranges
(property-tested), tar headers read through ranges equal the export's local reading, the
hfutils index form turned into the export's rows."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("huggingface_hub")

from kxl_prep.export.index import read_tar_members  # noqa: E402
from kxl_testing.hub_pools import hfutils_index  # noqa: E402
from kxl_testing.sample import member_name, write_tar  # noqa: E402
from kxl_tools.fetch.coalesce import coalesce, summarize  # noqa: E402
from kxl_tools.fetch.hub_index import IndexMismatch, table_from_hfutils  # noqa: E402
from kxl_tools.fetch.ranged import HubFile, RangedFile, Retry, get_range  # noqa: E402


@st.composite
def tar_like_members(draw):
    """Members in a random order, laid out as in a tar: apart (a header at least between two)."""
    sizes = draw(st.lists(st.integers(0, 5000), min_size=0, max_size=40))
    gaps = draw(st.lists(st.integers(1, 3000), min_size=len(sizes), max_size=len(sizes)))
    members, pos = [], 0
    for i, (size, gap) in enumerate(zip(sizes, gaps)):
        pos += gap
        members.append(SimpleNamespace(id=i, offset=pos, size=size))
        pos += size
    return draw(st.permutations(members))


@settings(max_examples=200, deadline=None)
@given(tar_like_members(), st.integers(0, 4000), st.integers(1, 20000))
def test_coalesce_covers_every_member_once_within_its_limits(members, max_gap, max_span):
    ranges = coalesce(members, max_gap, max_span)
    got = [m for r in ranges for m in r.members]
    assert sorted(m.id for m in got) == sorted(m.id for m in members)  # each member in one range
    assert [m.offset for m in got] == sorted(m.offset for m in members)  # in offset order
    for r in ranges:
        assert r.start == r.members[0].offset and r.end == r.members[-1].offset + r.members[-1].size
        assert r.length <= max_span or len(r.members) == 1  # only a lone big member exceeds it
        for a, b in zip(r.members, r.members[1:]):
            assert 0 <= b.offset - (a.offset + a.size) <= max_gap
    for a, b in zip(ranges, ranges[1:]):  # ranges apart: merging them would break a limit
        gap = b.start - a.end
        assert gap > max_gap or b.end - a.start > max_span
    totals = summarize(ranges)
    assert totals["requests"] == len(ranges)
    assert totals["member_bytes"] == sum(m.size for m in members)
    assert totals["bytes"] == totals["member_bytes"] + totals["gap_bytes"]
    if max_gap == 0:  # tar members never touch (headers between): one request per member
        assert totals["gap_bytes"] == 0


@pytest.fixture
def tar_on_hub(hub_server, tmp_path):
    members = [(member_name(i, "jpg", "dot" if i % 3 else "flat"), bytes([i % 251]) * (700 * i + 13))
               for i in range(1, 40)]
    members.insert(5, ("5.json", b'{"side": "file"}'))
    tar = write_tar(tmp_path / "t" / "data-0001.tar", members)
    hub_server.add_file("o/pool", "original/data-0001.tar", tar, repo_type="dataset")
    return tar, HubFile("o/pool", "original/data-0001.tar")


def test_headers_read_by_ranges_equal_the_local_index(tar_on_hub, hub_server):
    tar, file = tar_on_hub
    local, skipped_local = read_tar_members(tar)
    ranged = RangedFile(file, tar.stat().st_size, Retry(base_wait=0.01), block=4096)
    remote, skipped_remote = read_tar_members(str(file), fileobj=ranged)
    assert remote.equals(local) and skipped_remote == skipped_local == 1
    # only headers (and what a block carries along) were read, not the whole tar
    assert ranged.bytes_read < tar.stat().st_size and ranged.requests > 1


def test_get_range_and_the_tar_end(tar_on_hub):
    tar, file = tar_on_hub
    raw = tar.read_bytes()
    assert get_range(file, 10, 600) == raw[10:600]
    assert get_range(file, len(raw) - 5, len(raw) + 100) == raw[-5:]  # the file ends first
    assert get_range(file, len(raw) + 10, len(raw) + 20) == b""  # past the end: nothing


def test_hfutils_index_gives_the_exports_rows(tar_on_hub):
    tar, _ = tar_on_hub
    doc = json.loads(json.dumps(hfutils_index(tar)))
    table, skipped = table_from_hfutils(doc, "idx/original/data-0001.json")
    local, _ = read_tar_members(tar)
    assert table.drop(["sha256"]).equals(local) and skipped == 1
    raw = tar.read_bytes()
    import hashlib

    for offset, size, digest in zip(*(table[c].to_pylist() for c in ("offset", "size", "sha256"))):
        assert hashlib.sha256(raw[offset:offset + size]).hexdigest() == digest
    with pytest.raises(IndexMismatch, match="no `files`"):
        table_from_hfutils({"filesize": 1}, "idx/x.json")
