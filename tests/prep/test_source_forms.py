"""Every metadata form danbooru2023 users hold reads into the same table as the SQLite DB."""
from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.sources import SourceError, detect_format, read_posts
from kxl_prep.sources.records import sorted_tag_lists, tag_array
from kxl_testing.sample import make_sample
from kxl_testing.source_forms import (danbooru_records, dump_tables, write_danbooru_parquet, write_duckdb,
                                      write_jsonl)


@pytest.fixture(scope="module", params=["relation", "text"])
def sample(request, tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp(f"forms-{request.param}"), n_posts=700, seed=9,
                       images=False, tag_storage=request.param)


@pytest.fixture(scope="module")
def reference(sample):
    return read_posts([sample.db], progress=False)


def _reject_keys(rejects: pd.DataFrame) -> set:
    return set(zip(rejects["record"], rejects["field"]))


def test_hakubooru_parquet_tables_read_like_the_db(sample, reference, tmp_path):
    # rows shuffled and split into small row groups: the reader must not rely on file order
    folder = dump_tables(sample.db, tmp_path / "tables", shuffle_seed=4, row_group_size=64)
    names = sorted(p.name for p in folder.iterdir())
    assert names == (["post.parquet", "posttagrelation.parquet", "tag.parquet"] if sample.tag_storage == "relation"
                     else ["post.parquet", "tag.parquet"])
    schema = pq.read_schema(folder / "post.parquet")
    assert schema.field("rating").type == pa.int64()  # integer ratings, no tag_string_* fields
    assert not [n for n in schema.names if n.startswith("tag_string")]
    for source in ([folder], [folder / "post.parquet"], sorted(folder.iterdir())):
        res = read_posts(source, progress=False)
        pd.testing.assert_frame_equal(res.posts, reference.posts)
        # the same records rejected for the same fields (a value a typed parquet column cannot
        # hold, the planted file_size '12kb', arrives as null: "missing" instead of its text)
        assert _reject_keys(res.rejects) == _reject_keys(reference.rejects)
        assert set(res.rejects["record"].astype(int)) == set(sample.malformed)
        read = [st for st in res.stats["sources"].values() if "skipped" not in st]
        assert len(read) == 1 and read[0]["format"] == "hakubooru-parquet"
        assert read[0]["tag_storage"] == sample.tag_storage
        assert (read[0]["records"], read[0]["accepted"]) == (700, len(reference.posts))
    assert detect_format(folder) == detect_format(folder / "tag.parquet") == "hakubooru-parquet"


def test_duckdb_file_of_the_tables_reads_like_the_db(sample, reference, tmp_path):
    pytest.importorskip("duckdb")
    folder = dump_tables(sample.db, tmp_path / "tables", shuffle_seed=8)
    for name in ("danbooru2023.duckdb", "danbooru2023-duck.db"):  # by header, whatever the name
        path = write_duckdb(folder, tmp_path / name)
        assert detect_format(path) == "duckdb"
        res = read_posts([path], progress=False)
        pd.testing.assert_frame_equal(res.posts, reference.posts)
        assert _reject_keys(res.rejects) == _reject_keys(reference.rejects)
        assert res.stats["sources"][str(path)]["format"] == "hakubooru-duckdb"


def test_danbooru_records_in_any_tag_order_read_like_the_db(sample, reference, tmp_path):
    records = danbooru_records(sample.jsonl, seed=2)
    scrambled = [r for r in records if r["tag_string_general"] != " ".join(sorted(r["tag_string_general"].split()))]
    assert len(scrambled) > len(records) // 2  # the fixture does list tags out of order
    forms = [write_jsonl(tmp_path / "posts.jsonl", records),
             write_danbooru_parquet(tmp_path / "posts.parquet", records),
             write_danbooru_parquet(tmp_path / "lists.parquet", records, tag_lists=True)]
    assert [detect_format(p) for p in forms] == ["json", "parquet", "parquet"]
    for path in forms:
        res = read_posts([path], progress=False)
        pd.testing.assert_frame_equal(res.posts, reference.posts)
        assert res.rejects.empty


def test_utc_style_dates_keep_every_post_with_its_utc_year(sample, reference, tmp_path):
    records = danbooru_records(sample.jsonl, utc_dates=True)
    assert all(r["created_at"].endswith(" UTC") for r in records)
    res = read_posts([write_jsonl(tmp_path / "utc.jsonl", records)], progress=False)
    assert res.rejects.empty and len(res.posts) == len(reference.posts)
    # expected years computed independently: the original offset text, converted to UTC
    original = reference.posts.set_index("id")["created_at"]
    want = {pid: dt.datetime.fromisoformat(text).astimezone(dt.timezone.utc).year for pid, text in original.items()}
    got = dict(zip(res.posts["id"], res.posts["year"].astype(int)))
    assert got == want
    assert sum(want[p] != int(y) for p, y in reference.posts.set_index("id")["year"].items()) >= 1


def test_parquet_of_an_unknown_kind_is_refused_with_the_expected_columns(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"post": [1], "caption": ["x"]}), path)
    with pytest.raises(SourceError) as err:
        read_posts([path], progress=False)
    text = str(err.value)
    assert "columns: post, caption" in text
    for expected in ("tag_string_general", "post.parquet", "tag.parquet (id, name, type)",
                     "posttagrelation.parquet (post_id, tag_id)", "rating (0..3)"):
        assert expected in text


