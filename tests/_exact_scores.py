"""Exact-arithmetic references (mpmath) for logits ``scale q.k + b`` with an additive bias.

The logits are formed in mpmath from the float64 queries, keys, scale and bias (every
binary float is a rational, converted exactly), so the tail and output error below are
those of the real-number softmax of the given inputs.
"""

from __future__ import annotations

import mpmath
import numpy as np

_DPS = 120


def lifted_key_case(n: int = 256):
    """Issue 20.2's case: one query, ``n`` keys whose scores fall linearly from 12 to -12,
    and a +30 additive bias on the lowest-scoring (last) key, which then carries about 97%
    of the mass; its value is the only non-zero one.  Returns ``(q, k, v, b)``."""
    q = np.array([[4.0, 0.0]])
    k = np.stack([np.linspace(3, -3, n), np.zeros(n)], -1)
    v = np.zeros((n, 1))
    v[-1] = 1
    b = np.zeros((1, n))
    b[0, -1] = 30.0
    return q, k, v, b


def exact_logits(q, keys, scale, bias=None, visible=None) -> list:
    """Exact logits of one query row (``None`` where masked)."""
    n = keys.shape[0]
    b = np.zeros(n) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (n,))
    vis = np.ones(n, bool) if visible is None else np.broadcast_to(visible, (n,))
    sc = mpmath.mpf(float(scale))
    out = []
    for j in range(n):
        if not vis[j]:
            out.append(None)
            continue
        dot = mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(c))
                          for a, c in zip(q, keys[j], strict=True))
        out.append(sc * dot + mpmath.mpf(float(b[j])))
    return out


def exact_tail_and_error(logits: list, kept, values) -> tuple:
    """Exact ``(1 - P(kept), |Attn - Attn_kept|)`` of one row of exact logits."""
    with mpmath.workdps(_DPS):
        mx = max(s for s in logits if s is not None)
        w = [mpmath.mpf(0) if s is None else mpmath.exp(s - mx) for s in logits]
        z = mpmath.fsum(w)
        zh = mpmath.fsum(wi for wi, k in zip(w, kept, strict=True) if k)
        tail = (z - zh) / z
        err2 = mpmath.mpf(0)
        for c in range(values.shape[1]):
            col = [mpmath.mpf(float(a)) for a in values[:, c]]
            attn = mpmath.fsum(wi * ci for wi, ci in zip(w, col, strict=True)) / z
            head = mpmath.fsum(wi * ci for wi, ci, k in zip(w, col, kept, strict=True) if k)
            err2 += (attn - head / zh) ** 2 if zh > 0 else mpmath.inf
        return tail, mpmath.sqrt(err2)


def exact_output_distance(logits: list, values, output) -> mpmath.mpf:
    """Exact ``|Attn - output|`` (Euclidean) of one row of exact logits."""
    with mpmath.workdps(_DPS):
        mx = max(s for s in logits if s is not None)
        w = [mpmath.mpf(0) if s is None else mpmath.exp(s - mx) for s in logits]
        z = mpmath.fsum(w)
        err2 = mpmath.mpf(0)
        for c in range(values.shape[1]):
            attn = mpmath.fsum(wi * mpmath.mpf(float(a)) for wi, a in
                               zip(w, values[:, c], strict=True)) / z
            err2 += (attn - mpmath.mpf(float(output[c]))) ** 2
        return mpmath.sqrt(err2)


def check_rows(q, keys, values, scale, kept, tail_upper, error_bound=None, *, bias=None,
               visible=None) -> None:
    """Assert ``exact tail <= tail_upper`` (and ``exact error <= error_bound``) per row.

    ``q`` ``(m, d)``, ``keys`` ``(n, d)``, ``values`` ``(n, dv)``, ``kept`` ``(m, n)``,
    ``bias``/``visible`` broadcastable to ``(m, n)``.
    """
    m, n = q.shape[0], keys.shape[0]
    b = np.zeros((m, n)) if bias is None else np.broadcast_to(bias, (m, n))
    vis = np.ones((m, n), bool) if visible is None else np.broadcast_to(visible, (m, n))
    tail_upper = np.asarray(tail_upper, np.float64).reshape(m)
    for i in range(m):
        logits = exact_logits(q[i], keys, scale, b[i], vis[i])
        tail, err = exact_tail_and_error(logits, np.asarray(kept[i]) & vis[i], values)
        assert tail <= mpmath.mpf(float(tail_upper[i])), (i, float(tail), tail_upper[i])
        if error_bound is not None:
            eb = float(np.asarray(error_bound).reshape(m)[i])
            assert err <= mpmath.mpf(eb), (i, float(err), eb)
