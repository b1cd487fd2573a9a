"""Logit-only tail bounds (certattn.bounds, certattn.blocks): sound, tight where claimed, minimal.

Theorems GAP-SINGLE, GAP-EXACT-HEAD, GAP-MULTI, GAP-UNIFORM and BLOCK-BOUNDS.  The
reference is exact arithmetic (mpmath, tests/_exact.py) on small rows.
"""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import certattn
from certattn._array import device_of, to_numpy
from certattn.blocks import (
    block_tail_bounds,
    greedy_block_set,
    key_block_bounds,
    smallest_block_count,
)
from certattn.bounds import (
    TAIL_BOUNDS,
    bound_k,
    gap_bound,
    gap_exact_head_bound,
    gap_threshold,
    multigap_bound,
    tail_bound,
    uniform_gap_bound,
)

from ._exact import exact_tail_of_set, exact_tails, exact_weights

KW = {"optimal_cuts": {"n_cuts": 2}}


@st.composite
def rows(draw, max_n: int = 16):
    """Rows with ties, -inf masks and extreme ranges (float64 or float32)."""
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["grid", "wide", "extreme", "gauss"]))
    if kind == "grid":
        row = np.array(draw(st.lists(st.integers(-20, 20), min_size=n, max_size=n)), float) / 2
    elif kind == "wide":
        row = np.array(draw(st.lists(st.floats(-80, 80), min_size=n, max_size=n)))
    elif kind == "extreme":
        vals = st.sampled_from([-1e300, -1e5, -745.0, -700.0, -30.0, 0.0, 0.5, 40.0, 1e5, 1e300])
        row = np.array(draw(st.lists(vals, min_size=n, max_size=n)))
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        row = np.random.default_rng(seed).normal(0, draw(st.sampled_from([0.5, 2.0, 6.0])), n)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    big = float(np.finfo(dtype).max)
    row = np.clip(row, -big, big).astype(dtype)
    masked = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    row[masked & draw(st.booleans())] = -np.inf
    assume(np.isfinite(row).any())
    return row


def _all(row: np.ndarray, bound: str) -> np.ndarray:
    n = row.shape[-1]
    return np.array(
        [float(tail_bound(row, k, bound=bound, **KW.get(bound, {}))) for k in range(1, n + 1)]
    )


@given(row=rows())
def test_every_gap_bound_is_sound_against_exact_arithmetic(row):
    """GAP-*: every upper bound >= the exact tail mass of the top-k set, for every k."""
    tails = exact_tails(row)
    n_valid = int(np.isfinite(row).sum())
    for bound in TAIL_BOUNDS:
        ub = _all(row, bound)
        assert np.all((ub >= 0) & (ub <= 1))
        for k in range(1, row.size + 1):
            assert mpmath.mpf(ub[k - 1]) >= tails[min(k, n_valid)], (bound, k)
            if k >= n_valid:
                assert ub[k - 1] == 0.0
            else:  # a non-empty tail has positive mass and never reports 0
                assert ub[k - 1] > 0.0


@given(row=rows(max_n=12))
def test_bound_ordering(row):
    """exact-head <= single gap; all-gap <= checkpoint(m) <= checkpoint(0) = single gap.

    (Rows spanning more than 700 nats are excluded: there the all-gap and checkpoint forms
    round far tail terms up to e^-700, which is sound but may exceed the other forms.)
    """
    fin = row[np.isfinite(row)].astype(np.float64)
    assume(fin.max() - fin.min() < 600)
    tol = 1e-9
    gap, head = _all(row, "gap"), _all(row, "exact_head")
    allg = _all(row, "all_gap")
    ck = [
        np.array([float(multigap_bound(row, k, n_cuts=m)) for k in range(1, row.size + 1)])
        for m in (0, 1, 3)
    ]
    assert np.all(head <= gap * (1 + tol))
    np.testing.assert_allclose(ck[0], gap, rtol=1e-9, atol=1e-300)
    assert np.all(ck[1] <= ck[0] * (1 + tol))
    assert np.all(ck[2] <= ck[1] * (1 + tol))
    assert np.all(allg <= ck[2] * (1 + tol))
    assert np.all(allg <= _all(row, "uniform_gap") * (1 + tol))


