"""After an export: meta.json made to match the written files, the rejects file, the summary.

meta.json must list exactly the images that exist, under the names written (`<id>.<ext>`,
the extension changes on re-encoding) and with the written `image_size` (sd-scripts picks
the bucket from it and would fail on a missing file). It is rebuilt from selection.parquet
(id, caption, in selection order) and the journals, streamed chunk by chunk through prep's
meta.json writer (outputs.MetaJsonWriter, so both steps write one byte form): a 5M-image
dataset never has its captions in memory at once.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kxl_common.atomic import atomic_open
from kxl_prep.outputs import META_JSON, MetaJsonWriter
from kxl_prep.export.plan import Plan
from kxl_prep.export.writer import read_journal
from kxl_prep.schema import REJECTS_SCHEMA

REJECTS = "export_rejects.parquet"
SUMMARY = "export_summary.json"


def journal_path(state_dir: Path, unit_key: str) -> Path:
    return state_dir / "journal" / f"{unit_key}.jsonl"


@dataclass
class Records:
    """What the journals say, kept compact (one tuple per exported image)."""

    ok: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # id -> (file, w, h)
    rejected: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (shard, reason, detail)
    notes: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0

    def __len__(self) -> int:
        return len(self.ok) + len(self.rejected)


def collect_records(plan: Plan, state_dir: Path) -> Records:
    """The journals of every unit of the plan (every --shard slice's)."""
    records = Records()
    for unit in plan.units:
        wanted = {p.id for p in unit.posts}
        for pid, rec in read_journal(journal_path(state_dir, unit.key)).items():
            if pid not in wanted:
                continue
            if rec["status"] == "ok":
                records.ok[pid] = (rec["file"], int(rec["size"][0]), int(rec["size"][1]))
                records.rejected.pop(pid, None)
                for note in rec.get("notes", ()):
                    records.notes[note.split(":")[0] if note.startswith("ext_fixed") else note] += 1
                records.bytes_in += rec.get("bytes_in", 0)
                records.bytes_out += rec.get("bytes_out", 0)
            else:
                records.rejected[pid] = (unit.shard.rel, rec["reason"], rec.get("detail", ""))
                records.ok.pop(pid, None)
    return records


def write_meta(out_dir: Path, selection_path: Path, records: Records, train_records=None) -> tuple[int, str]:
    """Rewrite meta.json (through prep's own writer, outputs.MetaJsonWriter): one entry per
    exported image, in selection order. `train_records` (a kxl_prep.columnar.TrainRecordsWriter)
    gets the same entries and is closed with meta.json's sha256, so train_records.arrow follows
    meta.json. Returns (entries, meta.json's sha256)."""
    parquet = pq.ParquetFile(selection_path)
    with MetaJsonWriter(out_dir / META_JSON, train_records) as meta:
        for batch in parquet.iter_batches(batch_size=65536, columns=["id", "caption"]):
            chunk = []
            for pid, caption in zip(batch.column("id").to_pylist(), batch.column("caption").to_pylist()):
                got = records.ok.get(pid)
                if got is not None:
                    name, w, h = got
                    chunk.append((name, caption or "", w, h))
            if chunk:
                meta.write(*(list(column) for column in zip(*chunk)))
        digest = meta.finish()
    return meta.rows, digest


def write_rejects(out_dir: Path, plan: Plan, records: Records) -> int:
    rows = []
    for pid, (shard, reason, detail) in records.rejected.items():
        rows.append((shard, str(pid), "image", f"{reason}: {detail}" if detail else reason))
    for r in plan.not_found.itertuples(index=False):
        rows.append(("shards", str(int(r.id)), "image", f"not_found:{r.reason}"))
    rows.sort(key=lambda r: int(r[1]))
    table = pa.Table.from_pylist([dict(zip(REJECTS_SCHEMA.names, r)) for r in rows], schema=REJECTS_SCHEMA)
    with atomic_open(out_dir / REJECTS, "wb") as fh:
        pq.write_table(table, fh)
    return len(rows)


def _kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def build_summary(plan: Plan, records: Records) -> dict:
    rejected = Counter(reason for _, reason, _ in records.rejected.values())
    n_planned = sum(len(u.posts) for u in plan.units)
    not_found = Counter(plan.not_found["reason"])
    by_kind = Counter()
    for reason, count in not_found.items():
        by_kind[_kind(reason)] += count
    return {
        "selected": plan.n_selected,
        "exported": len(records.ok),
        "rejected": dict(sorted(rejected.items())),
        # every reason with its count (on a partial download: one per missing tar)
        "not_found": dict(sorted(not_found.items())),
        "not_found_by_kind": dict(sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0]))),
        "pending": n_planned - len(records),
        "conversions": dict(sorted(records.notes.items())),
        "bytes_in": records.bytes_in,
        "bytes_out": records.bytes_out,
    }


