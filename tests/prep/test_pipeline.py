"""prepare(): end to end on hand-built post tables (POSTS_SCHEMA), determinism, counts,
bad input, and the finished directory read by sd-scripts' own dataset classes (gated)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kxl_prep.pipeline import PrepError, prepare
from kxl_prep.recipe import DataRecipe, FilterSpec, load_recipe
from kxl_prep.schema import POSTS_SCHEMA, RATINGS

DETERMINISTIC = ["meta.json", "buckets.json", "selection.parquet", "rejects.csv", "bucket_histogram.csv"]
SMALL = {
    "method": "quota",
    "ranges": [
        {"id_min": 0, "id_max": 2000, "count": 300},
        {"id_min": 2000, "id_max": 5000, "count": 500},
        {"id_min": 5000},
    ],
}


def make_posts(n: int = 1500, seed: int = 0, arrow_lists: bool = False) -> pd.DataFrame:
    """A post table shaped like the sources' output, with every filter case represented."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(7600, n, replace=False)).astype(np.int64)
    years = 2005 + ids * 19 // 7600
    vocab = [f"tag_{i}" for i in range(60)] + ["1girl", "2girls", "1boy", "^_^", "long_hair"]
    meta_vocab = ["highres", "absurdres", "commentary_request", "bad_id", "translated"]

    def lists(pool, mean):
        return [[str(t) for t in rng.choice(pool, min(len(pool), rng.poisson(mean)), replace=False)] for _ in range(n)]

    data = {
        "id": ids,
        "created_at": [f"{y}-03-01T10:00:00.000-05:00" for y in years],
        "year": years.astype(np.int16),
        "rating": np.array(RATINGS)[rng.integers(0, 4, n)],
        "fav_count": rng.poisson(25, n).astype(np.int64),
        "score": rng.poisson(10, n).astype(np.int64),
        "width": rng.integers(100, 5000, n).astype(np.int32),
        "height": rng.integers(100, 5000, n).astype(np.int32),
        "file_ext": rng.choice(["jpg", "png", "webp", "jpeg", "gif", "mp4", "zip"], n, p=[.6, .2, .05, .05, .05, .03, .02]),
        "file_size": rng.integers(1000, 10**7, n),
        "md5": np.where(rng.random(n) < 0.03, None, "0123456789abcdef" * 2).astype(object),
        "file_url": ["https://cdn.example/x"] * n,
        "is_deleted": rng.random(n) < 0.05,
        "is_banned": rng.random(n) < 0.01,
        "tags_general": lists(vocab, 8),
        "tags_artist": lists([f"artist_{i}" for i in range(10)] + ["banned_artist"], 1),
        "tags_character": lists([f"char_{i}" for i in range(10)], 1),
        "tags_copyright": lists([f"series_{i}" for i in range(5)], 1),
        "tags_meta": lists(meta_vocab, 2),
    }
    table = pa.Table.from_pydict(data, schema=POSTS_SCHEMA)
    if arrow_lists:
        return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)
    return table.to_pandas()


def recipe(**kw) -> DataRecipe:
    return load_recipe().replace(selection=SMALL, **kw)


def test_end_to_end_counts(tmp_path):
    posts = make_posts()
    m = prepare(posts, tmp_path, recipe=recipe(), progress=False)
    c = m["counts"]
    ids = posts["id"].to_numpy()
    assert [g["available"] for g in c["per_range"]] == [
        int((ids < 2000).sum()), int(((ids >= 2000) & (ids < 5000)).sum()), int((ids >= 5000).sum())
    ]
    assert [g["selected"] for g in c["per_range"]] == [300, 500, int((ids >= 5000).sum())]
    removed = sum(f["removed"] for f in c["filters"].values())
    assert c["images"] == c["selected"] - removed == sum(g["kept"] for g in c["per_range"])
    assert sum(c["rating"].values()) == sum(c["quality"].values()) == sum(c["year"].values()) == c["images"]

    sel = pq.read_table(tmp_path / "selection.parquet").to_pandas()
    meta = json.loads((tmp_path / "meta.json").read_text())
    buckets = json.loads((tmp_path / "buckets.json").read_text())
    assert len(sel) == len(meta) == len(buckets) == c["images"]
    assert list(meta) == sel["image_key"].tolist() == [f"{i}.{e}" for i, e in zip(sel["id"], sel["file_ext"])]
    assert sel["id"].is_monotonic_increasing
    by_id = posts.set_index("id")
    kept = by_id.loc[sel["id"]]
    # every kept post passes every filter, and is where a quota put it
    assert not kept["is_deleted"].any() and not kept["is_banned"].any()
    assert kept["md5"].notna().all() and kept["file_ext"].isin(["jpg", "jpeg", "png", "webp"]).all()
    for key, row in zip(sel["image_key"], sel.itertuples()):
        assert meta[key]["image_size"] == [row.width, row.height]
        assert meta[key]["caption"] == row.caption
        assert buckets[key] == [row.bucket_w, row.bucket_h]
    # thresholds are the percentiles of the kept posts' fav_count per rating
    for r in RATINGS:
        vals = kept.loc[kept["rating"] == r, "fav_count"].to_numpy()
        assert m["quality"]["thresholds"][r] == pytest.approx(np.percentile(vals, [90, 75, 60, 45, 30, 10]).tolist())
    assert set(m["outputs"]) >= set(DETERMINISTIC) | {"dataset.toml", "report.md", "bucket_histogram.png"}


