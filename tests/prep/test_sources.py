"""Source readers: known answers on small hand-made inputs, rejects, rating schemes."""
from __future__ import annotations

import gzip
import json
import sqlite3

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kxl_prep.schema import POSTS_COLUMNS, REJECTS_SCHEMA, TAG_COLUMNS
from kxl_prep.sources import TAG_DTYPE, detect_format, empty_table, read_posts
from kxl_prep.sources.danbooru import detect_old_safe
from kxl_testing.sample import (INDEX_DDL, LOCALPOST_DDL, POST_COLUMNS_DDL, POST_FIELDS, RELATION_DDL,
                               TAG_DDL, encode_tag_list)

# tag id -> (name, HakuBooru type: 0 general, 1 artist, 2 character, 3 copyright, 4 meta)
TAGS = {
    1: ("1girl", 0), 2: ("smile", 0), 3: ("^_^", 0), 4: ("long_hair", 0),
    5: ("some_artist", 1), 6: ("hatsune_miku", 2), 7: ("vocaloid", 3), 8: ("highres", 4),
    9: ("commentary_request", 4), 10: ("abc_artist", 1),
}


def post_row(pid, created="2015-06-01T12:00:00.000-04:00", rating=0, w=1000, h=1500, ext="jpg",
             size=123456, fav=10, score=8, md5="d41d8cd98f00b204e9800998ecf8427e", deleted=0, banned=0):
    url = None if md5 is None else f"https://cdn.donmai.us/original/d4/1d/{md5}.{ext}"
    values = {
        "id": pid, "created_at": created, "uploader_id": 1, "source": "", "md5": md5,
        "parent_id": None, "has_children": 0, "is_deleted": deleted, "is_banned": banned,
        "pixiv_id": None, "has_active_children": 0, "bit_flags": 0, "has_large": 0,
        "has_visible_children": 0, "image_width": w, "image_height": h, "file_size": size,
        "file_ext": ext, "rating": rating, "score": score, "up_score": score, "down_score": 0,
        "fav_count": fav, "file_url": url, "large_file_url": url, "preview_file_url": url,
        "updated_at": created,
    }
    return tuple(values[f] for f in POST_FIELDS)


def make_db(path, posts, post_tags, storage="relation", tags=TAGS):
    """posts: rows from post_row; post_tags: {post id: [tag ids in any order]}."""
    con = sqlite3.connect(path)
    extra = ""
    if storage == "text":
        extra = ', "tag_list" TEXT'
    con.execute(f'CREATE TABLE "post" ({POST_COLUMNS_DDL}{extra})')
    con.execute(TAG_DDL)
    con.execute(RELATION_DDL)
    con.execute(LOCALPOST_DDL)
    for ddl in INDEX_DDL:
        con.execute(ddl)
    con.executemany('INSERT INTO "tag" VALUES (?,?,?,?)',
                    [(i, n, t, 1) for i, (n, t) in tags.items()])
    for row in posts:
        if storage == "text":
            row = row + (encode_tag_list(post_tags.get(row[0], [])),)
        con.execute(f'INSERT INTO "post" VALUES ({",".join("?" * len(row))})', row)
    if storage == "relation":
        for pid, tids in post_tags.items():
            con.executemany('INSERT INTO "posttagrelation" ("post_id", "tag_id") VALUES (?,?)',
                            [(pid, t) for t in tids])
    con.commit()
    con.close()
    return path


BASIC_POSTS = [post_row(10), post_row(20, rating=3, fav=99, md5=None, ext="png"),
               post_row(30, rating=1, created="2010-12-31T23:30:00-05:00", deleted=1, banned=1)]
BASIC_TAGS = {10: [9, 2, 6, 1, 5, 8, 7, 3, 10, 4], 20: [2, 1], 30: []}


def expected_basic():
    return {
        10: {"tags_general": ["1girl", "^_^", "long_hair", "smile"],
             "tags_artist": ["abc_artist", "some_artist"], "tags_character": ["hatsune_miku"],
             "tags_copyright": ["vocaloid"], "tags_meta": ["commentary_request", "highres"]},
        20: {"tags_general": ["1girl", "smile"], "tags_artist": [], "tags_character": [],
             "tags_copyright": [], "tags_meta": []},
        30: {c: [] for c in TAG_COLUMNS},
    }


