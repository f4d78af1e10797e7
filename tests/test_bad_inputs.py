"""Every command that takes a path, against every kind of bad path (kxl_testing.bad_inputs):
non-zero exit, one error line naming the path and the problem, no traceback, nothing left behind.

The cases run in three child processes, one per console script (python -m
kxl_testing.bad_inputs), each calling its click group exactly as the console script does; one
case per script also runs through the real console script to show the two agree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest

from kxl_testing import bad_inputs as bi

REPO = Path(__file__).resolve().parent.parent


def _groups() -> dict[str, click.Group]:
    return {script: bi._load_main(script) for script in bi.SCRIPTS}


def _leaf_commands(name: str, cmd: click.Command):
    if isinstance(cmd, click.Group):
        for sub, c in cmd.commands.items():
            yield from _leaf_commands(f"{name} {sub}", c)
    else:
        yield name, cmd


def _bound_params(row: str, cmd: click.Command) -> set[str]:
    """Names of the parameters the row's placeholders land in (parsed by click itself)."""
    _, _, args = bi.parse_row(row)
    words = len(bi.command_name(row).split()) - 1
    marks = iter(range(1000))
    argv = [bi.PLACEHOLDER.sub(lambda m: f"@slot{next(marks)}@", a) for a in args[words:]]
    ctx = click.Context(cmd, info_name=bi.command_name(row), resilient_parsing=True)
    raw, _, _ = cmd.make_parser(ctx).parse_args(argv)  # names -> raw strings, before any type check
    bound = set()
    for name, value in raw.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        if any("@slot" in str(v) for v in values):
            bound.add(name)
    return bound


def coverage_problems(rows: list[str]) -> tuple[list[str], list[str]]:
    """(commands of the three scripts with no row, path parameters no row puts a value in)."""
    rows_by_command: dict[str, list[str]] = {}
    for row in rows:
        rows_by_command.setdefault(bi.command_name(row), []).append(row)
    missing, unbound = [], []
    for script, group in _groups().items():
        for name, cmd in _leaf_commands(script, group):
            path_params = {p.name for p in cmd.params if isinstance(p.type, click.Path)}
            if name not in rows_by_command:
                if path_params or name not in bi.NO_PATH:
                    missing.append(name)
                continue
            bound = set().union(*(_bound_params(r, cmd) for r in rows_by_command[name]))
            unbound += [f"{name}: {p}" for p in sorted(path_params - bound)]
    return missing, unbound


def test_every_command_that_takes_a_path_has_a_row():
    missing, unbound = coverage_problems(bi.ROWS)
    assert not missing, f"commands with no row in kxl_testing.bad_inputs.ROWS: {missing}"
    assert not unbound, f"path parameters no row attacks: {unbound}"
    known = {n for s, g in _groups().items() for n, _ in _leaf_commands(s, g)}
    assert {bi.command_name(r) for r in bi.ROWS} <= known, "a row for a command that does not exist"


def test_a_forgotten_command_or_option_is_caught():
    without_merge = [r for r in bi.ROWS if bi.command_name(r) != "kxl merge"]
    assert coverage_problems(without_merge)[0] == ["kxl merge"]
    inspect_row = next(r for r in bi.ROWS if bi.command_name(r) == "kxl inspect")
    shorter = [r for r in bi.ROWS if r != inspect_row] + [inspect_row.replace(" --json {out_file}", "")]
    assert coverage_problems(shorter) == ([], ["kxl inspect: json_path"])


def test_row_parsing():
    row = "A=B KXL_X={sd_scripts} kxl eval score {generated} --out {out_dir=} --prompts {prompts~}"
    env, script, args = bi.parse_row(row)
    assert env == {"A": "B", "KXL_X": "{sd_scripts}"} and script == "kxl"
    assert bi.command_name(row) == "kxl eval score"
    assert bi.slots(row) == [(0, "sd_scripts", ""), (1, "generated", ""), (2, "out_dir", "="), (3, "prompts", "~")]


