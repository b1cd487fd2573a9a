"""Tests of the Gaussian score model (THEORY.md section 5): certattn.gaussian, gaussian_mc.

Theorem ids: GAUSS-TILT, GAUSS-THRESHOLD, GAUSS-TOPFRAC, GAUSS-KEPS, GAUSS-FINITE-N,
GAUSS-LIMITS, GAUSS-VALIDITY.  References are independent of the implementation:
numerical integration (scipy.integrate.quad), mpmath at 50 digits, a private float64
sort + cumsum computation of the exact k_eps, and the numbers quoted in THEORY.md.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, optimize, special, stats

from certattn import gaussian as g
from certattn import gaussian_mc as gmc
from certattn._array import device_of, to_numpy

sigmas = st.floats(0.05, 6.0)
epss = st.floats(1e-12, 0.999)
rhos = st.floats(1e-12, 1.0 - 1e-9)


def _pdf(s: float, mu: float, sigma: float) -> float:
    return stats.norm.pdf(s, mu, sigma)


def _quad(f, a: float, b: float) -> float:
    return integrate.quad(f, a, b, epsabs=0.0, epsrel=1e-11, limit=200)[0]


# ---------------------------------------------------------------- closed forms vs integration


@pytest.mark.parametrize("mu", [-1.5, 0.0, 2.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("t_std", [-2.0, 0.0, 1.5])
def test_threshold_against_integration(mu: float, sigma: float, t_std: float) -> None:
    """GAUSS-THRESHOLD / GAUSS-FINITE-N: discarded mass, kept fraction, E tail sum, E count."""
    t = mu + sigma * t_std
    lo, hi = mu - 12 * sigma, mu + sigma**2 + 12 * sigma
    below = _quad(lambda s: math.exp(s) * _pdf(s, mu, sigma), lo, t)
    total = _quad(lambda s: math.exp(s) * _pdf(s, mu, sigma), lo, hi)
    kept = _quad(lambda s: _pdf(s, mu, sigma), t, hi)
    assert float(g.discarded_mass(t, sigma, mu=mu)) == pytest.approx(below / total, rel=1e-8)
    assert float(g.kept_fraction(t, sigma, mu=mu)) == pytest.approx(kept, rel=1e-8)
    n = 37
    assert float(g.expected_tail_sum(n, t, sigma, mu=mu)) == pytest.approx(n * below, rel=1e-8)
    assert float(g.expected_kept_count(n, t, sigma, mu=mu)) == pytest.approx(n * kept, rel=1e-8)
    assert float(g.expected_tail_sum(n, np.inf, sigma, mu=mu)) == pytest.approx(
        n * total, rel=1e-8
    )


@pytest.mark.parametrize("sigma", [0.5, 1.7])
def test_tilted_law_against_integration(sigma: float) -> None:
    """GAUSS-TILT: mean and sd of the e^s-weighted law."""
    mu = 0.4
    lo, hi = mu - 14 * sigma, mu + sigma**2 + 14 * sigma
    z = _quad(lambda s: math.exp(s) * _pdf(s, mu, sigma), lo, hi)
    m = _quad(lambda s: s * math.exp(s) * _pdf(s, mu, sigma), lo, hi) / z
    v = _quad(lambda s: (s - m) ** 2 * math.exp(s) * _pdf(s, mu, sigma), lo, hi) / z
    mean, sd = g.tilted_normal(mu, sigma)
    assert float(mean) == pytest.approx(m, rel=1e-9)
    assert float(sd) == pytest.approx(math.sqrt(v), rel=1e-8)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
@pytest.mark.parametrize("rho", [0.01, 0.3, 0.9])
def test_top_fraction_against_integration(sigma: float, rho: float) -> None:
    """GAUSS-TOPFRAC: find the threshold keeping rho numerically, integrate the tail."""
    t = optimize.brentq(lambda x: _quad(lambda s: _pdf(s, 0, sigma), x, 20 * sigma) - rho,
                        -20 * sigma, 20 * sigma, xtol=1e-14)
    lo, hi = -14 * sigma, sigma**2 + 14 * sigma
    tau = _quad(lambda s: math.exp(s) * _pdf(s, 0, sigma), lo, t) / _quad(
        lambda s: math.exp(s) * _pdf(s, 0, sigma), lo, hi
    )
    assert float(g.top_fraction_tail_mass(rho, sigma)) == pytest.approx(tau, rel=1e-7)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_limits_against_integration_and_large_rows(sigma: float) -> None:
    """GAUSS-LIMITS: log n - sigma^2/2 and n e^{-sigma^2} (population) and on a long row."""
    lo, hi = -14 * sigma, 2 * sigma**2 + 14 * sigma
    m1 = _quad(lambda s: math.exp(s) * _pdf(s, 0, sigma), lo, hi)
    ms = _quad(lambda s: s * math.exp(s) * _pdf(s, 0, sigma), lo, hi)
    m2 = _quad(lambda s: math.exp(2 * s) * _pdf(s, 0, sigma), lo, hi)
    n = 1000
    assert float(g.entropy_limit(n, sigma)) == pytest.approx(
        math.log(n) + math.log(m1) - ms / m1, rel=1e-9
    )
    assert float(g.participation_ratio_limit(n, sigma)) == pytest.approx(n * m1**2 / m2, rel=1e-8)
    if sigma > 1.0:
        return  # sum e^{2 s_i} no longer concentrates at n = 2e5 (rel. sd ~ e^{2 sigma^2}/sqrt n)
    # One row of 2e5 logits: entropy within 5 relative sds of Z (absolute, in nats; the
    # observed error is up to about 4 of them), participation ratio within 5 %.
    n = 200_000
    s = sigma * np.random.default_rng(7).standard_normal(n)
    p = np.exp(s - s.max())
    p /= p.sum()
    entropy = -np.sum(p * np.log(p))
    tol = 5 * float(g.partition_rel_sd(n, sigma))
    assert entropy == pytest.approx(float(g.entropy_limit(n, sigma)), abs=tol)
    assert 1 / np.sum(p**2) == pytest.approx(float(g.participation_ratio_limit(n, sigma)), rel=0.05)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_partition_rel_sd(sigma: float) -> None:
    """GAUSS-FINITE-N: exact relative sd of Z, against Monte Carlo (5000 rows of 50)."""
    n = 50
    z = np.exp(sigma * np.random.default_rng(11).standard_normal((20000, n))).sum(axis=1)
    assert z.std() / z.mean() == pytest.approx(float(g.partition_rel_sd(n, sigma)), rel=0.1)


# ---------------------------------------------------------------- the rule and its inverses


def test_rule_reference_values() -> None:
    """GAUSS-KEPS: THEORY.md's rule values at eps = 0.01 (0.908, 0.628, 0.431, 0.250)."""
    got = g.keps_fraction(0.01, np.array([1.0, 2.0, 2.5, 3.0]))
    np.testing.assert_allclose(got, [0.908, 0.628, 0.431, 0.250], atol=6e-4)
    assert float(g.keps_fraction(0.01, 0.0)) == pytest.approx(0.99, rel=1e-12)


