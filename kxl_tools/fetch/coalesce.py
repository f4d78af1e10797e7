"""Which byte ranges to ask for: the selected members of one tar, nearby ones merged.

Members sorted by offset are merged into one range while the hole between two of them is
at most `max_gap` bytes and the range stays under `max_span` (a range is held in memory
whole). max_gap=0 merges only members that touch, i.e. never in a tar (each member's data
is followed by padding and the next header): one request per member.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# 256 KiB: about link bandwidth x one answer's latency / requests in flight (50 MiB/s x 30 ms
# / 8 = 190 KiB); the best time in bench/bench_fetch_images.py at those settings, 25% of the
# whole tars' bytes for a 20% selection (1 MiB: 60% of the bytes, no faster)
DEFAULT_MAX_GAP = 256 << 10
DEFAULT_MAX_SPAN = 32 << 20


@dataclass
class Range:
    start: int
    end: int  # exclusive
    members: list = field(default_factory=list)  # objects with .offset / .size, in offset order

    @property
    def length(self) -> int:
        return self.end - self.start


def coalesce(members, max_gap: int = DEFAULT_MAX_GAP, max_span: int = DEFAULT_MAX_SPAN) -> list[Range]:
    ranges: list[Range] = []
    for member in sorted(members, key=lambda m: m.offset):
        end = member.offset + member.size
        last = ranges[-1] if ranges else None
        if (last is not None and member.offset - last.end <= max_gap
                and max(end, last.end) - last.start <= max_span):
            last.end = max(end, last.end)
            last.members.append(member)
        else:
            ranges.append(Range(member.offset, end, [member]))
    return ranges


def summarize(ranges: list[Range]) -> dict:
    """requests, bytes asked for, bytes of members, bytes of gaps read and thrown away."""
    fetched = sum(r.length for r in ranges)
    wanted = sum(m.size for r in ranges for m in r.members)
    return {"requests": len(ranges), "bytes": fetched, "member_bytes": wanted, "gap_bytes": fetched - wanted}