@pytest.fixture(scope="module")
def results():
    """{case id: (case, result, before, after)} for every row, run in one child per script."""
    root = Path(tempfile.mkdtemp(prefix="kxl-bad-inputs-"))
    root.chmod(0o755)  # a case run as `nobody` (root's read-only case) must reach its folder
    try:
        goods = bi.Goods(root / "good").build()
        as_root = os.geteuid() == 0
        by_script: dict[str, list[bi.Case]] = {}
        for row in bi.ROWS:
            for case in bi.cases_for(row, goods, root / "cases", as_root):
                by_script.setdefault(case.script, []).append(case)
        before = {c.id: bi.snapshot(Path(c.cwd)) for cases in by_script.values() for c in cases}
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("KXL_SD_SCRIPTS", None)
        # the user's own caches play no part (and `nobody` cannot read root's)
        env.update(XDG_CACHE_HOME=str(root / "cache"), KXL_TOKENIZER_CACHE=str(root / "cache" / "no-tokenizers"),
                   HOME=str(root / "home"), MPLCONFIGDIR=str(root / "mpl"))
        procs = []
        for script, cases in by_script.items():
            work = root / "runs" / script
            work.mkdir(parents=True)
            (work / "cases.json").write_text(json.dumps([c.__dict__ for c in cases]))
            procs.append((script, work, subprocess.Popen(
                [sys.executable, "-m", "kxl_testing.bad_inputs", str(work / "cases.json"), str(work / "results.jsonl")],
                env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        out = {}
        for script, work, proc in procs:
            log, _ = proc.communicate(timeout=900)
            got = {}
            if (work / "results.jsonl").exists():
                got = {r["id"]: r for r in map(json.loads, (work / "results.jsonl").read_text().splitlines())}
            for c in by_script[script]:
                result = got.get(c.id) or {"rc": None, "stdout": "", "stderr": f"no result: the child said {log[-2000:]!r}"}
                out[c.id] = (c, result, before[c.id], bi.snapshot(Path(c.cwd)))
        yield out
    finally:
        for p in (root / "cases").rglob("read-only"):
            p.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("row", bi.ROWS, ids=[bi.row_id(r) for r in bi.ROWS])
def test_bad_inputs(results, row):
    mine = [v for v in results.values() if v[0].id.startswith(bi.row_id(row) + " | ")]
    assert mine, "the row made no case"
    skipped = [f"{case.id}: {result['skipped']}" for case, result, _, _ in mine if result.get("skipped")]
    report = []
    for case, result, before, after in mine:
        found = bi.problems(case, result, before, after)
        if found:
            shown = (result["stderr"] or result["stdout"]).strip().splitlines()[-3:]
            report.append(f"{case.id}: {'; '.join(found)}\n    $ {case.script} {' '.join(case.argv)}\n    "
                          + "\n    ".join(shown))
    assert not report, f"{len(report)} of {len(mine)} cases:\n" + "\n".join(report)
    if skipped:
        pytest.skip(f"{len(skipped)} case(s) could not be set up here: {skipped[0]}")


def test_the_runner_sees_what_the_console_script_shows(results):
    """One case per script again through `python -m <its cli module>`: the same exit status and
    the same error line as the in-child runner recorded (so the runner is a faithful stand-in)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KXL_SD_SCRIPTS", None)
    checked = set()
    for case, result, _, _ in results.values():
        if case.script in checked or case.case != "missing" or case.env or result.get("skipped"):
            continue
        module = bi.SCRIPTS[case.script].split(":")[0]
        real = subprocess.run([sys.executable, "-m", module, *case.argv], cwd=case.cwd, env=env,
                              capture_output=True, text=True, timeout=300)
        assert real.returncode == result["rc"] != 0, (case.id, real.stderr)
        assert real.stderr.strip().splitlines()[-1] == result["stderr"].strip().splitlines()[-1], case.id
        checked.add(case.script)
    assert checked == set(bi.SCRIPTS)
