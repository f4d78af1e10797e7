"""The built-in synthetic sample: determinism, layout, schema, content, and its bench DB."""
from __future__ import annotations

import hashlib
import io
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kxl_prep.sources import read_posts
from kxl_testing.sample import RECENT_FROM_ID, UPDATES, make_bench_db, make_sample


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("sample"), n_posts=600, seed=5)


def test_same_seed_is_byte_identical(tmp_path):
    a = make_sample(tmp_path / "a", n_posts=300, seed=11)
    b = make_sample(tmp_path / "b", n_posts=300, seed=11)
    da, db = digest_tree(a.root), digest_tree(b.root)
    assert da == db
    assert len([k for k in da if k.endswith(".tar")]) > 1000
    c = make_sample(tmp_path / "c", n_posts=300, seed=12, images=False)
    assert digest_tree(c.root)["danbooru2023.db"] != da["danbooru2023.db"]


def test_schema_is_hakubooru_peewee_schema(sample, tmp_path):
    pytest.importorskip("hakubooru")
    from hakubooru.dataset import db as hdb
    from peewee import SqliteDatabase

    ref = tmp_path / "ref.db"
    database = SqliteDatabase(str(ref))
    models = [hdb.Post, hdb.Tag, hdb.PostTagRelation, hdb.LocalPost]
    for m in models:
        m._meta.database = database
    database.connect()
    database.create_tables(models)
    database.close()

    def ddl(path):
        con = sqlite3.connect(path)
        rows = sorted(r[0] for r in con.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
        con.close()
        return rows

    assert ddl(sample.db) == ddl(ref)


def test_shard_layout(sample):
    root = sample.shards
    originals = sorted(p.name for p in (root / "original").iterdir())
    assert originals == [f"data-{i:04d}.tar" for i in range(1000)]
    posts = read_posts([sample.db], progress=False).posts.set_index("id")
    seen = {}
    seen_tars: set[str] = set()
    for tar_path in sorted(root.rglob("*.tar")):
        rel = tar_path.relative_to(root)
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            assert names == sorted(names)
            for m in tar.getmembers():
                assert m.mtime == tar.getmembers()[0].mtime
                # nyanko7/danbooru2023: `<id>.<ext>` at the tar root; `./<id>.<ext>` in updates
                prefix, fname = ("./", m.name[2:]) if m.name.startswith("./") else ("", m.name)
                assert "/" not in fname
                assert prefix == ("./" if rel.parts[0] == "updates" else "")
                pid, ext = fname.split(".")
                pid = int(pid)
                if rel.parts[0] == "original":
                    assert rel.name == f"data-{pid % 1000:04d}.tar" and pid < UPDATES[0][1]
                elif rel.parts[0] == "recent":
                    assert rel.name == f"data-{1000 + pid % 1000:04d}.tar" and pid >= RECENT_FROM_ID
                else:
                    (folder, first), (_, nxt) = (UPDATES[0], UPDATES[1]) if rel.parts[1] == UPDATES[0][0] \
                        else (UPDATES[1], (None, RECENT_FROM_ID))
                    assert rel.parts[1] == folder and rel.name == f"dataset-{pid % 10}.tar"
                    assert first <= pid < nxt
                seen_tars.add(rel.as_posix())
                img = Image.open(io.BytesIO(tar.extractfile(m).read()))
                assert img.format.lower().replace("jpeg", "jpg") == ext
                assert 1 <= max(img.size) <= 96
                seen[pid] = (ext, img.size)
    assert len(seen) > 400
    assert any(r for r in root.glob("recent/*.tar"))
    for folder, _ in UPDATES:  # both update folders, posts in them
        assert any(t.startswith(f"updates/{folder}/dataset-") for t in seen_tars)
    for pid, (ext, (w, h)) in seen.items():
        if pid in posts.index:
            row = posts.loc[pid]
            assert row["file_ext"] == ext
            assert row["md5"] is not None and not pd.isna(row["md5"])  # restricted: no file
            assert abs(w / h - row["width"] / row["height"]) < 0.08 * max(1, row["width"] / row["height"])
    exts_in_db = set(posts["file_ext"])
    assert {"mp4", "zip"} & exts_in_db and not {"mp4", "zip", "webm", "swf"} & {e for e, _ in seen.values()}


def test_sample_content(sample):
    res = read_posts([sample.db], progress=False)
    p = res.posts
    ids = p["id"].to_numpy()
    for lo, hi in ((0, 2_000_000), (2_000_000, 5_000_000), (5_000_000, 10**9)):
        assert ((ids >= lo) & (ids < hi)).sum() > 50
    assert p["is_deleted"].any() and p["is_banned"].any() and p["md5"].isna().any()
    assert set(p["rating"]) == {"general", "sensitive", "questionable", "explicit"}
    assert {"jpg", "png", "webp", "gif"} <= set(p["file_ext"])
    assert p["year"].min() <= 2006 and p["year"].max() >= 2023
    assert p["created_at"].str.slice(-6).nunique() >= 3  # several UTC offsets
    general = {t for lst in p["tags_general"] for t in lst}
    assert {"1girl", "2girls", "multiple_girls", "1boy", "solo"} <= general
    assert {"^_^", "o_o"} & general
    meta = {t for lst in p["tags_meta"] for t in lst}
    assert {"commentary_request", "highres", "absurdres"} <= meta
    assert "banned_artist" in {t for lst in p["tags_artist"] for t in lst}
    assert p["tags_character"].map(len).gt(0).mean() > 0.5
    # fav counts are heavy tailed and differ per rating
    med = p.groupby("rating")["fav_count"].median()
    assert med["explicit"] > med["general"]
    assert p["fav_count"].max() > 20 * max(p["fav_count"].median(), 1)
    # the planted malformed rows are rejected with the expected fields
    got = dict(zip(res.rejects["record"].astype(int), res.rejects["field"]))
    assert got == sample.malformed


def test_sample_jsonl_matches_db(sample):
    db = read_posts([sample.db], progress=False).posts
    js = read_posts([sample.jsonl], progress=False)
    pd.testing.assert_frame_equal(js.posts, db)
    assert len(js.rejects) == 2


def test_text_storage_sample_reads_the_same(sample, tmp_path):
    text = make_sample(tmp_path / "t", n_posts=600, seed=5, tag_storage="text", images=False)
    a = read_posts([sample.db], progress=False)
    b = read_posts([text.db], progress=False)
    pd.testing.assert_frame_equal(a.posts, b.posts)
    assert set(b.rejects["record"].astype(int)) == set(text.malformed)


def test_bench_db_both_storages(tmp_path):
    rel = make_bench_db(tmp_path / "r.db", 3000, seed=1, chunk=1000, progress=False)
    txt = make_bench_db(tmp_path / "t.db", 3000, seed=1, chunk=1000, progress=False, tag_storage="text")
    a = read_posts([rel], progress=False)
    b = read_posts([txt], progress=False)
    pd.testing.assert_frame_equal(a.posts, b.posts)
    assert len(a.posts) == 3000 and a.rejects.empty
    n_tags = sum(a.posts[c].map(len) for c in ("tags_general", "tags_artist", "tags_character",
                                                  "tags_copyright", "tags_meta"))
    assert 25 <= n_tags.mean() <= 35
    con = sqlite3.connect(rel)  # popularity is the real post count of each tag
    pop = dict(con.execute('SELECT "id", "popularity" FROM "tag"'))
    counts = dict(con.execute('SELECT "tag_id", count(*) FROM "posttagrelation" GROUP BY "tag_id"'))
    con.close()
    assert all(pop[t] == c for t, c in counts.items())
    top = sorted(counts.values(), reverse=True)
    assert top[0] > 20 * np.median(top)  # Zipf-like: a few tags are everywhere
