"""The bad-input harness: every kxl command that takes a path, against every kind of bad path.

ROWS holds one line per command (more where a command has several forms). A row is the
command line with each path written as `{kind}`; the harness puts a bad value into one
placeholder at a time (the others get a good value of their kind) and checks that the command

- exits non-zero, with no traceback;
- prints one error line (`Error: ...`, click's usage lines around it allowed) that names the
  bad path (or, for an output under a file, the file in the way);
- leaves nothing behind: the folder it ran in holds exactly what it held before.

`{kind=}` gives a placeholder a good value without attacking it; `{kind~}` attacks it with the
bad values the path check catches before the command runs (missing, the wrong type, empty, and
every output case) only, where the harness has no good neighbour for the command to get past
first (score's --prompts needs a generated folder, which needs a model); `NAME={kind}` before the
command sets an environment variable (e.g. KXL_SD_SCRIPTS). KINDS says, for each kind, what a
good value is and which bad values apply: a missing path, an empty file, a folder for a file
and a file for a folder, garbage bytes, a truncated file (plain and, where the kind has one, a
compressed form), a valid file of the wrong kind, and for outputs a read-only folder, a path
under a file and a path of the wrong type. A new command joins with one row; tests/
test_bad_inputs.py fails for a command of kxl-prep, kxl-train or kxl that takes a path and has
no row (NO_PATH lists the commands that take none).

The cases run in child processes (`python -m kxl_testing.bad_inputs CASES.json RESULTS.jsonl`,
one per console script), each case calling the script's click group as its console script
does (standalone mode, sys.exit), with file descriptors 1 and 2 redirected, so library prints
and tracebacks are caught as a user would see them.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"kxl-prep": "kxl_prep.cli:main", "kxl-train": "kxl_train.cli:main", "kxl": "kxl_tools.cli:main"}

# --- the table --------------------------------------------------------------------------------
NO_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, so a request fails at once
ROWS = [
    "kxl-prep prepare {posts} --out {out_dir} --recipe {data_recipe} --thresholds {thresholds} --image-dir {image_dir} "
    "--reject-warn-share 1",
    "kxl-prep select-tags {posts} --recipe {tags_recipe} --report-dir {out_dir}",
    "kxl-prep export {prep_dir} --shards {shards} --image-dir {out_dir} --index-dir {out_dir} --quiet",
    "kxl-prep train-records {prep_dir}",
    "kxl-train validate {train_recipe}",
    "kxl-train launch {train_recipe} --dataset {prep_dir} --model {sdxl} --output {out_dir} --dry-run",
    "kxl-train resume {state_dir} --dry-run",
    "KXL_SD_SCRIPTS={sd_scripts} kxl-train lokr-count --recipe {train_recipe=}",
    "KXL_SD_SCRIPTS={sd_scripts} kxl-train sdxl-args",
    "KXL_SD_SCRIPTS={sd_scripts} kxl-train lokr-plan --write",
    "kxl-train preset-from {lokr} --out {out_file} --against {preset} --json {out_file}",
    "kxl-train tokenizer-cache {out_dir}",
    "kxl compare {model} {model} --base {sdxl} --out {out_dir}",
    "kxl compare-run {run_dir} {run_dir} --base {sdxl} --out {out_dir}",
    "kxl merge {sdxl} {lokr} {out_file}",
    "kxl inspect {lokr} --json {out_file} --preset {preset}",
    "kxl eval prompts {prep_dir} --out {out_file} --source {posts}",
    "kxl eval generate {prompts} --out {out_dir} --settings {settings} --checkpoint {sdxl} --lokr {lokr} "
    "--tokenizer-cache-dir {tokenizers}",
    "kxl eval generate {prompts=} --out {out_dir=} --diffusers {diffusers}",
    "kxl eval score {generated} --dataset {prep_dir~} --ccip-model {ccip~} --image-dir {images~} --prompts {prompts~} "
    "--out {out_dir}",
    "kxl eval report {scored} {scored~} --out {out_dir}",
    # fetch: a bad path must stop the command before it asks the hub (here a closed loopback port)
    f"HF_ENDPOINT={NO_HUB} kxl fetch metadata {{out_dir}} --cache-dir {{out_dir}}",
    f"HF_ENDPOINT={NO_HUB} kxl fetch release {{out_dir}} --cache-dir {{out_dir}}",
    f"HF_ENDPOINT={NO_HUB} kxl fetch ccip {{out_dir}} --cache-dir {{out_dir}}",
    f"HF_ENDPOINT={NO_HUB} kxl fetch images {{prep_dir}} --pool danbooru2023 --image-dir {{out_dir}} "
    "--index-dir {out_dir}",
]
# Commands that take no path at all (a row would have nothing to attack).
NO_PATH: dict[str, str] = {}
# What a failed run may leave, by design: command -> (files, as a regex on the relative path; why).
KEEPS: dict[str, tuple[str, str]] = {
    "kxl-prep export": (r"(^|/)out_dir-\d+(/data-\d+-[0-9a-f]+\.(lock|parquet))?$",
                        "the shard index of the tars read before the bad one: a cache the rerun reuses"),
}


# --- kinds of path ----------------------------------------------------------------------------
@dataclass
class Kind:
    """A kind of path: how to make a good one, and which bad ones apply."""
    suffix: str = ""
    is_dir: bool = False
    output: bool = False
    good: Callable[[Path], None] | None = None  # writes a good value at the given path
    wrong: str | None = None  # a kind whose good value is a valid file of the wrong kind here
    compressed: bool = False  # also try a truncated gzip of the good file
    inside: tuple[str, ...] = ()  # for folders: the files inside that get garbage
    allow_empty_dir: bool = False
    copy: bool = True  # False: good value used in place (shipped recipes name files beside them)


def _write_random(path: Path, n: int = 4096, seed: int = 0) -> None:
    import numpy as np

    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


def _copy(src: Path) -> Callable[[Path], None]:
    def make(dst: Path) -> None:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
    return make


class Goods:
    """Good values of each kind, built once under `root` and copied into each case."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.made: dict[str, Path] = {}

    def build(self) -> dict[str, Path]:
        import torch

        from kxl_prep.pipeline import prepare
        from kxl_prep.recipe import load_recipe
        from kxl_testing.lokr_runs import write_run
        from kxl_testing.sample import make_sample
        from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_checkpoint, write_lokr
        from kxl_tools.eval.prompts import Prompt, write_prompt_file

        r = self.root
        layout = tiny_layout()
        write_checkpoint(r / "sdxl.safetensors", layout, seed=1, dtype=torch.float32)
        plan = lokr_plan(layout, factor=2)
        write_lokr(r / "lokr.safetensors", plan, seed=2, dtype=torch.float32)
        gen = torch.Generator().manual_seed(3)
        factors = {name: (torch.randn(*p["lokr_w1"], generator=gen), torch.randn(*p["lokr_w2"], generator=gen))
                   for name, p in plan.items()}
        write_run(r / "run", "net", {10: factors, 20: factors})
        sample = make_sample(r / "sample", n_posts=60, seed=0, images=True)
        shutil.copyfile(sample.jsonl, r / "posts.jsonl")
        prepare([sample.jsonl], r / "prep", recipe=load_recipe().replace(selection={"method": "all"}), progress=False)
        write_prompt_file(r / "prompts.jsonl", [Prompt(id="p0", kind="custom", prompt="1girl", seeds=[0])])
        for name in ("state", "tokenizers", "diffusers", "ccip", "generated", "scored", "sd-scripts", "images"):
            (r / name).mkdir()
        self.made = {
            "sdxl": r / "sdxl.safetensors", "model": r / "sdxl.safetensors", "lokr": r / "lokr.safetensors", "run_dir": r / "run",
            "posts": r / "posts.jsonl", "shards": sample.shards, "prep_dir": r / "prep",
            "thresholds": r / "prep" / "manifest.json", "prompts": r / "prompts.jsonl",
            "data_recipe": REPO / "recipes" / "data" / "epsilon-rev1.toml",
            "tags_recipe": REPO / "recipes" / "data" / "epsilon-rev2.toml",
            "train_recipe": REPO / "recipes" / "epsilon-rev1.toml",
            "preset": REPO / "recipes" / "lycoris" / "epsilon-lokr.toml",
            "settings": REPO / "recipes" / "eval" / "generate-tiny.toml",
            "state_dir": r / "state", "tokenizers": r / "tokenizers", "diffusers": r / "diffusers",
            "ccip": r / "ccip", "generated": r / "generated", "scored": r / "scored", "sd_scripts": r / "sd-scripts",
            "images": r / "images",
        }
        return self.made


