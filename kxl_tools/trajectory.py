"""`kxl compare-run`: a whole training run against the released one, step by step.

Files are paired by the step they were saved at: a step file's from its name, as sd-scripts
writes them (`{output_name}-step{step:08d}.safetensors`; the released rev1 intermediates are
`kohaku-xl-epsilon-lyco-step00001700.safetensors` ...), the final `{output_name}.safetensors`'s
from its sd-scripts metadata (`ss_steps`). Two final files are paired only when they are at the
same step: my final of step 5100 is not the released final of step 6800. A final file without
`ss_steps` has no known step: it is shown as "final", paired only with another such file. A full checkpoint named `...-{step}step.safetensors`
(`kohaku-xl-epsilon-13600step.safetensors`) is a merged model of that step.

For every step both runs saved, per block (kxl_tools.keys.BLOCKS) and in total:
  distance    rel. Frobenius ||M - R|| / ||R||, cosine, norm ratio ||M|| / ||R|| of the LoKr
              deltas (R, the released run, is the reference), and ||M - R|| itself;
  movement    of each run since its previous file (the start, a zero delta, before the first):
              ||X(s) - X(prev)||, and relative to ||X(s)||;
  in moves    ||M - R|| / ||R(s) - R(prev)||: the distance in units of the released run's own
              last step-to-step move (1700 steps in rev1).
Every module delta of every file is computed once: modules are the outer loop and each holds at
most the current and previous delta of both runs, so memory stays at a few tensors of one module
(as `kxl compare`). With --base, the LoKr of a checkpoint's step is compared with that checkpoint
minus BASE (merged model against released model, in delta space: no 7 GB file is written), and
so is the released LoKr of the same step (a check that BASE is the released run's base).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .compare import Sums, _natural, compare_files, pair_sums
from .keys import BLOCKS, block_of
from .sources import NetworkDeltas, SourceError, open_file
from .step_names import CHECKPOINT_FILE, STEP_FILE
FINAL = "final"


@dataclass
class RunFiles:
    """The LoKr files of one run, by step, and its full checkpoints by step."""

    directory: Path
    name: str
    steps: dict[int, Path]
    final: Path | None = None
    checkpoints: dict[int, Path] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    final_step: int | None = None  # the final file's ss_steps, when it has one

    def files(self) -> dict:
        """{point: file}: the step files, and the final file at its own step ("final" when its
        step is unknown); a step file of the final's step holds the same weights and is kept."""
        files = dict(self.steps)
        if self.final is not None:
            files.setdefault(FINAL if self.final_step is None else self.final_step, self.final)
        return files

    def describe(self) -> dict:
        return {"dir": str(self.directory), "name": self.name, "steps": sorted(self.steps),
                "final": self.final.name if self.final else None, "final_step": self.final_step,
                "checkpoints": {s: p.name for s, p in sorted(self.checkpoints.items())}, "ignored": self.ignored}


def _saved_step(path: Path) -> int | None:
    """The step a file was saved at, from sd-scripts' metadata (ss_steps), when it says."""
    _, reader = open_file(path)
    try:
        steps = (reader.metadata or {}).get("ss_steps")
    finally:
        reader.close()
    return int(steps) if steps and steps.isdigit() else None


