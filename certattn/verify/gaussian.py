"""Batch checks of the Gaussian score model: GAUSS-TILT, GAUSS-THRESHOLD, GAUSS-TOPFRAC,
GAUSS-KEPS (closed forms of :mod:`certattn.gaussian` against Gauss-Legendre quadrature),
GAUSS-FINITE-N and GAUSS-LIMITS (against Monte Carlo, as z-scores) and GAUSS-VALIDITY
(the empirical validity rule of :mod:`certattn.gaussian_mc`, on the host).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from .._array import to_numpy
from ._common import Array, Ctx, Worst, _ctx, _rel, _steps, _terms

_NODES = 28  # Gauss-Legendre nodes per side of the centre


@functools.cache
def _legendre_host() -> tuple[np.ndarray, np.ndarray]:
    g, wts = np.polynomial.legendre.leggauss(_NODES)
    return (g + 1.0) / 2.0, wts / 2.0


def _legendre(dev, xp):
    """Gauss-Legendre nodes on [0, 1] and weights summing to 1 (:data:`_NODES` of them)."""
    g, wts = _legendre_host()
    return xp.asarray(g, device=dev), xp.asarray(wts, device=dev)


def _gauss_moments(xp, centre, a, b, dev, moments=1):
    """``int_a^b z^p exp(-(z - c)^2 / 2) dz`` per row for ``p = 0 .. moments - 1``.

    ``a``, ``b``, ``centre`` are arrays (r,).  Gauss-Legendre with :data:`_NODES` nodes on
    each side of the centre (the integrand is monotone on each piece): about 3e-14
    relative on +-10 sd (measured against mpmath), the exponential evaluated once for
    every moment."""
    g, wts = _legendre(dev, xp)
    out = [xp.zeros_like(a) for _ in range(moments)]
    c = xp.minimum(xp.maximum(centre, a), b)
    for lo, hi in ((a, c), (c, b)):
        z = lo[:, None] + (hi - lo)[:, None] * g[None, :]
        f = z - centre[:, None]
        f *= f
        f *= -0.5
        f = xp.exp(f)
        for p in range(moments):
            if p:
                f *= z  # f = z^p exp(...)
            out[p] = out[p] + (f @ wts) * (hi - lo)
    return out


def _threshold_integrals(xp, zt, sig, dev):
    """By quadrature, for s = mu + sigma z and the threshold at z = zt: the kept fraction
    ``P(z >= zt)`` and the discarded attention mass ``int_{z<zt} e^{sigma z} phi / E e^{sigma z}``
    (``e^{sigma z - z^2/2 - sigma^2/2} = e^{-(z - sigma)^2/2}``: no closed form used).
    Four integrals, each once, over 10 sd beyond both centres (truncation below 1e-16 relative)."""
    lo = xp.minimum(zt, xp.zeros_like(zt)) - 10.0  # both centres (0 and sigma > 0) inside
    hi = xp.maximum(zt, sig) + 10.0
    zero = xp.zeros_like(sig)
    (pb,), (pa,) = _gauss_moments(xp, zero, lo, zt, dev), _gauss_moments(xp, zero, zt, hi, dev)
    (tb,), (ta,) = _gauss_moments(xp, sig, lo, zt, dev), _gauss_moments(xp, sig, zt, hi, dev)
    return pa / (pb + pa), tb / (tb + ta)


def _params(ctx: Ctx, r: int) -> tuple[Array, Array, Array, np.ndarray, np.ndarray]:
    """Random (mu, sigma, zt) with both |zt| and |zt - sigma| <= 5 (tails >= 3e-7)."""
    rng = ctx.rng
    sig = rng.uniform(0.05, 4.0, r)
    zt = np.where(rng.random(r) < 0.5, rng.uniform(-5, 5, r), sig + rng.uniform(-5, 5, r))
    zt = np.clip(zt, np.maximum(-5, sig - 5), np.minimum(5, sig + 5))
    mu = rng.uniform(-20, 20, r)
    return ctx.put(mu), ctx.put(sig), ctx.put(zt), sig, zt


def check_gauss_tilt(rows, *, xp, device, rng, progress):
    """GAUSS-TILT: ``tilted_normal(mu, sigma)`` against the mean and standard deviation of
    the density proportional to ``e^s phi((s - mu)/sigma)`` by Gauss-Legendre quadrature
    (:data:`_NODES` nodes on each side of the centre, over +-10 sd, one exponential for
    the three moments).  Relative error (mean: relative to ``|mean| + sigma``); tolerance
    1e-12 (the quadrature's moments err by below 1e-13, measured against mpmath)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian import tilted_normal

    for r in _steps(rows, 8 * _NODES):
        mu, sig, _, _, _ = _params(ctx, r)
        lo, hi = -10.0 + xp.zeros_like(sig), sig + 10.0
        m0, m1, m2 = _gauss_moments(xp, sig, lo, hi, device, 3)
        m1, m2 = m1 / m0, m2 / m0
        mean_ref, sd_ref = mu + sig * m1, sig * xp.sqrt(m2 - m1 * m1)
        mean, sd = tilted_normal(mu, sig)
        w.add(xp.abs(mean - mean_ref) / (xp.abs(mean_ref) + sig))
        w.add(_rel(xp, sd, sd_ref))
        ctx.tick(r)
    return w.value, 1e-12


def check_gauss_threshold(rows, *, xp, device, rng, progress):
    """GAUSS-THRESHOLD: ``discarded_mass(t, sigma, mu=mu)`` and ``kept_fraction`` against the
    quadrature of ``int_{s<t} e^s phi`` / ``int e^s phi`` and ``int_{s>=t} phi`` (threshold
    within 5 sd, values >= 3e-7).  Relative; tolerance 1e-11 (the quadrature errs by
    below 5e-14 relative, measured against mpmath; the closed forms by a few ulps)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian import discarded_mass, kept_fraction

    for r in _steps(rows, 8 * _NODES):
        mu, sig, zt, _, _ = _params(ctx, r)
        kept, disc = _threshold_integrals(xp, zt, sig, device)
        t = mu + sig * zt
        w.add(_rel(xp, discarded_mass(t, sig, mu=mu), disc))
        w.add(_rel(xp, kept_fraction(t, sig, mu=mu), kept))
        ctx.tick(r)
    return w.value, 1e-11


def check_gauss_topfrac(rows, *, xp, device, rng, progress):
    """GAUSS-TOPFRAC: ``top_fraction_tail_mass(rho, sigma)`` (and ``keps_eps``) with ``rho``
    the quadrature kept fraction of a threshold, against that threshold's quadrature
    discarded mass.  Relative; tolerance 1e-8 (the map rho -> tau amplifies the
    quadrature's 5e-14 by its elasticity ``h(z + sigma) / h(z)``, ``h`` the normal
    hazard; measured violations stay below 2e-9)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian import keps_eps, top_fraction_tail_mass

    for r in _steps(rows, 8 * _NODES):
        _, sig, zt, _, _ = _params(ctx, r)
        kept, disc = _threshold_integrals(xp, zt, sig, device)
        w.add(_rel(xp, top_fraction_tail_mass(kept, sig), disc))
        w.add(_rel(xp, keps_eps(kept, sig), disc))
        ctx.tick(r)
    return w.value, 1e-8


def check_gauss_keps(rows, *, xp, device, rng, progress):
    """GAUSS-KEPS: with (rho, tau) the quadrature kept fraction and discarded mass of one
    threshold, ``keps_fraction(tau, sigma) = rho`` and ``keps_sigma(rho, tau) = sigma``
    (relative; tolerance 1e-8, as for GAUSS-TOPFRAC)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian import keps_fraction, keps_sigma

    for r in _steps(rows, 8 * _NODES):
        _, sig, zt, _, _ = _params(ctx, r)
        kept, disc = _threshold_integrals(xp, zt, sig, device)
        ok = disc < 1.0 - 1e-9  # eps must lie in [0, 1)
        w.add(xp.where(ok, _rel(xp, keps_fraction(disc, sig), kept), xp.zeros_like(kept)))
        w.add(xp.where(ok, _rel(xp, keps_sigma(kept, disc), sig), xp.zeros_like(kept)))
        ctx.tick(r)
    return w.value, 1e-8


def _zscore(est: Any, sd: Any, m: int, closed: Any, bias: Any = 0.0) -> Any:
    """``max(0, |mean - closed| - bias) / (sd / sqrt(m))``."""
    se = np.asarray(sd, np.float64) / math.sqrt(m)
    d = np.abs(np.asarray(est, np.float64) - np.asarray(closed, np.float64)) - bias
    return np.maximum(d, 0.0) / np.maximum(se, 1e-300)


def check_gauss_finite_n(rows, *, xp, device, rng, progress):
    """GAUSS-FINITE-N by Monte Carlo (rows = simulated rows of n = 256 scores, in groups of
    one random (mu, sigma <= 1.2, t)): the sample means of ``sum_{s<t} e^s`` and
    ``#{s >= t}`` against ``expected_tail_sum`` and ``expected_kept_count``, the sample
    relative sd of ``Z`` against ``partition_rel_sd`` (standard error from the sample
    kurtosis).  Violation: z-scores; tolerance 6 (no bias: the expectations are exact)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian import expected_kept_count, expected_tail_sum, partition_rel_sd

    n = 256
    for r in _steps(rows, 4 * n):
        if r < 64:
            ctx.tick(r)
            continue
        mu = float(ctx.rng.uniform(-3, 3))
        sig = float(ctx.rng.uniform(0.1, 1.2))
        t = mu + sig * float(ctx.rng.uniform(-2, 2))
        s = ctx.put(mu + sig * ctx.rng.standard_normal((r, n)))
        es = xp.exp(s)
        below = to_numpy(xp.sum(xp.where(s < t, es, xp.zeros_like(es)), axis=-1))
        count = to_numpy(xp.sum(xp.astype(s >= t, xp.float64), axis=-1))
        z = to_numpy(xp.sum(es, axis=-1))
        e_sum = to_numpy(expected_tail_sum(n, t, sig, mu=mu))
        e_cnt = to_numpy(expected_kept_count(n, t, sig, mu=mu))
        w.add(_zscore(below.mean(), below.std(ddof=1), r, e_sum))
        w.add(_zscore(count.mean(), count.std(ddof=1), r, e_cnt))
        zc = z - z.mean()
        m2, m4 = float(np.mean(zc**2)), float(np.mean(zc**4))
        rel = math.sqrt(m2) / z.mean()
        se_rel = rel * math.sqrt(max(m4 / m2**2 - 1.0, 1e-12) / 4.0) + rel / math.sqrt(r)
        w.add(max(abs(rel - float(to_numpy(partition_rel_sd(n, sig)))) / se_rel, 0.0))
        ctx.tick(r)
    return w.value, 6.0


def check_gauss_limits(rows, *, xp, device, rng, progress):
    """GAUSS-LIMITS by Monte Carlo on long rows (rows = simulated rows of n = 16384 i.i.d.
    N(mu, sigma^2) logits, sigma <= 1, grouped by parameter): the mean entropy against
    ``entropy_limit`` and the mean ``1/sum p^2`` over its limit against
    ``participation_ratio_limit``, as z-scores after subtracting a bias bound
    (``4 (1 + sigma^2)^2 e^{sigma^2} / n`` for the entropy, ``4 (e^{4 sigma^2} - 1)/n +
    4 (e^{sigma^2} - 1)/n`` relative for the ratio: second-order delta-method terms with
    a factor >= 2 to spare).  Tolerance 6."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian import entropy_limit, participation_ratio_limit

    n = 1 << 14
    for r in _steps(rows, 3 * n):
        if r < 16:
            ctx.tick(r)
            continue
        mu, sig = float(ctx.rng.uniform(-5, 5)), float(ctx.rng.uniform(0.2, 1.0))
        s = ctx.put(mu + sig * ctx.rng.standard_normal((r, n)))
        e, z = _terms(xp, s)
        p = e / z[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = to_numpy(-xp.sum(xp.where(p > 0, p * xp.log(p), xp.zeros_like(p)), axis=-1))
        pr = to_numpy(1.0 / xp.sum(p * p, axis=-1))
        lim_h = float(to_numpy(entropy_limit(float(n), sig)))
        lim_pr = float(to_numpy(participation_ratio_limit(float(n), sig)))
        w.add(_zscore(ent.mean(), ent.std(ddof=1), r, lim_h,
                      4 * (1 + sig**2) ** 2 * math.exp(sig**2) / n))
        ratio = pr / lim_pr
        bias = 4 * math.expm1(4 * sig**2) / n + 4 * math.expm1(sig**2) / n
        w.add(_zscore(ratio.mean(), ratio.std(ddof=1), r, 1.0, bias))
        ctx.tick(r)
    return w.value, 6.0


def check_gauss_validity(rows, *, xp, device, rng, progress):
    """GAUSS-VALIDITY (empirical, host): at random (n, sigma, eps) that ``gaussian_validity``
    trusts, ``monte_carlo_keps`` (rows = Monte Carlo rows per point, 6 points) stays within
    0.022 of the rule once 6 standard errors are allowed for:
    violation ``max(0, |mean - rule| - 6 sem)``, tolerance 0.022 (the calibrated claim);
    and at n = 128, sigma = 3, eps = 0.01 (untrusted) the rule under-predicts (else 1)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..gaussian_mc import gaussian_validity, monte_carlo_keps

    per = max(100, rows // 7)
    done = 0
    while done < 6:
        n = int(2 ** ctx.rng.integers(6, 12))
        sig, eps = float(ctx.rng.uniform(0.25, 4.0)), float(ctx.rng.choice([1e-3, 1e-2, 0.1]))
        if not bool(gaussian_validity(n, sig).trusted):
            continue
        mc = monte_carlo_keps(n, sig, eps, rows=per, seed=int(ctx.rng.integers(1 << 31)))
        w.add(max(0.0, abs(float(mc.mean) - float(mc.rule)) - 6 * float(mc.sem)))
        done += 1
        ctx.tick(per)
    mc = monte_carlo_keps(128, 3.0, 0.01, rows=per, seed=int(ctx.rng.integers(1 << 31)))
    w.flag(not float(mc.mean) > float(mc.rule) + 3 * float(mc.sem))
    ctx.tick(per)
    return w.value, 0.022