def test_incomplete_table_sets_are_refused(sample, tmp_path):
    folder = dump_tables(sample.db, tmp_path / "t")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "tag.parquet", lone / "tag.parquet")
    with pytest.raises(SourceError, match="no post.parquet beside it"):
        read_posts([lone / "tag.parquet"], progress=False)
    shutil.copy(folder / "post.parquet", lone / "posts-2023.parquet")
    (lone / "tag.parquet").unlink()
    with pytest.raises(SourceError, match="no tag.parquet beside it"):
        read_posts([lone / "posts-2023.parquet"], progress=False)
    with pytest.raises(SourceError, match=r"holds posts-2023\.parquet"):
        read_posts([lone], progress=False)  # a folder without post.parquet: no traceback


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["b", "a", "ab", "^_^", "é", "z_(x)", "A", "1girl", ""]),
                         max_size=8), max_size=12))
def test_tag_lists_are_sorted_by_name_without_repeats(lists):
    got = sorted_tag_lists(pa.array(lists, type=pa.list_(pa.string()))).to_pylist()
    assert got == [sorted(set(x)) for x in lists]  # Python's str order = UTF-8 byte order
    assert tag_array(lists, len(lists)).to_pylist() == got


def _post_table(ids, **over):
    from kxl_prep.sources.hakubooru_db import POST_FIELDS

    n = len(ids)
    cols = {"id": ids, "created_at": ["2015-06-01T12:00:00.000-04:00"] * n, "rating": [0] * n,
            "fav_count": [10] * n, "score": [8] * n, "image_width": [1000] * n, "image_height": [1500] * n,
            "file_ext": ["jpg"] * n, "file_size": [123] * n, "md5": ["abc"] * n, "file_url": ["u"] * n,
            "is_deleted": [0] * n, "is_banned": [0] * n}
    cols.update(over)
    assert set(cols) == set(POST_FIELDS)
    return pa.table(cols)


def test_hand_made_tables_duplicates_unknown_tags_orphans_and_types(tmp_path):
    tags = pa.table({"id": pa.array([1, 2, 4, 5], pa.int32()), "name": ["1girl", "smile", "long_hair", "some_artist"],
                     "type": pa.array([0, 0, 0, 1], pa.int8())})
    # ids out of order, int32 columns, booleans, created_at as a timestamp with a zone
    posts = _post_table(pa.array([5, 3, 1, 2], pa.int32()),
                        is_deleted=[False, True, False, False],
                        created_at=pa.array([dt.datetime(2010, 12, 31, 23, 30, tzinfo=dt.timezone.utc)] * 4,
                                            pa.timestamp("ms", tz="UTC")))
    relation = pa.table({"id": list(range(1, 9)), "post_id": pa.array([1, 1, 1, 2, 2, 3, 4, 5], pa.int32()),
                         "tag_id": [2, 2, 1, 1, 999, 4, 1, 5]})
    folder = tmp_path / "t"
    folder.mkdir()
    pq.write_table(posts, folder / "post.parquet")
    pq.write_table(tags, folder / "tag.parquet")
    pq.write_table(relation, folder / "posttagrelation.parquet")
    res = read_posts([folder], progress=False)
    p = res.posts
    assert p["id"].tolist() == [1, 3, 5]
    assert p["tags_general"].tolist() == [["1girl", "smile"], ["long_hair"], []]  # a tag twice counts once
    assert p["tags_artist"].tolist() == [[], [], ["some_artist"]]
    assert p["is_deleted"].tolist() == [False, True, False]
    assert p["year"].tolist() == [2010] * 3 and p["created_at"].iloc[0] == "2010-12-31T23:30:00.000+0000"
    assert res.rejects[["record", "field"]].values.tolist() == [["2", "tags"]]
    assert "unknown tag id 999" in res.rejects["reason"].iloc[0]
    assert res.stats["sources"][str(folder)]["tag_rows_of_unknown_posts"] == 1


def test_id_ranges_and_small_windows_on_parquet_tables(sample, tmp_path):
    from kxl_prep.sources.hakubooru_parquet import read_hakubooru_parquet
    from kxl_prep.sources.records import to_pandas

    folder = dump_tables(sample.db, tmp_path / "tables", shuffle_seed=6, row_group_size=50)
    ranges = [(0, 2_000_000), (5_000_000, 6_000_000)]
    want = read_posts([sample.db], progress=False, id_ranges=ranges)
    got = read_posts([folder], progress=False, id_ranges=ranges)
    pd.testing.assert_frame_equal(got.posts, want.posts)
    assert _reject_keys(got.rejects) == _reject_keys(want.rejects)
    assert got.posts["id"].between(0, 6_000_000).all() and len(got.posts) > 100
    big, _ = read_hakubooru_parquet(folder, progress=False)
    small, _ = read_hakubooru_parquet(folder, progress=False, chunk_posts=7)
    assert len(small) > 50
    pd.testing.assert_frame_equal(to_pandas(pa.concat_tables([p.posts for p in big])),
                                  to_pandas(pa.concat_tables([p.posts for p in small])))
