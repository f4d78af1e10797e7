"""The kxl-prep / prepare_dataset.py command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kxl_prep.cli import main
from kxl_prep.recipe import REPO_ROOT


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from kxl_testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample"), n_posts=400, seed=1, images=False)


def run(*args):
    return CliRunner().invoke(main, ["--no-progress", *map(str, args)], catch_exceptions=False)


def test_prepare_writes_the_dataset(sample, tmp_path):
    out = tmp_path / "out"
    res = run("prepare", sample.db, "--out", out, "--seed", 3, "--count-scale", 0.0001)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["options"]["filters_apply"] == "after-sampling"
    assert manifest["counts"]["rejects"] == len(sample.malformed)
    assert manifest["counts"]["per_range"][0]["requested"] == 100  # 1,000,000 x 0.0001
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta) == manifest["counts"]["images"] > 0
    assert f"images {manifest['counts']['images']:,}" in res.output
    # the same command again gives the same bytes
    res = run("prepare", sample.db, "--out", tmp_path / "again", "--seed", 3, "--count-scale", 0.0001)
    assert (out / "meta.json").read_bytes() == (tmp_path / "again" / "meta.json").read_bytes()


def test_options_reach_the_manifest(sample, tmp_path):
    run("prepare", sample.db, "--out", tmp_path / "a")
    thresholds = tmp_path / "a" / "manifest.json"
    res = run("prepare", sample.db, "--out", tmp_path / "b", "--fill-after-filter", "--thresholds", thresholds,
              "--image-dir", tmp_path / "imgs")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["options"]["filters_apply"] == "before-sampling"
    assert m["quality"]["pinned_from"] == str(thresholds)
    assert f'image_dir = "{tmp_path / "imgs"}"' in (tmp_path / "b" / "dataset.toml").read_text()


def test_bad_recipe_is_a_clean_error(sample, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[selection]\nmethod = "all"\n[captions]\nshuffle = true\n')
    res = CliRunner().invoke(main, ["prepare", str(sample.db), "--out", str(tmp_path / "o"), "--recipe", str(bad)])
    assert res.exit_code == 1
    assert "captions: unknown key(s) ['shuffle']" in res.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_demo(tmp_path):
    from kxl_testing.demo import main as demo_main

    res = CliRunner().invoke(demo_main, ["--no-progress", "--demo", str(tmp_path / "demo")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    demo = tmp_path / "demo"
    assert (demo / "sample" / "danbooru2023.db").is_file()
    for name in ("meta.json", "dataset.toml", "manifest.json", "report.md", "bucket_histogram.png", "selection.parquet"):
        assert (demo / name).is_file(), name
    m = json.loads((demo / "manifest.json").read_text())
    assert m["counts"]["images"] > 0 and m["recipe"]["name"] == "epsilon-rev1"


def test_prepare_dataset_py_is_the_same_cli():
    res = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_dataset.py"), "prepare", "--help"],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 0
    for opt in ("--out", "--recipe", "--seed", "--fill-after-filter", "--thresholds"):
        assert opt in res.stdout
    res = subprocess.run([sys.executable, str(REPO_ROOT / "prepare_dataset.py"), "--help"],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert "--demo" in res.stdout


def test_prepare_dataset_py_offers_kxl_prep_commands():
    from kxl_testing.demo import main as demo_main

    assert sorted(demo_main.commands) == sorted(main.commands) == ["export", "prepare", "select-tags", "train-records"]
    assert all(demo_main.commands[name] is main.commands[name] for name in main.commands)
    assert "--demo" not in [o for p in main.params for o in p.opts]  # the product has no demo
