"""Reject breakdowns: reasons grouped by kind, counted, most common first, one example each."""
from __future__ import annotations

from collections import Counter

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.reject_summary import check_sources, format_reasons, reason_kinds, top_reasons


def _rejects(rows):
    return pd.DataFrame(rows, columns=["source", "record", "field", "reason"])


def test_kinds_counts_examples_and_more():
    rows = ([("a.db", str(i), "rating", f"unknown rating: {i % 4}") for i in range(10, 40)]
            + [("a.db", str(i), "created_at", f"not an ISO 8601 date: 'x{i}'") for i in range(50, 70)]
            + [("a.db", str(i), "tags", f"unknown tag id {i * 7}") for i in range(80, 85)]
            + [("a.db", f"line {i}", "record", "invalid JSON: Expecting value") for i in range(2)]
            + [("a.db", "99", f"f{k}", "missing") for k in range(6)])
    reasons, more = top_reasons(_rejects(rows), top=3)
    assert [(r.field, r.kind, r.count) for r in reasons] == [
        ("rating", "unknown rating", 30), ("created_at", "not an ISO N date", 20), ("tags", "unknown tag id N", 5)]
    assert (reasons[0].example_record, reasons[0].example_reason) == ("10", "unknown rating: 2")
    assert reasons[1].example_record == "50" and reasons[1].example_source == "a.db"
    assert more == 1 + 6  # the JSON kind and the six one-off fields
    text = format_reasons(reasons, more)
    assert text.splitlines()[0] == "            30  rating: unknown rating   e.g. record 10: unknown rating: 2"
    assert text.splitlines()[-1] == "  and 7 more kind(s) of reason"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["rating", "id", "tags"]), st.sampled_from(["bad: 1", "bad: 22", "odd 3", "odd"])),
                min_size=1, max_size=60))
def test_counts_add_up_and_are_ranked(pairs):
    rows = [("s", str(i), f, r) for i, (f, r) in enumerate(pairs)]
    reasons, more = top_reasons(_rejects(rows), top=100)
    want = Counter((f, k) for (f, _), k in zip(pairs, reason_kinds(pd.Series([r for _, r in pairs]))))
    assert {(r.field, r.kind): r.count for r in reasons} == dict(want) and more == 0
    assert [r.count for r in reasons] == sorted((r.count for r in reasons), reverse=True)
    for r in reasons:  # the example is the group's first record
        first = next(i for i, (f, _) in enumerate(pairs) if (f, reason_kinds(pd.Series([pairs[i][1]]))[0]) == (r.field, r.kind))
        assert r.example_record == str(first)


def test_check_sources_errors_and_warnings():
    stats = {"sources": {
        "good.db": {"format": "hakubooru-sqlite", "records": 1000, "rejected": 5},
        "meh.jsonl": {"format": "danbooru-jsonl", "records": 100, "rejected": 2},
        "bad.parquet": {"format": "danbooru-parquet", "records": 3, "rejected": 3},
        "empty.jsonl": {"format": "danbooru-jsonl", "records": 0, "rejected": 0},
        "tag.parquet": {"format": "hakubooru-parquet", "skipped": "same tables as post.parquet"},
    }}
    rejects = _rejects([("meh.jsonl", "1", "rating", "unknown rating: 'x'"),
                        ("meh.jsonl", "2", "id", "duplicate: id already read from good.db"),
                        ("meh.jsonl", "3", "rating", "unknown rating: 'y'")]
                       + [("bad.parquet", str(i), "rating", "unknown rating: 0") for i in range(3)]
                       + [("good.db", str(i), "tags", "broken tag list: '$'") for i in range(5)])
    errors, warnings = check_sources(stats, rejects, 0.01)
    assert len(errors) == 2
    assert errors[0].startswith("bad.parquet: all 3 records rejected (danbooru-parquet)")
    assert "3  rating: unknown rating   e.g. record 0: unknown rating: 0" in errors[0]
    assert errors[1] == "empty.jsonl: holds no post records (danbooru-jsonl)"
    assert len(warnings) == 1 and warnings[0].startswith("meh.jsonl: 2 of 100 records rejected (2.0%")
    assert "duplicate" not in warnings[0]  # duplicates of an earlier source are not malformed records
    assert check_sources(stats, rejects, 0.05)[1] == []
