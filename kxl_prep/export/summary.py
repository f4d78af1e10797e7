"""After an export: meta.json made to match the written files, the rejects file, the summary.

meta.json must list exactly the images that exist, under the names written (`<id>.<ext>`,
the extension changes on re-encoding) and with the written `image_size` (sd-scripts picks
the bucket from it and would fail on a missing file). The prep's own meta.json is kept as
meta.prep.json the first time, and every rewrite starts from it (so a rerun, or a later job
of a `--shard K/N` array, never loses an entry). A meta.json rewritten by prep afterwards
is noticed (its hash differs from the one recorded) and becomes the new source.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kxl_common.atomic import atomic_open, write_json
from kxl_prep.export.plan import Plan
from kxl_prep.export.writer import read_journal
from kxl_prep.schema import REJECTS_SCHEMA

META = "meta.json"
META_PREP = "meta.prep.json"
STATE = "export_state.json"
REJECTS = "export_rejects.parquet"
SUMMARY = "export_summary.json"


def journal_path(state_dir: Path, unit_key: str) -> Path:
    return state_dir / "journal" / f"{unit_key}.jsonl"


def collect_records(plan: Plan, state_dir: Path) -> tuple[dict[int, dict], dict[int, str]]:
    """(id -> journal record, id -> shard rel) over every unit of the plan (all jobs)."""
    records: dict[int, dict] = {}
    where: dict[int, str] = {}
    for unit in plan.units:
        wanted = {p.id for p in unit.posts}
        for pid, rec in read_journal(journal_path(state_dir, unit.key)).items():
            if pid in wanted:
                records[pid] = rec
                where[pid] = unit.shard.rel
    return records, where


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prep_meta(out_dir: Path) -> dict:
    """The prep's meta.json entries (snapshotting it to meta.prep.json when it is new)."""
    meta, prep = out_dir / META, out_dir / META_PREP
    state = _read_json(out_dir / STATE) or {}
    if meta.exists() and _sha256(meta) != state.get("meta_sha256"):
        with atomic_open(prep, "wb") as fh:  # prep (re)wrote meta.json since our last rewrite
            fh.write(meta.read_bytes())
    return _read_json(prep) or {}


def _read_json(path: Path):
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _id_of_key(key: str) -> int | None:
    stem = Path(key).name.split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def write_meta(out_dir: Path, selection: pd.DataFrame, records: dict[int, dict]) -> int:
    """Rewrite meta.json: one entry per exported image, in selection order. Returns entries."""
    prep_by_id = {}
    for key, entry in _prep_meta(out_dir).items():
        pid = _id_of_key(key)
        if pid is not None:
            prep_by_id[pid] = entry
    captions = dict(zip(selection["id"].astype("int64"), selection["caption"])) if "caption" in selection else {}
    meta = {}
    for pid in selection["id"].astype("int64").tolist():
        rec = records.get(pid)
        if rec is None or rec["status"] != "ok":
            continue
        entry = dict(prep_by_id.get(pid) or {"caption": captions.get(pid, "")})
        entry["image_size"] = [int(rec["size"][0]), int(rec["size"][1])]
        meta[rec["file"]] = entry
    write_json(out_dir / META, meta)
    write_json(out_dir / STATE, {"meta_sha256": _sha256(out_dir / META)})
    return len(meta)


def write_rejects(out_dir: Path, plan: Plan, records: dict[int, dict], where: dict[int, str]) -> int:
    rows = []
    for pid, rec in records.items():
        if rec["status"] == "rejected":
            detail = f": {rec['detail']}" if rec.get("detail") else ""
            rows.append((where[pid], str(pid), "image", f"{rec['reason']}{detail}"))
    for r in plan.not_found.itertuples(index=False):
        rows.append(("shards", str(int(r.id)), "image", f"not_found:{r.reason}"))
    rows.sort(key=lambda r: int(r[1]))
    table = pa.Table.from_pylist([dict(zip(REJECTS_SCHEMA.names, r)) for r in rows], schema=REJECTS_SCHEMA)
    with atomic_open(out_dir / REJECTS, "wb") as fh:
        pq.write_table(table, fh)
    return len(rows)


def build_summary(plan: Plan, records: dict[int, dict]) -> dict:
    ok = [r for r in records.values() if r["status"] == "ok"]
    rejected = Counter(r["reason"] for r in records.values() if r["status"] == "rejected")
    notes = Counter(n.split(":")[0] if n.startswith("ext_fixed") else n for r in ok for n in r.get("notes", []))
    n_planned = sum(len(u.posts) for u in plan.units)
    return {
        "selected": plan.n_selected,
        "exported": len(ok),
        "rejected": dict(sorted(rejected.items())),
        "not_found": dict(sorted(Counter(plan.not_found["reason"]).items())),
        "pending": n_planned - len(records),
        "conversions": dict(sorted(notes.items())),
        "bytes_in": sum(r.get("bytes_in", 0) for r in ok),
        "bytes_out": sum(r.get("bytes_out", 0) for r in ok),
    }


def format_summary(summary: dict) -> str:
    lines = [f"export: {summary['exported']} of {summary['selected']} selected posts in image_dir"]
    if summary["pending"]:
        lines.append(f"  pending (other --shard jobs or unfinished units): {summary['pending']}")
    if not summary.get("meta_json_rewritten", True):
        lines.append("  meta.json: left as it was; the last --shard slice to finish rewrites it")
    for title, key in (("rejected", "rejected"), ("not found", "not_found"), ("converted", "conversions")):
        if summary[key]:
            parts = ", ".join(f"{k} {v}" for k, v in summary[key].items())
            lines.append(f"  {title}: {sum(summary[key].values()) if key != 'conversions' else ''} ({parts})".replace(":  (", ": ("))
    if summary["bytes_in"]:
        lines.append(f"  bytes: {summary['bytes_in'] / 2**20:.1f} MiB read, {summary['bytes_out'] / 2**20:.1f} MiB written")
    run = summary.get("this_run")
    if run:
        lines.append(
            f"  this run: {run['processed']} processed, {run['recovered']} adopted after a kill, "
            f"{run['already_done']} already done, {run['seconds']:.1f} s, {run['images_per_s']:.1f} images/s"
        )
        if run["failed_units"]:
            lines.append(f"  FAILED units (rerun to resume): {run['failed_units']}")
    return "\n".join(lines)
