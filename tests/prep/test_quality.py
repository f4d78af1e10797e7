"""Quality thresholds per rating and the strict 'greater than' levels."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.quality import compute_thresholds, load_thresholds, parse_thresholds, quality_levels
from kxl_prep.recipe import QualitySpec, RecipeError
from kxl_prep.schema import RATINGS

SPEC = QualitySpec()


def test_thresholds_are_linear_percentiles_within_each_rating():
    rng = np.random.default_rng(1)
    fav = rng.poisson(30, 5000).astype(float)
    codes = rng.integers(0, 4, 5000)
    got = compute_thresholds(fav, codes, SPEC)
    # pandas' quantile (linear interpolation) computed per group, independently
    frame = pd.DataFrame({"fav": fav, "rating": np.array(RATINGS)[codes]})
    for rating in RATINGS:
        want = frame.loc[frame.rating == rating, "fav"].quantile([p / 100 for p in SPEC.percentiles]).tolist()
        assert got[rating] == pytest.approx(want)


def test_empty_rating_has_no_thresholds():
    got = compute_thresholds(np.array([1.0, 2.0]), np.array([0, 0]), SPEC)
    assert got["explicit"] is None and got["general"] is not None


def test_levels_use_strictly_greater():
    table = {r: [90, 75, 60, 45, 30, 10] for r in RATINGS}
    fav = np.array([91, 90, 76, 75, 61, 46, 31, 11, 10, 0])
    levels = quality_levels(fav, np.zeros(len(fav), int), table, SPEC)
    assert [SPEC.labels[i] for i in levels] == [
        "masterpiece", "best quality", "best quality", "great quality", "great quality",
        "good quality", "normal quality", "low quality", "worst quality", "worst quality",
    ]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 500), st.integers(0, 3)), min_size=1, max_size=60),
)
def test_levels_match_a_plain_loop(rows):
    fav = np.array([r[0] for r in rows], dtype=float)
    codes = np.array([r[1] for r in rows])
    table = compute_thresholds(fav, codes, SPEC)
    levels = quality_levels(fav, codes, table, SPEC)
    for value, code, level in zip(fav, codes, levels):
        t = table[RATINGS[code]]
        want = next((i for i, th in enumerate(t) if value > th), len(t))
        assert level == want


def test_missing_thresholds_for_a_present_rating_is_an_error():
    with pytest.raises(RecipeError, match="explicit"):
        quality_levels(np.array([1.0]), np.array([3]), {"general": [1] * 6, "explicit": None}, SPEC)


def test_thresholds_from_files(tmp_path):
    lists = {"general": [27, 16, 10, 7, 4, 1], "explicit": [190, 106, 69, 45, 27, 9]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(lists))
    assert load_thresholds(p, SPEC)["general"] == [27.0, 16.0, 10.0, 7.0, 4.0, 1.0]
    # HakuBooru's {percentile: value} layout
    haku = {"general": {"90": 27, "75": 16, "60": 10, "45": 7, "30": 4, "10": 1, "95": 37}}
    p.write_text(json.dumps(haku))
    assert load_thresholds(p, SPEC)["general"] == [27.0, 16.0, 10.0, 7.0, 4.0, 1.0]
    # an earlier run's manifest
    p.write_text(json.dumps({"quality": {"percentiles": [90, 75, 60, 45, 30, 10], "thresholds": lists}}))
    assert load_thresholds(p, SPEC)["explicit"][0] == 190.0
    t = tmp_path / "t.toml"
    t.write_text("general = [27, 16, 10, 7, 4, 1]\n")
    assert load_thresholds(t, SPEC)["general"][-1] == 1.0


@pytest.mark.parametrize(
    "data,match",
    [
        ({"safe": [1] * 6}, "unknown rating"),
        ({"general": [1, 2]}, "expected 6 thresholds"),
        ({"general": {"90": 1}}, "no threshold for percentile"),
        ({"general": ["a"] * 6}, "numbers"),
    ],
)
def test_bad_thresholds_are_named(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_thresholds(data, SPEC)


def test_manifest_with_other_percentiles_is_refused(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"quality": {"percentiles": [95, 85, 75, 50, 25, 10], "thresholds": {}}}))
    with pytest.raises(RecipeError, match="percentiles"):
        load_thresholds(p, SPEC)
