"""Batch check of the approximation theorem DELTA-ERROR (:mod:`certattn.approx.delta`).

NumPy-only by design, like the search and geometry checks (the approximation subpackage
runs on the host): whatever the backend, instances are drawn and checked on NumPy.
"""

from __future__ import annotations

import math

import numpy as np

from .._fp import U as _U
from ._common import Worst, longdouble_ok


def _instance(rng: np.random.Generator) -> dict:
    s = int(rng.choice([24, 48, 96, 160]))
    d = int(rng.choice([4, 8, 16]))
    h = int(rng.choice([1, 2]))
    gamma = int(rng.choice([1, 3, 4, 8, 16, 64]))
    min_tail = int(rng.choice([0, 4, 16, 128]))
    spread = 10 ** rng.uniform(-0.5, 0.8)
    q = rng.standard_normal((h, s, d)) * spread
    if rng.random() < 0.3:  # slowly varying queries (the method's premise)
        q = q[:, :1] + 0.05 * q
    k = rng.standard_normal((h, s, d))
    if rng.random() < 0.3:  # a few dominant keys (attention sinks)
        k[:, : int(rng.integers(1, 5))] *= 4
    v = rng.standard_normal((h, s, int(rng.choice([1, 3, 8])))) * 10 ** rng.uniform(-2, 3)
    v[:, rng.random(s) < 0.1] = v[:, :1]  # repeated values
    return {"q": q, "k": k, "v": v, "gamma": gamma, "min_tail": min_tail,
            "causal": bool(rng.random() < 0.7), "kind": int(rng.integers(0, 3))}


