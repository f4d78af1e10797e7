"""The dry-run report of a tag selection: counts per rule, overlaps, final per rating/year."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kxl_prep.tags.report import build_tag_report, format_tag_report, plot_tag_report
from kxl_prep.tags.select import select_by_tags

from test_tag_select import make_posts, spec

POSTS = make_posts(
    [
        {"id": 1, "artist": ["alpha"], "general": ["figure", "photo_(medium)"], "rating": "general", "year": 2019},
        {"id": 2, "artist": ["alpha"], "copyright": ["s1"], "rating": "explicit", "year": 2021},
        {"id": 3, "copyright": ["s1"], "rating": "sensitive", "year": 2021},
        {"id": 4, "copyright": ["s1"], "general": ["comic"], "rating": "general", "year": 2022},
        {"id": 5, "general": ["figure", "photo_(medium)"], "rating": "questionable", "year": 2022},
        {"id": 6, "artist": ["beta"], "general": ["figure"], "rating": "general", "year": 2010},
    ]
)
RULES = [
    {"name": "artists", "artists": ["alpha"]},
    {"name": "series", "copyrights": ["s1"]},
    {"name": "figures", "all_of": ["figure", "photo_(medium)"]},
]


def test_report_counts_per_rule_overlaps_and_final_breakdowns():
    result = select_by_tags(POSTS, spec(RULES, exclude={"tags": ["comic"]}), progress=False)
    assert result.ids.tolist() == [1, 2, 3, 5]
    # the filters after the selection drop post 3 (row 2)
    kept = np.array([0, 1, 4])
    report = build_tag_report(POSTS, result, kept_rows=kept)
    by = {r["name"]: r for r in report["rules"]}
    assert (by["artists"]["matched"], by["artists"]["eligible"], by["artists"]["final"]) == (2, 2, 2)
    assert (by["series"]["matched"], by["series"]["excluded"], by["series"]["eligible"]) == (3, 1, 2)
    assert by["series"]["final"] == 1  # post 2 only (3 filtered out)
    assert by["series"]["final_only_this_rule"] == 0  # post 2 is also an artists post
    assert by["figures"]["final"] == 2 and by["figures"]["final_only_this_rule"] == 1
    assert by["artists"]["final_by_rating"] == {"general": 1, "sensitive": 0, "questionable": 0, "explicit": 1}
    assert by["figures"]["final_by_year"] == {"2019": 1, "2021": 0, "2022": 1}
    assert report["overlap"]["rules"] == ["artists", "series", "figures"]
    assert report["overlap"]["matched"] == [[2, 1, 1], [1, 3, 0], [1, 0, 2]]
    assert (report["selected"], report["final"], report["removed_by_filters"]) == (4, 3, 1)
    assert report["final_by_rating"] == {"general": 1, "sensitive": 0, "questionable": 1, "explicit": 1}
    assert report["final_by_year"] == {"2019": 1, "2021": 1, "2022": 1}
    assert report["final_by_rating_year"]["questionable"] == {"2019": 0, "2021": 0, "2022": 1}
    assert report["excluded_posts"] == 1
    json.dumps(report)  # manifest-ready

    text = format_tag_report(report)
    assert "overlap between rules" in text
    assert "final: 3" in text and "questionable 1" in text


def test_report_without_filters_and_plot(tmp_path):
    result = select_by_tags(POSTS, spec([dict(RULES[1], cap=2)], seed=4), progress=False)
    report = build_tag_report(POSTS, result)
    assert report["final"] == report["selected"] == 2
    assert report["rules"][0]["sampled"] == 2 and report["rules"][0]["matched"] == 3
    out = tmp_path / "reports" / "tag-selection.png"
    plot_tag_report(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kept_rows_outside_the_selection_are_refused():
    result = select_by_tags(POSTS, spec([RULES[0]]), progress=False)
    with pytest.raises(ValueError, match="did not select"):
        build_tag_report(POSTS, result, kept_rows=np.array([5]))
