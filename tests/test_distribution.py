"""Distribution-level identities (THEORY section 2) on every backend, against mpmath."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import certattn
from certattn._array import device_of, to_numpy
from certattn.distribution import kl_budget_to_tv, tv_budget_to_kl

from ._exact import exact_tail_of_set, exact_weights
from .test_topk import logit_rows


@st.composite
def rows_and_sets(draw):
    row = draw(logit_rows(dtypes=[np.float32, np.float64]))
    kept = np.array(draw(st.lists(st.booleans(), min_size=row.size, max_size=row.size)))
    assume((kept & np.isfinite(row)).any())  # the kept set holds a valid key
    return row, kept


@mpmath.workdps(350)
def _exact_divergences(row, kept):
    """TV, KL(P_hat||P), chi2, Hellinger^2 straight from their definitions, in mpmath.

    350 digits: the definitions subtract probabilities near 1 (``|p - p_hat|`` on kept
    keys), so a tail down to the 1e-300 tolerance of the tests must survive ``1 - tail``
    (at 80 digits a tail of e^-660 came out halved).
    """
    w = exact_weights(row)
    z = mpmath.fsum(w)
    p = [wi / z for wi in w]
    a = mpmath.fsum(wi for wi, k in zip(w, kept, strict=True) if k)
    phat = [wi / a if k else mpmath.mpf(0) for wi, k in zip(w, kept, strict=True)]
    tv = mpmath.fsum(abs(x - y) for x, y in zip(p, phat, strict=True)) / 2
    kl = mpmath.fsum(y * mpmath.log(y / x) for x, y in zip(p, phat, strict=True) if y > 0)
    chi2 = mpmath.fsum(y**2 / x for x, y in zip(p, phat, strict=True) if y > 0) - 1
    hell2 = 1 - mpmath.fsum(mpmath.sqrt(x * y) for x, y in zip(p, phat, strict=True))
    return tv, kl, chi2, hell2


def _close(value: float, exact: mpmath.mpf, rtol: float = 1e-12, atol: float = 0.0) -> bool:
    return abs(mpmath.mpf(value) - exact) <= rtol * abs(exact) + atol


@given(rs=rows_and_sets())
@example(  # a tail of e^-660: the definitions need more than 80 digits
    rs=(
        np.array([-1.7014117e38, -1.7014117e38, -40.0, -1.7014117e38, -700.0], np.float32),
        np.array([False, False, True, False, False]),
    )
)
def test_tail_mass_is_tv_for_any_kept_set(rs):
    """TV-TAIL: tail_mass equals the exact TV distance (and the exact tail)."""
    row, kept = rs
    tau = float(certattn.tail_mass(row, kept))
    tv, *_ = _exact_divergences(row, kept)
    assert _close(tau, exact_tail_of_set(row, kept), atol=1e-300)
    assert _close(tau, tv, rtol=1e-12, atol=1e-300)


@given(rs=rows_and_sets())
def test_divergences_match_their_definitions(rs):
    """TV-KL and DIV-COROLLARIES against the textbook definitions in exact arithmetic."""
    row, kept = rs
    d = certattn.truncation_divergences(row, kept)
    tv, kl, chi2, hell2 = _exact_divergences(row, kept)
    assume(tv < 1 - 1e-9)  # chi2 ~ 1/(1 - tau) is ill-conditioned right at tau -> 1
    # Exact-arithmetic sums of many tiny terms carry ~1e-60 absolute noise: allow it.
    assert _close(float(d.tv), tv, atol=1e-40)
    assert _close(float(d.kl), kl, rtol=1e-11, atol=1e-40)
    assert _close(float(d.chi2), chi2, rtol=1e-11, atol=1e-40)
    assert _close(float(d.hellinger2), hell2, rtol=1e-11, atol=1e-40)
    assert float(d.renyi(0.5)) == float(d.kl) == float(d.renyi(3.0))
    assert (float(d.kl_reverse) == math.inf) == (float(d.tv) > 0)
    # TV = 1 - exp(-KL) and KL = -log(1 - TV), both directions, in floating point.
    assert float(certattn.tv_from_kl(d.kl)) == pytest.approx(float(d.tv), rel=1e-12, abs=1e-300)
    # -log1p(-tau) amplifies tau's relative error by tau / ((1 - tau) KL) near tau = 1.
    tau, kl_val = float(d.tv), float(d.kl)
    cond = tau / ((1 - tau) * kl_val) if tau > 0 else 1.0
    rel = 1e-14 * max(cond, 1.0) + 1e-13
    assert float(certattn.kl_from_tail(d.tv)) == pytest.approx(kl_val, rel=rel, abs=1e-300)


def test_tiny_tails_keep_relative_accuracy():
    row = np.array([0.0, -700.0, -705.0])  # tail ~ e^-700: far below float64 epsilon
    kept = np.array([True, False, False])
    tau = float(certattn.tail_mass(row, kept))
    exact = exact_tail_of_set(row, kept)
    assert exact > 0 and _close(tau, exact, rtol=1e-13)
    d = certattn.truncation_divergences(row, kept)
    assert float(d.kl) > 0 and _close(float(d.kl), exact, rtol=1e-12)


@given(eps=st.floats(0, 0.999999))
def test_budgets_are_interchangeable(eps):
    """BUDGET-EQUIV: TV <= eps iff KL <= -log(1 - eps); the maps invert each other."""
    kl = tv_budget_to_kl(eps)
    assert kl_budget_to_tv(kl) == pytest.approx(eps, rel=1e-14, abs=1e-300)
    row = np.array([1.0, 0.5, 0.0, -1.0, -3.0])
    cert = certattn.certify_topk(row, eps)
    assert float(cert.kl_upper) <= kl * (1 + 1e-12) + 1e-300


def test_pinsker_is_loose_here():
    """THEORY's example: KL = 0.01 gives TV 0.00995 exactly, Pinsker says 0.0707."""
    assert kl_budget_to_tv(0.01) == pytest.approx(0.00995017, rel=1e-6)
    assert math.sqrt(0.01 / 2) > 7 * kl_budget_to_tv(0.01)


