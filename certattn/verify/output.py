"""Batch checks of the output-level theorems: OUT-BOUNDED, OUT-HEAD-TAIL, OUT-DIAMETER,
OUT-BEST and OUT-VAR-DECOMP.

Random value matrices next to adversarial logit rows: the bounds of
:mod:`certattn.output` on ``|Attn - Attn_k|`` must dominate the error computed directly
from the definitions, and the head/tail and variance decompositions must match their
float64 references.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .._fp import U as _U
from ._common import (
    Array,
    Ctx,
    Worst,
    _cases,
    _ctx,
    _rel,
    _slack,
    _terms,
    rand_kept,
    rank_mask,
)

_OUT_KINDS = ("normal", "ties", "masked", "wide", "dominant", "uniform")


def _values(ctx: Ctx, n: int, dv: int = 8) -> tuple[Array, Array, float]:
    """Values (n, dv) with a random scale (1e-2 .. 1e3), on the backend, and C = max |v_j|."""
    v = ctx.rng.standard_normal((n, dv)) * 10 ** ctx.rng.uniform(-2, 3)
    v[ctx.rng.random(n) < 0.1] = v[0]  # repeated values
    c = float(np.max(np.linalg.norm(v, axis=-1)))
    return ctx.put(v), ctx.put(v), c


def _output_refs(xp, x64, v, kept, variance=False):
    """Reference tau, Attn, Attn_k, |Attn - Attn_k| and (with ``variance``, else None)
    Var_P(V) from the definitions."""
    e, z = _terms(xp, x64)
    eh = xp.where(kept, e, xp.zeros_like(e))
    h = xp.sum(eh, axis=-1)
    attn, attn_k = (e @ v) / z[:, None], (eh @ v) / h[:, None]  # normalised after the sums
    err = xp.linalg.vector_norm(attn - attn_k, axis=-1)
    var = None
    if variance:
        dev = v[None, :, :] - attn[:, None, :]
        var = xp.sum(e * xp.sum(dev * dev, axis=-1), axis=-1) / z
    tau = xp.sum(e - eh, axis=-1) / z  # e - eh: the tail terms exactly (e or 0)
    return tau, attn, attn_k, err, var


def _tight_cases(ctx, rows, ns, width):
    """Rows on which every OUT bound is attained: two-point values ``+C u`` on a fixed kept
    half of the keys and ``-C u`` on the rest, so ``|Attn - Attn_k| = 2 C tau`` (no masked
    keys: the head is never empty).  Yields ``(x, x64, v, v64, kept)``."""
    kinds = ("normal", "ties", "wide", "dominant", "uniform")
    for x, x64, n, _ in _cases(ctx, rows, ns, kinds, width=width):
        u = ctx.rng.standard_normal(8)
        u *= 10 ** ctx.rng.uniform(-2, 3) / np.linalg.norm(u)
        half = np.arange(n) < (n + 1) // 2
        v = np.where(half[:, None], u, -u)
        kept = ctx.xp.broadcast_to(ctx.put(half), x.shape)
        yield x, x64, ctx.put(v), ctx.put(v), kept


def _tight_error(xp, x64, v64, kept):
    """``|Attn - Attn_k|`` without cancellation: ``p_i - p_hat_i = -e_i T/(H Z)`` on the
    head and ``e_i/Z`` on the tail (exact algebra), relative rounding about ``n u``; the
    norm is taken of the vector scaled to its largest component (tails near 1e-160 would
    otherwise square into the subnormals and lose digits)."""
    e, z = _terms(xp, x64)
    zero = xp.zeros_like(e)
    h = xp.sum(xp.where(kept, e, zero), axis=-1)
    t = xp.sum(xp.where(kept, zero, e), axis=-1)
    d = xp.where(kept, -e * (t / (h * z))[:, None], e / z[:, None])
    y = d @ v64
    # scaled norm: squares of components near 1e-160 would fall among the subnormals
    top = xp.max(xp.abs(y), axis=-1)
    safe = xp.where(top > 0, top, xp.ones_like(top))
    return top * xp.linalg.vector_norm(y / safe[:, None], axis=-1)


def _tight_slack(xp, w, err, bounds):
    """Relative slack of each bound below the attained error (rows with ``err > 0``)."""
    for b in bounds:
        w.add(_slack(xp, err, b))


def _out_cases(ctx, rows, ns, width):
    for x, x64, n, _ in _cases(ctx, rows, ns, _OUT_KINDS, width=width):
        v, v64, c = _values(ctx, n)
        yield x, x64, v, v64, c, rand_kept(ctx, x64, x.shape[0], n)


def check_out_head_tail(rows, *, xp, device, rng, progress):
    """OUT-HEAD-TAIL: ``tau (mu_tail - mu_head)`` from ``head_tail_terms`` against the direct
    difference ``sum p_i v_i - sum p_hat_i v_i`` (max-norm error divided by
    ``C (tau + 1e-3)``, i.e. relative with an absolute budget of ``1e-3 C tol``) and its
    ``tau`` against the reference (relative).  Tolerance 1e-9: the direct difference errs
    by about ``n u C`` (n <= 512)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..output import head_tail_terms

    for x, x64, v, v64, c, kept in _out_cases(ctx, rows, (7, 64, 512), 8 * 8):
        ht = head_tail_terms(x, v, kept)
        tau, attn, attn_k, _, _ = _output_refs(xp, x64, v64, kept)
        lhs = ht.tau[:, None] * (ht.mu_tail - ht.mu_head)
        diff = xp.max(xp.abs(lhs - (attn - attn_k)), axis=-1)
        w.add(diff / (c * (tau + 1e-3)))
        w.add(_rel(xp, ht.tau, tau))
    return w.value, 1e-9