def test_byte_identical_reruns_and_row_order(tmp_path):
    posts = make_posts(seed=1)
    prepare(posts, tmp_path / "a", recipe=recipe(), seed=5, progress=False)
    shuffled = posts.sample(frac=1.0, random_state=3).reset_index(drop=True)
    prepare(make_posts(seed=1, arrow_lists=True).iloc[::-1], tmp_path / "b", recipe=recipe(), seed=5, progress=False)
    prepare(shuffled, tmp_path / "c", recipe=recipe(), seed=5, progress=False)
    for name in DETERMINISTIC:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    prepare(posts, tmp_path / "d", recipe=recipe(), seed=6, progress=False)
    assert (tmp_path / "a" / "meta.json").read_bytes() != (tmp_path / "d" / "meta.json").read_bytes()


def test_fill_after_filter_fills_quotas(tmp_path):
    posts = make_posts(3000, seed=2)
    m = prepare(posts, tmp_path, recipe=recipe(), fill_after_filter=True, progress=False)
    assert m["options"]["filters_apply"] == "before-sampling"
    per = m["counts"]["per_range"]
    assert [g["kept"] for g in per[:2]] == [300, 500]
    # the filters were counted over every post
    assert m["counts"]["filters"]["deleted"]["matched"] == int(posts["is_deleted"].sum())


def test_pinned_thresholds_reproduce_a_run(tmp_path):
    posts = make_posts(seed=4)
    prepare(posts, tmp_path / "a", recipe=recipe(), progress=False)
    m = prepare(posts, tmp_path / "b", recipe=recipe(), thresholds=tmp_path / "a" / "manifest.json", progress=False)
    assert m["quality"]["pinned_from"].endswith("manifest.json")
    assert (tmp_path / "a" / "meta.json").read_bytes() == (tmp_path / "b" / "meta.json").read_bytes()
    flat = {r: [0, 0, 0, 0, 0, 0] for r in RATINGS}
    m = prepare(posts, tmp_path / "c", recipe=recipe(), thresholds=flat, progress=False)
    zero = int((pq.read_table(tmp_path / "c" / "selection.parquet").column("id").to_numpy() >= 0).sum())
    assert m["counts"]["quality"]["masterpiece"] + m["counts"]["quality"]["worst quality"] == zero


def test_rejects_from_sources_are_written_and_counted(tmp_path):
    class Result:
        posts = make_posts(200)
        rejects = pd.DataFrame({"source": ["x.db"] * 2, "record": ["7", "line 3"], "field": ["rating", "id"],
                                "reason": ["unknown rating: 9", "missing"]})
        stats = {"posts": 200}

    m = prepare(Result(), tmp_path, recipe=recipe(), progress=False)
    assert m["counts"]["rejects"] == 2
    assert pd.read_csv(tmp_path / "rejects.csv", dtype=str)["record"].tolist() == ["7", "line 3"]
    assert m["source_stats"] == {"posts": 200}


