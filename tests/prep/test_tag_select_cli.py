"""`kxl-prep select-tags`: the dry run of a tag recipe on a real source file (the synthetic
HakuBooru SQLite sample), checked against a plain-Python reading of the same posts."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from kxl_prep.sources import read_posts
from kxl_prep.tags.cli import select_tags
from kxl_testing.sample import make_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagcli")
    paths = make_sample(root / "sample", n_posts=300, seed=3, images=False)
    posts = read_posts([paths.db], progress=False).posts
    return root, paths.db, posts


def tagsets(posts, col):
    return [set(v) if v is not None else set() for v in posts[col].tolist()]


def test_dry_run_counts_match_the_source(sample):
    root, db, posts = sample
    artists = tagsets(posts, "tags_artist")
    copyrights = tagsets(posts, "tags_copyright")
    general = tagsets(posts, "tags_general")
    top_artists = [a for a, _ in Counter(a for s in artists for a in s if a != "banned_artist").most_common(3)]
    top_series = Counter(c for s in copyrights for c in s).most_common(1)[0][0]
    g1, g2 = [g for g, _ in Counter(g for s in general for g in s).most_common(6)][4:6]
    (root / "artists.txt").write_text("\n".join(a.replace("_", " ").upper() for a in top_artists) + "\n", encoding="utf-8")
    recipe = root / "tags.toml"
    recipe.write_text(
        f"""
name = "tags-sample"
seed = 5

[selection]
method = "tags"

[[selection.rules]]
name = "artists"
artists_file = "artists.txt"

[[selection.rules]]
name = "series"
copyrights = ["{top_series}"]
cap = 7

[[selection.rules]]
name = "pair"
all_of = ["{g1}", "{g2}"]
""",
        encoding="utf-8",
    )
    result = CliRunner().invoke(select_tags, [str(db), "--recipe", str(recipe), "--report-dir", str(root / "rep")],
                                obj={"progress": False})
    assert result.exit_code == 0, result.output
    report = json.loads((root / "rep" / "tag_selection.json").read_text(encoding="utf-8"))
    by = {r["name"]: r for r in report["rules"]}
    want_artists = sum(1 for s in artists if s & set(top_artists))
    want_series = sum(1 for s in copyrights if top_series in s)
    want_pair = sum(1 for s in general if {g1, g2} <= s)
    assert by["artists"]["matched"] == want_artists
    assert by["series"]["matched"] == want_series and by["series"]["sampled"] == min(7, want_series)
    assert by["pair"]["matched"] == want_pair

    ids = [int(x) for x in (root / "rep" / "tag_selection_ids.txt").read_text().split()]
    assert len(ids) == report["final"] == len(set(ids))
    kept = posts.set_index("id").loc[ids]
    # the rev1 filters ran after the selection: nothing deleted, banned, gold-only or animated
    assert not kept["is_deleted"].any() and not kept["is_banned"].any()
    assert kept["md5"].notna().all() and kept["file_ext"].isin(["jpg", "jpeg", "png", "webp"]).all()
    assert sum(report["final_by_rating"].values()) == report["final"]
    assert "overlap between rules" in result.output
    assert (root / "rep" / "tag_selection.png").exists()


def test_dry_run_refuses_a_quota_recipe_and_reports_unknown_tags(sample):
    root, db, _ = sample
    result = CliRunner().invoke(select_tags, [str(db), "--recipe", "epsilon-rev1"], obj={"progress": False})
    assert result.exit_code != 0 and "needs method = 'tags'" in result.output
    # the shipped rev2 lists name real danbooru tags, which the synthetic sample lacks
    result = CliRunner().invoke(select_tags, [str(db)], obj={"progress": False})
    assert result.exit_code != 0
    assert "artist tag 'wlop' not found" in result.output


def test_prepare_dry_run_is_the_tag_dry_run(sample, tmp_path):
    from kxl_prep.cli import main

    root, db, posts = sample
    artist = next(a for lst in posts["tags_artist"] if lst is not None for a in lst if a != "banned_artist")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "r"\nseed = 1\n[selection]\nmethod = "tags"\n[[selection.rules]]\nname = "a"\nartists = ["{artist}"]\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--no-progress", "prepare", str(db), "--out", str(out), "--recipe", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tag_selection.json").read_text(encoding="utf-8"))
    assert report["rules"][0]["matched"] == sum(1 for lst in posts["tags_artist"] if lst is not None and artist in lst)
    assert not (out / "meta.json").exists() and not (out / "manifest.json").exists()


@pytest.mark.parametrize("dry_run", [False, True], ids=["select-tags", "prepare --dry-run"])
def test_a_bad_source_is_a_clean_error(tmp_path, dry_run):
    import pandas as pd

    from kxl_prep.cli import main

    bad = tmp_path / "other.parquet"
    pd.DataFrame({"post": [1, 2], "note": ["a", "b"]}).to_parquet(bad)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[selection]\nmethod = "tags"\n[[selection.rules]]\nname = "a"\nartists = ["x"]\n',
                      encoding="utf-8")
    if dry_run:
        args = ["--no-progress", "prepare", str(bad), "--out", str(tmp_path / "out"), "--recipe", str(recipe), "--dry-run"]
        result = CliRunner().invoke(main, args)
    else:
        result = CliRunner().invoke(select_tags, [str(bad), "--recipe", str(recipe)], obj={"progress": False})
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a traceback
    assert result.output.startswith("Error: ") and str(bad) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