def check_delta_error(rows, *, xp, device, rng, progress):
    """DELTA-ERROR: on random heads (grouped sinks, slowly varying queries, wide value
    scales), delta_correct's ``error_bound`` dominates ``|O_i - Attn(q_i)|`` against a
    float64 reference (violation ``max(0, err - bound) / C``, C = max |v_j|; tolerance
    ``64 n u`` with n <= 160, the reference's absolute rounding), and on the corrected rows
    ``O_i - Attn_i`` equals ``tau_a (mu_T,a - mu_H,a) - tau_i (mu_T,i - mu_H,i)`` from
    :func:`certattn.output.head_tail_terms` (max-norm difference over ``C (tau_a + tau_i
    + 1e-3)``, tolerance 1e-9 as OUT-HEAD-TAIL, rescaled to the common tolerance).
    Rounding-level: on four query rows of every head (first, second, middle, last: dense
    and corrected ones) the error against the exact attention (error-free logits
    ``scale q.k`` with the library's float64 scale, softmax and output in extended
    precision) must be at most ``error_bound +`` :data:`EXACT_TOL` ``C`` (rescaled to the
    common tolerance), so a dense row's bound set to zero, or a rounding term removed, is
    seen (float64 scores alone err by about ``u |s|``).  ``rows`` counts query rows."""
    from ..approx.delta import delta_correct
    from ..approx.selection import run_policy
    from ..output import head_tail_terms
    from ..policies import Pages, WindowSinks

    tol = 64 * 160 * _U
    w = Worst()
    done = 0
    while done < rows:
        inst = _instance(rng)
        q, k, v = inst["q"], inst["k"], inst["v"]
        h, s, d = q.shape
        if inst["kind"] == 0:
            base = WindowSinks(window=max(1, s // 8), sinks=2)
        elif inst["kind"] == 1:
            base = WindowSinks(window=3, sinks=0)
        else:
            base = Pages(budget=16, page_size=8)
        r = delta_correct(q, k, v, gamma=inst["gamma"], min_tail=inst["min_tail"], base=base,
                          causal=inst["causal"])
        logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)
        if inst["causal"]:
            logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        attn = (p / p.sum(-1, keepdims=True)) @ v
        c = float(np.max(np.linalg.norm(v, axis=-1)))
        err = np.linalg.norm(r.output - attn, axis=-1)
        w.add(np.maximum(err - r.error_bound, 0.0) / c)
        if longdouble_ok():
            rows_x, err_x = _exact_error(q, k, v, inst["causal"], r.output)
            bound_x = r.error_bound[..., rows_x]
            w.add(np.maximum(err_x - bound_x, 0.0) / c * (tol / EXACT_TOL))
        # the identity, on the rows the correction changed
        kept = run_policy(q, k, v, base, method="base", params={}, causal=inst["causal"],
                          return_weights=False).kept
        ht = head_tail_terms(logits, v, kept)
        s_p = r.params["s_p"]
        rows_i = np.array([i for i in range(s_p) if i % inst["gamma"]], dtype=np.int64)
        if rows_i.size:
            a = inst["gamma"] * (rows_i // inst["gamma"])
            rhs = _term(ht, a) - _term(ht, rows_i)
            lhs = r.output[..., rows_i, :] - attn[..., rows_i, :]
            scale = c * (ht.tau[..., a] + ht.tau[..., rows_i] + 1e-3)
            w.add(np.max(np.abs(lhs - rhs), axis=-1) / scale * (tol / 1e-9))
        done += h * s
        if progress is not None:
            progress(h * s)
    return w.value, tol


EXACT_TOL = 5e-17
"""Tolerance (over C) of the exact comparison: the reference's logits err by about
``2^-63 |s|`` (error-free products, a correctly rounded sum), its softmax and output by
``n 2^-64`` relative in longdouble (n <= 160: below 1e-17)."""

_SPLIT = 134217729.0  # 2^27 + 1: Veltkamp's split of a double into two 26-bit halves


def _halves(a):
    t = _SPLIT * a
    hi = t - (t - a)
    return hi, a - hi


def _exact_dots(qr, k):
    """``qr @ k.T`` for rows ``qr`` (m, d) and keys (n, d) to far below ``2^-64`` relative to
    ``|q| |k|``: every partial product of the split factors is exact in float64, and the
    ``4 d`` products are summed by cascaded error-free additions (Ogita, Rump and Oishi's
    Sum2, vectorised over every (row, key)): the sum ``hi + lo`` errs by at most
    ``u |sum| + (4 d u)^2 sum |t|``, i.e. about ``1e-27 |q| |k|`` for d <= 64."""
    (qh, ql), (kh, kl) = _halves(qr), _halves(k)
    terms = [a[:, None, :] * b[None, :, :] for a in (qh, ql) for b in (kh, kl)]  # exact
    s = np.zeros((qr.shape[0], k.shape[0]))
    c = np.zeros_like(s)
    for part in terms:
        for j in range(qr.shape[-1]):
            t = part[:, :, j]
            x = s + t
            z = x - s
            c += (s - (x - z)) + (t - z)  # TwoSum: the rounding error of s + t, exactly
            s = x
    ld = np.longdouble
    return s.astype(ld) + c.astype(ld)


def _exact_error(q, k, v, causal, out):
    """``(rows, |out - Attn|)`` on a sample of query rows of every head, Attn exact to about
    :data:`EXACT_TOL` C (logits ``scale q.k`` with the library's float64 scale)."""
    ld = np.longdouble
    h, s, d = q.shape
    rows = np.unique(np.array([0, 1, s // 2, s - 1]) % s)
    errs = np.empty((h, rows.size))
    for g in range(h):
        lg = _exact_dots(q[g, rows], k[g]) * ld(1.0 / math.sqrt(d))
        if causal:
            lg = np.where(np.arange(s)[None, :] <= rows[:, None], lg, ld(-np.inf))
        e = np.exp(lg - lg.max(-1, keepdims=True))
        attn = (e @ v[g].astype(ld)) / e.sum(-1, keepdims=True)
        diff = out[g, rows].astype(ld) - attn
        errs[g] = np.sqrt(np.sum(diff * diff, axis=-1)).astype(np.float64)
    return rows, errs


def _term(ht, idx):
    """``tau (mu_T - mu_H)`` of the rows ``idx`` (Theorem OUT-HEAD-TAIL)."""
    return ht.tau[..., idx, None] * (ht.mu_tail[..., idx, :] - ht.mu_head[..., idx, :])
