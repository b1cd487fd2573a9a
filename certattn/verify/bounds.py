"""Batch checks of the logit-only tail bounds: GAP-SINGLE, GAP-EXACT-HEAD, GAP-MULTI,
GAP-UNIFORM (ordered-logit gap bounds of :mod:`certattn.bounds`), and BLOCK-BOUNDS,
BLOCK-SCORE, BLOCK-MASS (block tail bounds, key-block score boxes and balls of
:mod:`certattn.blocks`, Bennett log-mass of :mod:`certattn.cells`).

Every bound must lie on the right side of the true tail (or score, or log-mass) computed
in float64 or extended precision; equality cases are checked where the theorem states
them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._array import to_numpy
from .._fp import U as _U
from ._common import (
    EPS,
    REL_FLOOR,
    Ctx,
    Worst,
    _cases,
    _ctx,
    _draw,
    _rel,
    _slack,
    _split,
    _steps,
    _terms,
    longdouble_ok,
    rand_k,
    topk_tail,
)
from .distribution import ascending_tails

EXACT_TOL = 1e-15
"""Relative tolerance of comparisons with an extended-precision tail (longdouble: about
``2^-64`` relative here); where longdouble is float64 they are skipped."""


def _true_tail(xp, x64, k):
    e, z = _terms(xp, x64)
    return topk_tail(xp, ascending_tails(xp, e)[1], k) / z


def _two_level(ctx: Ctx, r: int, n: int, gap: Any = None, j: Any = None):
    """Rows taking two levels 0 > -gap with ``j`` keys on top (shuffled), and ``j``."""
    rng = ctx.rng
    j = rng.integers(1, n, r) if j is None else j
    gap = rng.uniform(0.0, 30.0, r) if gap is None else gap
    x = np.where(np.arange(n)[None, :] < j[:, None], 0.0, -gap[:, None])
    x = rng.permuted(x, axis=1)
    return ctx.put(x), ctx.put(j.astype(np.int64)), j, gap


def check_gap_single(rows, *, xp, device, rng, progress):
    """GAP-SINGLE: ``gap_bound(x, k) >= tau_k`` on adversarial rows (relative slack); equality
    on two-level rows at k = number of top keys (relative error), where the bound must
    also be at least the exact tail in extended precision (relative shortfall at most
    :data:`EXACT_TOL`, rescaled: this sees the shared log-space rounding margin of the
    gap bounds removed); and the solved form:
    with ``Delta = gap_threshold(k, n, eps) +- 1e-6`` the bound is ``> eps`` / ``<= eps``
    (else 1).  Tolerance 1e-9: the bound is rounded up by at most
    ``u (8 |d|max + 4 n + 2^14)`` (below 2e-11 for ``|d| <= 2e4``), the reference errs
    by below 1e-12."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..bounds import gap_bound, gap_threshold

    for x, x64, n, _ in _cases(ctx, rows, (7, 64, 1000), width=4):
        k = rand_k(ctx, x.shape[0], 1, n - 1)
        w.add(_slack(xp, _true_tail(xp, x64, k), gap_bound(x, k)))
    for n in (8, 64):
        for r in _steps(max(1, rows // 20), 8 * n):  # bounded memory
            x, k, j, gap = _two_level(ctx, r, n)
            b = gap_bound(x, k)
            w.add(_rel(xp, b, _true_tail(xp, x, k)))
            if longdouble_ok():  # the exact tail (n-j) e^-gap / (j + (n-j) e^-gap), extended
                m = (n - j) * np.exp(-gap.astype(np.longdouble))
                exact = (m / (j + m)).astype(np.float64)
                under = np.maximum(exact - np.asarray(to_numpy(b), np.float64), 0.0) / exact
                w.add(under * (1e-9 / EXACT_TOL))
            eps = float(ctx.rng.choice(EPS))
            thr = np.asarray(gap_threshold(j, n, eps))
            for sign in (1.0, -1.0):
                ok = thr + sign * 1e-6 > 0
                x2, k2, _, _ = _two_level(ctx, r, n, np.where(ok, thr + sign * 1e-6, 1.0), j)
                b = to_numpy(gap_bound(x2, k2))
                w.flag(ok & ((b <= eps) != (sign > 0)))
    return w.value, 1e-9


def check_gap_exact_head(rows, *, xp, device, rng, progress):
    """GAP-EXACT-HEAD: ``gap_exact_head_bound >= tau_k`` (relative slack) and never looser than
    ``gap_bound`` (relative excess).  Tolerance 1e-9 (margins as for GAP-SINGLE)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..bounds import gap_bound, gap_exact_head_bound

    for x, x64, n, _ in _cases(ctx, rows, (7, 64, 1000), width=4):
        k = rand_k(ctx, x.shape[0], 1, n - 1)
        b = gap_exact_head_bound(x, k)
        w.add(_slack(xp, _true_tail(xp, x64, k), b))
        w.add(_slack(xp, xp.astype(b, xp.float64), gap_bound(x, k)))
    return w.value, 1e-9


def check_gap_multi(rows, *, xp, device, rng, progress):
    """GAP-MULTI: the all-gap form and the DP-optimal 0 and 2 cuts are ``>= tau_k`` (relative
    slack); more cuts are never looser (all-gap <= 2 cuts <= 0 cuts <= ... within the
    margin).  Rows of n <= 64 (the DP is O(m n^2) per row).  Tolerance 1e-9."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..bounds import multigap_bound

    for x, x64, n, _ in _cases(ctx, rows, (5, 24, 64), width=3 * 64):
        k = rand_k(ctx, x.shape[0], 1, n - 1)
        tau = _true_tail(xp, x64, k)
        b_all = xp.astype(multigap_bound(x, k), xp.float64)
        b2 = xp.astype(multigap_bound(x, k, n_cuts=2), xp.float64)
        b0 = multigap_bound(x, k, n_cuts=0)
        for b in (b_all, b2, b0):
            w.add(_slack(xp, tau, b))
        w.add(_slack(xp, b_all, b2))
        w.add(_slack(xp, b2, b0))
    return w.value, 1e-9


def check_gap_uniform(rows, *, xp, device, rng, progress):
    """GAP-UNIFORM: ``uniform_gap_bound >= tau_k`` on adversarial rows (relative slack), and
    on rows whose gaps are all at least delta it equals ``1/(1 + k expm1(delta_min))``
    (relative error; delta_min from the reference's own sort).  Tolerance 1e-9."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..bounds import uniform_gap_bound

    for x, x64, n, _ in _cases(ctx, rows, (7, 64, 1000), width=4):
        k = rand_k(ctx, x.shape[0], 1, n - 1)
        w.add(_slack(xp, _true_tail(xp, x64, k), uniform_gap_bound(x, k)))
    for n in (16, 256):
        for r in _steps(max(1, rows // 20), 8 * n):  # bounded memory
            gaps = ctx.rng.uniform(0.01, 3.0, (r, 1)) * (1 + ctx.rng.random((r, n - 1)))
            xs = -np.concatenate([np.zeros((r, 1)), np.cumsum(gaps, axis=1)], axis=1)
            xs = ctx.rng.permuted(xs, axis=1)
            k = ctx.rng.integers(1, n, r)
            d = -np.diff(np.sort(xs, axis=1)[:, ::-1], axis=1)  # gaps of the descending order
            past = np.arange(n - 1)[None, :] >= (k - 1)[:, None]  # gaps past the k-th key
            dmin = np.where(past, d, np.inf).min(axis=1)
            closed = 1.0 / (1.0 + k * np.expm1(dmin))
            lib = to_numpy(uniform_gap_bound(ctx.put(xs), ctx.put(k.astype(np.int64))))
            w.add(np.abs(lib - closed) / (closed + REL_FLOOR))
    return w.value, 1e-9


def _blocks(xp, x64, nb):
    """Per-block (lower, upper, valid count) of contiguous blocks of the row."""
    r, n = x64.shape
    xb = xp.reshape(x64, (r, nb, n // nb))
    valid = xb > -xp.inf
    cnt = xp.sum(xp.astype(valid, xp.int64), axis=-1)
    lo = xp.min(xp.where(valid, xb, xp.full_like(xb, xp.inf)), axis=-1)
    lo = xp.where(cnt > 0, lo, xp.full_like(lo, -xp.inf))
    up = xp.max(xb, axis=-1)
    return lo, up, cnt


def _kept_tail(xp, x64, kept):
    e, z = _terms(xp, x64)
    return xp.sum(xp.where(kept, xp.zeros_like(e), e), axis=-1) / z


def check_block_bounds(rows, *, xp, device, rng, progress):
    """BLOCK-BOUNDS: for random kept block sets ``lo <= tau <= hi`` (relative slack); on
    block-constant logits ``lo = tau = hi`` (relative error); ``greedy_block_set``'s kept
    set has ``tail_upper <= eps`` and exact tail ``<= eps``.  Tolerance 1e-9 (rounding
    margin of the bounds, below 1e-11 for |LSE| <= 2e4)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..blocks import block_tail_bounds, greedy_block_set

    kinds = ("normal", "ties", "masked", "wide", "dominant", "uniform")
    for i, (x, x64, n, _) in enumerate(_cases(ctx, rows, (16, 64, 256), kinds, width=4)):
        r, nb = x.shape[0], 4 if n == 16 else 16
        lo, up, cnt = _blocks(xp, x64, nb)
        kb = ctx.put(ctx.rng.random((r, nb)) < 0.5) & (cnt > 0)
        kb = kb | (up == xp.max(up, axis=-1, keepdims=True))
        kept = xp.reshape(xp.broadcast_to(kb[:, :, None], (r, nb, n // nb)), (r, n))
        tau = _kept_tail(xp, x64, kept)
        blo, bhi = block_tail_bounds(lo, up, cnt, kb)
        w.add(_slack(xp, tau, bhi))
        w.add(_slack(xp, xp.astype(blo, xp.float64), tau, tau))
        # block-constant logits: both bounds are attained
        xc = xp.reshape(xp.broadcast_to(up[:, :, None], (r, nb, n // nb)), (r, n))
        xc = xp.where(xp.isfinite(xc), xc, xp.full_like(xc, -xp.inf))
        full = xp.full_like(cnt, n // nb)
        clo, chi = block_tail_bounds(up, up, xp.where(cnt > 0, full, cnt), kb)
        tc = _kept_tail(xp, xc, kept)
        w.add(_rel(xp, clo, tc))
        w.add(_rel(xp, chi, tc))
        eps = EPS[i % len(EPS)]
        sel = greedy_block_set(lo, up, cnt, eps)
        kept_g = xp.reshape(xp.broadcast_to(sel.kept[:, :, None], (r, nb, n // nb)), (r, n))
        zero = xp.zeros_like(tau)
        w.add(xp.maximum(xp.astype(sel.tail_upper, xp.float64) / eps - 1.0, zero))
        w.add(xp.maximum(_kept_tail(xp, x64, kept_g) / eps - 1.0, zero))
    return w.value, 1e-9


def check_block_score(rows, *, xp, device, rng, progress):
    """BLOCK-SCORE: ``key_block_bounds`` (box, ball, both) contain every score
    ``scale q.k`` of their block, the scores computed in extended precision (longdouble).
    Violation: ``max(0, s - U, L - s) / (scale |q| max|k|)``; tolerance 1e-17 covers the
    longdouble reference (``d 2^-64``, d <= 64); 4e-15 where longdouble is float64."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..blocks import key_block_bounds

    n, bs = 64, 8
    combos = [(d, mag, dt) for d in (4, 16, 64) for mag in (1.0, 1e3) for dt in ctx.dtypes[:2]]
    for (d, mag, dt), share in zip(combos, _split(rows, len(combos)), strict=True):
        for r in _steps(share, n * 4):
            centres = ctx.rng.standard_normal((n // bs, 1, d)) * 3
            keys = (centres + 0.5 * ctx.rng.standard_normal((n // bs, bs, d))).reshape(n, d)
            keys[ctx.rng.random(n) < 0.1] = keys[0]  # repeated keys
            keys = (keys * mag).astype(dt)
            q = (ctx.rng.standard_normal((r, d)) * mag).astype(dt)
            scale = 1.0 / math.sqrt(d)
            s = (q.astype(np.longdouble) @ keys.astype(np.longdouble).T) * np.longdouble(scale)
            size = scale * np.linalg.norm(q.astype(np.float64), axis=-1)[:, None] * np.max(
                np.linalg.norm(keys.astype(np.float64), axis=-1))
            s = s.reshape(r, n // bs, bs)
            for kind in ("box", "ball", "both"):
                lo, up, _ = key_block_bounds(ctx.put(q), ctx.put(keys), bs, kind=kind)
                lo = np.asarray(to_numpy(lo), np.longdouble)[:, :, None]
                up = np.asarray(to_numpy(up), np.longdouble)[:, :, None]
                bad = np.maximum(np.maximum(s - up, lo - s), 0).max(axis=-1)
                w.add(np.asarray(bad, np.float64) / size)
            ctx.tick(r)
    return w.value, (1e-17 if longdouble_ok() else 4e-15)


def check_block_mass(rows, *, xp, device, rng, progress):
    """BLOCK-MASS (host, NumPy): ``bennett_log_mass`` bounds ``log sum e^{s_i}`` of random
    cells given a bracket of the mean, the maximum and a variance bound (violation: the
    log excess, i.e. relative excess of the mass), and is attained (within 1e-9) by the
    two-level cells of the equality case.  Tolerance 1e-12 (the reference LSE errs by
    ``n u`` with n <= 256)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..cells import bennett_log_mass

    for n in (4, 32, 256):
        for r in _steps(max(1, rows // 3), n * 4):
            kind = ("normal", "ties", "dominant", "wide")[int(ctx.rng.integers(0, 4))]
            s = _draw(ctx.rng, kind, r, n, np.float64)
            mu = s.mean(axis=1)
            amax = np.abs(s).max(axis=1)
            err = 8 * n * _U * amax + 1e-300
            var = s.var(axis=1) * (1 + 1e-12) + 8 * n * _U * amax**2
            m = s.max(axis=1)
            ref = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
            b = bennett_log_mass(mu - err, mu + err, m, var, np.full(r, n))
            w.add(np.maximum(ref - b, 0.0))
            # equality: n1 keys at mu + bb, n2 at mu - bb n1/n2 (variance n1 bb^2 / n2)
            n1 = ctx.rng.integers(1, n, r) if n > 1 else np.ones(r, int)
            n2 = n - n1
            bb = ctx.rng.uniform(0.01, 5.0, r)
            mu0 = ctx.rng.uniform(-5, 5, r)
            hi, lo_ = mu0 + bb, mu0 - bb * n1 / n2
            true = np.logaddexp(np.log(n1) + hi, np.log(n2) + lo_)
            b2 = bennett_log_mass(mu0, mu0, hi, n1 * bb**2 / n2, np.full(r, n))
            w.add(np.maximum(true - b2, 0.0))
            w.add(np.maximum(b2 - true - 1e-9, 0.0))
            ctx.tick(r)
    return w.value, 1e-12
