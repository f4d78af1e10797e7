"""`kxl fetch metadata | release | ccip`, end to end through huggingface_hub's own code against the
test hub server (kxl_testing.hub_server): what lands in the target is the repository's bytes,
laid out as the next tool reads it, and faults (cut, corrupt, 429, 503, gated, bad input) end
either in the same result as a clean run or in a one-line error with nothing written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")
from click.testing import CliRunner  # noqa: E402

from kxl_tools.cli import main as kxl  # noqa: E402

TOKEN = "hf_kxl_test_token"
RELEASE = "KBlueLeaf/Kohaku-XL-Epsilon"
RUN_NAME = "kohaku-xl-epsilon-lyco"
CHECKPOINT = "kohaku-xl-epsilon-13600step.safetensors"
STEPS = (1700, 3400, 5100)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The metadata in every form the repositories publish, and a released run, made once."""
    from kxl_testing.lokr_runs import write_run
    from kxl_testing.sample import make_sample
    from kxl_testing.source_forms import dump_tables

    import torch

    root = tmp_path_factory.mktemp("fetch-sources")
    sample = make_sample(root / "sample", n_posts=300, seed=4, images=False)
    tables = dump_tables(sample.db, root / "tables")
    forms = {"sqlite": sample.db, "parquet": tables}
    try:
        from kxl_testing.source_forms import write_duckdb

        forms["duckdb"] = write_duckdb(tables, root / "danbooru2023.duckdb")
    except ImportError:
        pass
    gen = torch.Generator().manual_seed(0)

    def factors(scale):
        return {f"lora_unet_input_blocks_{i}_proj": (torch.randn(2, 2, generator=gen) * scale,
                                                      torch.randn(4, 3, generator=gen)) for i in range(3)}

    run = write_run(root / "run", RUN_NAME, {s: factors(s / 1000) for s in STEPS}, (6000, factors(6)))
    mine = write_run(root / "mine", "my-run", {s: factors(s / 900) for s in STEPS}, (6000, factors(6.5)))
    # a stand-in for the 6.9 GB checkpoint: 12 MiB, over huggingface_hub's 10 MiB write chunk
    (root / CHECKPOINT).write_bytes(hashlib.shake_256(b"checkpoint").digest(12 * 2 ** 20 + 123))
    return {"forms": forms, "run": run, "mine": mine, "checkpoint": root / CHECKPOINT, "root": root}


@pytest.fixture
def hub(hub_server, sources, monkeypatch):
    """The repositories `kxl fetch` reads, mirrored on the test server."""
    monkeypatch.setenv("KXL_FETCH_RETRY_BASE", "0.05")
    forms = sources["forms"]
    hub_server.add_file("KBlueLeaf/danbooru2023-sqlite", "danbooru2023.db", forms["sqlite"], "dataset")
    hub_server.add_file("KBlueLeaf/danbooru2023-sqlite", "README.md", b"# sqlite\n", "dataset")
    database = "KBlueLeaf/danbooru2023-metadata-database"
    hub_server.add_file(database, "danbooru2023.db", forms["sqlite"], "dataset")
    for table in sorted(forms["parquet"].iterdir()):
        hub_server.add_file(database, table.name, table, "dataset")
    if "duckdb" in forms:
        hub_server.add_file(database, "danbooru2023.duckdb", forms["duckdb"], "dataset")
    hub_server.gate(database, "dataset", TOKEN)
    for file in sorted(sources["run"].iterdir()):
        hub_server.add_file(RELEASE, f"intermediate/{file.name}", file)
    hub_server.add_file(RELEASE, f"intermediate/{CHECKPOINT}", sources["checkpoint"])
    hub_server.add_file(RELEASE, "intermediate/notes.txt", b"not a step file\n")
    hub_server.add_file(RELEASE, "kohaku-xl-epsilon-rev1.safetensors", b"not fetched\n")
    return hub_server


def fetch(*args, env=None):
    result = CliRunner().invoke(kxl, ["fetch", *map(str, args), "--quiet"], env=env)
    return result