@given(eps=epss, sigma=sigmas)
def test_rule_solves_top_fraction(eps: float, sigma: float) -> None:
    """GAUSS-KEPS: tau(rule) = eps, and both inverses round-trip."""
    rho = g.keps_fraction(eps, sigma)
    if float(rho) < 1e-300:
        return
    assert float(g.top_fraction_tail_mass(rho, sigma)) == pytest.approx(eps, rel=1e-6)
    assert float(g.keps_eps(rho, sigma)) == pytest.approx(eps, rel=1e-6)
    if float(rho) < 1 - eps - 1e-6 and float(rho) < 1 - 1e-9:
        assert float(g.keps_sigma(rho, eps)) == pytest.approx(sigma, rel=1e-6, abs=1e-6)


@given(rho=rhos, sigma=sigmas)
def test_eps_inverse_round_trip(rho: float, sigma: float) -> None:
    """The eps that rho certifies, fed back to the rule, gives rho."""
    eps = g.keps_eps(rho, sigma)
    if not 1e-300 < float(eps) < 0.999:
        return
    assert float(g.keps_fraction(eps, sigma)) == pytest.approx(rho, rel=1e-6)


def test_sigma_inverse_clips_at_zero() -> None:
    """rho >= 1 - eps needs no spread at all."""
    assert float(g.keps_sigma(0.995, 0.01)) == 0.0
    assert float(g.keps_sigma(0.5, 0.01)) > 0.0