@pytest.mark.parametrize("storage", ["relation", "text"])
def test_sqlite_known_answer(tmp_path, storage):
    db = make_db(tmp_path / "a.db", BASIC_POSTS, BASIC_TAGS, storage)
    res = read_posts([db], progress=False)
    posts = res.posts
    assert list(posts.columns) == list(POSTS_COLUMNS)
    assert (posts.dtypes == empty_table().dtypes).all()
    assert posts["id"].tolist() == [10, 20, 30]
    assert posts["rating"].tolist() == ["general", "explicit", "sensitive"]
    assert posts["year"].tolist() == [2015, 2015, 2010]
    assert posts["created_at"].tolist()[2] == "2010-12-31T23:30:00-05:00"
    assert posts["fav_count"].tolist() == [10, 99, 10]
    assert posts["width"].tolist() == [1000] * 3 and posts["height"].tolist() == [1500] * 3
    assert posts["file_ext"].tolist() == ["jpg", "png", "jpg"]
    assert posts["md5"].isna().tolist() == [False, True, False]  # restricted is kept
    assert posts["file_url"].isna().tolist() == [False, True, False]
    assert posts["is_deleted"].tolist() == [False, False, True]
    assert posts["is_banned"].tolist() == [False, False, True]
    for i, pid in enumerate(posts["id"]):
        for col, names in expected_basic()[pid].items():
            assert posts[col].iloc[i] == names, (pid, col)
    assert res.rejects.empty
    st = res.stats["sources"][str(db)]
    assert st["tag_storage"] == storage and st["records"] == 3 and st["accepted"] == 3


def test_sqlite_agrees_with_hakubooru_models(tmp_path):
    """Tag categories as hakubooru's own peewee models see them (read through peewee)."""
    pytest.importorskip("hakubooru")
    from hakubooru.dataset import db as hdb
    from peewee import SqliteDatabase

    path = make_db(tmp_path / "h.db", BASIC_POSTS, BASIC_TAGS)
    database = SqliteDatabase(str(path))
    for model in (hdb.Post, hdb.Tag, hdb.PostTagRelation, hdb.LocalPost):
        model._meta.database = database
    database.connect()
    try:
        got = read_posts([path], progress=False).posts.set_index("id")
        for post in hdb.Post.select():
            row = got.loc[post.id]
            assert row["rating"] == post.rating
            for cat in ("general", "artist", "character", "copyright", "meta"):
                names = sorted(t.name for t in getattr(post, f"tag_list_{cat}"))
                assert row[f"tags_{cat}"] == names
    finally:
        database.close()


def test_relation_duplicates_unknown_tags_and_orphans(tmp_path):
    posts = [post_row(1), post_row(2), post_row(3), post_row(5)]
    db = make_db(tmp_path / "d.db", posts, {1: [2, 2, 1], 2: [1, 999], 3: [4], 4: [1, 2]})
    res = read_posts([db], progress=False)
    assert res.posts["id"].tolist() == [1, 3, 5]
    assert res.posts["tags_general"].iloc[0] == ["1girl", "smile"]  # a tag twice counts once
    rej = res.rejects
    assert rej[["record", "field"]].values.tolist() == [["2", "tags"]]
    assert "unknown tag id 999" in rej["reason"].iloc[0]
    assert res.stats["sources"][str(db)]["tag_rows_of_unknown_posts"] == 1


def test_sqlite_malformed_rows_each_reason(tmp_path):
    posts = [post_row(1), post_row(2, rating=9), post_row(3, created="2015-13-01T00:00:00Z"),
             post_row(4, w=-5), post_row(5, h=-1), post_row(6, size="12kb"), post_row(7, fav=-2),
             post_row(8), post_row(9, created="2021-02-29T10:00:00+09:00"),
             post_row(10, md5=None)]
    db = make_db(tmp_path / "m.db", posts, {})
    con = sqlite3.connect(db)  # NOT NULL columns hold NULL only if someone wrote them so
    con.execute('UPDATE "post" SET "score" = \'n/a\' WHERE "id" = 8')
    con.commit()
    con.close()
    res = read_posts([db], progress=False)
    assert res.posts["id"].tolist() == [1, 10]
    got = {r.record: (r.field, r.reason) for r in res.rejects.itertuples()}
    assert got["2"] == ("rating", "unknown rating: 9")
    assert got["3"][0] == "created_at" and got["9"][0] == "created_at"
    assert got["4"] == ("image_width", "negative: -5")
    assert got["5"] == ("image_height", "negative: -1")
    assert got["6"] == ("file_size", "not an integer: '12kb'")
    assert got["7"] == ("fav_count", "negative: -2")
    assert got["8"][0] == "score"
    assert set(res.rejects["source"]) == {str(db)}
    assert list(res.rejects.columns) == list(REJECTS_SCHEMA.names)