def state(target: Path) -> dict:
    """What a fetch leaves: every file's sha256, and the manifest without file times."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(target.iterdir()) if p.is_file()}
    manifest = json.loads((target / "kxl-fetch.json").read_text())
    for record in manifest["files"].values():
        record.pop("mtime_ns")
    files["kxl-fetch.json"] = manifest
    return files


def blobs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("blobs/*") if p.is_file())


# ---- metadata

@pytest.mark.parametrize("form", ["sqlite", "parquet", "duckdb"])
def test_metadata_prepares_as_the_tables_given_directly(hub, sources, tmp_path, form):
    from kxl_prep.pipeline import prepare

    if form not in sources["forms"]:
        pytest.skip("duckdb is not installed (optional: the dev extra has it)")
    target = tmp_path / "meta"
    result = fetch("metadata", target, "--form", form, env={"HF_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    direct = sources["forms"][form]
    fetched = target / direct.name if direct.is_file() else target
    assert f"kxl-prep prepare {fetched} " in result.output
    for original in ([direct] if direct.is_file() else sorted(direct.iterdir())):
        assert (target / original.name).read_bytes() == original.read_bytes()
    kinds = {"sqlite": "KBlueLeaf/danbooru2023-sqlite", "parquet": "KBlueLeaf/danbooru2023-metadata-database",
             "duckdb": "KBlueLeaf/danbooru2023-metadata-database"}
    assert {r["repo"] for r in state(target)["kxl-fetch.json"]["files"].values()} == {f"datasets/{kinds[form]}"}
    a = prepare([direct], tmp_path / "direct", count_scale=300 / 7_600_000, progress=False)
    b = prepare([fetched], tmp_path / "fetched", count_scale=300 / 7_600_000, progress=False)
    assert a["counts"] == b["counts"] and a["counts"]["images"] > 50
    for name in ("meta.json", "buckets.json"):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "fetched" / name).read_bytes()


def test_gated_without_token_names_hf_token_and_writes_nothing(hub, tmp_path):
    target = tmp_path / "meta"
    cache = Path(hub.root).parent / "hf_home" / "hub"
    result = fetch("metadata", target, "--form", "parquet")
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "HF_TOKEN" in error[0] and "gated" in error[0], result.output
    assert "Traceback" not in result.output
    assert not target.exists() and blobs(cache) == []
    wrong = fetch("metadata", target, "--form", "parquet", env={"HF_TOKEN": "hf_not_this_one"})
    assert wrong.exit_code == 1 and "HF_TOKEN" in wrong.output and not target.exists()
    ok = fetch("metadata", target, "--form", "parquet", env={"HF_TOKEN": TOKEN})
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in target.iterdir()) == [
        "kxl-fetch.json", "post.parquet", "posttagrelation.parquet", "tag.parquet"]


def test_several_candidates_stop_with_the_list_and_file_picks_one(hub, sources, tmp_path):
    hub.add_file("someone/tables", "with-index.db", sources["forms"]["sqlite"], "dataset")
    hub.add_file("someone/tables", "no-index.db", sources["forms"]["sqlite"], "dataset")
    result = fetch("metadata", tmp_path / "m", "--repo", "someone/tables")
    assert result.exit_code == 1 and "no-index.db, with-index.db" in result.output and "--file" in result.output
    assert not (tmp_path / "m").exists()
    picked = fetch("metadata", tmp_path / "m", "--repo", "someone/tables", "--file", "no-index.db")
    assert picked.exit_code == 0, picked.output
    assert (tmp_path / "m" / "no-index.db").read_bytes() == sources["forms"]["sqlite"].read_bytes()


# ---- release

def test_release_is_the_run_folder_compare_run_reads(hub, sources, tmp_path):
    from kxl_tools.trajectory import compare_runs, scan_run

    target = tmp_path / "released"
    result = fetch("release", target)
    assert result.exit_code == 0, result.output
    run = sources["run"]
    assert sorted(p.name for p in target.glob("*.safetensors")) == sorted(p.name for p in run.iterdir())
    for file in run.iterdir():
        assert (target / file.name).read_bytes() == file.read_bytes()
    scanned = scan_run(target)
    assert scanned.name == RUN_NAME and sorted(scanned.steps) == list(STEPS) and scanned.final is not None
    # the 12 MiB checkpoint was not asked for, and not a byte of it moved
    assert hub.bytes_served(file=f"intermediate/{CHECKPOINT}") == 0
    via_fetch = compare_runs(sources["mine"], target, progress=False)
    direct = compare_runs(sources["mine"], run, progress=False)
    for report in (via_fetch, direct):
        report.pop("released", None)
    assert json.dumps(via_fetch, sort_keys=True, default=str) == json.dumps(direct, sort_keys=True, default=str)
    cli = CliRunner().invoke(kxl, ["compare-run", str(sources["mine"]), str(target), "--out",
                                   str(tmp_path / "cmp"), "--no-plot", "--total-only"])
    assert cli.exit_code == 0, cli.output


def test_release_steps_filter_and_checkpoint(hub, sources, tmp_path):
    target = tmp_path / "some"
    result = fetch("release", target, "--steps", "3400,final")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.glob("*.safetensors")) == [
        f"{RUN_NAME}-step00003400.safetensors", f"{RUN_NAME}.safetensors"]
    served = {r.file for r in hub.requests(file="*", method="GET") if r.status in (200, 206)}
    assert served == {f"intermediate/{RUN_NAME}-step00003400.safetensors", f"intermediate/{RUN_NAME}.safetensors"}
    ckpt = fetch("release", tmp_path / "ckpt", "--steps", "13600", "--checkpoint")
    assert ckpt.exit_code == 0, ckpt.output
    assert [p.name for p in (tmp_path / "ckpt").glob("*.safetensors")] == [CHECKPOINT]
    assert (tmp_path / "ckpt" / CHECKPOINT).read_bytes() == sources["checkpoint"].read_bytes()


def test_unknown_step_lists_the_steps_and_writes_nothing(hub, tmp_path):
    result = fetch("release", tmp_path / "x", "--steps", "1800")
    assert result.exit_code == 1
    assert "no step 1800" in result.output and "1700, 3400, 5100" in result.output and "13600" in result.output
    assert not (tmp_path / "x").exists()
    assert fetch("release", tmp_path / "x", "--steps", "13600").exit_code == 1  # checkpoint only, not asked
    assert fetch("release", tmp_path / "x", "--steps", "abc").exit_code == 1
    assert not (tmp_path / "x").exists()


def test_rerun_moves_no_bytes(hub, tmp_path):
    target = tmp_path / "r"
    assert fetch("release", target).exit_code == 0
    before = state(target)
    hub.clear_log()
    again = fetch("release", target)
    assert again.exit_code == 0 and "0 placed" in again.output and "4 already there" in again.output
    assert hub.bytes_served() == 0 and state(target) == before


# ---- ccip

def test_ccip_model_folder_loads_as_the_original(hub_server, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import numpy as np
    from PIL import Image

    from kxl_testing.eval_ccip import write_standin_ccip
    from kxl_tools.eval.ccip import CCIP

    original = write_standin_ccip(tmp_path / "standin")
    for file in original.iterdir():
        hub_server.add_file("deepghs/ccip_onnx", f"{original.name}/{file.name}", file)
    hub_server.add_file("deepghs/ccip_onnx", "README.md", b"# ccip\n")
    target = tmp_path / "ccip"
    result = fetch("ccip", target)
    assert result.exit_code == 0, result.output
    assert f"--ccip-model {target}" in result.output
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    assert np.array_equal(CCIP(target).features([image]), CCIP(original).features([image]))
    other = fetch("ccip", tmp_path / "other", "--model", "ccip-nope")
    assert other.exit_code == 1 and "ccip-caformer-24-randaug-pruned" in other.output
    assert not (tmp_path / "other").exists()


# ---- faults: each ends as a clean run does

def clean_run(hub, tmp_path, *args) -> dict:
    target = tmp_path / "clean"
    result = fetch(*args[:1], target, *args[1:], "--cache-dir", tmp_path / "clean-cache")
    assert result.exit_code == 0, result.output
    hub.clear_log()
    return state(target)


def test_cut_mid_file_resumes(hub, tmp_path):
    clean = clean_run(hub, tmp_path, "release", "--steps", "13600", "--checkpoint")
    name = f"intermediate/{CHECKPOINT}"
    # past huggingface_hub's 10 MiB write chunk, so that one chunk is on disk when the cut comes
    hub.fault("cut", file=name, after_bytes=11_000_000)
    target = tmp_path / "t"
    result = fetch("release", target, "--steps", "13600", "--checkpoint")
    assert result.exit_code == 0, result.output
    assert state(target) == clean
    gets = [r for r in hub.requests(file=name, method="GET") if r.status in (200, 206)]
    assert len(gets) == 2 and gets[0].body_bytes == 11_000_000 and gets[0].range is None
    # the retry asked only for what was missing: from the end of the chunk written before the cut
    assert gets[1].range == f"bytes={10 * 2 ** 20}-" and gets[1].status == 206
    assert gets[1].body_bytes == (12 * 2 ** 20 + 123) - 10 * 2 ** 20


def test_corrupt_bytes_are_caught_and_fetched_again(hub, tmp_path):
    clean = clean_run(hub, tmp_path, "release", "--steps", "3400")
    name = f"intermediate/{RUN_NAME}-step00003400.safetensors"
    hub.fault("corrupt", file=name, at=100)
    target = tmp_path / "t"
    result = fetch("release", target, "--steps", "3400")
    assert result.exit_code == 0, result.output
    assert state(target) == clean
    assert "sha256" in result.output  # the retry says why
    assert len([r for r in hub.requests(file=name, method="GET") if r.status == 200]) == 2


def test_corrupt_every_time_is_an_error_and_nothing_is_placed(hub, tmp_path):
    name = f"intermediate/{RUN_NAME}-step00003400.safetensors"
    hub.fault("corrupt", file=name, times=10)
    result = fetch("release", tmp_path / "t", "--steps", "3400", "--retries", "2")
    assert result.exit_code == 1 and "sha256" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("target_kind", ["file", "api"])
def test_429_and_503_then_ok(hub, tmp_path, status, target_kind):
    clean = clean_run(hub, tmp_path, "release", "--steps", "1700,final")
    if target_kind == "api":
        hub.fault("status", target="api", repo=RELEASE, status=status, times=2, methods=("GET",))
    else:
        hub.fault("status", file=f"intermediate/{RUN_NAME}.safetensors", status=status, times=2)
    target = tmp_path / "t"
    result = fetch("release", target, "--steps", "1700,final")
    assert result.exit_code == 0, result.output
    assert state(target) == clean
    assert len([r for r in hub.log if r.status == status]) == 2


def test_503_past_the_retries_is_one_line_and_nothing_written(hub, tmp_path):
    hub.fault("status", file=f"intermediate/{RUN_NAME}.safetensors", status=503, times=100)
    result = fetch("release", tmp_path / "t", "--steps", "1700,final", "--retries", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "rerun" in result.output and not (tmp_path / "t").exists()


# ---- bad input

def test_unknown_repository(hub, tmp_path):
    result = fetch("metadata", tmp_path / "m", "--repo", "nobody/nothing")
    assert result.exit_code == 1 and "datasets/nobody/nothing: no such repository" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()
    result = fetch("release", tmp_path / "m", "--repo", RELEASE, "--revision", "v9")
    assert result.exit_code == 1 and "no such revision" in result.output


def test_target_that_is_a_file(hub, tmp_path):
    target = tmp_path / "file"
    target.write_text("mine\n")
    result = fetch("release", target, "--steps", "1700")  # refused as the command line is read
    assert result.exit_code == 2 and f"Directory '{target}' is a file" in result.output
    assert "Traceback" not in result.output and target.read_text() == "mine\n"


def test_a_file_already_in_the_target(hub, sources, tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    name = f"{RUN_NAME}-step00001700.safetensors"
    (target / name).write_bytes(b"my own file\n")
    result = fetch("release", target, "--steps", "1700,3400")
    assert result.exit_code == 1 and "nothing was overwritten" in result.output
    assert (target / name).read_bytes() == b"my own file\n" and sorted(p.name for p in target.iterdir()) == [name]
    # the hub's own bytes, put there by hand, are kept and not downloaded again
    (target / name).write_bytes((sources["run"] / name).read_bytes())
    hub.clear_log()
    assert fetch("release", target, "--steps", "1700,3400").exit_code == 0
    assert {r.file for r in hub.requests(file="*", method="GET") if r.status == 200} == {
        f"intermediate/{RUN_NAME}-step00003400.safetensors"}
    assert set(state(target)["kxl-fetch.json"]["files"]) == {name, f"{RUN_NAME}-step00003400.safetensors"}


def test_copy_instead_of_link(hub, tmp_path):
    target = tmp_path / "c"
    assert fetch("release", target, "--steps", "1700", "--copy").exit_code == 0
    placed = target / f"{RUN_NAME}-step00001700.safetensors"
    cache = Path(hub.root).parent / "hf_home" / "hub"
    assert placed.stat().st_nlink == 1
    linked = tmp_path / "l"
    assert fetch("release", linked, "--steps", "1700").exit_code == 0
    blob = [b for b in blobs(cache) if b.read_bytes() == placed.read_bytes()]
    assert len(blob) == 1 and (linked / placed.name).stat().st_ino == blob[0].stat().st_ino


# ---- interrupted in a child process: kill -9, a disk that fills up

REPO_ROOT = Path(__file__).resolve().parents[2]
BIG = f"intermediate/{CHECKPOINT}"
BIG_SIZE = 12 * 2 ** 20 + 123
CHUNK = 10 * 2 ** 20  # huggingface_hub writes downloads in chunks of this size (DOWNLOAD_CHUNK_SIZE)
CHECKPOINT_ARGS = ("release", "--steps", "13600", "--checkpoint")


def child(target: Path, *extra: str, disk_bytes: int | None = None):
    """`kxl fetch release TARGET --steps 13600 --checkpoint EXTRA` in a child process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    options = ["--disk-bytes", str(disk_bytes)] if disk_bytes is not None else []
    args = [sys.executable, "-m", "kxl_testing.fetch_child", *options, "--", "fetch", CHECKPOINT_ARGS[0],
            str(target), *CHECKPOINT_ARGS[1:], "--quiet", *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, limit: float = 120.0):
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def cache_of(hub) -> Path:
    return Path(hub.root).parent / "hf_home" / "hub"


