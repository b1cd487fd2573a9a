r"""Sound log-space arithmetic shared by the bounds (certattn.bounds, .blocks, .output).

Every bound is carried as a logarithm :math:`L` of the exact quantity, with a margin
:math:`\sigma` covering the rounding of the float64 operations that produced it (the
error model of :mod:`certattn.bounds`).  Here: the unit roundoff, the log of cumulative
sums of exponentials, the margin formula, and the two directed conversions
:math:`e^{L \pm \sigma}` back to a probability that round the right way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "CLIP",
    "SMALLEST",
    "U",
    "log_cumsum",
    "margin",
    "neg_inf",
    "ratio_log",
    "round_down",
    "round_up",
]

Array = Any

U = 2.0**-53
"""Unit roundoff of float64."""
SMALLEST = 2.0**-1074
"""Smallest positive (subnormal) float64."""
CLIP = -700.0
"""Tail terms below :math:`e^{-700}` (relative to the row maximum) are rounded up to it."""
_DCAP = 1e300  # |d| is capped in the margin so that it stays finite


def neg_inf(xp: Any, like: Array) -> Array:
    """An array of ``-inf`` shaped like ``like`` (on its device)."""
    return xp.full_like(like, -xp.inf)


def log_cumsum(d: Array, valid: Array, xp: Any, *, reverse: bool, upper: bool) -> Array:
    """``log`` of cumulative sums of ``exp(d)`` along the last axis (``d <= 0``).

    ``reverse`` accumulates from the end (suffix sums, i.e. from the small end of a
    descending row).  ``upper`` (tail role) rounds terms below ``e^{-700}`` up to it so
    that no term underflows; otherwise (head role) underflow only shrinks the sums.
    Invalid entries contribute 0.  Empty sums give ``-inf``.
    """
    if upper:
        d = xp.maximum(d, CLIP)
    e = xp.where(valid, xp.exp(d), xp.zeros_like(d))
    if reverse:
        e = xp.flip(e, axis=-1)
    c = xp.cumulative_sum(e, axis=-1)
    if reverse:
        c = xp.flip(c, axis=-1)
    with np.errstate(divide="ignore"):
        return xp.where(c > 0, xp.log(xp.where(c > 0, c, xp.ones_like(c))), neg_inf(xp, c))


def margin(a: Array, b: Array, n: Any, xp: Any) -> Array:
    """Log-space margin ``u (4(|a| + |b|) + 4 n + 2^14)`` with infinities capped."""
    cap = _DCAP
    a = xp.minimum(xp.abs(a), cap)
    b = xp.minimum(xp.abs(b), cap)
    return U * (4.0 * (a + b) + 4.0 * n + 16384.0)


def round_up(log_b: Array, sigma: Array, positive: Array, xp: Any) -> Array:
    r"""Sound upper bound :math:`\min(1, e^{L+\sigma}(1+4u) + 2^{-1073})`.

    Where ``positive`` (the exact quantity is > 0) the result is at least the smallest
    subnormal, elsewhere it is 0.
    """
    # + 2^-1073: an exp that lands among the subnormals errs by up to half of 2^-1074
    v = xp.exp(xp.minimum(log_b + sigma, 0.0)) * (1.0 + 4 * U) + 2 * SMALLEST
    v = xp.minimum(v, 1.0)
    return xp.where(positive, v, xp.zeros_like(v))


def round_down(log_b: Array, sigma: Array, xp: Any) -> Array:
    r"""Sound lower bound :math:`\max(0, e^{L-\sigma}(1-4u) - 2^{-1073})`."""
    v = xp.exp(log_b - sigma) * (1.0 - 4 * U) - 2 * SMALLEST
    return xp.minimum(xp.maximum(v, 0.0), 1.0)


def ratio_log(log_x: Array, log_d: Array, xp: Any) -> Array:
    """``log(X / (D + X))`` from ``log X`` and ``log D``; ``-inf`` where ``X = 0``."""
    lx = xp.where(log_x > -xp.inf, log_x, xp.zeros_like(log_x))
    out = lx - xp.logaddexp(log_d, lx)
    return xp.where(log_x > -xp.inf, out, neg_inf(xp, out))
