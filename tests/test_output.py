"""Output-level bounds (certattn.output): identity exact, bounds sound, chain, budgets.

Theorems OUT-HEAD-TAIL, OUT-BOUNDED, OUT-DIAMETER, OUT-BEST and OUT-VAR-DECOMP.  The
reference for soundness is the exact error |Attn - Attn_k| in mpmath (60 digits).
"""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from certattn._array import device_of, to_numpy
from certattn.output import (
    head_tail_terms,
    output_bounds,
    smallest_k_for_output,
    variance_decomposition,
)

from ._exact import exact_weights

NAMES = ("bounded", "diameter_all", "diameter", "tail_head", "variance")


@st.composite
def cases(draw, max_n: int = 10):
    """(logits (Lq, n), values (n, dv), kept (Lq, n)) with masks, ties and wide ranges."""
    n = draw(st.integers(2, max_n))
    lq = draw(st.integers(1, 3))
    dv = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    sigma = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    x = rng.normal(0, sigma, (lq, n))
    if draw(st.booleans()):
        x = np.round(x)  # ties
    x[rng.random((lq, n)) < draw(st.sampled_from([0.0, 0.3]))] = -np.inf
    x[:, 0] = np.where(np.isfinite(x).any(axis=1), x[:, 0], 0.0)
    x = x + draw(st.sampled_from([0.0, 1e5, -3e6]))  # large offsets: rounding of LSE
    v = rng.normal(0, draw(st.sampled_from([1e-3, 1.0, 100.0])), (n, dv))
    if draw(st.booleans()):
        v += 50.0  # values far from the origin: C >> spread
    kind = draw(st.sampled_from(["topk", "random"]))
    if kind == "topk":
        kk = rng.integers(1, n + 1, lq)
        order = np.argsort(-x, axis=1, kind="stable")
        kept = np.zeros_like(x, bool)
        for i in range(lq):
            kept[i, order[i, : kk[i]]] = True
    else:
        kept = rng.random((lq, n)) < 0.5
    kept &= np.isfinite(x)
    assume(kept.any(axis=1).all())
    return x, v, kept


def _exact_error(row: np.ndarray, v: np.ndarray, kept: np.ndarray) -> mpmath.mpf:
    """Exact |Attn - Attn_k| (Euclidean) in mpmath.

    Attn - Attn_k is a tiny difference of two O(|v|) vectors when the tail is tiny, so it
    is evaluated at 1000 digits (ranges up to e^-2000 stay exact).
    """
    with mpmath.workdps(1000):
        return _exact_error_at_precision(row, v, kept)


def _exact_error_at_precision(row: np.ndarray, v: np.ndarray, kept: np.ndarray) -> mpmath.mpf:
    w = exact_weights(row)
    z = mpmath.fsum(w)
    zh = mpmath.fsum(wi for wi, k in zip(w, kept, strict=True) if k)
    err2 = mpmath.mpf(0)
    for c in range(v.shape[1]):
        col = [mpmath.mpf(float(a)) for a in v[:, c]]
        attn = mpmath.fsum(wi * ci for wi, ci in zip(w, col, strict=True)) / z
        head = mpmath.fsum(wi * ci for wi, ci, k in zip(w, col, kept, strict=True) if k) / zh
        err2 += (attn - head) ** 2
    return mpmath.sqrt(err2)


@given(case=cases())
def test_every_bound_is_sound_against_exact_arithmetic(case):
    """OUT-BOUNDED, OUT-DIAMETER, OUT-BEST: each bound >= the exact error (mpmath)."""
    x, v, kept = case
    ob = output_bounds(x, v, kept)
    for i in range(x.shape[0]):
        exact = _exact_error(x[i], v, kept[i])
        for name in (*NAMES, "best"):
            assert mpmath.mpf(float(getattr(ob, name)[i])) >= exact, name
        assert float(ob.error[i]) == pytest.approx(
            float(exact), rel=1e-6, abs=1e-9 * np.abs(v).max()
        )