@pytest.mark.parametrize("n,k,delta", [(10, 3, 0.7), (50, 1, 4.0), (7, 6, 0.0), (200, 20, 12.5)])
def test_gap_single_equality_on_two_level_rows(n, k, delta):
    """GAP-SINGLE is attained by two-level logits (k at s_k = delta, n - k at 0), in any order."""
    row = np.zeros(n)
    row[:k] = delta
    row = np.random.default_rng(n).permutation(row)
    exact = exact_tails(row)[k]
    b = float(gap_bound(row, k))
    assert mpmath.mpf(b) >= exact
    assert b <= float(exact) * (1 + 1e-10)
    closed = 1 / (1 + k / (n - k) * np.exp(delta))
    assert b == pytest.approx(closed, rel=1e-12)


def test_gap_threshold_is_the_solved_form():
    """Thm 4.5 certifies tau <= eps iff Delta_k >= ln((n-k)/k) + ln((1-eps)/eps)."""
    n, k, eps = 40, 5, 0.05
    thr = float(gap_threshold(k, n, eps))
    for d, expect in ((thr + 1e-6, True), (thr - 1e-6, False)):
        row = np.concatenate([np.full(k, d), np.zeros(n - k)])
        assert (float(gap_bound(row, k)) <= eps) is expect


def test_uniform_gap_on_arithmetic_progression():
    """GAP-UNIFORM: equal gaps delta give 1/(1 + k(e^delta - 1)) and it is >= the exact tail."""
    delta, n, k = 0.3, 60, 4
    row = -delta * np.arange(n)
    b = float(uniform_gap_bound(row, k))
    assert b == pytest.approx(1 / (1 + k * np.expm1(delta)), rel=1e-12)
    assert mpmath.mpf(b) >= exact_tails(row)[k]


def test_checkpoint_dp_is_the_optimal_cut_choice():
    """GAP-MULTI: the DP bound equals the minimum over every set of m cut points."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = np.sort(rng.normal(0, 2, 9))[::-1]
        n = s.size
        for k in (1, 3):
            for m in (1, 2):
                best = np.inf
                for cuts in itertools.combinations(range(k + 1, n), m):
                    j = [k, *cuts, n]
                    x = sum((j[r + 1] - j[r]) * np.exp(s[j[r]] - s[k - 1]) for r in range(m + 1))
                    best = min(best, x / (k + x))
                got = float(multigap_bound(s, k, n_cuts=m))
                assert got == pytest.approx(best, rel=1e-10)


@given(row=rows(), eps=st.sampled_from([1e-6, 1e-3, 0.05, 0.3, 0.9]))
def test_bound_k_is_minimal_for_its_bound_and_sound(row, eps):
    """bound_k = min{k : bound(k) <= eps}; its exact tail is <= eps."""
    tails = exact_tails(row)
    n_valid = int(np.isfinite(row).sum())
    for bound in TAIL_BOUNDS:
        ub = _all(row, bound)
        kk = int(bound_k(row, eps, bound=bound, **KW.get(bound, {})))
        assert 1 <= kk <= n_valid
        assert ub[kk - 1] <= eps
        assert np.all(ub[: kk - 1] > eps)
        assert tails[kk] <= mpmath.mpf(eps)


def test_bounds_are_not_monotone_in_k():
    """s = (10, 0, 0, 0): GAP-SINGLE certifies k = 1 but not k = 2 (hence every k is scanned)."""
    row = np.array([0.0, 10.0, 0.0, 0.0])
    assert float(gap_bound(row, 1)) < 0.01 < float(gap_bound(row, 2))
    assert int(bound_k(row, 0.01)) == 1


def test_batched_per_row_k_axis_and_backends(backend):
    """Batched rows, k per row, another key axis; same numbers on every backend and device."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (3, 4, 11))
    x[1, 2, 5:] = -np.inf
    k = rng.integers(1, 12, (3, 4))
    xb = backend.asarray(np.moveaxis(x, -1, 0))
    kb = backend.asarray(k)
    for bound in TAIL_BOUNDS:
        kw = KW.get(bound, {})
        got = tail_bound(xb, kb, bound=bound, axis=0, **kw)
        assert device_of(got) == device_of(xb)
        ref = np.array(
            [
                [float(tail_bound(x[i, j], int(k[i, j]), bound=bound, **kw)) for j in range(4)]
                for i in range(3)
            ]
        )
        np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-13)
        ck = bound_k(xb, 0.02, bound=bound, axis=0, **kw)
        ref_k = [
            [int(bound_k(x[i, j], 0.02, bound=bound, **kw)) for j in range(4)] for i in range(3)
        ]
        np.testing.assert_array_equal(to_numpy(ck), ref_k)
    assert to_numpy(gap_bound(xb, kb, axis=0)).shape == (3, 4)
    assert to_numpy(gap_exact_head_bound(xb, 2, axis=0)).shape == (3, 4)


