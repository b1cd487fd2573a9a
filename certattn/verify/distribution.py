"""Batch checks of the distribution-level theorems: TV-TAIL, TV-KL, DIV-COROLLARIES,
BUDGET-EQUIV and TOPK-MINIMAL.

Each check runs the library's :mod:`certattn.distribution` / :mod:`certattn.topk`
functions on adversarial logit rows and compares the total variation, KL, chi-square,
Hellinger and Renyi divergences of the Top-k truncation, the budget conversions and the
minimality of the certified ``k`` with float64 references built from the definitions.
"""

from __future__ import annotations

import numpy as np

from .._array import device_of, to_numpy
from ._common import (
    EPS,
    Worst,
    _cases,
    _ctx,
    _rel,
    _slack,
    _terms,
    longdouble_ok,
    rand_k,
    rand_kept,
    topk_tail,
)

_NS = (7, 64, 1000)


def check_tv_tail(rows, *, xp, device, rng, progress):
    """TV-TAIL on arbitrary kept sets: ``tail_mass(x, kept)`` against (a) the tail summed
    directly, ``sum_T e_i / sum e_i`` (relative, floor 1e-250) and (b) the definition
    ``1/2 sum |p - p_hat|`` (absolute budget 1e-12 through a floor of 1e-2).  Tolerance
    1e-10: both sides err by at most ``u (|d|max + n + 8)`` with ``|d| <= 745`` for terms
    that do not underflow and ``n <= 1000``, i.e. below 3e-13."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..distribution import tail_mass

    for x, x64, n, _ in _cases(ctx, rows, _NS, width=6):
        kept = rand_kept(ctx, x64, x.shape[0], n)
        lib = tail_mass(x, kept)
        e, z = _terms(xp, x64)
        t = xp.sum(xp.where(kept, xp.zeros_like(e), e), axis=-1)
        h = xp.sum(xp.where(kept, e, xp.zeros_like(e)), axis=-1)
        p = e / z[:, None]
        ph = xp.where(kept, e / h[:, None], xp.zeros_like(e))
        w.add(_rel(xp, lib, t / z))
        w.add(_rel(xp, lib, 0.5 * xp.sum(xp.abs(p - ph), axis=-1), 1e-2))
    return w.value, 1e-10


def ascending_tails(xp, e):
    """The terms ``e`` sorted ascending and their cumulative sums (small end first).

    One sort of the values (unstable: the sorted values are the same, and NumPy's unstable
    sort is about ten times faster than its stable one)."""
    es = xp.sort(e, axis=-1, stable=False)
    return es, xp.cumulative_sum(es, axis=-1)


def _divergence_refs(xp, x64, k, corollaries=False):
    """Reference tau, KL (and with ``corollaries`` chi2, Hellinger^2) of the Top-k truncation,
    from the definitions, and the tail sum ``T``.

    One sort of the terms: the Top-k are its last ``k`` positions (which of several tied
    keys is kept does not change any sum), the tail ``T`` is summed from the small end and
    the head ``H`` over the last ``k`` positions."""
    e, z = _terms(xp, x64)
    es, cs = ascending_tails(xp, e)
    n = es.shape[-1]
    t = topk_tail(xp, cs, k)
    pos = xp.arange(n, dtype=xp.int64, device=device_of(es))
    head = pos[None, :] >= (n - k)[:, None]
    zero = xp.zeros_like(es)
    h = xp.sum(xp.where(head, es, zero), axis=-1)
    tau = t / z
    with np.errstate(divide="ignore"):
        kl = xp.where(tau < 0.5, -xp.log1p(-tau), xp.log(z) - xp.log(h))
    if not corollaries:
        return tau, kl, None, None, t
    # chi2 and Hellinger from their definitions, with p_hat_i - p_i = e_i (1/H - 1/Z) formed
    # as e_i T / (H Z) (exact algebra, Z = H + T): no cancellation, no normalisation mismatch
    zz = (h + t)[:, None]
    p = es / zz
    ph = es / h[:, None]
    diff = es * (t[:, None] / (h[:, None] * zz))
    pos_p = p > 0
    safe = xp.where(pos_p, p, xp.ones_like(p))
    chi_h = xp.where(pos_p, diff * diff / safe, zero)
    hel_h = xp.where(pos_p, diff * diff / (xp.sqrt(ph) + xp.sqrt(safe)) ** 2, zero)
    chi2 = xp.sum(xp.where(head, chi_h, p), axis=-1)  # tail keys contribute p_i exactly
    hell = 0.5 * xp.sum(xp.where(head, hel_h, p), axis=-1)
    return tau, kl, chi2, hell, t


def check_tv_kl(rows, *, xp, device, rng, progress):
    """TV-KL: ``truncation_divergences(x, k=k).kl`` and ``kl_from_tail(tau)`` against
    ``-log1p(-tau)`` (tail summed from the small end; ``log Z - log H`` where
    ``tau >= 1/2``), ``tv_from_kl(kl)`` against tau,
    and ``kl_reverse = inf`` exactly where the tail is non-empty (1 if not).  Relative,
    tolerance 1e-10 (rounding of both sides below 3e-13, see TV-TAIL)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..distribution import kl_from_tail, truncation_divergences, tv_from_kl

    for x, x64, n, _ in _cases(ctx, rows, _NS, width=8):
        k = rand_k(ctx, x.shape[0], 1, n)
        d = truncation_divergences(x, k=k)
        tau, kl, _, _, t = _divergence_refs(xp, x64, k)
        w.add(_rel(xp, d.kl, kl))
        w.add(_rel(xp, kl_from_tail(tau), kl))
        w.add(_rel(xp, tv_from_kl(d.kl), tau))
        w.flag((t > 1e-300) & ~(d.kl_reverse == xp.inf))
        nv = xp.sum(xp.astype(x64 > -xp.inf, xp.int64), axis=-1)
        w.flag((k >= nv) & (d.kl_reverse != 0))
    return w.value, 1e-10