KINDS: dict[str, Kind] = {
    "sdxl": Kind(".safetensors", wrong="lokr"),
    "lokr": Kind(".safetensors", wrong="sdxl"),
    "model": Kind(".safetensors", wrong="posts"),  # either a LoKr or an SDXL checkpoint
    "run_dir": Kind(is_dir=True, inside=("net-step00000010.safetensors",)),
    "posts": Kind(".jsonl", wrong="sdxl", compressed=True),
    "shards": Kind(is_dir=True, inside=("original/data-0000.tar",)),
    "prep_dir": Kind(is_dir=True, inside=("meta.json", "selection.parquet", "dataset.toml", "manifest.json",
                                          "train_records.arrow")),
    "thresholds": Kind(".json", wrong="prompts"),
    "prompts": Kind(".jsonl", wrong="posts"),
    "data_recipe": Kind(".toml", wrong="train_recipe", copy=False),
    "tags_recipe": Kind(".toml", wrong="data_recipe", copy=False),
    "train_recipe": Kind(".toml", wrong="data_recipe", copy=False),
    "preset": Kind(".toml", wrong="data_recipe", copy=False),
    "settings": Kind(".toml", wrong="preset", copy=False),
    "state_dir": Kind(is_dir=True),
    "tokenizers": Kind(is_dir=True, allow_empty_dir=True),
    "diffusers": Kind(is_dir=True),
    "ccip": Kind(is_dir=True),
    "generated": Kind(is_dir=True),
    "scored": Kind(is_dir=True),
    "sd_scripts": Kind(is_dir=True),
    "images": Kind(is_dir=True, allow_empty_dir=True),
    "image_dir": Kind(is_dir=True, output=True),
    "out_dir": Kind(is_dir=True, output=True),
    "out_file": Kind(".json", output=True),
}