@pytest.mark.parametrize(
    "row,k,match",
    [
        ([0.0, np.nan], 1, "NaN"),
        ([0.0, np.inf], 1, r"\+inf"),
        ([-np.inf, -np.inf], 1, "fully masked"),
        ([0.0, 1.0], 0, r"\[1, 2\]"),
        ([0.0, 1.0], 3, r"\[1, 2\]"),
    ],
)
def test_bad_input(row, k, match):
    with pytest.raises(ValueError, match=match):
        gap_bound(np.array(row), k)


def test_bad_options():
    with pytest.raises(ValueError, match="bound must be"):
        tail_bound(np.zeros(3), 1, bound="nope")
    with pytest.raises(ValueError, match="n_cuts"):
        multigap_bound(np.zeros(3), 1, n_cuts=-1)
    with pytest.raises(ValueError, match="eps"):
        bound_k(np.zeros(3), 1.0)


# --------------------------------------------------------------------------
# Blockwise bounds
# --------------------------------------------------------------------------


@st.composite
def blocked_rows(draw):
    row = draw(rows(max_n=14))
    assume(np.isfinite(row).all())
    n = row.size
    n_blocks = draw(st.integers(1, min(5, n)))
    cuts = (
        sorted(draw(st.sets(st.integers(1, n - 1), min_size=n_blocks - 1, max_size=n_blocks - 1)))
        if n > 1 and n_blocks > 1
        else []
    )
    labels = np.zeros(n, int)
    for c in cuts:
        labels[c:] += 1
    nb = int(labels.max()) + 1
    slack = draw(st.sampled_from([0.0, 0.5]))
    lo = np.array([row[labels == b].min() for b in range(nb)], float) - slack
    up = np.array([row[labels == b].max() for b in range(nb)], float) + slack
    sizes = np.bincount(labels, minlength=nb)
    kept = np.array(draw(st.lists(st.booleans(), min_size=nb, max_size=nb)))
    return row, labels, lo, up, sizes, kept


@pytest.mark.parametrize("offset", [0.0, -1e3, -1e300, 1e300])
def test_block_bounds_keep_block_sizes_next_to_huge_logits(offset):
    """Regression (found by the thorough profile): log n + u lost log n when |u| was huge,
    so blocks of 1 and 4 keys at -1e300 weighed the same and the lower bound was 0.5 for
    an exact tail of 0.2."""
    lo = np.full(2, offset)
    b_lo, b_hi = block_tail_bounds(lo, lo, np.array([1, 4]), np.array([False, True]))
    assert float(b_lo) <= 0.2 <= float(b_hi)
    assert float(b_hi) - float(b_lo) < 1e-9


@given(case=blocked_rows())
def test_block_bounds_sandwich_the_exact_tail(case):
    """BLOCK-BOUNDS: lower <= exact tail of the kept blocks <= upper (mpmath)."""
    row, labels, lo, up, sizes, kept = case
    exact = exact_tail_of_set(row, kept[labels])
    b_lo, b_hi = block_tail_bounds(lo, up, sizes, kept)
    assert mpmath.mpf(float(b_lo)) <= exact <= mpmath.mpf(float(b_hi))