def test_text_form_broken_list(tmp_path):
    db = make_db(tmp_path / "t.db", [post_row(1), post_row(2)], {1: [1], 2: [2]}, "text")
    con = sqlite3.connect(db)
    con.execute('UPDATE "post" SET "tag_list" = \'$1#$zz!\' WHERE "id" = 2')
    con.commit()
    con.close()
    res = read_posts([db], progress=False)
    assert res.posts["id"].tolist() == [1]
    assert res.rejects[["record", "field"]].values.tolist() == [["2", "tags"]]
    assert res.rejects["reason"].iloc[0].startswith("broken tag list")


def test_windows_and_id_ranges(tmp_path):
    rng = np.random.default_rng(3)
    ids = sorted(rng.choice(np.arange(1, 5000), 300, replace=False).tolist())
    posts = [post_row(i, fav=i % 17) for i in ids]
    ptags = {i: rng.choice(np.arange(1, 11), rng.integers(0, 8), replace=False).tolist() for i in ids}
    db = make_db(tmp_path / "w.db", posts, ptags)
    from kxl_prep.sources.hakubooru_db import read_hakubooru_db
    from kxl_prep.sources.records import to_pandas

    big, _ = read_hakubooru_db(db, progress=False)
    small, _ = read_hakubooru_db(db, progress=False, chunk_posts=7)
    assert len(small) > 10
    a = to_pandas(pa.concat_tables([p.posts for p in big]))
    b = to_pandas(pa.concat_tables([p.posts for p in small]))
    pd.testing.assert_frame_equal(a, b)
    ranges = [(0, 1000), (2500, 3000)]
    sub = read_posts([db], progress=False, id_ranges=ranges).posts
    want = a[((a.id >= 0) & (a.id < 1000)) | ((a.id >= 2500) & (a.id < 3000))].reset_index(drop=True)
    pd.testing.assert_frame_equal(sub, want)


# --- Danbooru records ---------------------------------------------------------------------------
def danbooru(pid, rating="g", created="2023-01-02T03:04:05.678-05:00", **kw):
    rec = {"id": pid, "created_at": created, "rating": rating, "fav_count": 3, "score": 2,
           "image_width": 800, "image_height": 600, "file_ext": "png", "file_size": 1000,
           "md5": "abc", "file_url": "https://x/abc.png", "is_deleted": False,
           "is_banned": False, "is_flagged": True, "is_pending": False,
           "tag_string_general": "smile 1girl", "tag_string_artist": "someone",
           "tag_string_character": "", "tag_string_copyright": "original",
           "tag_string_meta": "highres"}
    rec.update(kw)
    return rec


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


def test_jsonl_fields_and_year_offsets(tmp_path):
    recs = [
        danbooru(1, created="2010-12-31T23:30:00-05:00"),
        danbooru(2, created="2011-01-01T00:30:00+09:00", rating="explicit"),
        danbooru(3, created="2019-07-01T00:00:00Z", rating="q"),
        danbooru(4, created="2021-03-04T05:06:07.123456+05:30", rating="s"),
        danbooru(5, md5=None, file_url=None, file_ext=".JPG"),
    ]
    res = read_posts([write_jsonl(tmp_path / "a.jsonl", recs)], progress=False)
    p = res.posts
    assert p["year"].tolist() == [2010, 2011, 2019, 2021, 2023]
    assert p["rating"].tolist() == ["general", "explicit", "questionable", "sensitive", "general"]
    assert p["tags_general"].iloc[0] == ["1girl", "smile"]  # Danbooru order (by name), not as written
    assert p["tags_artist"].iloc[0] == ["someone"] and p["tags_character"].iloc[0] == []
    assert p["file_ext"].tolist()[-1] == "jpg"
    assert p["md5"].isna().tolist() == [False] * 4 + [True]
    assert res.rejects.empty
    assert (p.dtypes == empty_table().dtypes).all()


