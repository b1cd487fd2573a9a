"""The fast paths of ``certattn verify`` and of the library functions it exercises.

The Top-k mask (one selection of the ``k``-th value and a count of ties) against the
verify reference (a stable order and a scatter: an independent algorithm) on rows full of
ties; the Gauss-Legendre reference integrals against mpmath.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

import certattn
from certattn.verify._common import rank_mask
from certattn.verify.gaussian import _gauss_moments, _threshold_integrals


def _tied_rows(rng, r, n, dtype):
    x = np.round(rng.standard_normal((r, n)) * rng.uniform(0.3, 3.0, (r, 1)))
    x[rng.random((r, n)) < 0.3] = -np.inf
    x[rng.random((r, n)) < 0.1] = -0.0  # -0.0 ties with 0.0
    return x.astype(dtype)


def _np():
    import array_api_compat.numpy as xnp

    return xnp


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_reference_mask_agrees_with_the_library_on_ties(dtype):
    rng = np.random.default_rng(0)
    xp = _np()
    for n in (1, 2, 7, 33):
        x = _tied_rows(rng, 50, n, dtype)
        for k in (rng.integers(0, n + 2, 50), np.full(50, max(1, n // 2))):  # sort, select
            lib = np.asarray(certattn.topk_mask(x, k))
            ref = np.asarray(rank_mask(xp, x.astype(np.float64), xp.asarray(k)))
            assert (lib == ref).all()
            assert (lib.sum(-1) == np.minimum(k, (x > -np.inf).sum(-1))).all()


def test_topk_mask_keeps_the_earliest_of_tied_keys():
    x = np.array([[1.0, 3.0, 1.0, 3.0, 1.0, -np.inf, 1.0]])
    want = [[True, True, True, True, False, False, False]]
    assert certattn.topk_mask(x, 4).tolist() == want
    assert certattn.topk_mask(x, np.array([4])).tolist() == want
    assert rank_mask(_np(), x, np.array([4])).tolist() == want
    assert certattn.topk_mask(x.T, 4, axis=0).T.tolist() == want


def test_topk_mask_on_array_api_strict_matches_numpy():
    xs = pytest.importorskip("array_api_strict")
    x = _tied_rows(np.random.default_rng(1), 40, 9, np.float64)
    k = np.random.default_rng(2).integers(0, 11, 40)
    lib = certattn.topk_mask(xs.asarray(x), xs.asarray(k))
    assert (np.asarray(lib) == np.asarray(certattn.topk_mask(x, k))).all()


def test_gauss_legendre_reference_integrals_against_mpmath():
    xp = _np()
    rng = np.random.default_rng(3)
    sig = rng.uniform(0.05, 4.0, 40)
    zt = np.clip(sig + rng.uniform(-5, 5, 40), np.maximum(-5, sig - 5), np.minimum(5, sig + 5))
    kept, disc = _threshold_integrals(xp, zt, sig, "cpu")
    for i in range(40):
        rho, tau = mpmath.ncdf(-zt[i]), mpmath.ncdf(zt[i] - sig[i])
        assert abs(kept[i] - rho) <= 1e-13 * rho
        assert abs(disc[i] - tau) <= 1e-13 * tau
    m0, m1, m2 = _gauss_moments(xp, sig, -10.0 + 0 * sig, sig + 10.0, "cpu", 3)
    assert np.allclose(m1 / m0, sig, rtol=1e-13, atol=1e-13)
    assert np.allclose(m2 / m0 - (m1 / m0) ** 2, 1.0, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "strict"])
def test_tail_bound_at_k_is_the_full_curve_at_k(backend):
    """``tail_bound`` evaluates only column k; the values are the full curve's (which
    ``bound_k`` uses and tests/test_bounds.py checks against mpmath) to the last bit."""
    from certattn.bounds import TAIL_BOUNDS, _bound_curve, tail_bound
    from certattn.verify._common import KINDS, _draw

    xs = pytest.importorskip("array_api_strict") if backend == "strict" else None
    rng = np.random.default_rng(4)
    for kind in KINDS:
        for dtype in (np.float64, np.float32):
            for n in (1, 2, 9, 40):
                x = _draw(rng, kind, 12, n, dtype)
                k = rng.integers(1, n + 1, 12)
                xa, ka = (xs.asarray(x), xs.asarray(k)) if xs else (x, k)
                for bound in TAIL_BOUNDS:
                    kw = {"n_cuts": 1} if bound == "optimal_cuts" else {}
                    full = np.asarray(_bound_curve(x, bound, kw.get("n_cuts"), -1)[0])
                    at_k = np.asarray(tail_bound(xa, ka, bound=bound, **kw))
                    assert np.array_equal(at_k, full[np.arange(12), k - 1]), (kind, n, bound)


@pytest.mark.parametrize("pooled", [False, True])
def test_masked_rows_hold_minus_inf_and_dtype_min_masks(pooled):
    """The "masked" kind keeps its ``-inf`` keys (a final clip to the dtype's range had
    turned every one into ``-max``) and also draws rows masked by the dtype's minimum."""
    from certattn.verify._common import Pool, _draw

    rng = np.random.default_rng(5)
    for dtype in (np.float64, np.float32, np.float16):
        x = _draw(rng, "masked", 400, 64, dtype, Pool(rng) if pooled else None)
        low = float(np.finfo(dtype).min)
        assert (x == -np.inf).mean() > 0.1 and (x == low).mean() > 0.1
        assert ((x > -np.inf) & (x > low)).any(axis=1).all()  # a valid key in every row
        assert not np.isnan(x).any()