def check_div_corollaries(rows, *, xp, device, rng, progress):
    """DIV-COROLLARIES: ``chi2``, ``hellinger2`` and Renyi orders 2 and 1/2 of
    ``truncation_divergences`` against the definitions ``sum (p_hat - p)^2 / p``,
    ``1/2 sum (sqrt p - sqrt p_hat)^2``, ``log(sum p_hat^2/p) = log1p(chi2)`` and
    ``-2 log sum sqrt(p p_hat) = -2 log1p(-H^2)`` (all sums of non-negative terms: no
    cancellation: ``p_hat_i - p_i = e_i T/(H Z)`` on the head, ``p_i`` on the tail).
    Relative, tolerance 1e-10."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..distribution import truncation_divergences

    for x, x64, n, _ in _cases(ctx, rows, _NS, width=10):
        k = rand_k(ctx, x.shape[0], 1, n)
        d = truncation_divergences(x, k=k)
        _, _, chi2, hell, _ = _divergence_refs(xp, x64, k, corollaries=True)
        for lib, ref in ((d.chi2, chi2), (d.hellinger2, hell), (d.renyi(2.0), xp.log1p(chi2)),
                         (d.renyi(0.5), -2.0 * xp.log1p(-hell))):
            w.add(_rel(xp, lib, ref))
    return w.value, 1e-10


EXACT_TOL = 1e-15
"""Tolerance of the extended-precision sample (relative): the longdouble tail errs by about
``n 2^-64`` (n <= 2048: 1.1e-16); where longdouble is float64 the sample is skipped."""

_SAMPLE = 2  # rows per certificate compared against the extended-precision tail


def _topk_violations(w, xp, cert, x64, eps, sample, n_sample=_SAMPLE):
    """Soundness and minimality of a Top-k certificate ``cert`` at budget ``eps`` against the
    float64 tail summed from the small end (relative excesses, tolerance 1e-11); the first
    ``n_sample`` rows go to ``sample`` (a list) for :func:`_exact_violations`."""
    k = xp.astype(cert.k, xp.int64)
    nv = xp.sum(xp.astype(x64 > -xp.inf, xp.int64), axis=-1)
    if eps == 0.0:
        w.flag((k != nv) | (cert.tail_upper != 0))
        return
    e, z = _terms(xp, x64)
    cs_up = ascending_tails(xp, e)[1]
    tk = topk_tail(xp, cs_up, k) / z
    tk1 = topk_tail(xp, cs_up, k - 1) / z
    zero = xp.zeros_like(tk)
    w.add(xp.maximum(tk / eps - 1.0, zero))
    w.add(xp.where(k >= 2, xp.maximum((1.0 - 1e-6) - tk1 / eps, zero), zero))
    w.add(_slack(xp, tk, cert.tail_upper))
    w.add(xp.maximum(cert.tail_upper / eps - 1.0, zero))
    w.flag((k < 1) | (k > nv))
    r = min(n_sample, x64.shape[0])
    sample.append((to_numpy(x64[:r, ...]), to_numpy(k[:r]),
                   to_numpy(cert.tail_upper[:r]).astype(np.float64)))


def _exact_violations(w, sample):
    """The sampled rows of :func:`_topk_violations` (rows of one length) against the tail in
    extended precision, in one call: relative excess of the exact tail over ``tail_upper``,
    rescaled from :data:`EXACT_TOL` to 1e-11 (this sees a rounding margin removed).
    Skipped where longdouble is float64."""
    if not sample or not longdouble_ok():
        return
    x, k, ub = (np.concatenate(parts) for parts in zip(*sample, strict=True))
    exact = _longdouble_tail(x, k)
    w.add(np.where(exact > ub, (exact - ub) / np.maximum(exact, 1e-300), 0.0)
          * (1e-11 / EXACT_TOL))


def _longdouble_tail(x64: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Exact-to-``n 2^-64`` tail of the Top-k (ties: any order, equal terms) in longdouble."""
    ld = np.longdouble
    # sort the float64 logits (fast), not the longdouble terms: exp is monotone, so the
    # terms come ascending too and the tail is the n - k smallest (the first n - k)
    x = np.sort(x64, axis=-1).astype(ld)
    es = np.exp(x - x[:, -1:])
    cs = np.cumsum(es, axis=-1)
    n = x.shape[-1]
    idx = np.clip(n - k - 1, 0, n - 1)
    t = np.where(k < n, np.take_along_axis(cs, idx[:, None], axis=-1)[:, 0], ld(0))
    return (t / cs[:, -1]).astype(np.float64)