def check_out_bounded(rows, *, xp, device, rng, progress):
    """OUT-BOUNDED: ``output_bounds(...).bounded >= |Attn - Attn_k|`` (reference from the
    definitions).  Violation ``max(0, err - bound) / (2C)``; and, on a tenth more rows where
    the bound is attained (two-point values, :func:`_tight_cases`), relative to the error
    itself, ``max(0, err - bound) / err`` (so a bound scaled by ``1 - delta`` fails for
    ``delta`` above the tolerance, whatever ``tau C``).  Tolerance ``64 n u`` with
    n = 512 (4e-12), the reference's absolute and relative rounding."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..output import output_bounds

    for x, x64, v, v64, c, kept in _out_cases(ctx, rows, (7, 64, 512), 8 * 8):
        ob = output_bounds(x, v, kept, diameters=False)
        err = _output_refs(xp, x64, v64, kept)[3]
        w.add(xp.maximum(err - ob.bounded, xp.zeros_like(err)) / (2 * c))
    for x, x64, v, v64, kept in _tight_cases(ctx, max(1, rows // 10), (7, 64, 512), 8 * 8):
        ob = output_bounds(x, v, kept, diameters=False)
        _tight_slack(xp, w, _tight_error(xp, x64, v64, kept), (ob.bounded,))
    return w.value, 64 * 512 * _U


def _distance_margin(xp, ob, n, dv, c):
    """What ``tail_head`` may exceed ``diameter`` by: its distance margin (``_Centred``)
    and the error bound of the computed head mean it measures from,
    ``delta = C (u (2n + 2 d_v + 2048) + n 2^-1074)`` (``output._mu_error``).

    The squared distances carry ``4 (d_v + 16) u (a + b) <= M = 32 (d_v + 16) u C^2``
    (centred values within ``2C``) and the distances ``2 u (sqrt a + sqrt b) <= 8 u C``, so
    a computed distance exceeds an exact ``D`` by at most
    ``sqrt(D^2 + M) - D + 8 u C = M / (sqrt(D^2 + M) + D) + 8 u C``, which decreases in
    ``D``; with ``D`` the tail-to-head distance ``<= diam_{H,T}``, itself at least
    ``diameter / tail_upper`` up to the diameter's relative rounding (``1e-12`` here), the
    margin is at most that expression at ``D = diameter / tail_upper (1 - 1e-12)``: about
    ``sqrt(M)`` where every value is the same, ``M / (2D)`` (about ``1e-13 C``) on
    ordinary rows."""
    m2 = 32 * (dv + 16) * _U * c * c
    tau = ob.tail_upper
    pos = tau > 0
    d = xp.where(pos, ob.diameter / xp.where(pos, tau, xp.ones_like(tau)), xp.zeros_like(tau))
    d = xp.maximum(d * (1.0 - 1e-12), xp.zeros_like(d))
    delta = c * (_U * (2 * n + 2 * dv + 2048) + n * 2.0**-1074)
    return tau * (m2 / (xp.sqrt(d * d + m2) + d) + 8 * _U * c + delta)


def check_out_diameter(rows, *, xp, device, rng, progress):
    """OUT-DIAMETER: the chain ``|Attn - Attn_k| <= tail_head <= diameter <= diameter_all <=
    bounded`` of ``output_bounds`` (each step: ``max(0, a - b) / (2C)``), and on a tenth
    more rows where the whole chain is attained (two-point values) each bound's relative
    slack below the error.  Tolerance ``64 n u`` with n = 128.  The step ``tail_head <=
    diameter`` allows ``tail_head`` its own distance margin (:func:`_distance_margin`):
    its distances come from ``|a|^2 - 2 a.b + |b|^2`` with a margin on the squares
    (``_Centred.max_dist``), which where every valid value is the same (diameter 0) stays
    at about ``sqrt(u) C`` and shrinks to about ``1e-13 C`` where the diameter is of
    order ``C``."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..output import output_bounds

    for x, x64, v, v64, c, kept in _out_cases(ctx, rows, (7, 32, 128), 128 + 8 * 8):
        ob = output_bounds(x, v, kept, diameters=True)
        err = _output_refs(xp, x64, v64, kept)[3]
        slack = _distance_margin(xp, ob, int(x.shape[-1]), int(v.shape[-1]), c)
        zero = xp.zeros_like(err)
        chain = (err, ob.tail_head, ob.diameter, ob.diameter_all, ob.bounded)
        for i, (a, b) in enumerate(itertools.pairwise(chain)):
            over = xp.astype(a, xp.float64) - b - (slack if i == 1 else zero)
            w.add(xp.maximum(over, zero) / (2 * c))
    for x, x64, v, v64, kept in _tight_cases(ctx, max(1, rows // 10), (7, 32, 128), 128 + 64):
        ob = output_bounds(x, v, kept, diameters=True)
        _tight_slack(xp, w, _tight_error(xp, x64, v64, kept),
                     (ob.tail_head, ob.diameter, ob.diameter_all, ob.bounded))
    return w.value, 64 * 128 * _U


def check_out_best(rows, *, xp, device, rng, progress):
    """OUT-BEST: the variance bound and ``best`` of ``output_bounds`` are ``>=
    |Attn - Attn_k|``, ``best`` is the minimum of the five bounds (relative error), and
    ``smallest_k_for_output(x, v, delta)`` keeps a Top-k whose exact error is ``<= delta``.
    Violation ``max(0, err - bound) / (2C)``; on a tenth more rows where every bound is
    attained (two-point values), the relative slack of ``variance`` and ``best`` below
    the error.  Tolerance ``64 n u`` (n = 128)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..output import output_bounds, smallest_k_for_output

    for x, x64, v, v64, c, kept in _out_cases(ctx, rows, (7, 32, 128), 128 + 8 * 8):
        ob = output_bounds(x, v, kept, diameters=True)
        err = _output_refs(xp, x64, v64, kept)[3]
        zero = xp.zeros_like(err)
        for b in (ob.variance, ob.best):
            w.add(xp.maximum(err - b, zero) / (2 * c))
        mins = ob.bounded
        for b in (ob.diameter_all, ob.diameter, ob.tail_head, ob.variance):
            mins = xp.minimum(mins, b)
        w.add(_rel(xp, ob.best, xp.astype(mins, xp.float64)))
        delta = float(ctx.rng.uniform(0.001, 0.5)) * c
        k = smallest_k_for_output(x, v, delta)
        err_k = _output_refs(xp, x64, v64, rank_mask(xp, x64, xp.astype(k, xp.int64)))[3]
        w.add(xp.maximum(err_k - delta, zero) / (2 * c))
    for x, x64, v, v64, kept in _tight_cases(ctx, max(1, rows // 10), (7, 32, 128), 128 + 64):
        ob = output_bounds(x, v, kept, diameters=True)
        _tight_slack(xp, w, _tight_error(xp, x64, v64, kept), (ob.variance, ob.best))
    return w.value, 64 * 128 * _U


def check_out_var_decomp(rows, *, xp, device, rng, progress):
    """OUT-VAR-DECOMP: ``(1-tau) within_head + tau within_tail + between`` of
    ``variance_decomposition`` against ``Var_P(V) = sum p_i |v_i - Attn|^2`` (relative, floor
    ``1e-6 C^2``) and its ``error`` against ``|Attn - Attn_k|`` (relative, floor
    ``1e-3 C``).  Tolerance 1e-9 (reference rounding about ``n u`` relative, n <= 512)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..output import variance_decomposition

    for x, x64, v, v64, c, kept in _out_cases(ctx, rows, (7, 64, 512), 8 * 8):
        vd = variance_decomposition(x, v, kept)
        _, _, _, err, var = _output_refs(xp, x64, v64, kept, variance=True)
        total = (1.0 - vd.tau) * vd.within_head + vd.tau * vd.within_tail + vd.between
        w.add(_rel(xp, total, var, 1e-6 * c * c))
        w.add(_rel(xp, vd.total, var, 1e-6 * c * c))
        w.add(_rel(xp, vd.error, err, 1e-3 * c))
    return w.value, 1e-9


def check_mask_hidden(rows, *, xp, device, rng, progress):
    """MASK-HIDDEN: keys masked by a finite fill keep their exact mass.  Per row (one head
    each): 24 keys, d = 8, a quarter of them masked by the float16 minimum (hidden scores
    65504 + offset above the visible ones, offset in [-60, 12]: from negligible to
    dominant) or the float32 minimum (ordinary scores), one key masked by ``-inf``;
    ``certify_attention`` with eps in {0, 0.01, 0.3}.  The exact tail of the kept set and
    the exact output error over ALL keys (logits ``scale q.k + fill`` and softmax in
    extended precision) must be at most ``tail_upper`` (relative excess) and
    ``error_bound`` (excess over ``max |v_j|``).  Tolerance 1e-12 (1e-9 where
    longdouble is float64)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from .._array import to_numpy
    from .._validate import InputError
    from ..attention import certify_attention
    from ._common import longdouble_ok

    n, d, ld = 24, 8, np.longdouble
    sc = 1.0 / math.sqrt(d)  # the float64 scale is part of the given logits
    step = max(1, min(4096, -(-rows // 6)))
    for i, r0 in enumerate(range(0, rows, step)):
        r, g = min(step, rows - r0), ctx.rng
        q = g.standard_normal((r, 1, d))
        k = g.standard_normal((r, n, d)) * 2
        v = g.standard_normal((r, n, 3)) * 10 ** g.uniform(-1, 2)
        hidden = g.random((r, 1, n)) < 0.25
        hidden[..., 0] = False  # at least one visible key
        # the fill is the minimum of the mask's dtype (float16 where the backend has it)
        dt = np.float16 if i % 2 == 0 and np.float16 in ctx.dtypes else np.float32
        fill = float(np.finfo(dt).min)
        if dt == np.float16:  # hidden keys along q: scale q.k_j = 65504 + offset + max
            s_vis = np.max(np.einsum("rqd,rnd->rqn", q, k), axis=-1) * sc
            t = -fill + g.uniform(-60, 12, (r, 1, n)) + s_vis[..., None]
            along = q / np.sum(q * q, axis=-1, keepdims=True) / sc
            k = np.where(hidden[:, 0, :, None], t[:, 0, :, None] * along, k)
        mask = np.where(hidden, fill, 0.0)
        mask[..., -1] = np.where(hidden[..., -1], fill, -np.inf)  # a -inf key too
        mask = mask.astype(dt)
        eps = (0.0, 0.01, 0.3)[i % 3]
        try:
            c = certify_attention(ctx.put(q), ctx.put(k), ctx.put(v), eps, mask=ctx.put(mask),
                                  scale=sc, return_kept=True)
        except InputError:  # a row whose every key is masked: refused, nothing to check
            continue
        kept = to_numpy(c.kept).astype(bool)[:, 0]
        lg = np.einsum("rqd,rnd->rqn", q.astype(ld), k.astype(ld))[:, 0] * ld(sc)
        lg = lg + mask[:, 0].astype(ld)  # fills, 0 and -inf: exact in any dtype
        e = np.exp(lg - lg.max(axis=1, keepdims=True))
        z = e.sum(axis=1)
        tau = (np.where(kept, 0, e).sum(axis=1) / z).astype(np.float64)
        attn = np.einsum("rn,rnc->rc", e, v.astype(ld)) / z[:, None]
        out = to_numpy(c.output)[:, 0].astype(ld)
        err = np.sqrt(np.sum((attn - out) ** 2, axis=1)).astype(np.float64)
        tb, eb = to_numpy(c.tail_upper)[:, 0], to_numpy(c.error_bound)[:, 0]
        w.add(np.where(tau > tb, (tau - tb) / np.maximum(tau, 1e-300), 0.0))
        vmax = np.max(np.linalg.norm(v, axis=-1), axis=-1)
        w.add(np.maximum(err - eb, 0.0) / vmax)
        ctx.tick(r)
    return w.value, (1e-12 if longdouble_ok() else 1e-9)