def test_jobs_give_the_results_of_one_job(capsys):
    """``--jobs 2`` (worker processes) reports what ``--jobs 1`` does, in registry order."""
    from certattn.cli import main
    from certattn.verify import run_verify

    ids = ["TV-TAIL", "GAP-SINGLE", "GAUSS-KEPS", "BLOCK-MASS"]
    one = run_verify(rows=300, seed=3, ids=ids, progress=False)
    assert main(["verify", "--rows", "300", "--seed", "3", "--jobs", "2", "--json", "--only",
                 *ids]) == 0
    import json

    two = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in two] == ids
    for a, b in zip(one, two, strict=True):
        assert (a.rows, a.max_violation, a.tolerance, a.passed) == (
            b["rows"], b["max_violation"], b["tolerance"], b["passed"])
    assert main(["verify", "--jobs", "0"]) == 2
    with pytest.raises(ValueError, match="jobs must be an integer"):
        run_verify(rows=10, ids=["TV-TAIL"], jobs=0)


def test_row_model_keeps_long_rows_fixed_and_every_combination():
    from certattn.verify._common import LONG_KEYS, LONG_ROWS, row_shares

    lengths = [7] * 21 + [64] * 21 + [1000] * 21
    for rows in (1, 63, 500, 63 * LONG_ROWS, 10**6, 10**7):
        shares = row_shares(rows, lengths)
        assert sum(shares) == rows
        assert max(shares) - min(shares) <= 1 or rows > 63 * LONG_ROWS
        long = [s for s, n in zip(shares, lengths, strict=True) if n > LONG_KEYS]
        assert max(long) <= LONG_ROWS and (rows < 63 or min(shares) >= 1)
    big = row_shares(10**7, lengths)
    assert big[-21:] == [LONG_ROWS] * 21 and min(big[:42]) > 10**7 // 43
    assert row_shares(10**6, [1000, 2048]) == [500_000, 500_000]  # no short rows: even


def test_estimate_is_the_cost_model_and_the_schedule():
    from certattn.verify import CHECKS, estimated_seconds, rows_for

    for rows in (None, 10**5, 10**7):
        costs = [spec.seconds(rows_for(t, rows)) for t, spec in CHECKS.items()]
        one, two = estimated_seconds(rows), estimated_seconds(rows, jobs=2)
        assert one == pytest.approx(sum(costs))
        assert max(max(costs), one / 2) <= two <= one
    assert estimated_seconds(10**6) < estimated_seconds(10**7)
    assert all(s.rate > 0 and s.fixed >= 0 for s in CHECKS.values())


def test_float64_tail_screen_bounds_the_extended_tail():
    """SEARCH-SOUND's float64 upper bound on the tail is >= the longdouble tail, and tight."""
    from certattn.verify.search import _tail_exact, _tail_hi

    rng = np.random.default_rng(4)
    for mag in (0.1, 10.0, 100.0):
        q = rng.standard_normal((300, 16)) * mag
        keys = rng.standard_normal((64, 16)) * mag
        vis = np.arange(64)[None, :] < rng.integers(1, 65, 300)[:, None]
        kept = rng.random((300, 64)) < 0.5
        hi = _tail_hi(q, keys, vis, kept, 0.25)
        ex = _tail_exact(q, keys, vis, kept, 0.25)
        assert (hi >= ex).all()
        assert (hi <= ex * (1 + 1e-9) + 65e-300).all()  # 1e-300 per underflowed term


def test_quant_screen_sends_every_entry_at_a_bound_to_the_exact_scores():
    from certattn.verify.quant import _exact_near

    rng = np.random.default_rng(5)
    q, keys = rng.standard_normal((20, 32)), rng.standard_normal((50, 32))
    s = (q @ keys.T) * 0.5
    i, _, exact = _exact_near(q, keys, 0.5, ((s, 1.0),))  # a bound equal to the float64 score
    assert i.size == s.size
    far = ((s + 1e-6 * np.abs(s) + 1e-9, 1.0), (s - 1e-6 * np.abs(s) - 1e-9, -1.0))
    assert _exact_near(q, keys, 0.5, far)[0].size == 0
    assert np.allclose(np.sort(exact.astype(float)), np.sort(s.ravel()), rtol=1e-12, atol=1e-14)