def test_jsonl_rejects_every_reason(tmp_path):
    recs = [
        danbooru(1),
        {k: v for k, v in danbooru(0).items() if k != "id"},
        danbooru(3, created="31/12/2010"),
        danbooru(4, rating="x"),
        danbooru(5, image_width=-1),
        danbooru(6, image_height=-1),
        danbooru(7, file_size=-1),
        danbooru(8, fav_count=-1),
        danbooru(9, tag_string_general=5),
        danbooru(10, image_width="1200px"),
        danbooru(11, score=2.5),
        danbooru(12, tag_string_meta=["ok", 3]),
        danbooru("13x"),
    ]
    path = write_jsonl(tmp_path / "r.jsonl", recs, ["{broken", "[1, 2]"])
    with open(path, "ab") as fh:
        fh.write(b'{"id": 77, "created_at": "\xff\xfe"}\n')
    res = read_posts([path], progress=False)
    assert res.posts["id"].tolist() == [1]
    got = {r.record: (r.field, r.reason) for r in res.rejects.itertuples()}
    assert got["line 2"] == ("id", "missing")
    assert got["3"][0] == "created_at" and "31/12/2010" in got["3"][1]
    assert got["4"] == ("rating", "unknown rating: 'x'")
    assert got["5"] == ("image_width", "negative: -1")
    assert got["6"] == ("image_height", "negative: -1")
    assert got["7"] == ("file_size", "negative: -1")
    assert got["8"] == ("fav_count", "negative: -1")
    assert got["9"][0] == "tags" and "broken tag list" in got["9"][1]
    assert got["10"] == ("image_width", "not an integer: '1200px'")
    assert got["11"] == ("score", "not an integer: 2.5")
    assert got["12"][0] == "tags"
    assert got["line 13"][0] == "id"
    assert got["line 14"][0] == "record" and got["line 14"][1].startswith("invalid JSON")
    assert got["line 15"][0] == "record"
    assert got["line 16"] == ("record", "not UTF-8 text")
    assert len(res.rejects) == len(recs) + 3 - 1  # every bad record once, none vanished
    st = res.stats["sources"][str(path)]
    assert (st["records"], st["accepted"], st["rejected"]) == (16, 1, 15)


def test_old_safe_detection_rule():
    assert detect_old_safe(["s", "q", "e"], ["2019-01-01T00:00:00-05:00"] * 3)[0] is True
    assert detect_old_safe(["s", "g"], ["2019-01-01"] * 2)[0] is False
    assert detect_old_safe(["s", "q"], ["2019-01-01", "2023-01-01"])[0] is False
    assert detect_old_safe(["q", "e"], ["2019-01-01"] * 2)[0] is False


def test_old_safe_mapping_in_stats(tmp_path):
    old = [danbooru(1, rating="s", created="2018-01-01T00:00:00-05:00"),
           danbooru(2, rating="e", created="2019-01-01T00:00:00-05:00")]
    new = [danbooru(3, rating="s"), danbooru(4, rating="g")]
    a, b = write_jsonl(tmp_path / "old.jsonl", old), write_jsonl(tmp_path / "new.jsonl", new)
    res = read_posts([a, b], progress=False)
    assert res.posts["rating"].tolist() == ["general", "explicit", "sensitive", "general"]
    assert res.stats["sources"][str(a)]["pre_2022_s_safe"] is True
    assert res.stats["sources"][str(b)]["pre_2022_s_safe"] is False
    forced = read_posts([a], progress=False, rating_scheme="current")
    assert forced.posts["rating"].tolist() == ["sensitive", "explicit"]
    safe_word = read_posts([write_jsonl(tmp_path / "w.jsonl", [danbooru(5, rating="safe")])],
                           progress=False)
    assert safe_word.posts["rating"].tolist() == ["general"]


def test_json_array_gzip_and_parquet_match_jsonl(tmp_path):
    recs = [danbooru(i, rating="gsqe"[i % 4], fav_count=i) for i in range(1, 30)]
    ref = read_posts([write_jsonl(tmp_path / "a.jsonl", recs)], progress=False).posts
    arr = tmp_path / "page.json"
    arr.write_text(json.dumps(recs))
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in recs))
    pqt = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(recs), pqt)
    listy = tmp_path / "d.parquet"  # a parquet export holding tag lists instead of strings
    pq.write_table(pa.Table.from_pylist(
        [{**r, "tag_string_general": r["tag_string_general"].split()} for r in recs]), listy)
    for path, fmt in ((arr, "json"), (gz, "json"), (pqt, "parquet"), (listy, "parquet")):
        assert detect_format(path) == fmt
        pd.testing.assert_frame_equal(read_posts([path], progress=False).posts, ref)


