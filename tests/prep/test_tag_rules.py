"""Parsing, normalization and validation of the `[tag_selection]` table of a data recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from kxl_prep.tags.rules import (
    TagRecipeError,
    UnknownTagsError,
    load_tag_selection,
    normalize_tag,
    parse_tag_selection,
    read_tag_file,
    validate_against_vocabulary,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hatsune Miku", "hatsune_miku"),
        ("  figure\t", "figure"),
        ("photo \\(medium\\)", "photo_(medium)"),
        ("Photo  (Medium)", "photo_(medium)"),
        ("^_^", "^_^"),
        ("o_o", "o_o"),
        ("#compass", "#compass"),
        ("ko~n", "ko~n"),
    ],
)
def test_normalize_tag(raw, expected):
    assert normalize_tag(raw) == expected


def test_read_tag_file_skips_blank_and_comment_lines_but_keeps_hash_tags(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# series list\n\n#compass\n  Fate/Grand Order \n#\nblue archive\n", encoding="utf-8")
    assert read_tag_file(f) == ["#compass", "fate/grand_order", "blue_archive"]


def test_inline_and_file_lists_merge_normalized_without_duplicates(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.txt").write_text("Artist One\nartist_two\n", encoding="utf-8")
    (tmp_path / "lists" / "b.txt").write_text("artist three\nartist_one\n", encoding="utf-8")
    spec = parse_tag_selection(
        {
            "rules": [
                {
                    "name": "artists",
                    "artists": ["ARTIST_ZERO", "artist one"],
                    "artists_file": ["lists/a.txt", "lists/b.txt"],
                    "cap": 5,
                }
            ]
        },
        base_dir=tmp_path,
        seed=7,
    )
    rule = spec.rules[0]
    assert rule.artists == ("artist_zero", "artist_one", "artist_two", "artist_three")
    assert rule.cap == 5 and spec.seed == 7
    assert rule.kind() == "artists"


def test_single_file_path_string_is_accepted(tmp_path):
    (tmp_path / "c.txt").write_text("touhou\n", encoding="utf-8")
    spec = parse_tag_selection({"rules": [{"name": "series", "copyrights_file": "c.txt"}]}, base_dir=tmp_path, seed=3)
    assert spec.rules[0].copyrights == ("touhou",)
    assert spec.seed == 3


def test_expression_rule_and_exclusions(tmp_path):
    (tmp_path / "ids.txt").write_text("# opted out\n12\n5\n12\n", encoding="utf-8")
    spec = parse_tag_selection(
        {
            "rules": [{"name": "figure-photos", "all_of": ["photo (medium)", "figure"], "none_of": ["3d"]}],
            "exclude": {"tags": ["AI-generated"], "artists": ["x"], "ids": [9], "ids_file": "ids.txt"},
        },
        base_dir=tmp_path,
        seed=1,
    )
    rule = spec.rules[0]
    assert rule.all_of == ("photo_(medium)", "figure") and rule.none_of == ("3d",)
    assert rule.kind() == "all_of+none_of"
    assert spec.exclude.tags == ("ai-generated",)
    assert spec.exclude.ids == (5, 9, 12)
    manifest = spec.to_manifest()
    assert manifest["rules"][0]["all_of"] == {"count": 2, "tags": ["photo_(medium)", "figure"]}
    assert manifest["exclude"]["ids"] == {"count": 3}


@pytest.mark.parametrize(
    "table, message",
    [
        ({"rules": []}, "at least one"),
        ({}, "at least one"),
        ({"rules": [{"artists": ["a"]}]}, "needs a non-empty 'name'"),
        ({"rules": [{"name": "r", "none_of": ["a"]}]}, "at least one non-empty include list"),
        ({"rules": [{"name": "r", "artist": ["a"]}]}, "did you mean 'artists'"),
        ({"rules": [{"name": "r", "artists": "a"}]}, "expected a list of tag names"),
        ({"rules": [{"name": "r", "artists": ["a"], "cap": -1}]}, "non-negative integer"),
        ({"rules": [{"name": "r", "artists": ["a"], "cap": 1.5}]}, "non-negative integer"),
        ({"rules": [{"name": "r", "all_of": ["a", "b"], "none_of": ["b"]}]}, "both required and forbidden"),
        ({"rules": [{"name": "r", "artists": ["a"]}, {"name": "r", "copyrights": ["c"]}]}, "unique"),
        ({"rules": [{"name": "r", "artists": [" "]}]}, "empty tag name"),
        ({"rules": [{"name": "r", "artists_file": "missing.txt"}]}, "does not exist"),
        ({"rules": [{"name": "r", "artists": ["a"]}], "exclude": {"tag": ["x"]}}, "did you mean 'tags'"),
        ({"rules": [{"name": "r", "artists": ["a"]}], "exclude": {"ids": ["x"]}}, "post ids"),
        ({"seed": 4, "rules": [{"name": "r", "artists": ["a"]}]}, "unknown key"),  # the recipe's seed only
        ({"rule": []}, "unknown key"),
        ({"method": "quota", "rules": [{"name": "r", "artists": ["a"]}]}, "expected 'tags'"),
    ],
)
def test_malformed_tables_are_refused_with_the_reason(tmp_path, table, message):
    with pytest.raises(TagRecipeError, match=message):
        parse_tag_selection(table, base_dir=tmp_path, seed=1)


def test_bad_seed_is_refused(tmp_path):
    with pytest.raises(TagRecipeError, match="non-negative integer seed"):
        parse_tag_selection({"rules": [{"name": "r", "artists": ["a"]}]}, base_dir=tmp_path, seed=-2)


def test_caps_scale_for_a_sample(tmp_path):
    spec = parse_tag_selection(
        {"rules": [{"name": "a", "artists": ["x"], "cap": 1000}, {"name": "b", "artists": ["y"]}]},
        base_dir=tmp_path,
        seed=0,
    )
    assert [r.cap for r in spec.scaled(0.0104).rules] == [10, None]
    assert spec.scaled(1.0) is spec


VOCAB = {
    "general": {"figure", "photo_(medium)", "1girl", "solo"},
    "artist": {"wlop", "ilya_kuvshinov", "mika_pikazo"},
    "character": {"hatsune_miku"},
    "copyright": {"vocaloid", "blue_archive", "touhou"},
    "meta": {"highres"},
}


def test_validation_passes_when_every_tag_exists_in_its_category(tmp_path):
    spec = parse_tag_selection(
        {
            "rules": [
                {"name": "a", "artists": ["WLOP"], "copyrights": ["touhou"]},
                {"name": "f", "all_of": ["photo_(medium)", "figure"], "any_of": ["hatsune_miku", "highres"]},
            ],
            "exclude": {"tags": ["solo"], "characters": ["hatsune_miku"]},
        },
        base_dir=tmp_path,
        seed=0,
    )
    validate_against_vocabulary(spec, VOCAB)  # no error


def test_unknown_tags_are_listed_with_closest_names_and_wrong_category(tmp_path):
    spec = parse_tag_selection(
        {
            "rules": [
                {"name": "artists", "artists": ["ilya kuvshinof", "vocaloid", "wlop"]},
                {"name": "figures", "all_of": ["photo_(medum)", "figure"]},
            ],
            "exclude": {"copyrights": ["blue archiv"]},
        },
        base_dir=tmp_path,
        seed=0,
    )
    with pytest.raises(UnknownTagsError) as err:
        validate_against_vocabulary(spec, VOCAB)
    problems = {(p.where, p.tag): p for p in err.value.problems}
    assert set(problems) == {
        ("rule 'artists' key 'artists'", "ilya_kuvshinof"),
        ("rule 'artists' key 'artists'", "vocaloid"),
        ("rule 'figures' key 'all_of'", "photo_(medum)"),
        ("exclude key 'copyrights'", "blue_archiv"),
    }
    assert problems[("rule 'artists' key 'artists'", "ilya_kuvshinof")].suggestions[0] == "ilya_kuvshinov"
    assert problems[("rule 'artists' key 'artists'", "vocaloid")].found_in == ("copyright",)
    assert problems[("rule 'figures' key 'all_of'", "photo_(medum)")].suggestions[0] == "photo_(medium)"
    assert problems[("exclude key 'copyrights'", "blue_archiv")].suggestions[0] == "blue_archive"
    text = str(err.value)
    assert "4 tag(s)" in text
    assert "artist tag 'vocaloid' not found (it exists as a copyright tag)" in text
    assert "closest: ilya_kuvshinov" in text


def test_suggestions_on_a_large_vocabulary_use_the_narrowed_pool(tmp_path):
    big = {f"artist_{i:06d}" for i in range(50000)} | {"kantoku"}
    spec = parse_tag_selection({"rules": [{"name": "a", "artists": ["kantok"]}]}, base_dir=tmp_path, seed=0)
    with pytest.raises(UnknownTagsError) as err:
        validate_against_vocabulary(spec, {"artist": big})
    assert err.value.problems[0].suggestions[0] == "kantoku"


def test_rev2_recipe_parses_and_documents_the_figure_photo_rule():
    spec = load_tag_selection(REPO / "recipes" / "data" / "epsilon-rev2.toml")
    assert spec.seed == 20240301
    by_name = {r.name: r for r in spec.rules}
    figure_rules = [r for r in spec.rules if set(r.all_of) == {"photo_(medium)", "figure"}]
    assert len(figure_rules) == 1
    assert any(r.artists for r in spec.rules) and any(r.copyrights for r in spec.rules)
    assert all(len(r.artists) >= 5 for r in by_name.values() if r.artists)