def test_kill_9_mid_fetch_then_resume(hub, tmp_path):
    import os
    import signal

    clean = clean_run(hub, tmp_path, *CHECKPOINT_ARGS)
    hub.fault("stall", file=BIG, after_bytes=CHUNK + 500_000)
    target = tmp_path / "t"
    proc = child(target)
    try:
        assert hub.stalled.wait(120)
        partial = wait_until(lambda: [p for p in cache_of(hub).rglob("*.incomplete") if p.stat().st_size == CHUNK])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        proc.kill()
        hub.release_stalls()
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()  # nothing is placed before every file is in and checked
    assert partial[0].stat().st_size == CHUNK
    hub.clear_log()
    result = fetch("release", target, *CHECKPOINT_ARGS[1:])
    assert result.exit_code == 0, result.output
    assert state(target) == clean
    gets = [r for r in hub.requests(file=BIG, method="GET") if r.status in (200, 206)]
    assert [(g.range, g.body_bytes) for g in gets] == [(f"bytes={CHUNK}-", BIG_SIZE - CHUNK)]


def test_disk_full_stops_cleanly_and_resumes(hub, tmp_path):
    clean = clean_run(hub, tmp_path, *CHECKPOINT_ARGS)
    target = tmp_path / "t"
    proc = child(target, disk_bytes=CHUNK + 4096)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("Error: ") and "no space left" in output, output
    assert not target.exists()
    partial = [p for p in cache_of(hub).rglob("*.incomplete")]
    assert len(partial) == 1 and partial[0].stat().st_size == CHUNK + 4096  # what fitted stays, for the resume
    hub.clear_log()
    result = fetch("release", target, *CHECKPOINT_ARGS[1:])
    assert result.exit_code == 0, result.output
    assert state(target) == clean
    gets = [r for r in hub.requests(file=BIG, method="GET") if r.status in (200, 206)]
    assert [g.range for g in gets] == [f"bytes={CHUNK + 4096}-"]


def test_disk_full_while_copying_leaves_no_partial_file(hub, tmp_path):
    clean = clean_run(hub, tmp_path, *CHECKPOINT_ARGS)
    target = tmp_path / "t"
    proc = child(target, "--copy", disk_bytes=BIG_SIZE + 1_000_000)  # the download fits, the copy does not
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "no space left" in output and "Traceback" not in output, output
    assert not target.exists() or sorted(p.name for p in target.iterdir()) == []
    hub.clear_log()
    result = fetch("release", target, *CHECKPOINT_ARGS[1:], "--copy")
    assert result.exit_code == 0, result.output
    assert state(target) == clean and hub.bytes_served() == 0  # the cached download was kept
