"""Selection: seeded quotas without replacement, the selector registry, the filters."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.recipe import FilterSpec, RecipeError
from kxl_prep.select import (
    SELECTORS,
    SelectContext,
    Selection,
    apply_filters,
    register_selector,
    sample_positions,
    select,
)


def frame(ids, **cols):
    n = len(ids)
    base = {
        "id": np.asarray(ids, dtype=np.int64),
        "is_deleted": np.zeros(n, bool),
        "is_banned": np.zeros(n, bool),
        "md5": ["d41d8cd98f00b204e9800998ecf8427e"] * n,
        "file_url": ["https://example/x"] * n,
        "file_ext": ["jpg"] * n,
    }
    base.update(cols)
    return pd.DataFrame(base)


QUOTA = {
    "method": "quota",
    "ranges": [
        {"id_min": 0, "id_max": 100, "count": 10},
        {"id_min": 100, "id_max": 300, "count": 50},
        {"id_min": 300},
    ],
}


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 400), k=st.integers(0, 450), seed=st.integers(0, 2**63), stream=st.integers(0, 50))
def test_sample_positions_without_replacement(n, k, seed, stream):
    got = sample_positions(n, k, seed, stream)
    assert len(got) == min(n, k)
    assert len(np.unique(got)) == len(got)
    assert np.all(np.diff(got) > 0)
    assert got.min(initial=0) >= 0 and got.max(initial=-1) < n
    assert np.array_equal(got, sample_positions(n, k, seed, stream))


def test_sampling_is_uniform():
    counts = np.zeros(20)
    for seed in range(4000):
        counts[sample_positions(20, 5, seed, 0)] += 1
    expected = 4000 * 5 / 20
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 19 d.o.f.: p ~ 0.001


def test_streams_and_seeds_differ():
    a = sample_positions(1000, 100, 0, 0)
    assert not np.array_equal(a, sample_positions(1000, 100, 0, 1))
    assert not np.array_equal(a, sample_positions(1000, 100, 1, 0))


def test_quota_counts_and_ranges():
    ids = np.arange(0, 500, 1)
    sel = select(frame(ids), QUOTA, SelectContext(seed=3))
    chosen = ids[sel.positions]
    assert np.all(np.diff(chosen) > 0)
    assert ((chosen < 100).sum(), ((chosen >= 100) & (chosen < 300)).sum(), (chosen >= 300).sum()) == (10, 50, 200)
    assert [g["selected"] for g in sel.groups] == [10, 50, 200]
    assert [g["available"] for g in sel.groups] == [100, 200, 200]
    assert sel.groups[2]["requested"] is None
    assert np.array_equal(sel.group, np.where(chosen < 100, 0, np.where(chosen < 300, 1, 2)))


def test_quota_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    ids = rng.choice(1000, 600, replace=False)
    a = ids[select(frame(ids), QUOTA, SelectContext(seed=7)).positions]
    shuffled = rng.permutation(ids)
    b = shuffled[select(frame(shuffled), QUOTA, SelectContext(seed=7)).positions]
    assert np.array_equal(a, b)
    c = ids[select(frame(ids), QUOTA, SelectContext(seed=8)).positions]
    assert not np.array_equal(a, c)


def test_short_ranges_are_reported_and_counts_scale():
    sel = select(frame(np.arange(0, 50)), QUOTA, SelectContext(seed=0))
    assert sel.groups[0]["short"] == 0 and sel.groups[1] == {**sel.groups[1], "available": 0, "short": 50}
    sel = select(frame(np.arange(0, 100)), QUOTA, SelectContext(seed=0, count_scale=0.5))
    assert sel.groups[0]["requested"] == 5 and sel.groups[0]["selected"] == 5


@pytest.mark.parametrize(
    "ranges,match",
    [
        ([{"id_min": 0, "id_max": 10}, {"id_min": 5}], "overlap"),
        ([{"id_min": 10, "id_max": 5}], "greater than"),
        ([{"id_min": 0, "count": -1}], "non-negative"),
        ([{"id_min": 0, "cnt": 1}], "unknown key"),
        ([], "non-empty"),
    ],
)
def test_bad_quota_recipes(ranges, match):
    with pytest.raises(RecipeError, match=match):
        select(frame([1]), {"method": "quota", "ranges": ranges}, SelectContext(seed=0))


def test_unknown_selector_and_plugin_registry():
    with pytest.raises(RecipeError, match="unknown selector"):
        select(frame([1]), {"method": "nope"}, SelectContext(seed=0))

    @register_selector("even-ids")
    def even(posts, params, ctx):
        pos = np.flatnonzero(posts["id"].to_numpy() % 2 == 0)
        return Selection(pos, np.zeros(len(pos), np.int32), [{"range": "even", "selected": len(pos)}])

    try:
        sel = select(frame([1, 2, 3, 4]), {"method": "even-ids"}, SelectContext(seed=0))
        assert sel.positions.tolist() == [1, 3]
    finally:
        SELECTORS.pop("even-ids")


def test_filters_count_matched_and_removed():
    df = frame(
        [1, 2, 3, 4, 5, 6, 7],
        is_deleted=[True, True, False, False, False, False, False],
        is_banned=[True, False, True, False, False, False, False],
        md5=["m", "m", "m", None, "m", "m", "m"],
        file_url=["u", "u", "u", "u", None, "u", "u"],
        file_ext=["jpg", "gif", "png", "jpg", "webp", "mp4", None],
    )
    keep, counts = apply_filters(df, FilterSpec())
    assert keep.tolist() == [False, False, False, False, False, False, False]
    assert counts == {
        "deleted": {"matched": 2, "removed": 2},
        "banned": {"matched": 2, "removed": 1},
        "restricted": {"matched": 2, "removed": 2},
        "not_still_image": {"matched": 3, "removed": 2},
    }
    keep, counts = apply_filters(df, FilterSpec(deleted=False, banned=False, allowed_ext=("jpg", "gif")))
    assert keep.tolist() == [True, True, False, False, False, False, False]
    assert "deleted" not in counts


def test_recipe_refuses_a_literal_separator_in_captions():
    from kxl_prep.recipe import DatasetSpec, load_recipe, validate

    recipe = load_recipe().replace(dataset=DatasetSpec(shuffle_caption=False, caption_tag_dropout_rate=0.0))
    with pytest.raises(RecipeError, match=re.escape("leaves '|||' in the caption")):
        validate(recipe)


def test_shipped_rev1_recipe():
    from kxl_prep.recipe import load_recipe

    r = load_recipe("epsilon-rev1")
    assert r.selection == {"method": "quota", "ranges": [
        {"id_min": 0, "id_max": 2_000_000, "count": 1_000_000},
        {"id_min": 2_000_000, "id_max": 5_000_000, "count": 2_000_000},
        {"id_min": 5_000_000},
    ]}
    assert r.filters.apply == "after-sampling" and r.filters.allowed_ext == ("jpg", "jpeg", "png", "webp")
    assert (r.buckets.resolution, r.buckets.min_reso, r.buckets.max_reso, r.buckets.step) == ((1024, 1024), 256, 4096, 64)
    assert r.quality.percentiles == (90, 75, 60, 45, 30, 10)
    assert r.dataset.caption_tag_dropout_rate == 0.15


@pytest.mark.parametrize(
    "text,match",
    [
        ('name = "x"\n[filters]\ndeleted = "yes"\n', "filters.deleted: expected true or false"),
        ('name = "x"\n[buckets]\nstep = 48\n', "multiple of 32"),
        ('name = "x"\n[captions.year]\nedges = [2010]\n', "one more label than edges"),
        ('name = "x"\n[quality]\npercentiles = [90, 50]\n', "one more label than percentiles"),
        ('name = "x"\n[filters]\napply = "sometimes"\n', "filters.apply"),
        ('name = "x"\nbogus = 1\n', "unknown key"),
        ('name = "x"\n[selection]\nranges = []\n', "method"),
        ("name = [\n", "not valid TOML"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text, match):
    from kxl_prep.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
