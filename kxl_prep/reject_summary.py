"""The most common reject reasons of a source, each with its count and one example record.

A reason's kind is its text up to the first ": " (the value after it differs per record),
digit runs read as N: "unknown rating: 0" and "unknown rating: 7" are one kind, and so are
"unknown tag id 12" and "unknown tag id 99". Vectorized (a broken dump rejects millions).
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

TOP_REASONS = 5


@dataclass(frozen=True)
class ReasonCount:
    field: str
    kind: str
    count: int
    example_source: str
    example_record: str
    example_reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def reason_kinds(reasons: pd.Series) -> pd.Series:
    text = reasons.astype(str)
    return text.str.split(": ", n=1).str[0].str.replace(r"\d+", "N", regex=True)


def top_reasons(rejects: pd.DataFrame, top: int = TOP_REASONS) -> tuple[list[ReasonCount], int]:
    """(the `top` most common (field, kind) groups, most common first; the number of other groups)."""
    if rejects is None or rejects.empty:
        return [], 0
    frame = pd.DataFrame({"field": rejects["field"].astype(str).to_numpy(),
                          "kind": reason_kinds(rejects["reason"]).to_numpy(),
                          "row": range(len(rejects))})
    groups = frame.groupby(["field", "kind"], sort=False)["row"].agg(["size", "first"]).reset_index()
    groups = groups.sort_values(["size", "first"], ascending=[False, True], kind="stable")
    out = []
    for g in groups.head(top).itertuples(index=False):
        ex = rejects.iloc[int(g.first)]
        out.append(ReasonCount(g.field, g.kind, int(g.size), str(ex["source"]), str(ex["record"]),
                               str(ex["reason"])))
    return out, max(len(groups) - top, 0)


def format_reasons(reasons: list[ReasonCount], more: int, indent: str = "  ") -> str:
    lines = [f"{indent}{r.count:>12,}  {r.field}: {r.kind}   e.g. record {r.example_record}: {r.example_reason}"
             for r in reasons]
    if more:
        lines.append(f"{indent}and {more} more kind(s) of reason")
    return "\n".join(lines)


def _of_source(rejects: pd.DataFrame | None, source: str) -> pd.DataFrame:
    if rejects is None or rejects.empty:
        return pd.DataFrame(columns=["source", "record", "field", "reason"])
    mine = rejects[rejects["source"].astype(str) == source]
    # duplicates of posts read from an earlier source are not malformed records
    return mine[~mine["reason"].astype(str).str.startswith("duplicate: ")]


def check_sources(source_stats: dict, rejects: pd.DataFrame | None, warn_share: float) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the sources read: a source that gave no post at all (every
    record rejected, or none in it) is an error; a reject share above warn_share a warning.
    Each message carries the source's most common reasons."""
    errors: list[str] = []
    warnings: list[str] = []
    for source, st in (source_stats.get("sources") or {}).items():
        if st.get("skipped") or "records" not in st:
            continue
        records, rejected = int(st["records"]), int(st.get("rejected", 0))
        if records == 0:
            errors.append(f"{source}: holds no post records ({st.get('format', 'unknown format')})")
            continue
        if rejected == 0:
            continue
        reasons, more = top_reasons(_of_source(rejects, source))
        detail = format_reasons(reasons, more)
        if rejected >= records:
            errors.append(f"{source}: all {records:,} records rejected ({st.get('format')}); most common reasons:\n"
                          f"{detail}")
        elif rejected / records > warn_share:
            warnings.append(f"{source}: {rejected:,} of {records:,} records rejected ({rejected / records:.1%}, "
                            f"above the {warn_share:.1%} warning threshold); most common reasons:\n{detail}")
    return errors, warnings