def test_rows_spanning_the_float_range_are_bounded_quietly():
    """Logits at +-1.7e308 in one row: x - max overflows to -inf for the low key (its
    exact weight is below e^-1.7e308); no warning, every bound still covers the error."""
    x = np.array([[1.7e308, 1.7e308 - 1e293, -1.7e308, 0.0]])
    v = np.eye(4)[:, :2]
    for kept in ([True, False, False, False], [True, True, False, False]):
        kept = np.array([kept])
        ob = output_bounds(x, v, kept)
        exact = _exact_error(x[0], v, kept[0])
        for name in (*NAMES, "best"):
            assert mpmath.mpf(float(getattr(ob, name)[0])) >= exact, name
        assert 0 < float(ob.tail_upper[0]) <= 1e-300  # a positive tail, bounded tightly


@given(case=cases())
def test_head_tail_identity_is_exact(case):
    """OUT-HEAD-TAIL: Attn - Attn_k = tau (mu_tail - mu_head), and tau matches mpmath."""
    x, v, kept = case
    ht = head_tail_terms(x, v, kept)
    scale = np.abs(v).max()
    np.testing.assert_allclose(
        ht.error, ht.tau[:, None] * (ht.mu_tail - ht.mu_head), rtol=1e-9, atol=1e-12 * scale
    )
    np.testing.assert_allclose(ht.attn_k, ht.mu_head)
    for i in range(x.shape[0]):
        w = exact_weights(x[i])
        tau = mpmath.fsum(wi for wi, k in zip(w, kept[i], strict=True) if not k) / mpmath.fsum(w)
        assert float(ht.tau[i]) == pytest.approx(float(tau), rel=1e-12, abs=1e-300)


@given(case=cases())
def test_diameter_chain(case):
    """OUT-DIAMETER chain: tau max_T|v_j - mu_H| <= tau diam_HT <= tau diam(V) <= 2 C tau.

    Checked on a direct NumPy reference (the mathematics) and on the library's bounds.
    """
    x, v, kept = case
    ht = head_tail_terms(x, v, kept)
    ob = output_bounds(x, v, kept)
    tol = 1e-9
    for i in range(x.shape[0]):
        valid = np.isfinite(x[i])
        tail = valid & ~kept[i]
        if not tail.any():
            assert float(ob.best[i]) == 0.0 or float(ob.tail_head[i]) == 0.0
            continue
        tau = float(ht.tau[i])
        th = np.linalg.norm(v[tail] - ht.mu_head[i], axis=1).max()
        d_ht = np.linalg.norm(v[kept[i]][:, None] - v[tail][None], axis=-1).max()
        d_all = np.linalg.norm(v[valid][:, None] - v[valid][None], axis=-1).max()
        c = np.linalg.norm(v[valid], axis=1).max()
        assert th <= d_ht * (1 + tol) + 1e-12 * c
        assert d_ht <= d_all * (1 + tol)
        assert d_all <= 2 * c * (1 + tol)
        chain = [ob.tail_head[i], ob.diameter[i], ob.diameter_all[i], ob.bounded[i]]
        for lo, hi in itertools.pairwise(chain):
            assert float(lo) <= float(hi) * (1 + tol) + 1e-9 * tau * c
        assert float(ob.tail_head[i]) == pytest.approx(tau * th, rel=1e-6, abs=1e-6 * tau * c)


@given(case=cases())
def test_variance_decomposition_and_best(case):
    """OUT-VAR-DECOMP: total = (1-tau) V_H + tau V_T + between; error = sqrt(chi2 between);
    OUT-BEST: best is the minimum and `tightest` names it."""
    x, v, kept = case
    vd = variance_decomposition(x, v, kept)
    scale = np.abs(v).max() ** 2
    np.testing.assert_allclose(
        vd.total,
        (1 - vd.tau) * vd.within_head + vd.tau * vd.within_tail + vd.between,
        rtol=1e-9,
        atol=1e-12 * scale,
    )
    ht = head_tail_terms(x, v, kept)
    err = np.linalg.norm(ht.error, axis=-1)
    finite = vd.tau < 1
    np.testing.assert_allclose(vd.error[finite], err[finite], rtol=1e-7, atol=1e-9 * np.sqrt(scale))
    # direct reference for the total variance
    for i in range(x.shape[0]):
        p = np.exp(x[i] - x[i].max())
        p /= p.sum()
        ref = (p * ((v - p @ v) ** 2).sum(axis=1)).sum()
        assert float(vd.total[i]) == pytest.approx(ref, rel=1e-9, abs=1e-12 * scale)
    ob = output_bounds(x, v, kept)
    stack = np.stack([getattr(ob, n) for n in NAMES], axis=-1)
    np.testing.assert_array_equal(ob.best, stack.min(axis=-1))
    np.testing.assert_array_equal(ob.tightest_names(), np.array(NAMES)[stack.argmin(axis=-1)])