def scan_run(directory: str | Path, name: str | None = None) -> RunFiles:
    """The step files of the run in `directory` (one output name, or `name` when there are several)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"{directory}: not a directory")
    series: dict[str, dict[int, Path]] = {}
    checkpoints, others = {}, []
    for p in sorted(directory.glob("*.safetensors")):
        m = STEP_FILE.match(p.name)
        c = CHECKPOINT_FILE.match(p.name)
        if m:
            series.setdefault(m["name"], {})[int(m["step"])] = p
        elif c:
            checkpoints[int(c["step"])] = p
        else:
            others.append(p)
    if name is None:
        if len(series) > 1:
            raise SourceError(f"{directory}: step files of several runs ({', '.join(sorted(series))}); choose one with --mine-name / --released-name")
        if not series:
            raise SourceError(f"{directory}: no step files (NAME-stepNNNNNNNN.safetensors, as sd-scripts saves them)")
        name = next(iter(series))
    if name not in series:
        raise SourceError(f"{directory}: no step files of {name!r} (found: {', '.join(sorted(series)) or 'none'})")
    final = directory / f"{name}.safetensors"
    run = RunFiles(directory, name, series[name], final if final.is_file() else None, checkpoints)
    if run.final is not None:
        run.final_step = _saved_step(run.final)
    run.ignored = sorted([p.name for p in others if p != final]
                         + [p.name for n, s in series.items() if n != name for p in s.values()])
    return run


def _points(mine: RunFiles, released: RunFiles) -> list:
    points = set(mine.files()) | set(released.files())
    return sorted(p for p in points if p != FINAL) + ([FINAL] if FINAL in points else [])


def final_notes(mine: RunFiles, released: RunFiles) -> list[str]:
    """Where each run's final file was placed, said in the report: it is paired by its step."""
    notes = []
    for side, run in (("mine", mine), ("released", released)):
        if run.final is None:
            continue
        if run.final_step is None:
            notes.append(f"{side}: final {run.final.name} has no ss_steps, its step is unknown: shown as 'final', "
                         f"paired only with a final file of unknown step")
        elif run.final_step in run.steps:
            notes.append(f"{side}: final {run.final.name} is step {run.final_step} (ss_steps), "
                         f"as {run.steps[run.final_step].name}: counted once")
        else:
            notes.append(f"{side}: final {run.final.name} is step {run.final_step} (ss_steps): paired by that step")
    if (mine.final_step is not None and released.final_step is not None and mine.final_step != released.final_step):
        notes.append(f"the final files are at different steps (mine {mine.final_step}, released {released.final_step}): "
                     f"each is paired with the other run's file of its own step, not with the other final")
    return notes


def _open_network(path: Path) -> NetworkDeltas:
    kind, reader = open_file(path)
    if kind != "network":
        raise SourceError(f"{path}: named like a LoKr step file, but it is a {kind}")
    return NetworkDeltas(reader)


def _metrics(s: Sums | None) -> dict | None:
    return None if s is None else {**s.metrics(), "numel": s.numel}


def trajectory(mine: RunFiles, released: RunFiles, progress: bool = True) -> dict:
    points = _points(mine, released)
    files = {"mine": mine.files(), "released": released.files()}
    src_m = {p: _open_network(f) for p, f in files["mine"].items()}
    src_r = {p: _open_network(f) for p, f in files["released"].items()}
    names = set()
    for src in list(src_m.values()) + list(src_r.values()):
        names.update(src.names())
    order = sorted(names, key=lambda n: (BLOCKS.index(block_of(n)), _natural(n)))
    # sums[kind][point][block]: kind "dist" (mine vs released), "move_mine", "move_released"
    sums = {k: {p: {} for p in points} for k in ("dist", "move_mine", "move_released")}

    def add(kind, point, block, s):
        for key in (block, "TOTAL"):
            sums[kind][point].setdefault(key, Sums()).add(s)

    for name in tqdm(order, desc="compare-run", unit="module", disable=not progress):
        block = block_of(name)
        prev = {"mine": None, "released": None}  # the previous file's delta (None: the zero start)
        prev_n2 = {"mine": 0.0, "released": 0.0}
        for point in points:
            cur, n2 = {}, {}
            for side, srcs in (("mine", src_m), ("released", src_r)):
                if point in srcs:
                    cur[side] = srcs[point].delta(name)  # None when the file lacks the module: zero
                    # its squared norm once, reused by the distance and both moves
                    n2[side] = pair_sums(cur[side], None).a2 if cur[side] is not None else 0.0
            if cur.get("mine") is not None and cur.get("released") is not None and cur["mine"].numel() != cur["released"].numel():
                raise SourceError(f"{name}: step {point}: delta of {list(cur['mine'].shape)} in {files['mine'][point]} "
                                  f"but {list(cur['released'].shape)} in {files['released'][point]}")
            if "mine" in cur and "released" in cur and (cur["mine"] is not None or cur["released"] is not None):
                add("dist", point, block, pair_sums(cur["mine"], cur["released"], n2["mine"], n2["released"]))
            for side in cur:
                # movement: previous vs current, current as the reference (rel. to ||X(s)||)
                if cur[side] is not None or prev[side] is not None:
                    add(f"move_{side}", point, block, pair_sums(prev[side], cur[side], prev_n2[side], n2[side], cross=False))
                prev[side], prev_n2[side] = cur[side], n2[side]
            del cur
    for src in list(src_m.values()) + list(src_r.values()):
        src.reader.close()

    rows = []
    for point in points:
        row = {"point": point, "step": None if point == FINAL else point,
               "files": {side: files[side][point].name for side in files if point in files[side]},
               "final": [side for side, run in (("mine", mine), ("released", released))
                         if run.final is not None and files[side].get(point) == run.final],
               "mine": point in src_m, "released": point in src_r, "blocks": {}}
        for block in [b for b in BLOCKS if any(b in sums[k][point] for k in sums)] + ["TOTAL"]:
            d = _metrics(sums["dist"][point].get(block))
            mm = _metrics(sums["move_mine"][point].get(block))
            mr = _metrics(sums["move_released"][point].get(block))
            entry = {"distance": d,
                     "move_mine": None if mm is None else {"norm": mm["norm_diff"], "rel": mm["rel_fro"]},
                     "move_released": None if mr is None else {"norm": mr["norm_diff"], "rel": mr["rel_fro"]}}
            entry["distance_in_moves"] = (d["norm_diff"] / mr["norm_diff"]
                                          if d is not None and mr is not None and mr["norm_diff"] > 0 else None)
            row["blocks"][block] = entry
        rows.append(row)
    paired = [p for p in points if p in src_m and p in src_r]
    return {
        "mine": mine.describe(),
        "released": released.describe(),
        "paired": paired,
        "only_mine": [p for p in points if p in src_m and p not in src_r],
        "only_released": [p for p in points if p in src_r and p not in src_m],
        "finals": final_notes(mine, released),
        "points": rows,
    }