@pytest.mark.parametrize(
    "column,value,match",
    [
        ("rating", "safe", r"record \d+ \(rating='safe'\).*field 'rating'"),
        ("width", 0, r"record \d+.*field 'width'.*positive"),
        ("fav_count", None, r"field 'fav_count'"),
    ],
)
def test_bad_fields_name_record_and_field(tmp_path, column, value, match):
    posts = make_posts(300, seed=5)
    ok = (~posts["is_deleted"] & ~posts["is_banned"] & posts["md5"].notna() & posts["file_ext"].isin(["jpg", "png"]))
    row = int(np.flatnonzero(ok.to_numpy() & (posts["id"].to_numpy() >= 5000))[0])
    posts[column] = posts[column].astype(object)
    posts.at[row, column] = value
    with pytest.raises(PrepError, match=match):
        prepare(posts, tmp_path, recipe=recipe(), progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_duplicate_ids_are_refused(tmp_path):
    posts = make_posts(100)
    posts = pd.concat([posts, posts.iloc[[3]]], ignore_index=True)
    with pytest.raises(PrepError, match=f"record {posts['id'].iloc[3]}.*duplicate|record {posts['id'].iloc[3]}.*more than one"):
        prepare(posts, tmp_path, recipe=recipe(), progress=False)


def test_interrupted_rerun_leaves_no_manifest(tmp_path, monkeypatch):
    posts = make_posts(200)
    prepare(posts, tmp_path, recipe=recipe(), count_scale=0.1, progress=False)
    old_meta = (tmp_path / "meta.json").read_bytes()
    from kxl_prep import outputs

    def boom(*a, **k):
        raise OSError("disk full")

    # fails while the captions stream: the big files keep their old content
    with monkeypatch.context() as patch:
        patch.setattr(outputs.DatasetWriter, "write", boom)
        with pytest.raises(OSError):
            prepare(posts, tmp_path, recipe=recipe(), count_scale=0.1, seed=9, progress=False)
    assert not (tmp_path / "manifest.json").exists()  # the directory says it is incomplete
    assert (tmp_path / "meta.json").read_bytes() == old_meta
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # fails after them: they are replaced whole, and still no manifest
    with monkeypatch.context() as patch:
        patch.setattr(outputs, "write_rejects", boom)
        with pytest.raises(OSError):
            prepare(posts, tmp_path, recipe=recipe(), count_scale=0.1, seed=9, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert (tmp_path / "meta.json").read_bytes() != old_meta
    json.loads((tmp_path / "meta.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_manifest_checksums_match_files(tmp_path):
    import hashlib

    m = prepare(make_posts(300), tmp_path, recipe=recipe(), progress=False)
    for name, info in m["outputs"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == info["sha256"]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["counts"] == m["counts"] and on_disk["seed"] == 0
    assert on_disk["recipe"]["name"] == "epsilon-rev1" and on_disk["recipe"]["sha256"]


def test_filters_can_be_switched_off(tmp_path):
    posts = make_posts(400)
    r = recipe(filters=FilterSpec(deleted=False, banned=False, restricted=False,
                                  allowed_ext=("jpg", "jpeg", "png", "webp", "gif", "mp4", "zip")))
    m = prepare(posts, tmp_path, recipe=r, progress=False)
    assert m["counts"]["images"] == m["counts"]["selected"]


# ---- the finished directory, read by sd-scripts ---------------------------------------------


@pytest.mark.sdscripts
def test_sd_scripts_builds_the_same_dataset(sd_scripts_library, tmp_path):
    """sd-scripts' own FineTuningDataset from our dataset.toml: same images, captions and
    buckets as we wrote (image sizes come from meta.json, so no image is read)."""
    import sdxl_train_network
    from library import config_util, strategy_base, strategy_sd

    prepare(make_posts(800, seed=7), tmp_path, recipe=recipe(), progress=False)
    toml_path = str(tmp_path / "dataset.toml")
    args = sdxl_train_network.setup_parser().parse_args(["--dataset_config", toml_path])
    strategy_base.LatentsCachingStrategy.set_strategy(strategy_sd.SdSdxlLatentsCachingStrategy(False, False, 1, False))
    generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True))
    blueprint = generator.generate(config_util.load_user_config(toml_path), args)
    train_group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    dataset = train_group.datasets[0]
    meta = json.loads((tmp_path / "meta.json").read_text())
    buckets = json.loads((tmp_path / "buckets.json").read_text())
    assert set(dataset.image_data) == set(meta)
    for key, info in dataset.image_data.items():
        assert info.caption == meta[key]["caption"]
        assert list(info.bucket_reso) == buckets[key], key


def test_bad_extension_is_named(tmp_path):
    posts = make_posts(300, seed=5)
    posts["file_ext"] = posts["file_ext"].astype(object)
    posts.loc[posts["file_ext"] == "jpg", "file_ext"] = "JPG"
    r = recipe(filters=FilterSpec(allowed_ext=("jpg", "jpeg", "png", "webp", "JPG")))
    with pytest.raises(PrepError, match=r"record \d+ \(file_ext='JPG'\).*field 'file_ext'.*lower-case"):
        prepare(posts, tmp_path, recipe=r, progress=False)


def test_an_empty_selection_is_an_error_and_writes_nothing(tmp_path):
    # (an empty dataset used to be written as a valid, empty directory; a run that produces
    # nothing is now an error raised before anything is written)
    with pytest.raises(PrepError, match="the dataset would be empty") as err:
        prepare(make_posts(100), tmp_path / "out", recipe=recipe(filters=FilterSpec(allowed_ext=("bmp",))),
                progress=False)
    assert "100 posts read" in str(err.value) and "filter not_still_image removed" in str(err.value)
    assert not (tmp_path / "out").exists()
