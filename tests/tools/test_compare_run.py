"""`kxl compare-run`: two synthetic runs whose deltas differ by known amounts at every step give
the per-block distances and movements computed here independently (float64, kron written out)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from kxl_testing.lokr_runs import write_lokr_file, write_run
from kxl_tools.cli import main as kxl
from kxl_tools.merge import merge
from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_checkpoint
from kxl_tools.trajectory import compare_runs

MINE_STEPS, RELEASED_STEPS, FINAL = [1, 2, 4, 5], [1, 2, 3, 4], 6


def block(name: str) -> str:
    """Report block by name (written out here, not kxl_tools.keys.block_of)."""
    for prefix, b in (("lora_te1_", "TE1"), ("lora_te2_", "TE2"), ("lora_unet_input_blocks_", "UNet input"),
                      ("lora_unet_middle_block_", "UNet middle"), ("lora_unet_output_blocks_", "UNet output")):
        if name.startswith(prefix):
            return b
    return "UNet other"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    layout = tiny_layout(8)
    plan = lokr_plan(layout, factor=2)
    g = torch.Generator().manual_seed(5)
    w1 = {n: torch.randn(p["lokr_w1"], generator=g) for n, p in plan.items()}
    b = {n: torch.randn(p["lokr_w2"], generator=g) for n, p in plan.items()}
    e = {n: torch.randn(p["lokr_w2"], generator=g) for n, p in plan.items()}
    eps = {n: 0.05 * (i % 3 + 1) for i, n in enumerate(plan)}  # per-module size of the difference

    # released: w2 = s B; mine: w2 = s B + s^2 eps E (drifts away), and one module left out
    def released(s):
        return {n: (w1[n], s * b[n]) for n in plan}

    skipped = next(n for n in plan if n.startswith("lora_unet_output_blocks_"))

    def mine(s):
        return {n: (w1[n], s * b[n] + s * s * eps[n] * e[n]) for n in plan if n != skipped}

    write_run(root / "mine", "kohaku-xl-epsilon-lyco", {s: mine(s) for s in MINE_STEPS}, (FINAL, mine(FINAL)))
    write_run(root / "released", "kohaku-xl-epsilon-lyco", {s: released(s) for s in RELEASED_STEPS}, (FINAL, released(FINAL)))
    (root / "released" / "README.md").write_text("not a model")
    base = root / "base.safetensors"
    write_checkpoint(base, layout, seed=1, dtype=torch.float32)
    merge(base, root / "released" / "kohaku-xl-epsilon-lyco-step00000002.safetensors",
          root / "released" / "kohaku-xl-epsilon-2step.safetensors", dtype="fp32", progress=False)
    return root, mine, released, base


def kron64(f):
    w1, w2 = f
    w1 = w1.double().reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.double()).reshape(-1)


def expected(factors_a, factors_b, names):
    """rel. Frobenius, cosine, ||A-B|| per block and TOTAL, a missing module counting as zero."""
    acc = {}
    for n in names:
        da = kron64(factors_a[n]) if factors_a and n in factors_a else None
        db = kron64(factors_b[n]) if factors_b and n in factors_b else None
        if da is None and db is None:
            continue
        ref = da if da is not None else db
        da = torch.zeros_like(ref) if da is None else da
        db = torch.zeros_like(ref) if db is None else db
        for key in (block(n), "TOTAL"):
            s = acc.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            s[0] += float(da @ da); s[1] += float(db @ db); s[2] += float(da @ db); s[3] += float((da - db) @ (da - db))
    out = {}
    for key, (aa, bb, ab, dd) in acc.items():
        out[key] = {"rel": math.sqrt(dd / bb) if bb else None, "cos": ab / math.sqrt(aa * bb) if aa and bb else None,
                    "ratio": math.sqrt(aa / bb) if bb else None, "diff": math.sqrt(dd)}
    return out


def test_trajectory_figures(runs):
    root, mine, released, _ = runs
    r = compare_runs(root / "mine", root / "released", progress=False)
    assert r["paired"] == [1, 2, 4, FINAL]  # both finals are step 6 (ss_steps): paired there
    assert r["only_mine"] == [5] and r["only_released"] == [3]  # listed, not skipped silently
    assert "README.md" not in r["released"]["ignored"] and "kohaku-xl-epsilon-2step.safetensors" not in r["released"]["ignored"]
    assert r["released"]["checkpoints"] == {2: "kohaku-xl-epsilon-2step.safetensors"}
    names = list(released(1))
    rows = {row["point"]: row for row in r["points"]}
    assert rows[FINAL]["step"] == FINAL and rows[FINAL]["final"] == ["mine", "released"]
    assert rows[FINAL]["files"] == {"mine": "kohaku-xl-epsilon-lyco.safetensors", "released": "kohaku-xl-epsilon-lyco.safetensors"}
    prev_mine = {1: None, 2: 1, 4: 2, 5: 4, FINAL: 5}
    prev_released = {1: None, 2: 1, 3: 2, 4: 3, FINAL: 4}
    step = {}
    for point, row in rows.items():
        s = step.get(point, point)
        if point in r["paired"]:
            exp = expected(mine(s), released(s), names)
            for key, want in exp.items():
                got = row["blocks"][key]["distance"]
                assert got["rel_fro"] == pytest.approx(want["rel"], rel=1e-5), (point, key)
                assert got["cosine"] == pytest.approx(want["cos"], abs=1e-6), (point, key)
                assert got["norm_ratio"] == pytest.approx(want["ratio"], rel=1e-5), (point, key)
                assert got["norm_diff"] == pytest.approx(want["diff"], rel=1e-5), (point, key)
        else:
            assert all(e["distance"] is None for e in row["blocks"].values())
        for side, prev, fn in (("mine", prev_mine, mine), ("released", prev_released, released)):
            if point not in prev:
                assert all(e[f"move_{side}"] is None for e in row["blocks"].values())
                continue
            p = prev[point]
            before = fn(step.get(p, p)) if p is not None else None
            exp = expected(before, fn(s), names)  # previous vs current, current the reference
            for key, want in exp.items():
                got = row["blocks"][key][f"move_{side}"]
                assert got["norm"] == pytest.approx(want["diff"], rel=1e-5), (side, point, key)
                assert got["rel"] == pytest.approx(want["rel"], rel=1e-5), (side, point, key)
        if point in r["paired"]:
            t = row["blocks"]["TOTAL"]
            assert t["distance_in_moves"] == pytest.approx(t["distance"]["norm_diff"] / t["move_released"]["norm"])
    # the released run's first move is from zero: the whole delta, relative movement 1
    assert rows[1]["blocks"]["TOTAL"]["move_released"]["rel"] == pytest.approx(1.0)


def test_checkpoint_of_a_step_against_base_plus_lokr(runs):
    root, _, _, base = runs
    r = compare_runs(root / "mine", root / "released", base=base, progress=False)
    (c,) = r["checkpoints"]
    assert c["step"] == 2
    # the released checkpoint IS base + the released step-2 LoKr (fp32): the base checks out
    assert c["released"]["total"]["rel_fro"] < 1e-5 and c["released"]["verdict"] == "SAME"
    # merged-vs-released in delta space = my LoKr vs the released LoKr at that step
    at2 = next(row for row in r["points"] if row["point"] == 2)["blocks"]["TOTAL"]["distance"]
    assert c["mine"]["total"]["rel_fro"] == pytest.approx(at2["rel_fro"], rel=1e-4)
    assert c["mine"]["total"]["cosine"] == pytest.approx(at2["cosine"], abs=1e-5)


def test_cli_writes_table_json_plot(runs, tmp_path):
    root, _, _, base = runs
    out = tmp_path / "out"
    res = CliRunner().invoke(kxl, ["compare-run", str(root / "mine"), str(root / "released"), "--base", str(base), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "only mine: 5; only released: 3" in res.output
    assert "checkpoint kohaku-xl-epsilon-2step.safetensors (step 2) minus --base:" in res.output
    data = json.loads((out / "trajectory.json").read_text())
    assert data["paired"] == [1, 2, 4, FINAL]
    assert "      6 finals " in res.output  # the row of the two final files, at their step
    assert (out / "trajectory.png").stat().st_size > 10_000
    assert (out / "trajectory.txt").read_text().startswith("mine:")
    # without --base the released checkpoint is named as not compared
    res = CliRunner().invoke(kxl, ["compare-run", str(root / "mine"), str(root / "released"), "--out", str(tmp_path / "o2"), "--no-plot"])
    assert res.exit_code == 0 and "not compared: pass --base BASE" in res.output


def test_bad_run_directories(runs, tmp_path):
    root, mine, _, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(kxl, ["compare-run", str(empty), str(root / "released"), "--no-plot"])
    assert res.exit_code != 0 and "no step files" in res.output
    two = write_run(tmp_path / "two", "a", {1: mine(1)})
    write_run(two, "b", {1: mine(1)})
    res = CliRunner().invoke(kxl, ["compare-run", str(two), str(root / "released"), "--no-plot"])
    assert res.exit_code != 0 and "several runs (a, b)" in res.output
    res = CliRunner().invoke(kxl, ["compare-run", str(two), str(root / "released"), "--mine-name", "b", "--no-plot",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    far = write_run(tmp_path / "far", "x", {100: mine(1)})
    res = CliRunner().invoke(kxl, ["compare-run", str(far), str(root / "released"), "--no-plot"])
    assert res.exit_code != 0 and "no step saved by both runs" in res.output


def factors_at(seed: int):
    """{step: factors} drawn for one run (tiny layout), the same for every call."""
    plan = lokr_plan(tiny_layout(8), factor=2)

    def at(step):
        g = torch.Generator().manual_seed(1000 * seed + step)
        return {n: (torch.randn(p["lokr_w1"], generator=g), torch.randn(p["lokr_w2"], generator=g)) for n, p in plan.items()}
    return at


def test_finals_at_different_steps_pair_by_their_real_step(tmp_path):
    """My run stopped at step 3 (final file, ss_steps 3), the released one went on to 6: my final
    is compared with the released step-3 file, never with the released final, and nothing of mine
    is shown at step 6."""
    mine, released = factors_at(1), factors_at(2)
    write_run(tmp_path / "mine", "run", {1: mine(1), 2: mine(2)}, (3, mine(3)))
    write_run(tmp_path / "released", "run", {s: released(s) for s in (1, 2, 3, 4)}, (6, released(6)))
    r = compare_runs(tmp_path / "mine", tmp_path / "released", progress=False)
    assert r["paired"] == [1, 2, 3]
    assert r["only_mine"] == [] and r["only_released"] == [4, 6]
    rows = {row["point"]: row for row in r["points"]}
    assert rows[3]["files"] == {"mine": "run.safetensors", "released": "run-step00000003.safetensors"}
    assert rows[3]["final"] == ["mine"] and rows[6]["final"] == ["released"]
    names = list(mine(1))
    want = expected(mine(3), released(3), names)["TOTAL"]
    got = rows[3]["blocks"]["TOTAL"]["distance"]
    assert got["rel_fro"] == pytest.approx(want["rel"], rel=1e-5)
    assert got["norm_diff"] == pytest.approx(want["diff"], rel=1e-5)
    # at 6 only the released run has a file: no distance, no movement of mine
    assert rows[6]["mine"] is False and rows[6]["blocks"]["TOTAL"]["distance"] is None
    assert rows[6]["blocks"]["TOTAL"]["move_mine"] is None
    # the released final's move is from its step-4 file
    move = expected(released(4), released(6), names)["TOTAL"]
    assert rows[6]["blocks"]["TOTAL"]["move_released"]["norm"] == pytest.approx(move["diff"], rel=1e-5)
    res = CliRunner().invoke(kxl, ["compare-run", str(tmp_path / "mine"), str(tmp_path / "released"),
                                   "--out", str(tmp_path / "out"), "--total-only"])
    assert res.exit_code == 0, res.output
    assert "mine: final run.safetensors is step 3 (ss_steps): paired by that step" in res.output
    assert "the final files are at different steps (mine 3, released 6)" in res.output
    table = res.output.split("TOTAL\n", 1)[1]
    labels = [line.split()[0:3] for line in table.splitlines()[2:] if line.strip() and line.split()[0].isdigit()]
    assert [lab[0] for lab in labels] == ["1", "2", "3", "4", "6"]
    assert labels[2][1:3] == ["final", "M"] and labels[4][1:3] == ["final", "R"]
    # the plot has no point of mine at 6: its rows are the JSON's, and step 6 carries no mine value
    data = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    assert [p["step"] for p in data["points"] if p["mine"]] == [1, 2, 3]


def test_final_without_ss_steps_and_final_of_a_saved_step(tmp_path):
    mine, released = factors_at(3), factors_at(4)
    write_run(tmp_path / "mine", "run", {1: mine(1), 2: mine(2)})
    write_lokr_file(tmp_path / "mine" / "run.safetensors", mine(9))  # no ss_steps: step unknown
    write_run(tmp_path / "released", "run", {1: released(1), 2: released(2)}, (2, released(2)))
    r = compare_runs(tmp_path / "mine", tmp_path / "released", progress=False)
    assert r["paired"] == [1, 2]  # the unknown-step final is paired with nothing
    assert r["only_mine"] == ["final"] and r["only_released"] == []
    rows = {row["point"]: row for row in r["points"]}
    assert rows["final"]["step"] is None  # so the plot leaves it out
    assert rows[2]["files"]["released"] == "run-step00000002.safetensors"  # counted once, as its step file
    notes = "\n".join(r["finals"])
    assert "mine: final run.safetensors has no ss_steps, its step is unknown" in notes
    assert "released: final run.safetensors is step 2 (ss_steps), as run-step00000002.safetensors: counted once" in notes