def checkpoint_checks(mine: RunFiles, released: RunFiles, base, progress: bool = True) -> list[dict]:
    """Each released full checkpoint against BASE + my LoKr of its step (and the released LoKr)."""
    out = []
    for step, ckpt in sorted(released.checkpoints.items()):
        entry = {"step": step, "checkpoint": ckpt.name}
        for side, run in (("mine", mine), ("released", released)):
            lokr = run.files().get(step)
            if lokr is None:
                entry[side] = {"missing": f"no {run.name}-step{step:08d}.safetensors in {run.directory}"}
                continue
            r = compare_files(lokr, ckpt, base, progress=progress)
            entry[side] = {"lokr": lokr.name, "total": r["total"], "blocks": r["blocks"], "counts": r["counts"],
                           "verdict": r["verdict"]["level"]}
        out.append(entry)
    return out


def compare_runs(mine_dir, released_dir, base=None, mine_name=None, released_name=None, progress=True) -> dict:
    mine = scan_run(mine_dir, mine_name)
    released = scan_run(released_dir, released_name)
    report = trajectory(mine, released, progress)
    if not report["paired"]:
        raise SourceError(f"no step saved by both runs: {mine_dir} has {sorted(mine.steps)}, {released_dir} has {sorted(released.steps)}")
    report["base"] = str(base) if base is not None else None
    report["checkpoints"] = checkpoint_checks(mine, released, base, progress) if base is not None else []
    if base is None and released.checkpoints:
        report["checkpoints_skipped"] = f"{len(released.checkpoints)} released checkpoint(s) not compared: pass --base BASE"
    return report


def _f(x, spec, width):
    if x is None:
        return "-".rjust(width)
    if isinstance(x, float) and not math.isfinite(x):
        return "inf".rjust(width)
    return format(x, spec).rjust(width)


def _label(row) -> str:
    finals = row.get("final", [])
    if row["point"] == FINAL:
        return "final"
    if len(finals) == 2:
        return f"{row['point']} finals"
    return f"{row['point']}" + (f" final {'M' if finals[0] == 'mine' else 'R'}" if finals else "")