# Bad values: name -> (applies to kind?, make it under the case folder -> (path, path the error may name instead))
BAD_FILE_CASES = ("missing", "empty", "directory", "garbage", "truncated", "truncated_gz", "wrong_kind")
BAD_DIR_CASES = ("missing", "file", "empty_dir", "garbage_inside")
BAD_OUTPUT_CASES = ("wrong_type", "under_file", "unwritable")
# What the error line must say for the case (besides the path), as a regex, case-insensitive.
PROBLEM_WORDS = {
    "missing": r"not exist|no such|not found|missing",
    "empty": r"empty|shorter|no (posts|prompts|records|tensors|data)|nothing",
    "directory": r"director|folder",
    "file": r"director|folder|is a file",
    "under_file": r"director|folder|is a file",
    "wrong_type": r"director|folder|is a file",
    "unwritable": r"permission|writable|read-only",
}

PLACEHOLDER = re.compile(r"\{(\w+)([=~]?)\}")
PARSE_TIME_CASES = {"missing", "empty", "directory", "file", *BAD_OUTPUT_CASES}


@dataclass
class Case:
    id: str
    script: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    bad_path: str  # as given on the command line
    may_name: list[str] = field(default_factory=list)  # other acceptable paths in the message
    case: str = ""
    drop_privileges: bool = False


