"""`kxl eval`: prompts -> generate -> score -> report, end to end through the CLI on a tiny
random-weight diffusers SDXL (kxl_testing.eval_sdxl) and stand-in CCIP ONNX files
(kxl_testing.eval_ccip), offline. The sd-scripts backend has its own gated test
(test_eval_sdscripts.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("diffusers")

from kxl_testing.eval_ccip import write_standin_ccip  # noqa: E402
from kxl_testing.eval_dataset import export_references, make_eval_dataset  # noqa: E402
from kxl_testing.eval_sdxl import save_tiny_sdxl  # noqa: E402
from kxl_tools.cli import main  # noqa: E402
from kxl_tools.eval.generate import image_path  # noqa: E402
from kxl_tools.eval.prompts import read_prompt_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "eval" / "generate-tiny.toml"
N_CHARS, N_SEEDS = 4, 2


def kxl(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dataset = make_eval_dataset(root)
    prompts = root / "prompts.jsonl"
    kxl("eval", "prompts", dataset, "--out", prompts, "--characters", N_CHARS, "--seeds", N_SEEDS)
    model_a, model_b = save_tiny_sdxl(root / "tiny-a", seed=0), save_tiny_sdxl(root / "tiny-b", seed=7)
    gen_a, gen_b = root / "gen-a", root / "gen-b"
    for model, gen in ((model_a, gen_a), (model_b, gen_b)):
        kxl("eval", "generate", prompts, "--diffusers", model, "--settings", TINY, "--out", gen)
    given = export_references(dataset, gen_a, prompts)
    ccip = write_standin_ccip(root / "ccip_onnx")
    return {"root": root, "dataset": dataset, "prompts": prompts, "model_a": model_a, "gen_a": gen_a,
            "gen_b": gen_b, "ccip": ccip, "given": given}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_prompt_file_holds_characters_then_card_styles(world):
    items = read_prompt_file(world["prompts"])
    chars = [p for p in items if p.kind == "character"]
    styles = [p for p in items if p.kind == "style"]
    assert len(chars) == N_CHARS and len(styles) == 5
    assert all(len(p.seeds) == N_SEEDS for p in items)
    assert [p.posts for p in chars] == sorted((p.posts for p in chars), reverse=True)
    for p in chars:  # the card's order: people, character, series, ..., quality, year, rating
        assert p.prompt.endswith("masterpiece, newest, safe")
        head = p.prompt.split(", ")
        assert head[0] == p.people
        assert head[1] == p.display.replace("(", r"\(").replace(")", r"\)")


def test_every_prompt_and_seed_has_one_image(world):
    items = read_prompt_file(world["prompts"])
    for p in items:
        for s in p.seeds:
            path = image_path(world["gen_a"], p.id, s)
            assert path.is_file()
            img = Image.open(path)
            assert img.size == (64, 64) and img.text["seed"] == str(s) and img.text["prompt"] == p.prompt
    header = json.loads((world["gen_a"] / "generate.json").read_text())
    assert header["settings"]["steps"] == 4 and header["model"]["backend"] == "diffusers"


def test_generation_is_deterministic_per_seed(world, tmp_path):
    first = read_prompt_file(world["prompts"])[0]
    for bs in (3, 1):  # 3: the batches of gen-a again; 1: every image alone
        again = tmp_path / f"again-{bs}"
        kxl("eval", "generate", world["prompts"], "--diffusers", world["model_a"], "--settings", TINY,
            "--out", again, "--batch-size", bs, "--limit", 3)
        made = sorted((again / "images").rglob("*.png"))
        assert len(made) == 3
        for path in made:
            a, b = pixels(path), pixels(world["gen_a"] / path.relative_to(again))
            if bs == 3:
                assert np.array_equal(a, b)
            else:  # same noise and seeds; a batch of one rounds some float sums differently
                assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.001
    seeds = first.seeds
    assert not np.array_equal(pixels(image_path(world["gen_a"], first.id, seeds[0])),
                              pixels(image_path(world["gen_a"], first.id, seeds[1])))


def test_resume_makes_only_the_missing_images(world, tmp_path):
    gen = tmp_path / "resume"
    out = kxl("eval", "generate", world["prompts"], "--diffusers", world["model_a"], "--settings", TINY,
              "--out", gen, "--limit", 4)
    assert "4 made, 0 already there" in out
    victim = sorted((gen / "images").rglob("*.png"))[1]
    kept = {p: p.stat().st_mtime_ns for p in (gen / "images").rglob("*.png") if p != victim}
    victim.unlink()
    out = kxl("eval", "generate", world["prompts"], "--diffusers", world["model_a"], "--settings", TINY,
              "--out", gen)
    total = sum(len(p.seeds) for p in read_prompt_file(world["prompts"]))
    assert f"{total - 3} made, 3 already there" in out
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    twin = world["gen_a"] / victim.relative_to(gen)
    assert np.array_equal(pixels(victim), pixels(twin))


def test_resume_refuses_other_settings(world, tmp_path):
    gen = tmp_path / "mixed"
    kxl("eval", "generate", world["prompts"], "--diffusers", world["model_a"], "--settings", TINY, "--out", gen,
        "--limit", 1)
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text().replace("steps = 4", "steps = 5"))
    res = CliRunner().invoke(main, ["eval", "generate", str(world["prompts"]), "--diffusers", str(world["model_a"]),
                                    "--settings", str(other), "--out", str(gen)])
    assert res.exit_code != 0 and "another settings" in res.output


def test_shards_split_the_jobs_without_overlap(world, tmp_path):
    gen = tmp_path / "sharded"
    names = []
    for k in (0, 1, 2):  # 0-based, as export's --shard (kxl_common.shard)
        kxl("eval", "generate", world["prompts"], "--diffusers", world["model_a"], "--settings", TINY,
            "--out", gen / str(k), "--shard", f"{k}/3")
        names.append({p.relative_to(gen / str(k)) for p in (gen / str(k) / "images").rglob("*.png")})
    union = set().union(*names)
    assert sum(len(n) for n in names) == len(union)
    assert union == {p.relative_to(world["gen_a"]) for p in (world["gen_a"] / "images").rglob("*.png")}


def test_score_own_references_beats_shuffled_references(world):
    out = kxl("eval", "score", world["gen_a"], "--dataset", world["dataset"], "--ccip-model", world["ccip"])
    score = json.loads((world["gen_a"] / "score.json").read_text())
    per = pd.read_csv(world["gen_a"] / "score_per_character.csv")
    assert "control with shuffled references" in out
    assert score["ccip"]["threshold"] == 0.1 and score["ccip"]["name"] == "ccip-caformer-24-randaug-pruned"
    scored = per[per["score"].notna()]
    assert len(scored) == len(world["given"]) >= 2
    # own references: each image has a JPEG copy among them, the others are other seeds
    assert score["overall"]["score"] > score["control_shuffled_references"]["score"]
    assert score["overall"]["mean_difference"] < score["control_shuffled_references"]["mean_difference"]
    captions = pd.read_parquet(world["dataset"] / "selection.parquet", columns=["caption"])["caption"]
    prefixes = [c.split("|||")[0].strip().split(", ") for c in captions]
    for display, n_refs in zip(scored["display"], scored["references"]):
        assert n_refs == min(8, sum(display in p for p in prefixes))


def test_score_lists_characters_without_references(world, tmp_path):
    items = read_prompt_file(world["prompts"])
    edited = tmp_path / "edited.jsonl"
    lines = world["prompts"].read_text().splitlines()
    extra = dict(json.loads(lines[0]), id="char-nobody", display="no such character", character="no_such_character")
    edited.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    gen = tmp_path / "gen"
    kxl("eval", "generate", edited, "--diffusers", world["model_a"], "--settings", TINY, "--out", gen)
    kxl("eval", "score", gen, "--dataset", world["dataset"], "--ccip-model", world["ccip"], "--prompts", edited)
    score = json.loads((gen / "score.json").read_text())
    assert "no_such_character" in score["characters_without_references"]
    assert score["characters_total"] == sum(p.kind == "character" for p in items) + 1


def test_report_puts_two_models_side_by_side(world):
    for gen in (world["gen_a"], world["gen_b"]):
        kxl("eval", "score", gen, "--dataset", world["dataset"], "--ccip-model", world["ccip"])
    out_dir = world["root"] / "report"
    kxl("eval", "report", world["gen_a"], world["gen_b"], "--out", out_dir, "--min-delta", 0.2)
    rep = json.loads((out_dir / "report.json").read_text())
    a = json.loads((world["gen_a"] / "score.json").read_text())
    b = json.loads((world["gen_b"] / "score.json").read_text())
    assert rep["a"]["score"] == pytest.approx(a["overall"]["score"])
    assert rep["b"]["score"] == pytest.approx(b["overall"]["score"])
    assert rep["a"]["ci"][0] <= rep["a"]["score"] <= rep["a"]["ci"][1]
    # model B never made the references: it must be worse, and the report must say so
    assert rep["paired"]["mean_delta_b_minus_a"] < 0
    assert rep["worse_in_b"] and not rep["better_in_b"]
    assert all(x["delta"] <= -0.2 for x in rep["worse_in_b"])
    assert rep["grid_rows"] == min(8, rep["paired"]["characters"]) + 5  # then the 5 style prompts
    assert "# kxl eval report" in (out_dir / "report.md").read_text()
    for png in ("report_grid.png", "report_plot.png"):
        assert Image.open(out_dir / png).size[0] > 100