def test_variance_bound_can_be_the_tightest():
    """Values clustered except one far tail key of tiny mass: the variance bound need not win,
    but with many moderately spread tail keys it does (names are reported per row)."""
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(0, 0.2, (1, n))
    v = rng.normal(0, 1, (n, 8))
    ob = output_bounds(x, v, k=int(0.9 * n))
    assert set(ob.tightest_names().ravel()) <= set(NAMES)
    assert float(ob.best[0]) <= float(ob.tail_head[0])


def test_tail_upper_is_used():
    """A given tail bound (e.g. a certificate's) scales the bounds linearly in 2 C tau."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 12))
    v = rng.normal(size=(12, 3))
    a = output_bounds(x, v, k=4)
    b = output_bounds(x, v, k=4, tail_upper=2 * np.asarray(a.tail_upper))
    np.testing.assert_allclose(b.bounded, 2 * a.bounded, rtol=1e-14)
    assert np.all(b.tail_head >= a.tail_head)


@given(
    case=cases(max_n=9),
    delta=st.sampled_from([1e-6, 1e-2, 0.3, 5.0]),
    bound=st.sampled_from(["best", "bounded", "variance", "tail_head"]),
)
def test_smallest_k_for_output_is_minimal_and_sound(case, delta, bound):
    """Returned k: bound(k) <= delta, bound(k - 1) > delta, exact error of k <= delta."""
    x, v, _ = case
    ks = smallest_k_for_output(x, v, delta, bound=bound)
    n_valid = np.isfinite(x).sum(axis=1)
    for i in range(x.shape[0]):
        k = int(ks[i])
        assert 1 <= k <= n_valid[i]

        def value(kk: int, row: np.ndarray = x[i : i + 1]) -> float:
            ob = output_bounds(row, v, k=kk, diameters=False)
            if bound == "best":
                return min(float(getattr(ob, n)[0]) for n in ("bounded", "tail_head", "variance"))
            return float(getattr(ob, bound)[0])

        assert value(k) <= delta * (1 + 1e-9)
        if k > 1:
            assert value(k - 1) > delta * (1 - 1e-9)
        order = np.argsort(-x[i], kind="stable")
        kept = np.zeros(x.shape[1], bool)
        kept[order[:k]] = True
        kept &= np.isfinite(x[i])
        assert _exact_error(x[i], v, kept) <= mpmath.mpf(delta)


def test_batched_heads_and_backends(backend):
    """(batch, head, Lq, n) logits with (batch, head, n, dv) values, on every backend."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, (2, 3, 5, 7))
    x[0, 1, 2, 4:] = -np.inf
    v = rng.normal(size=(2, 3, 7, 4))
    kept = rng.random(x.shape) < 0.5
    kept[..., 0] = True
    ref = output_bounds(x, v, kept)
    xb, vb, kb = (backend.asarray(a) for a in (x, v, kept))
    got = output_bounds(xb, vb, kb, chunk_elems=64)
    assert device_of(got.best) == device_of(xb)
    for name in (*NAMES, "best", "error", "tail_upper"):
        np.testing.assert_allclose(to_numpy(getattr(got, name)), getattr(ref, name), rtol=1e-12)
    for i in range(5):
        one = output_bounds(x[1, 2, i], v[1, 2], kept[1, 2, i])
        assert float(one.best) == pytest.approx(float(ref.best[1, 2, i]), rel=1e-12)
    # The default chunk is larger than the key axis: slices must stay in range
    # (array-api-strict rejects out-of-range slices that NumPy silently clips).
    full = output_bounds(xb, vb, kb)
    np.testing.assert_allclose(to_numpy(full.best), ref.best, rtol=1e-12)
    kb_out = smallest_k_for_output(xb, vb, 0.1, chunk_elems=64)
    np.testing.assert_array_equal(to_numpy(kb_out), smallest_k_for_output(x, v, 0.1))


