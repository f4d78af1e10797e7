"""One `--shard K/N` convention (0-based, as a Slurm array's task id) for export and eval."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kxl_common.shard import ShardError, parse_shard, take_share


@given(st.integers(0, 60), st.integers(1, 9))
def test_shares_partition_in_order(n_items, n):
    items = list(range(n_items))
    shares = [take_share(items, parse_shard(f"{k}/{n}")) for k in range(n)]
    assert sorted(x for share in shares for x in share) == items
    assert all(share == [x for x in items if x % n == k] for k, share in enumerate(shares))


def test_the_last_share_is_n_minus_one_and_n_of_n_says_so():
    assert parse_shard("3/4") == (3, 4)
    assert parse_shard(None) == parse_shard("") == (0, 1)
    with pytest.raises(ShardError, match="0-based: the last of 4 is 3/4"):
        parse_shard("4/4")


def test_export_and_eval_take_the_same_convention():
    from kxl_prep.export.cli import export
    from kxl_prep.export.plan import parse_shard_spec
    from kxl_tools.eval.cli import generate

    assert parse_shard_spec("0/3") == (0, 3)
    with pytest.raises(ShardError):
        parse_shard_spec("3/3")
    shard_help = {p.name: p.help for p in export.params}["shard_spec"]
    assert shard_help == {p.name: p.help for p in generate.params}["shard"]
    assert {p.name: p.default for p in generate.params}["shard"] == "0/1"