@pytest.mark.parametrize("kept", [[True, False, False], [False, True, True], [True, True, False]])
def test_block_bounds_equality_on_block_constant_logits(kept):
    """Block-constant logits attain both bounds (head at l / tail at u, and the mirror)."""
    lo = np.array([1.0, -2.0, 0.5])
    up = np.array([3.0, 0.0, 0.5])
    sizes = np.array([2, 3, 4])
    kept = np.array(kept)
    b_lo, b_hi = block_tail_bounds(lo, up, sizes, kept)
    hi_row = np.repeat(np.where(kept, lo, up), sizes)
    lo_row = np.repeat(np.where(kept, up, lo), sizes)
    mask = np.repeat(kept, sizes)
    assert float(b_hi) == pytest.approx(float(exact_tail_of_set(hi_row, mask)), rel=1e-11)
    assert float(b_lo) == pytest.approx(float(exact_tail_of_set(lo_row, mask)), rel=1e-11)
    assert mpmath.mpf(float(b_hi)) >= exact_tail_of_set(hi_row, mask)
    assert mpmath.mpf(float(b_lo)) <= exact_tail_of_set(lo_row, mask)


def _subsets(nb: int):
    for r in range(nb + 1):
        yield from itertools.combinations(range(nb), r)


@given(case=blocked_rows(), eps=st.sampled_from([1e-3, 0.05, 0.3]))
def test_greedy_blocks_optimal_in_blocks_and_within_one_block_in_keys(case, eps):
    """cost='blocks' is the exact minimum; cost='keys' is within max n_b of the optimum."""
    _, _, lo, up, sizes, _ = case
    nb = lo.size
    best_blocks, best_keys = nb, int(sizes.sum())
    for sub in _subsets(nb):
        mask = np.zeros(nb, bool)
        mask[list(sub)] = True
        if float(block_tail_bounds(lo, up, sizes, mask)[1]) <= eps:
            best_blocks = min(best_blocks, len(sub))
            best_keys = min(best_keys, int(sizes[mask].sum()))
    sel_b = greedy_block_set(lo, up, sizes, eps, cost="blocks")
    assert int(smallest_block_count(lo, up, sizes, eps)) == int(sel_b.n_blocks)
    assert int(sel_b.n_blocks) == best_blocks
    assert float(sel_b.tail_upper) <= eps
    sel_k = greedy_block_set(lo, up, sizes, eps, cost="keys")
    assert float(sel_k.tail_upper) <= eps
    assert best_keys <= int(sel_k.n_keys) <= best_keys + int(sizes.max())
    assert int(sel_k.n_keys) == int(sizes[to_numpy(sel_k.kept)].sum())


def test_block_functions_take_per_row_sizes():
    """Sizes per row (each query's visible keys of a block, 0 for an unseen block) give
    each row the bounds and the greedy set it gets on its own (CertifiedBlocks uses it)."""
    rng = np.random.default_rng(2)
    lo = rng.normal(size=(4, 5))
    up = lo + rng.uniform(0, 2, (4, 5))
    sizes = rng.integers(0, 4, (4, 5))
    sizes[:, 0] = 2
    kept = rng.random((4, 5)) < 0.5
    both = block_tail_bounds(lo, up, sizes, kept)
    sel = greedy_block_set(lo, up, sizes, 0.2)
    for i in range(4):
        one = block_tail_bounds(lo[i], up[i], sizes[i], kept[i])
        assert float(both.lower[i]) == float(one.lower)
        assert float(both.upper[i]) == float(one.upper)
        alone = greedy_block_set(lo[i], up[i], sizes[i], 0.2)
        np.testing.assert_array_equal(to_numpy(sel.kept)[i], to_numpy(alone.kept))
        assert int(sel.n_keys[i]) == int(alone.n_keys)


def test_block_bounds_backends(backend):
    rng = np.random.default_rng(1)
    lo = rng.normal(size=(2, 6))
    up = lo + rng.uniform(0, 2, (2, 6))
    sizes = rng.integers(1, 5, (2, 6))
    kept = rng.random((2, 6)) < 0.4
    ref = block_tail_bounds(lo, up, sizes, kept)
    args = [backend.asarray(a) for a in (lo, up, sizes, kept)]
    got = block_tail_bounds(*args)
    for g, r in zip(got, ref, strict=True):
        assert device_of(g) == device_of(args[0])
        np.testing.assert_allclose(to_numpy(g), r, rtol=1e-13)
    sel = greedy_block_set(*(backend.asarray(a) for a in (lo, up, sizes)), 0.1)
    np.testing.assert_array_equal(to_numpy(sel.kept), greedy_block_set(lo, up, sizes, 0.1).kept)


