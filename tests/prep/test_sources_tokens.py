"""parse_token_lists against plain Python parsing, on random tag id lists."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.sources.tokens import parse_token_lists
from kxl_testing.sample import encode_tag_list

id_lists = st.lists(st.lists(st.integers(0, 36**6), max_size=12), max_size=30)


def reference(strings, base):
    values, counts = [], []
    for s in strings:
        if base == 36:
            toks = [t for t in s[1:-1].split("#$") if t] if s else []
        else:
            toks = [t for t in s.split(",") if t]
        values += [int(t, base) for t in toks]
        counts.append(len(toks))
    return values, counts


@settings(max_examples=150, deadline=None)
@given(id_lists)
def test_base36_tag_lists(lists):
    strings = [encode_tag_list(x) for x in lists]
    values, counts = parse_token_lists(strings, 36)
    want_v, want_c = reference(strings, 36)
    assert values.tolist() == want_v == [v for x in lists for v in x]
    assert counts.tolist() == want_c


@settings(max_examples=150, deadline=None)
@given(id_lists)
def test_base10_group_concat(lists):
    strings = [",".join(map(str, x)) for x in lists]
    values, counts = parse_token_lists(strings, 10)
    want_v, want_c = reference(strings, 10)
    assert values.tolist() == want_v
    assert counts.tolist() == want_c
    assert values.dtype == np.int64