def check_budget_equiv(rows, *, xp, device, rng, progress):
    """BUDGET-EQUIV: (a) ``tau <= eps`` iff ``kl_from_tail(tau) <= tv_budget_to_kl(eps)`` for
    the reference tail of random k (rows within relative 1e-12 of the boundary skipped);
    (b) ``certify_topp(x, p)`` with ``p = 1 - eps`` keeps a head of exact mass ``>= p`` and is
    minimal, its ``tail_upper`` bounds the exact tail and is ``<= 1 - p``, checked against
    the references exactly as TOPK-MINIMAL (:func:`_topk_violations`), never against
    ``certify_topk``; (c) the budgets round-trip, ``kl_budget_to_tv(tv_budget_to_kl(eps)) =
    eps``.  Logical failures count 1; relative excesses (b) at most 1e-11 (1e-15 on the
    extended-precision sample); the round-trip's relative error at most 1e-11 (a few
    ulps)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..distribution import kl_budget_to_tv, kl_from_tail, tv_budget_to_kl
    from ..topk import certify_topp

    for i, (x, x64, n, _) in enumerate(_cases(ctx, rows, _NS, width=6)):
        eps = EPS[i % len(EPS)]
        k = rand_k(ctx, x.shape[0], 1, n)
        e, z = _terms(xp, x64)
        tau = topk_tail(xp, ascending_tails(xp, e)[1], k) / z
        far = xp.abs(tau - eps) > 1e-12 * eps
        w.flag(far & ((tau <= eps) != (kl_from_tail(tau) <= tv_budget_to_kl(eps))))
        p = 1.0 - eps
        sample = []
        _topk_violations(w, xp, certify_topp(x, p), x64, 1.0 - p, sample)
        _exact_violations(w, sample)
        w.add(abs(kl_budget_to_tv(tv_budget_to_kl(eps)) - eps) / eps * 1e3)
    return w.value, 1e-11


def check_topk_minimal(rows, *, xp, device, rng, progress):
    """TOPK-MINIMAL: for ``cert = certify_topk(x, eps)`` and the float64 tail summed from the
    small end, ``tail_ref(k) <= eps (1 + tol)``, ``tail_ref(k - 1) >= eps (1 - 1e-6 - tol)``
    (minimality), ``tail_ref(k) <= cert.tail_upper (1 + tol)`` and ``cert.tail_upper <= eps``;
    ``eps = 0`` keeps every valid key.  Violation: the relative excess; tolerance
    ``tol = 1e-11`` covers the reference's rounding (``u (n + 760)`` per term, n <= 2048).
    On one row per budget of every batch the exact tail (extended precision, ``n 2^-64``)
    must be ``<= tail_upper (1 + 1e-15)``: this sees the rounding margin
    (``2 (n + 4096) u + 2100 u``, about 2e-12) removed.  Every batch is split over all
    budgets (six in (0, 0.3], 1e-300 and 0) and, on NumPy with numba installed, both code
    paths (NumPy and compiled, ``certattn[fast]``) alternate between the budgets."""
    import contextlib

    from .._array import is_numpy
    from .._topk_numba import forced, kernels
    from ..topk import certify_topk

    ctx, w = _ctx(xp, device, rng, progress), Worst()
    paths = ("numpy", "numba") if is_numpy(xp) and kernels() is not None else (None,)
    eps_list = (*EPS, 1e-300, 0.0)
    m = len(eps_list)
    for i, (x, x64, _, _) in enumerate(_cases(ctx, rows, (5, 64, 2048), width=6)):
        sample = []  # rows of every budget, for one extended-precision call per batch
        for j, eps in enumerate(eps_list):
            sel = ctx.put(np.arange(j, x.shape[0], m))
            if sel.shape[0] == 0:
                continue
            xs, x64s = xp.take(x, sel, axis=0), xp.take(x64, sel, axis=0)
            path = paths[(i + j) % len(paths)]
            with forced(path) if path else contextlib.nullcontext():
                cert = certify_topk(xs, eps)
            _topk_violations(w, xp, cert, x64s, eps, sample, 1)  # 7 budgets: 7 rows
        _exact_violations(w, sample)
    return w.value, 1e-11