def test_block_bounds_bad_input():
    with pytest.raises(ValueError, match="lower > upper"):
        block_tail_bounds(np.array([1.0]), np.array([0.0]), np.array([1]), np.array([True]))
    with pytest.raises(ValueError, match="sizes"):
        block_tail_bounds(np.array([0.0]), np.array([1.0]), np.array([-1]), np.array([True]))


@pytest.mark.parametrize("kind", ["box", "ball", "both"])
def test_key_block_bounds_contain_every_score(kind):
    """Score bounds from key blocks (cells.py) contain every score of their block."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(3, 8))
    keys = rng.normal(size=(21, 8))
    lo, up, sizes = key_block_bounds(q, keys, 5, kind=kind)
    assert list(sizes) == [5, 5, 5, 5, 1]
    s = q @ keys.T / np.sqrt(8)
    blk = np.arange(21) // 5
    assert np.all(lo[:, blk] <= s) and np.all(s <= up[:, blk])
    b_lo, b_hi = block_tail_bounds(lo, up, sizes, np.array([True, False, True, False, False]))
    kept = np.isin(blk, [0, 2])
    for i in range(3):
        ex = exact_tail_of_set(s[i], kept)
        assert mpmath.mpf(float(b_lo[i])) <= ex <= mpmath.mpf(float(b_hi[i]))


def test_exact_weights_reference_sanity():
    """The mpmath reference itself: weights of a masked row."""
    w = exact_weights([0.0, -np.inf, 0.0])
    assert w[1] == 0 and w[0] == w[2] == 1


def test_renamed_bound_names_warn_and_agree():
    """0.1 renames: certified_k -> bound_k, exact_head_bound -> gap_exact_head_bound,
    BOUNDS -> TAIL_BOUNDS, bound="checkpoint" -> "optimal_cuts" (old names warn)."""
    row = np.random.default_rng(3).normal(0, 2, 30)
    with pytest.warns(DeprecationWarning, match="bound_k"):
        old = certattn.certified_k
    assert old is bound_k
    with pytest.warns(DeprecationWarning, match="gap_exact_head_bound"):
        assert certattn.exact_head_bound is gap_exact_head_bound
    with pytest.warns(DeprecationWarning, match="TAIL_BOUNDS"):
        assert certattn.BOUNDS == TAIL_BOUNDS
    with pytest.warns(DeprecationWarning, match="optimal_cuts"):
        a = bound_k(row, 0.05, bound="checkpoint", n_cuts=2)
    assert int(a) == int(bound_k(row, 0.05, bound="optimal_cuts", n_cuts=2))


@pytest.mark.parametrize("n_cuts", [7, 8, 10**9, 2**62])
def test_n_cuts_is_capped_at_what_the_row_can_use(monkeypatch, n_cuts):
    """Issue 16.8: ``n_cuts=10**9`` on 8 keys ran 10^9 DP rounds; at most n - 1 matter."""
    import certattn.bounds as b

    rounds = []
    real = b._checkpoint_costs

    def counted(p, xp, m):
        rounds.append(m)
        if m > 7:  # uncapped: would run m rounds; fail instead of hanging
            pytest.fail(f"{m} dynamic-programming rounds for 8 keys")
        return real(p, xp, m)

    monkeypatch.setattr(b, "_checkpoint_costs", counted)
    x = np.array([3.0, 1.0, 0.5, 0.4, 0.3, -1.0, -2.0, -5.0])
    got = bound_k(x, 0.1, bound="optimal_cuts", n_cuts=n_cuts)
    assert rounds == [7]
    rounds.clear()
    assert int(got) == int(bound_k(x, 0.1, bound="optimal_cuts", n_cuts=7))
    assert float(multigap_bound(x, 2, n_cuts=n_cuts)) == float(multigap_bound(x, 2, n_cuts=7))
    assert rounds and max(rounds) == 7


@pytest.mark.parametrize("bad", [-1, 1.5, float("nan"), float("inf"), "3", None, True])
def test_n_cuts_rejects_non_integers_with_a_value_error(bad):
    with pytest.raises(ValueError, match="n_cuts must be a non-negative integer"):
        bound_k(np.zeros(4), 0.1, bound="optimal_cuts", n_cuts=bad)
