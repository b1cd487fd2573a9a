"""Batch check of certified search: SEARCH-SOUND.

For every method of :func:`certattn.search.certified_search` (ours, mc, tree, gap, and
quant and paged with per-key bounds from 4-bit estimates, Theorem QUANT-SCORE) on
clustered keys and random queries, the exact tail of the kept set (logits and softmax in
extended precision) must be at most the returned ``tail_upper``, and that bound at most
the budget ``eps``.  A rigorous float64 upper bound on the tail (:func:`_tail_hi`)
settles the rows it puts below ``tail_upper``; the others get the extended-precision
tail (:func:`_tail_exact`).
"""

from __future__ import annotations

import math

import numpy as np

from .._array import to_numpy
from .._fp import U
from ._common import EPS, Worst, _ctx, _split, _steps, longdouble_ok


def _tail_exact(q, keys, vis, kept, scale):
    """The tail of ``kept`` with logits and softmax in longdouble (float64 result)."""
    ld = np.longdouble
    lg = (q.astype(ld) @ keys.astype(ld).T) * ld(scale)
    lg = np.where(vis, lg, -np.inf)
    e = np.exp(lg - lg.max(axis=1, keepdims=True))
    return (np.where(kept, 0, e).sum(axis=1) / e.sum(axis=1)).astype(np.float64)


def _tail_hi(q, keys, vis, kept, scale):
    """A rigorous float64 upper bound on the exact tail of ``kept`` (no longdouble).

    The float64 logits err by at most ``a_j = (d + 4) 2^-52 scale |q|.|k_j|``; the shifted
    terms ``exp(l_j - c)`` (``c`` the float64 maximum: the tail does not depend on the
    shift) then err by a factor ``exp(+-theta)``, ``theta = max_j a_j + u |l_j - c| +
    5 2^-52`` (the subtraction and ``exp``, at most 4 ulp), the sums of positive terms by
    ``gamma_n``; underflowed terms add at most ``1e-300`` each to the tail.
    """
    d, n = q.shape[1], keys.shape[0]
    x, k = q.astype(np.float64), keys.astype(np.float64)
    lg = (x @ k.T) * scale
    a = 2 * (d + 4) * U * ((np.abs(x) @ np.abs(k).T) * scale)
    lg = np.where(vis, lg, -np.inf)
    diff = lg - lg.max(axis=1, keepdims=True)
    e = np.exp(diff)
    theta = np.max(np.where(vis, a + U * np.abs(diff), 0.0), axis=1) + 10 * U
    t = np.where(kept, 0.0, e).sum(axis=1) + n * 1e-300
    factor = np.exp(2.0 * theta) * (1.0 + (2 * n + 8) * U)
    return t / e.sum(axis=1) * factor


def check_search_sound(rows, *, xp, device, rng, progress):
    """SEARCH-SOUND: for every method (ours, mc, tree, gap, quant, paged), clustered keys
    (n = 64 or 256, d = 16; repeated keys, magnitudes x100, float32, random causal-style masks) and
    ``rows`` queries, the exact tail of ``kept`` (logits ``scale q.k`` and softmax in
    longdouble) is ``<= tail_bound`` and ``tail_bound <= eps``.  Violation: relative
    excess; tolerance 1e-12 (the longdouble reference errs by about ``d 2^-64`` in the
    logits, below 1e-15 relative in the tail); 1e-9 where longdouble is float64."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..search import certified_search

    methods = ("ours", "mc", "tree", "gap", "quant", "paged")
    combos = [(m, n, mag, dt) for m in methods for n in (64, 256) for mag in (1.0, 100.0)
              for dt in ctx.dtypes[:2]]
    for i, ((method, n, mag, dt), share) in enumerate(
            zip(combos, _split(rows, len(combos)), strict=True)):
        if share == 0:
            continue
        d, rng_ = 16, ctx.rng
        cents = rng_.standard_normal((8, d)) * 3
        keys = cents[rng_.integers(0, 8, n)] + 0.5 * rng_.standard_normal((n, d))
        keys[rng_.random(n) < 0.1] = keys[0]
        keys = (keys * mag / 10).astype(dt)
        vals = rng_.standard_normal((n, 4)).astype(dt)
        eps, scale = EPS[i % 4], 1.0 / math.sqrt(d)
        for r in _steps(share, n * 8):
            q = (cents[rng_.integers(0, 8, r)] * rng_.uniform(0, 2, (r, 1))
                 + rng_.standard_normal((r, d))).astype(dt)
            mask = None
            if i % 3 == 0:
                lim = rng_.integers(1, n + 1, r)
                mask = np.arange(n)[None, :] < lim[:, None]
            res = certified_search(ctx.put(q), ctx.put(keys), ctx.put(vals), eps,
                                   mask=None if mask is None else ctx.put(mask), method=method)
            kept, tb = to_numpy(res.kept).astype(bool), to_numpy(res.tail_upper)
            vis = np.ones((r, n), bool) if mask is None else mask
            tau = _tail_hi(q, keys, vis, kept, scale)
            near = tau > tb  # only these rows may violate: their exact tail decides
            tau[near] = _tail_exact(q[near], keys, vis[near], kept[near], scale)
            w.add(np.where(tau > tb, (tau - tb) / np.maximum(tau, 1e-300), 0.0))
            w.add(np.maximum(tb / eps - 1.0, 0.0))
            w.flag(kept & ~vis)
            ctx.tick(r)
    return w.value, (1e-12 if longdouble_ok() else 1e-9)
