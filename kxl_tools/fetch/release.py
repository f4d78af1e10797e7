"""`kxl fetch release`: the released rev1 files of KBlueLeaf/Kohaku-XL-Epsilon, laid out as
`kxl compare-run` reads a run folder.

The model repository has, under `intermediate/` (the spec, from the repository's listing):
the LoKr saved every 1700 steps `kohaku-xl-epsilon-lyco-step00001700.safetensors` ...
`-step00018700`, the final LoKr `kohaku-xl-epsilon-lyco.safetensors` and the full
13600-step checkpoint `kohaku-xl-epsilon-13600step.safetensors` (6.9 GB). Files are recognised
by the names compare-run pairs (kxl_tools.step_names), not by a fixed list, and
placed flat in the target folder.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from ..step_names import CHECKPOINT_FILE, STEP_FILE
from .hub import FetchError, Placement, Snapshot

REPO = "KBlueLeaf/Kohaku-XL-Epsilon"
FOLDER = "intermediate"
FINAL = "final"


def parse_steps(text: str | None) -> set | None:
    """None for every step; else a set of ints and/or "final" from "1700,3400,final"."""
    if text is None or text.strip().lower() == "all":
        return None
    wanted = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if part == FINAL:
            wanted.add(FINAL)
        elif part.isdigit():
            wanted.add(int(part))
        elif part:
            raise FetchError(f"--steps: {part!r} is not a step number, 'final' or 'all'")
    if not wanted:
        raise FetchError("--steps: no step given")
    return wanted


def release_files(snap: Snapshot, folder: str = FOLDER) -> tuple[dict, dict, dict]:
    """({step: path} of LoKr step files, {name: path} of final LoKr files, {step: path} of checkpoints)."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    steps, checkpoints, plain = {}, {}, {}
    series = set()
    for path in snap.files:
        if not path.startswith(prefix) or "/" in path[len(prefix):]:
            continue
        name = PurePosixPath(path).name
        if (m := STEP_FILE.match(name)):
            steps[int(m["step"])] = path
            series.add(m["name"])
        elif (c := CHECKPOINT_FILE.match(name)):
            checkpoints[int(c["step"])] = path
        elif name.endswith(".safetensors"):
            plain[name] = path
    finals = {name: path for name, path in plain.items() if name[:-len(".safetensors")] in series}
    return steps, finals, checkpoints


def plan(snap: Snapshot, steps: set | None, checkpoint: bool, folder: str = FOLDER) -> list[Placement]:
    lokr, finals, checkpoints = release_files(snap, folder)
    if not lokr and not checkpoints:
        raise FetchError(f"{snap.label}: no step files under {folder or 'the root'}/ "
                         "(NAME-stepNNNNNNNN.safetensors or NAME-NNNNstep.safetensors)")
    if steps is not None:
        unknown = sorted(s for s in steps if s != FINAL and s not in lokr and s not in checkpoints)
        if unknown or (FINAL in steps and not finals):
            shown = [str(s) for s in unknown] + ([FINAL] if FINAL in steps and not finals else [])
            raise FetchError(f"{snap.label}: no step {', '.join(shown)} under {folder}/; it has steps "
                             f"{', '.join(map(str, sorted(lokr))) or 'none'}"
                             + (f", checkpoints at {', '.join(map(str, sorted(checkpoints)))}" if checkpoints else "")
                             + (", final" if finals else ""))
    chosen = [lokr[s] for s in sorted(lokr) if steps is None or s in steps]
    chosen += [finals[n] for n in sorted(finals) if steps is None or FINAL in steps]
    if checkpoint:
        chosen += [checkpoints[s] for s in sorted(checkpoints) if steps is None or s in steps]
    if not chosen:
        raise FetchError(f"{snap.label}: the selected steps have no file to fetch "
                         + ("(their full checkpoint needs --checkpoint)" if not checkpoint else ""))
    return [Placement(snap.files[p], PurePosixPath(p).name) for p in chosen]