def format_report(report: dict, blocks: bool = True) -> str:
    m, r = report["mine"], report["released"]
    lines = [f"mine:     {m['dir']} ({m['name']}: {len(m['steps'])} step files{', final' if m['final'] else ''})",
             f"released: {r['dir']} ({r['name']}: {len(r['steps'])} step files{', final' if r['final'] else ''}, reference)",
             f"paired: {', '.join(map(str, report['paired']))}",
             f"only mine: {', '.join(map(str, report['only_mine'])) or 'none'}; "
             f"only released: {', '.join(map(str, report['only_released'])) or 'none'}"]
    for side in ("mine", "released"):
        if report[side]["ignored"]:
            lines.append(f"{side}: not part of the run, ignored: {', '.join(report[side]['ignored'])}")
    lines += report.get("finals", [])
    names = ["TOTAL"] + ([b for b in BLOCKS if any(b in row["blocks"] for row in report["points"])] if blocks else [])
    hdr = (f"{'step':>14} {'rel_dist':>9} {'cosine':>8} {'ratio':>7} {'|M-R|':>10} {'move M':>10} {'move R':>10} "
           f"{'relmove M':>9} {'relmove R':>9} {'in moves':>8}")
    for b in names:
        lines += ["", b, hdr, "-" * len(hdr)]
        for row in report["points"]:
            e = row["blocks"].get(b)
            if e is None:
                continue
            d, mm, mr = e["distance"] or {}, e["move_mine"] or {}, e["move_released"] or {}
            lines.append(
                f"{_label(row):>14} {_f(d.get('rel_fro'), '.4g', 9)} {_f(d.get('cosine'), '.4f', 8)} "
                f"{_f(d.get('norm_ratio'), '.3f', 7)} {_f(d.get('norm_diff'), '.4g', 10)} {_f(mm.get('norm'), '.4g', 10)} "
                f"{_f(mr.get('norm'), '.4g', 10)} {_f(mm.get('rel'), '.4g', 9)} {_f(mr.get('rel'), '.4g', 9)} "
                f"{_f(e['distance_in_moves'], '.3g', 8)}")
    for c in report.get("checkpoints", []):
        lines += ["", f"checkpoint {c['checkpoint']} (step {c['step']}) minus --base:"]
        for side in ("mine", "released"):
            e = c[side]
            if "missing" in e:
                lines.append(f"  {side:<8}: {e['missing']}")
                continue
            t = e["total"]
            lines.append(f"  {side:<8} {e['lokr']}: rel. Frobenius {_f(t['rel_fro'], '.4g', 0)}, cosine {_f(t['cosine'], '.4f', 0)}, "
                         f"norm ratio {_f(t['norm_ratio'], '.3f', 0)} ({e['verdict']})")
    if report.get("checkpoints_skipped"):
        lines.append(report["checkpoints_skipped"])
    lines += ["", "rel_dist = ||M-R||/||R||; move = ||X(s)-X(previous file)|| (from zero at the first);",
              "relmove = move/||X(s)||; in moves = ||M-R|| / move R (the released run's last step-to-step move)",
              "final M / final R / finals: the final file of mine / released / both, at the step its ss_steps names"]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Distance and movement against step, one line per block; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kxl_common.figures import save_figure

    rows = [r for r in report["points"] if r["step"] is not None]
    blocks = ["TOTAL"] + [b for b in BLOCKS if any(b in r["blocks"] for r in rows)]
    colors = {b: ("black" if b == "TOTAL" else plt.cm.tab10(i)) for i, b in enumerate(blocks)}
    fig, axes = plt.subplots(3, 1, figsize=(11, 12), sharex=True, constrained_layout=True)
    for b in blocks:
        pts = [(r["step"], r["blocks"][b]) for r in rows if b in r["blocks"]]
        lw = 2.2 if b == "TOTAL" else 1.2
        d = [(s, e["distance"]["rel_fro"]) for s, e in pts if e["distance"] and math.isfinite(e["distance"]["rel_fro"])]
        if d:
            axes[0].plot(*zip(*d), marker="o", ms=3, lw=lw, color=colors[b], label=b)
        c = [(s, e["distance"]["cosine"]) for s, e in pts if e["distance"] and e["distance"]["cosine"] is not None]
        if c:
            axes[1].plot(*zip(*c), marker="o", ms=3, lw=lw, color=colors[b], label=b)
        for side, ls in (("move_released", "-"), ("move_mine", "--")):
            mv = [(s, e[side]["rel"]) for s, e in pts if e[side] and math.isfinite(e[side]["rel"])]
            if mv:
                axes[2].plot(*zip(*mv), ls=ls, lw=lw, color=colors[b], label=f"{b} ({'released' if side == 'move_released' else 'mine'})")
    for c in report.get("checkpoints", []):
        e = c.get("mine", {})
        if "total" in e:
            axes[0].scatter([c["step"]], [e["total"]["rel_fro"]], marker="*", s=160, color="red", zorder=5,
                            label=f"merged {c['step']} vs released checkpoint")
    axes[0].set_ylabel("rel. distance ||M-R|| / ||R||")
    axes[0].set_yscale("log")
    axes[0].set_title(f"{report['mine']['name']} ({report['mine']['dir']}) vs released {report['released']['name']}")
    axes[1].set_ylabel("cosine(M, R)")
    axes[2].set_ylabel("step-to-step move / ||X(s)||")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    save_figure(fig, path, dpi=110)