def test_bad_input():
    x = np.zeros((2, 4))
    v = np.zeros((4, 2))
    with pytest.raises(ValueError, match="kept set holds no valid key"):
        output_bounds(x, v, np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="values must be"):
        output_bounds(x, np.zeros((3, 2)), k=1)
    with pytest.raises(ValueError, match="NaN or inf"):
        output_bounds(x, np.full((4, 2), np.nan), k=1)
    with pytest.raises(ValueError, match="delta"):
        smallest_k_for_output(x, v, -1.0)
    with pytest.raises(ValueError, match="kept"):
        head_tail_terms(x, v)


# Values at the edges of the float range (issue 20): the power-of-two rescaling of the
# engine must neither raise (2^1024 and 2^1073 are not floats) nor lose soundness.
_Q = np.array([[1.0, 0.0], [0.0, 1.0]])
_K = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
_SIGNS = np.array([[1.0, -1.0], [-1.0, 0.0], [0.0, 1.0]])
EDGE_VALUES = {
    "2^1023": 2.0**1023 * _SIGNS,
    "1.7e308": 1.7e308 * _SIGNS,
    "-1.7e308": -1.7e308 * _SIGNS,
    "5e-324": 5e-324 * _SIGNS,
    "1e-310": 1e-310 * _SIGNS,
    "mixed": np.array([[1.7e308, 5e-324], [-1e-310, -(2.0**1023)], [3e-320, 1.0]]),
    "mixed_tiny": np.array([[1e-300, 5e-324], [-1e-310, 0.0], [3e-320, 1e-320]]),
}


def _assert_covers(bound: float, x_row: np.ndarray, v: np.ndarray, kept_row: np.ndarray):
    assert not np.isnan(bound)
    assert mpmath.mpf(bound) >= _exact_error(x_row, v, kept_row)


@pytest.mark.parametrize("name", list(EDGE_VALUES))
def test_values_at_the_float_edges_through_every_entry_point(name):
    """|v| in {2^1023, 1.7e308, 5e-324, 1e-310, mixed}: output_bounds, certify_attention
    and certified_search raise nothing and their bounds cover the exact error."""
    import certattn

    v = EDGE_VALUES[name]
    x = _Q @ _K.T
    for k in (1, 2):
        ob = output_bounds(x, v, k=k)
        kept = np.zeros(x.shape, bool)
        kept[np.arange(2)[:, None], np.argsort(-x, axis=1, kind="stable")[:, :k]] = True
        for i in range(2):
            for b in (*NAMES, "best"):
                _assert_covers(float(getattr(ob, b)[i]), x[i], v, kept[i])
    cert = certattn.certify_attention(_Q, _K, v, eps=0.5, scale=1.0)
    res = certattn.certified_search(_Q, _K, v, 0.5, scale=1.0)
    for got in (cert, res):
        for i in range(2):
            _assert_covers(float(got.error_bound[i]), x[i], v, np.asarray(got.kept)[i])
    if np.abs(v).max() < 1e-300:  # tiny values: a tiny bound, not the trivial one
        assert float(np.max(cert.error_bound)) < 1e-290


@pytest.mark.parametrize("name", list(EDGE_VALUES))
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.3, 1.0])
def test_smallest_k_for_output_at_the_float_edges(name, frac):
    """The k returned meets delta in exact arithmetic, quietly, at every value scale."""
    v = EDGE_VALUES[name]
    x = _Q @ _K.T
    delta = frac * float(np.abs(v).max())
    ks = smallest_k_for_output(x, v, delta)
    for i in range(2):
        kept = np.zeros(3, bool)
        kept[np.argsort(-x[i], kind="stable")[: int(ks[i])]] = True
        assert _exact_error(x[i], v, kept) <= mpmath.mpf(delta)