def parse_row(row: str) -> tuple[dict[str, str], str, list[str]]:
    """(env assignments, script, argument templates)."""
    words = shlex.split(row)
    env = {}
    while "=" in words[0] and not words[0].startswith("{"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words[0], words[1:]


def command_name(row: str) -> str:
    """'kxl eval generate' for a row: the script and its subcommand words."""
    _, script, args = parse_row(row)
    words = [script]
    for a in args:
        if a.startswith(("-", "{")):
            break
        words.append(a)
    return " ".join(words)


def slots(row: str) -> list[tuple[int, str, str]]:
    """(index, kind, how) of each placeholder, in order: how is "" (every bad value), "=" (none)
    or "~" (the parse-time ones)."""
    return [(i, m.group(1), m.group(2)) for i, m in enumerate(PLACEHOLDER.finditer(row))]


def _good_name(kind: str, index: int) -> str:
    k = KINDS[kind]
    return f"{kind}-{index}{k.suffix}"


def _make_bad(case: str, kind: str, where: Path, goods: dict[str, Path]) -> tuple[Path, list[Path]] | None:
    """Write the bad value for `case` under `where`; None when the case does not apply to the kind."""
    k = KINDS[kind]
    name = f"bad-{kind}{k.suffix}"
    target = where / name
    good = goods.get(kind)
    if k.output:
        if case == "wrong_type":
            if k.is_dir:
                target.write_text("a file in the way\n")
            else:
                target.mkdir()
            return target, []
        if case == "under_file":
            blocker = where / "blocker.txt"
            blocker.write_text("a file in the way\n")
            return blocker / name, [blocker]
        if case == "unwritable":
            ro = where / "read-only"
            ro.mkdir()
            ro.chmod(0o555)
            return ro / name, [ro]
        return None
    if k.is_dir:
        if case == "missing":
            return target, []
        if case == "file":
            target.write_text("a file, not a folder\n")
            return target, []
        if case == "empty_dir":
            if k.allow_empty_dir:
                return None
            target.mkdir()
            return target, []
        if case == "garbage_inside":
            if good is None or not k.inside:
                return None
            shutil.copytree(good, target)
            for i, name in enumerate(k.inside):
                _write_random(target / name, seed=i)
            return target, [target / name for name in k.inside]
        return None
    if case == "missing":
        return target, []
    if case == "empty":
        target.write_bytes(b"")
        return target, []
    if case == "directory":
        target.mkdir()
        return target, []
    if case == "garbage":
        _write_random(target)
        return target, []
    if case == "truncated":
        if good is None:
            return None
        data = good.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        return target, []
    if case == "truncated_gz":
        if good is None or not k.compressed:
            return None
        target = where / f"bad-{kind}{k.suffix}.gz"
        data = gzip.compress(good.read_bytes())
        target.write_bytes(data[: len(data) // 2])
        return target, []
    if case == "wrong_kind":
        if k.wrong is None or goods.get(k.wrong) is None:
            return None
        _copy(goods[k.wrong])(target)
        return target, []
    return None


def row_id(row: str) -> str:
    return f"{command_name(row)} #{ROWS.index(row)}" if row in ROWS else command_name(row)


def cases_for(row: str, goods: dict[str, Path], root: Path, as_root: bool) -> list[Case]:
    """Every (slot, bad value) case of `row`, each in its own folder under `root`."""
    env_t, script, args_t = parse_row(row)
    row_slots = slots(row)
    out: list[Case] = []
    for index, kind, how in row_slots:
        if how == "=":
            continue
        k = KINDS[kind]
        names = BAD_OUTPUT_CASES if k.output else BAD_DIR_CASES if k.is_dir else BAD_FILE_CASES
        for case in names:
            if how == "~" and case not in PARSE_TIME_CASES:
                continue
            cid = f"{row_id(row)} | {{{kind}}}#{index} | {case}"
            where = root / re.sub(r"[^\w.-]+", "_", cid)
            where.mkdir(parents=True)
            if as_root and case == "unwritable":
                where.chmod(0o777)  # run as `nobody`, the command may write its other outputs here
            made = _make_bad(case, kind, where, goods)
            if made is None:
                shutil.rmtree(where)
                continue
            bad, may_name = made
            values = {}
            for j, other, _ in row_slots:
                if j == index:
                    values[j] = bad.relative_to(where)
                    continue
                dest = where / _good_name(other, j)
                if KINDS[other].output:
                    values[j] = dest.relative_to(where)
                    continue
                if not KINDS[other].copy:  # a shipped file that names others beside it: used in place
                    values[j] = goods[other]
                    continue
                _copy(goods[other])(dest)
                values[j] = dest.relative_to(where)
            counter = iter(range(len(row_slots)))

            def fill(template: str) -> str:
                return PLACEHOLDER.sub(lambda m: str(values[next(counter)]), template)

            # a path placeholder becomes an absolute path; a literal value (an address) stays as written
            env = {name: str(where / fill(v)) if PLACEHOLDER.search(v) else v for name, v in env_t.items()}
            argv = [fill(a) for a in args_t]
            out.append(Case(id=cid, script=script, argv=argv, env=env, cwd=str(where),
                            bad_path=str(values[index]), may_name=[str(p.relative_to(where)) for p in may_name],
                            case=case, drop_privileges=as_root and case == "unwritable"))
    return out


# --- checks -----------------------------------------------------------------------------------
USAGE_LINE = re.compile(r"^(Usage: |Try '.*(-h|--help)' for help\.$)")
PROGRESS_LINE = re.compile(r"\d+(\.\d+)?\w*/s\]$|\?\w*/s\]$|\[\d\d:\d\d<|\d+%\|")
MAX_ERROR_LINES = 12  # an error with its few listed reasons, not a dump


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """{relative path: (type, size, mtime_ns)} of everything under `folder`."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            seen[str(p.relative_to(folder))] = ("d" if p.is_dir() else "f", st.st_size if not p.is_dir() else 0,
                                               st.st_mtime_ns)
    return seen


def problems(case: Case, result: dict, before: dict, after: dict) -> list[str]:
    """What is wrong with how the command handled the case (empty when all is well)."""
    found = []
    if result.get("skipped"):
        return found
    out, err, rc = result["stdout"], result["stderr"], result["rc"]
    if rc == 0:
        found.append("exit status 0")
    if "Traceback (most recent call last)" in out + err:
        found.append("traceback")
    # progress bars and our own `warning:` lines may come first; the error is the last thing
    lines = [ln for ln in err.splitlines() if ln.strip() and not USAGE_LINE.match(ln) and not PROGRESS_LINE.search(ln)
             and not ln.startswith("warning: ")]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Error: ")]
    if len(starts) != 1:
        found.append(f"{len(starts)} 'Error:' lines")
    elif starts[0] != 0:
        found.append(f"other lines on stderr: {lines[:min(starts[0], 3)]}")
    if starts:
        block = lines[starts[-1]:]
        if len(block) > MAX_ERROR_LINES:
            found.append(f"an error of {len(block)} lines")
        line = "\n".join(block)
        names = [case.bad_path, str(Path(case.cwd) / case.bad_path), *case.may_name,
                 *(str(Path(case.cwd) / p) for p in case.may_name)]
        if not any(n in line for n in names):
            found.append("the error does not name the path")
        words = PROBLEM_WORDS.get(case.case)
        if words and not re.search(words, line, re.I):
            found.append(f"the error does not say the problem (/{words}/)")
    new = sorted(set(after) - set(before))
    kept = KEEPS.get(case.id.split(" #")[0])
    if kept:
        new = [p for p in new if not re.search(kept[0], p)]
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p] and after[p][0] == "f")
    if new:
        found.append(f"left behind: {new[:5]}")
    if changed:
        found.append(f"changed: {changed[:5]}")
    return found


# --- the child process ------------------------------------------------------------------------
def _load_main(script: str):
    import importlib

    module, _, attr = SCRIPTS[script].partition(":")
    return getattr(importlib.import_module(module), attr)


class _Timeout(Exception):
    pass


class CannotRun(Exception):
    """The case cannot be set up on this machine (reported as a skip, not a pass)."""


def run_case(case: dict, out_file: Path, err_file: Path, timeout: int = 120) -> int:
    """Run one case as its console script would run, fds 1 and 2 into the files; its exit status."""
    main = _load_main(case["script"])
    saved_env = {k: os.environ.get(k) for k in case["env"]}
    saved_fds = os.dup(1), os.dup(2)
    cwd = os.getcwd()
    rc = 0

    def restore() -> None:
        """Back to the harness's own fds, folder and environment."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        os.chdir(cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    with open(out_file, "wb") as fo, open(err_file, "wb") as fe:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        os.environ.update(case["env"])
        os.chdir(case["cwd"])
        dropped = False
        if case["drop_privileges"]:  # root ignores permissions: be `nobody` for a read-only case
            try:
                os.setegid(65534)
                os.seteuid(65534)
                dropped = True
            except OSError as exc:  # a container that forbids it: the case cannot be made here
                os.setegid(0)
                restore()
                raise CannotRun(f"cannot switch to user nobody ({exc.strerror})") from None

        def on_alarm(signum, frame):
            raise _Timeout(f"no result in {timeout} s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(timeout)
        try:
            main.main(args=case["argv"], prog_name=case["script"], standalone_mode=True)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:  # what the console script would print: a traceback, status 1
            traceback.print_exc()
            rc = 1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            if dropped:
                os.seteuid(0)
                os.setegid(0)
            restore()
    return rc


def child_main(cases_json: str, results_jsonl: str) -> None:
    cases = json.loads(Path(cases_json).read_text())
    work = Path(results_jsonl).parent
    with open(results_jsonl, "a", encoding="utf-8") as results:
        for i, case in enumerate(cases):
            out_file, err_file = work / f"case-{i}.out", work / f"case-{i}.err"
            with contextlib.suppress(Exception):
                signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                rc = run_case(case, out_file, err_file)
            except CannotRun as exc:
                results.write(json.dumps({"id": case["id"], "skipped": str(exc)}) + "\n")
                results.flush()
                continue
            results.write(json.dumps({"id": case["id"], "rc": rc,
                                      "stdout": out_file.read_text(errors="replace"),
                                      "stderr": err_file.read_text(errors="replace")}) + "\n")
            results.flush()


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
