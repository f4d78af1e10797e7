"""Buckets: our vectorized assignment against a brute-force reading of the rule and, when
sd-scripts is available, against its real BucketManager."""
from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.buckets import BucketAssigner, BucketError, BucketGrid, histogram
from kxl_prep.recipe import BucketSpec

REV1 = BucketGrid((1024, 1024), 256, 4096, 64)


def brute_candidates(res, lo, hi, step):
    """Every step-grid (w, h) in [lo, hi]^2 that the rule admits, found by testing each one."""
    lo = lo - lo % step
    hi = hi if hi % step == 0 else hi + step - hi % step
    area = res[0] * res[1]
    square = int(np.floor(np.sqrt(area) / step)) * step

    def partner(w):
        return min(hi, (area // w) // step * step)

    out = {(square, square)}
    for w in range(lo, hi + 1, step):
        for h in range(lo, hi + 1, step):
            if h == partner(w) or w == partner(h):
                out.add((w, h))
    return sorted(out)


def brute_assign(w, h, cands):
    if (w, h) in cands:
        return (w, h)
    ar = w / h
    errors = [abs(cw / ch - ar) for cw, ch in cands]
    best = min(errors)
    return cands[errors.index(best)]  # first in sorted order on ties


def test_rev1_candidates_match_brute_force():
    assert [tuple(r) for r in REV1.resolutions().tolist()] == brute_candidates((1024, 1024), 256, 4096, 64)


def test_known_sdxl_buckets():
    a = BucketAssigner(REV1)
    w, h = a.assign(np.array([1024, 1920, 1080, 4000, 300, 1000]), np.array([1024, 1080, 1920, 250, 5000, 1500]))
    got = list(zip(w.tolist(), h.tolist()))
    # 16:9 goes to 1344x768 (ratio 1.75, nearest of 1.667 and 2.0); 16:1 to the widest bucket
    assert got[0] == (1024, 1024)
    assert got[1] == (1344, 768)
    assert got[2] == (768, 1344)
    assert got[3] == (4096, 256)
    assert got[4] == (256, 4096)
    assert got[5] == brute_assign(1000, 1500, brute_candidates((1024, 1024), 256, 4096, 64))


def test_min_max_moved_onto_the_step_grid():
    g = BucketGrid((1024, 1024), 250, 4000, 64)
    assert g.adjusted() == (192, 4032)
    with pytest.raises(BucketError):
        BucketGrid((1024, 1024), 1100, 4096, 64).adjusted()
    with pytest.raises(BucketError):
        BucketGrid((1024, 1024), 256, 960, 64).adjusted()


grids = st.builds(
    lambda rw, rh, lo, hi, step: BucketGrid((rw * step, rh * step), min(lo, rw, rh) * step, max(hi, rw, rh) * step, step),
    st.integers(4, 32),
    st.integers(4, 32),
    st.integers(1, 8),
    st.integers(8, 64),
    st.sampled_from([32, 64, 128]),
)
sizes = st.lists(st.tuples(st.integers(1, 12000), st.integers(1, 12000)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(grid=grids, sizes=sizes)
def test_assignment_matches_brute_force(grid, sizes):
    cands = brute_candidates(grid.resolution, grid.min_reso, grid.max_reso, grid.step)
    assert [tuple(r) for r in grid.resolutions().tolist()] == cands
    # include every candidate size itself and ratios halfway between neighbours (ties)
    extra = [tuple(c) for c in cands[:5]]
    ws = np.array([s[0] for s in sizes] + [e[0] for e in extra])
    hs = np.array([s[1] for s in sizes] + [e[1] for e in extra])
    bw, bh = BucketAssigner(grid).assign(ws, hs)
    for w, h, gw, gh in zip(ws.tolist(), hs.tolist(), bw.tolist(), bh.tolist()):
        assert (gw, gh) == brute_assign(w, h, cands), (w, h)


def test_dense_sweep_matches_brute_force():
    a = BucketAssigner(REV1)
    cands = [tuple(r) for r in REV1.resolutions().tolist()]
    ws, hs = np.meshgrid(np.arange(64, 4200, 37), np.arange(64, 4200, 41))
    bw, bh = a.assign(ws.ravel(), hs.ravel())
    for w, h, gw, gh in zip(ws.ravel().tolist(), hs.ravel().tolist(), bw.tolist(), bh.tolist()):
        assert (gw, gh) == brute_assign(w, h, cands), (w, h)


def test_ties_go_to_the_first_sorted_candidate():
    # A grid where two candidates share a ratio: (w, h) and (2w, 2h) can't both appear on
    # one area, so build the tie from the midpoint of two neighbouring ratios instead.
    a = BucketAssigner(REV1)
    cands = [tuple(r) for r in REV1.resolutions().tolist()]
    ratios = sorted({cw / ch for cw, ch in cands})
    ties = 0
    for r1, r2 in zip(ratios, ratios[1:]):
        mid = (r1 + r2) / 2
        for h in range(100, 4000):
            w = round(mid * h)
            errs = sorted(abs(cw / ch - w / h) for cw, ch in cands)
            if errs[0] == errs[1]:
                ties += 1
                got = tuple(int(x[0]) for x in a.assign(np.array([w]), np.array([h])))
                assert got == brute_assign(w, h, cands)
                break
    assert ties > 0  # the sweep did exercise exact ties


def test_histogram_counts():
    rows = histogram(np.array([1024, 1024, 768]), np.array([1024, 1024, 1344]))
    assert [(r["w"], r["h"], r["count"]) for r in rows] == [(768, 1344, 1), (1024, 1024, 2)]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_spec_round_trip():
    assert BucketGrid.from_spec(BucketSpec()) == REV1


# ---- against sd-scripts ----------------------------------------------------------------------


@pytest.mark.sdscripts
@pytest.mark.parametrize(
    "res,lo,hi,step",
    [((1024, 1024), 256, 4096, 64), ((1024, 1024), 256, 2048, 64), ((896, 1152), 320, 3000, 32), ((768, 768), 250, 1100, 128)],
)
def test_same_buckets_as_sd_scripts(train_util, res, lo, hi, step):
    # sd-scripts moves min/max onto the grid in the dataset before making the manager
    grid = BucketGrid(res, lo, hi, step)
    adj_lo, adj_hi = grid.adjusted()
    manager = train_util.BucketManager(False, res, adj_lo, adj_hi, step)
    manager.make_buckets()
    assert [tuple(r) for r in grid.resolutions().tolist()] == [tuple(r) for r in manager.predefined_resos]

    rng = np.random.default_rng(abs(hash((res, lo, hi, step))) % 2**32)
    ws = np.concatenate([rng.integers(1, 9000, 6000), np.exp(rng.uniform(0, 9, 2000)).astype(int) + 1])
    hs = np.concatenate([rng.integers(1, 9000, 6000), np.exp(rng.uniform(0, 9, 2000)).astype(int) + 1])
    # candidate sizes themselves and their near neighbours
    c = np.array(manager.predefined_resos)
    ws = np.concatenate([ws, c[:, 0], c[:, 0] + 1, c[:, 0] * 3])
    hs = np.concatenate([hs, c[:, 1], c[:, 1], c[:, 1] * 3])
    bw, bh = BucketAssigner(grid).assign(ws, hs)
    for w, h, gw, gh in zip(ws.tolist(), hs.tolist(), bw.tolist(), bh.tolist()):
        reso, _, _ = manager.select_bucket(w, h)
        assert (gw, gh) == tuple(reso), (w, h)