TOP_SHOWN = 10


def _top(counts: Counter, n: int = TOP_SHOWN) -> str:
    """'a 5, b 3, ... and N more' (most common first)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} {v:,}" for k, v in ranked[:n])
    return text + (f" and {len(ranked) - n:,} more" if len(ranked) > n else "")


def _grouped_lines(title: str, reasons: dict[str, int]) -> list[str]:
    """Reasons grouped by kind (the part before ':'), each kind's top details; a partial
    download of 8 TB has a `shard_missing:<tar>` reason per tar it lacks."""
    kinds: dict[str, Counter] = {}
    for reason, count in reasons.items():
        kind, _, detail = reason.partition(":")
        kinds.setdefault(kind, Counter())[detail] += count
    ranked = sorted(kinds.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    lines = [f"  {title}: {sum(reasons.values()):,}"]
    for kind, details in ranked[:TOP_SHOWN]:
        named = Counter({d: c for d, c in details.items() if d})
        lines.append(f"    {kind}: {sum(details.values()):,}" + (f" ({_top(named)})" if named else ""))
    if len(ranked) > TOP_SHOWN:
        lines.append(f"    and {len(ranked) - TOP_SHOWN:,} more kinds")
    lines.append(f"    (every reason with its count: {SUMMARY}; every post: {REJECTS})")
    return lines


def format_summary(summary: dict) -> str:
    lines = [f"export: {summary['exported']} of {summary['selected']} selected posts in image_dir"]
    if summary["pending"]:
        lines.append(f"  pending (other --shard jobs or unfinished units): {summary['pending']}")
    if not summary.get("meta_json_rewritten", True):
        lines.append("  meta.json: left as it was; the last --shard slice to finish rewrites it")
    if summary["rejected"]:
        parts = ", ".join(f"{k} {v}" for k, v in summary["rejected"].items())
        lines.append(f"  rejected: {sum(summary['rejected'].values())} ({parts})")
    if summary["not_found"]:
        lines += _grouped_lines("not found", summary["not_found"])
    if summary["conversions"]:
        lines.append(f"  converted: ({', '.join(f'{k} {v}' for k, v in summary['conversions'].items())})")
    if summary["bytes_in"]:
        lines.append(f"  bytes: {summary['bytes_in'] / 2**20:.1f} MiB read, {summary['bytes_out'] / 2**20:.1f} MiB written")
    run = summary.get("this_run")
    if run:
        lines.append(
            f"  this run: {run['processed']} processed, {run['recovered']} adopted after a kill, "
            f"{run['already_done']} already done, {run['seconds']:.1f} s, {run['images_per_s']:.1f} images/s"
        )
        if run.get("stopped"):
            lines.append(f"  STOPPED (free space, then rerun to resume): {run['stopped']}")
        if run["failed_units"]:
            lines.append(f"  FAILED units (rerun to resume): {run['failed_units']}")
    return "\n".join(lines)