def test_monotonicity() -> None:
    """The rule decreases in sigma and in eps; tau decreases in rho and sigma."""
    sig = np.linspace(0.0, 6.0, 301)
    eps = np.logspace(-12, -0.05, 301)
    assert np.all(np.diff(g.keps_fraction(0.01, sig)) < 0)
    assert np.all(np.diff(g.keps_fraction(eps, 1.5)) < 0)
    rho = np.linspace(0.001, 0.999, 301)
    assert np.all(np.diff(g.top_fraction_tail_mass(rho, 1.0)) < 0)
    assert np.all(np.diff(g.top_fraction_tail_mass(0.2, sig)) < 0)
    assert np.all(np.diff(g.keps_sigma(rho, 0.01)[rho < 0.98]) < 0)


def test_log_space_deep_tails() -> None:
    """log=True stays accurate where the plain forms underflow (mpmath reference)."""
    # discarded mass at t = -60: Phi(-51.2) ~ 1e-571 underflows in float64.
    t, sigma = -60.0, 1.2
    with mpmath.workdps(50):
        ref = mpmath.log(mpmath.ncdf((mpmath.mpf(t) - sigma**2) / sigma))
    assert float(g.discarded_mass(t, sigma)) == 0.0
    assert float(g.discarded_mass(t, sigma, log=True)) == pytest.approx(float(ref), rel=1e-12)
    # rule with eps = e^-2000 and sigma = 110: the kept fraction is ~ e^-1100.
    le, sigma = -2000.0, 110.0
    lrho = g.keps_fraction(le, sigma, log=True)
    assert np.isfinite(float(lrho)) and float(lrho) < -700
    assert float(g.keps_eps(lrho, sigma, log=True)) == pytest.approx(le, rel=1e-9)
    assert float(g.keps_sigma(lrho, le, log=True)) == pytest.approx(sigma, rel=1e-9)
    # Near rho = 1 the log form keeps the digits that log(plain) loses:
    # log rho = log1p(-Phi(sigma + Phi^{-1}(eps))).
    e = np.logspace(-30, -0.1, 50)
    ref = np.log1p(-special.ndtr(2.0 + special.ndtri(e)))
    np.testing.assert_allclose(g.keps_fraction(np.log(e), 2.0, log=True), ref, rtol=1e-9)
    np.testing.assert_allclose(np.log(g.keps_fraction(e, 2.0)), ref, rtol=1e-9, atol=1e-15)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="eps"):
        g.keps_fraction(1.0, 1.0)
    with pytest.raises(ValueError, match="eps"):
        g.keps_fraction(-0.1, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        g.keps_fraction(0.1, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        g.discarded_mass(0.0, 0.0)
    with pytest.raises(ValueError, match="rho"):
        g.top_fraction_tail_mass(1.5, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        g.keps_fraction(0.1, np.nan)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_closed_forms_backends(backend, dtype) -> None:
    """Array-agnostic: namespace, device and dtype kept; float32 equals float64 to 1e-6."""
    sig = np.array([0.5, 1.0, 2.0, 3.0])
    eps = np.array([0.1, 0.01, 0.001, 1e-6])
    x_s, x_e = backend.asarray(sig, dtype), backend.asarray(eps, dtype)
    for fn, args, ref in [
        (g.keps_fraction, (x_e, x_s), g.keps_fraction(eps, sig)),
        (g.top_fraction_tail_mass, (x_e, x_s), g.top_fraction_tail_mass(eps, sig)),
        (g.keps_sigma, (x_e, x_e), g.keps_sigma(eps, eps)),
        (g.discarded_mass, (x_e, x_s), g.discarded_mass(eps, sig)),
        (g.entropy_limit, (100, x_s), g.entropy_limit(100, sig)),
    ]:
        out = fn(*args)
        assert out.dtype == x_s.dtype
        assert device_of(out) == device_of(x_s)
        rtol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(to_numpy(out), ref, rtol=rtol)


# ---------------------------------------------------------------- finite n: Monte Carlo


def _reference_keps(s: np.ndarray, eps: float) -> np.ndarray:
    """Exact k_eps by float64 sort + small-end cumsum (independent of certify_topk)."""
    w = np.sort(np.exp(s - s.max(axis=-1, keepdims=True)), axis=-1)
    c = np.cumsum(w, axis=-1)
    return s.shape[-1] - np.count_nonzero(c <= eps * c[:, -1:], axis=-1)


def test_monte_carlo_matches_reference_and_is_chunk_invariant() -> None:
    """The estimator's per-row k_eps equal the sort+cumsum reference on the same draws."""
    n, rows, seed = 300, 50, 5
    r = gmc.monte_carlo_keps(n, [1.0, 2.5], 0.02, rows=rows, seed=seed)
    z = np.random.default_rng(seed).standard_normal((rows, n))
    for i, sv in enumerate([1.0, 2.5]):
        np.testing.assert_array_equal(np.rint(r.fractions[i] * n), _reference_keps(sv * z, 0.02))
    r2 = gmc.monte_carlo_keps(n, [1.0, 2.5], 0.02, rows=rows, seed=seed, max_elements=7 * n)
    np.testing.assert_array_equal(r.fractions, r2.fractions)
    assert r.mean.shape == (2,) and r.fractions.shape == (2, rows)


@pytest.mark.parametrize(
    ("n", "sigma", "measured"), [(128, 1.0, 0.913), (128, 3.0, 0.333), (1024, 2.0, 0.631)]
)
def test_reference_table(n: int, sigma: float, measured: float) -> None:
    """GAUSS-VALIDITY: THEORY.md's measured means (2000 rows, eps = 0.01), other seed."""
    r = gmc.monte_carlo_keps(n, sigma, 0.01, rows=2000, seed=2026)
    assert abs(float(r.mean) - measured) <= 4 * float(r.sem) + 5e-4


@pytest.mark.parametrize(("n", "rows"), [(100_000, 20), (1_000_000, 6)])
def test_rule_against_monte_carlo_large_n(n: int, rows: int) -> None:
    """GAUSS-KEPS at n = 1e5 and 1e6, sigma <= 2: |mean - rule| <= 4 sem + 5e-4.

    4 standard errors of the seeded estimate, plus 5e-4 for the finite-n bias (of the
    order of the relative variance of Z, (e^{sigma^2}-1)/n <= 5.4e-4, and 1/(2n) from
    rounding k to an integer).  The tolerance is below 0.005, so a rule off by that much
    would fail.
    """
    sig = np.array([0.5, 1.0, 2.0])[:, None]
    eps = np.array([0.01, 0.1])[None, :]
    r = gmc.monte_carlo_keps(n, sig, eps, rows=rows, seed=17)
    tol = 4 * r.sem + 5e-4
    assert np.all(tol < 5e-3)
    assert np.all(np.abs(r.mean - r.rule) <= tol)


def test_validity_diagnostic() -> None:
    """GAUSS-VALIDITY: the reference cases, monotonicity, and the calibrated claim."""
    v = gmc.gaussian_validity([128, 128, 1024], [1.0, 3.0, 2.0])
    np.testing.assert_array_equal(v.trusted, [True, False, True])
    assert v.sigma_ratio[1] == pytest.approx(3.0 / math.sqrt(2 * math.log(128)))
    sig = np.linspace(0.1, 4.0, 40)
    t = gmc.gaussian_validity(512, sig).trusted
    assert t[0] and not t[-1] and np.all(np.diff(t.astype(int)) <= 0)
    # Where trusted, the rule is within 0.025 of the Monte Carlo mean; where the partition
    # function is most spread it is not.
    n = 256
    sig = np.array([0.5, 1.0, 1.5, 2.0, 3.0])[:, None]
    eps = np.array([0.001, 0.01, 0.1])[None, :]
    r = gmc.monte_carlo_keps(n, sig, eps, rows=300, seed=3)
    ok = gmc.gaussian_validity(n, sig * np.ones_like(eps)).trusted
    assert ok.any() and (~ok).any()
    assert np.all(np.abs(r.mean - r.rule)[ok] <= 0.025)
    assert np.max(np.abs(r.mean - r.rule)[~ok]) > 0.025
    with pytest.raises(ValueError, match="n"):
        gmc.gaussian_validity(1, 1.0)


def test_single_gap_overshoot() -> None:
    """Thm 4.5 at k = k_eps: valid (ratio >= 1) and loose as quoted in THEORY.md."""
    med = {}
    for n, sigma in [(128, 1.0), (128, 2.0), (4096, 3.0)]:
        ratio = gmc.single_gap_overshoot(n, sigma, 0.01, rows=300, seed=1)
        assert np.all(ratio[np.isfinite(ratio)] >= 1.0)
        med[n, sigma] = float(np.nanmedian(ratio))
    assert 6 < med[128, 1.0] < 12  # THEORY: about 9x
    assert 25 < med[128, 2.0] < 45  # about 35x
    assert 55 < med[4096, 3.0] < 90  # about 72x
    assert med[128, 1.0] < med[128, 2.0]


# ---------------------------------------------------------------- real rows


def test_estimate_sigma_and_predict_k_backends(backend) -> None:
    """Masked keys ignored; results in the input's namespace and device."""
    rng = np.random.default_rng(4)
    x = 1.3 * rng.standard_normal((3, 200))
    x[1, :50] = -np.inf
    mu, sd, cnt = g.estimate_sigma(backend.asarray(x))
    assert device_of(sd) == device_of(backend.asarray(x))
    np.testing.assert_array_equal(to_numpy(cnt), [200, 150, 200])
    np.testing.assert_allclose(to_numpy(sd)[1], np.std(x[1, 50:], ddof=1), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(mu)[1], np.mean(x[1, 50:]), rtol=1e-12)
    k = g.predict_k(backend.asarray(x.astype(np.float32)), 0.01)
    kn = to_numpy(k)
    assert kn.dtype == np.int64 and np.all(kn >= 1) and np.all(kn <= [200, 150, 200])
    expect = np.ceil(np.array([200, 150, 200]) * g.keps_fraction(0.01, to_numpy(sd)))
    np.testing.assert_allclose(kn, expect, atol=1)
    # axis
    kt = to_numpy(g.predict_k(backend.asarray(x.T.copy()), 0.01, axis=0))
    np.testing.assert_array_equal(kt, to_numpy(g.predict_k(backend.asarray(x), 0.01)))


def test_predict_k_on_gaussian_rows_tracks_exact() -> None:
    """On long Gaussian rows with moderate sigma the prediction is within 3 % of exact k."""
    from certattn import certify_topk

    s = 1.5 * np.random.default_rng(8).standard_normal((20, 8192))
    ratio = np.asarray(g.predict_k(s, 0.01)) / np.asarray(certify_topk(s, 0.01).k)
    assert np.all(np.abs(ratio - 1) < 0.03)


def test_predict_k_bad_inputs() -> None:
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="NaN"):
        g.predict_k(np.array([[0.0, np.nan]]), 0.1)
    with pytest.raises(ValueError, match="masked"):
        g.predict_k(np.array([[0.0, 1.0], [-np.inf, -np.inf]]), 0.1)
    with pytest.raises(ValueError, match="eps"):
        g.predict_k(x, 1.0)
    with pytest.raises(ValueError, match="floating"):
        g.predict_k(np.zeros((2, 4), dtype=np.int64), 0.1)
    np.testing.assert_array_equal(g.predict_k(x, 0.1), [4, 4])  # sigma = 0: ceil(0.9 * 4)


# ---------------------------------------------------------------- figures


def test_save_gaussian_figures(tmp_path) -> None:
    """The four figures are written as PNG and every axis is labelled."""
    from matplotlib.figure import Figure

    from certattn.plots import gaussian as pg

    paths = pg.save_gaussian_figures(tmp_path / "figs", quick=True)
    assert len(paths) == 4
    for p in paths:
        assert p.suffix == ".png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = pg.plot_single_gap_overshoot(ns=(64,), sigmas=np.array([1.0, 2.0]), rows=20)
    assert isinstance(fig, Figure)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