def test_topk_mask_and_tail_by_k():
    row = np.array([0.5, 2.0, 2.0, -np.inf, 1.0])
    mask = certattn.topk_mask(row, 2)
    assert mask.tolist() == [False, True, True, False, False]
    assert float(certattn.tail_mass(row, k=2)) == float(certattn.tail_mass(row, mask))
    assert certattn.topk_mask(row, 10).sum() == 4  # masked keys are never kept


def test_log_partition():
    row = np.array([0.0, math.log(3.0), -np.inf])
    assert float(certattn.log_partition(row)) == pytest.approx(math.log(4.0))
    kept = np.array([False, True, True])
    assert float(certattn.log_partition(row, kept)) == pytest.approx(math.log(3.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kept": np.ones(2, bool)}, "shape"),
        ({"kept": np.ones(3)}, "boolean"),
        ({}, "exactly one"),
        ({"kept": np.ones(3, bool), "k": 1}, "exactly one"),
    ],
)
def test_bad_kept_sets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        certattn.tail_mass(np.zeros(3), **kwargs)


def test_empty_kept_set_is_an_error_for_divergences():
    with pytest.raises(ValueError, match="no valid key"):
        certattn.truncation_divergences(np.array([0.0, -np.inf]), np.array([False, True]))


def test_backends_agree_and_stay_on_device(backend):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, (3, 5, 17))
    x[0, 0, 3:] = -np.inf
    kept = certattn.topk_mask(x, 4)
    xb, kb = backend.asarray(x), backend.asarray(kept)
    tau = certattn.tail_mass(xb, kb)
    assert device_of(tau) == device_of(xb)
    np.testing.assert_allclose(to_numpy(tau), certattn.tail_mass(x, kept), rtol=1e-12)
    d = certattn.truncation_divergences(xb, kb)
    for name in ("tv", "kl", "kl_reverse", "chi2", "hellinger2"):
        val = getattr(d, name)
        assert device_of(val) == device_of(xb), name
    np.testing.assert_allclose(
        to_numpy(d.chi2), certattn.truncation_divergences(x, kept).chi2, rtol=1e-12
    )
    m = certattn.topk_mask(xb, 4)
    assert device_of(m) == device_of(xb)
    np.testing.assert_array_equal(to_numpy(m), kept)


@pytest.mark.parametrize(
    ("fn", "arg", "match"),
    [
        (certattn.kl_from_tail, -0.1, "tau"),
        (certattn.kl_from_tail, 1.5, "tau"),
        (certattn.kl_from_tail, np.array([0.1, np.nan]), "tau"),
        (certattn.tv_from_kl, -1.0, "kl"),
        (certattn.tv_from_kl, np.nan, "kl"),
    ],
)
def test_divergence_conversions_reject_nonsense(fn, arg, match):
    """Issue 16 item 12: a negative tail mass used to give a negative KL."""
    with pytest.raises(ValueError, match=match):
        fn(np.asarray(arg))


def test_divergence_conversions_at_their_edges():
    assert float(certattn.kl_from_tail(np.asarray(1.0))) == np.inf
    assert float(certattn.kl_from_tail(np.asarray(0.0))) == 0.0
    assert float(certattn.tv_from_kl(np.asarray(np.inf))) == 1.0


def test_longdouble_logits_beyond_float64_are_refused():
    """Issue 16 item 2: float128 values beyond float64 silently gave a non-minimal k."""
    big = np.longdouble("1e400")
    with pytest.raises(ValueError, match="beyond the float64 range"):
        certattn.certify_topk(np.array([[big, big, 0]]), 0.6)
    with pytest.raises(ValueError, match="not exactly representable"):
        certattn.certify_topk(np.array([[1, 2, np.longdouble(1) / 3]]), 0.6)
    exact = np.array([[3.0, 3.0, 0.0]], dtype=np.longdouble)
    assert int(certattn.certify_topk(exact, 0.6).k[0]) == 1