def test_duplicates_across_sources_keep_first(tmp_path):
    db = make_db(tmp_path / "a.db", BASIC_POSTS, BASIC_TAGS)
    js = write_jsonl(tmp_path / "b.jsonl", [danbooru(20, fav_count=1), danbooru(40), danbooru(40)])
    res = read_posts([db, js], progress=False)
    assert res.posts["id"].tolist() == [10, 20, 30, 40]
    assert res.posts.set_index("id").loc[20, "fav_count"] == 99  # the DB's, read first
    dups = res.rejects[res.rejects.field == "id"]
    assert dups["record"].tolist() == ["20", "40"]
    assert dups["source"].tolist() == [str(js)] * 2
    assert str(db) in dups["reason"].iloc[0] and str(js) in dups["reason"].iloc[1]
    assert res.stats["duplicates"] == 2


def test_format_detection_by_content(tmp_path):
    db = make_db(tmp_path / "x.bin", BASIC_POSTS, BASIC_TAGS)
    assert detect_format(db) == "sqlite"
    js = write_jsonl(tmp_path / "y.dat", [danbooru(1)])
    assert detect_format(js) == "json"
    (tmp_path / "z.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown format"):
        detect_format(tmp_path / "z.txt")


def test_no_sources_gives_empty_table():
    res = read_posts([], progress=False)
    assert res.posts.empty and list(res.posts.columns) == list(POSTS_COLUMNS)
    assert res.posts["tags_general"].dtype == TAG_DTYPE


def test_id_ranges_filter_json_after_reading(tmp_path):
    recs = [danbooru(i) for i in (5, 1500, 2500, 9000)] + [danbooru(7, rating="x")]
    res = read_posts([write_jsonl(tmp_path / "a.jsonl", recs)], progress=False,
                     id_ranges=[(0, 2000), (8000, 10000)])
    assert res.posts["id"].tolist() == [5, 1500, 9000]
    assert res.rejects["record"].tolist() == ["7"]  # malformed records are still reported


def test_chunked_json_resolves_s_over_the_whole_file(tmp_path, monkeypatch):
    from kxl_prep.sources import danbooru as dmod

    monkeypatch.setattr(dmod, "CHUNK_RECORDS", 3)
    recs = [danbooru(i, rating="s", created="2019-01-01T00:00:00Z") for i in range(1, 8)]
    recs.append(danbooru(8, rating="g", created="2019-01-01T00:00:00Z"))  # in the last chunk
    recs.append(danbooru(9, rating=["g"]))
    res = read_posts([write_jsonl(tmp_path / "a.jsonl", recs)], progress=False)
    # one g anywhere in the file makes every s sensitive, also in the chunks read before it
    assert res.posts["rating"].tolist() == ["sensitive"] * 7 + ["general"]
    assert res.rejects[["record", "field"]].values.tolist() == [["9", "rating"]]
    old = read_posts([write_jsonl(tmp_path / "b.jsonl", recs[:7])], progress=False)
    assert old.posts["rating"].tolist() == ["general"] * 7
    assert old.stats["sources"][str(tmp_path / "b.jsonl")]["records"] == 7


def test_source_fields_are_the_raw_fields():
    """One spelling of the post fields: RawPosts holds SOURCE_FIELDS, in its order, the
    reject precedence covers them (and tags), and the SQLite SELECT reads their source names."""
    from dataclasses import fields

    from kxl_prep.sources.hakubooru_db import POST_FIELDS as DB_FIELDS
    from kxl_prep.sources.records import FIELD_ORDER, SOURCE_FIELDS, RawPosts

    names = [f.name for f in fields(RawPosts)]
    assert names[1:1 + len(SOURCE_FIELDS)] == list(SOURCE_FIELDS)
    assert sorted(FIELD_ORDER) == sorted([*SOURCE_FIELDS, "tags"])
    assert DB_FIELDS == ("id", "created_at", "rating", "fav_count", "score", "image_width", "image_height",
                         "file_ext", "file_size", "md5", "file_url", "is_deleted", "is_banned")
