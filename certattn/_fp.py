r"""The float64 error model: one home for every rounding constant and sound helper.

A certificate is a claim about the *exact* real-number softmax of the given logits.
Everything certattn computes is float64 arithmetic whose rounding is bounded here, once,
and used by every certificate (Top-k, any kept set, blocks, cells, search, output):

Constants
---------
``U = 2^-53``
    Unit roundoff: ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= U`` for normal results.
``SMALLEST = 2^-1074``
    Smallest positive subnormal; half of it bounds the absolute error of a subnormal result.
``EXP_ABS_ERR = 2^-1073``
    Absolute error bound of one ``exp`` whose result underflows (lands among subnormals).
``NORMAL_MIN = 2^-1022``
    Smallest normal float64 (an absolute floor added to radii and score bounds).
``EXP_FLOOR = -700``
    Exponents below it are raised to it before ``exp`` where a kernel wants no subnormals:
    a raised term over-estimates its exact value by at most ``e^-699``.
``GAMMA_EXP = 2100 U``
    Relative error of ``exp(x)`` for ``|x| <~ 900`` computed from a float64 ``x`` that is
    itself the rounded difference of two logits (``|x| U`` for the subtraction, 4 ulps for
    ``exp``).
``EXP_POLY_ERR = 192 U``
    Relative error of the compiled kernel's polynomial ``exp`` (degree-11 Taylor after a
    Cody-Waite reduction; derived in :mod:`certattn._topk_numba`).  It replaces the 4 ulps
    of a library ``exp`` on terms ``exp(s_i)`` of exact logits, where no subtraction is
    rounded, so it lies inside ``GAMMA_EXP`` (a test checks that).

Formulas
--------
:func:`sum_gamma`
    ``(n + extra) U``-type relative error of a float64 sum of ``n`` non-negative terms in
    any order (Higham, Thm 4.3: ``gamma_{n-1} <= 1.01 (n - 1) U``).
:func:`score_margin`
    ``(2 d + 8) U``: relative error of a float64 dot product of length ``d`` and a scale.
:func:`score_abs_margin`
    The absolute form per query row, ``(2 d + 8) U scale |q| max_j |k_j|``, rounded up.
:func:`widen_tail` / :func:`budget_under_slack`
    A tail bound ``t`` for scores within ``delta`` of the exact ones becomes one for the
    exact scores, ``t / (t + (1 - t) e^{-2 delta}) <= t e^{2 delta}``, rounded up; and the
    budget ``eps e^{-2 delta}`` (rounded down) whose widened bound stays within ``eps``.
:func:`score_slack` / :func:`slack_error`
    The per-row slack ``delta_i`` between computed and exact scores ``scale q.k + b`` and
    the output error it adds, ``(e^{2 delta} - 1) max_j |v_j|``.
:func:`quant_step_factor`
    ``1/2 + 2^(b+2) U``: a ``b``-bit code computed in float64 as
    ``rint((k - lo)/step)`` is within that many steps of the key (Theorem QUANT-SCORE).
:func:`margin`
    Log-space margin ``U (f (|a| + |b|) + 4 n + 2^14)`` of ``L = a - b`` where ``a`` and
    ``b`` are log-sums of ``n`` terms: ``f = 4`` when ``a`` and ``b`` were each formed
    by one shifted log-sum-exp (the shift is exact and each log errs by ``|.| U``),
    ``f = 8`` when they are log-sums of *bounds* that already carry one rounding of
    their own (blocks: ``log n_b + u_b`` then the LSE).
:func:`round_up` / :func:`round_down`
    ``e^{L +- sigma}`` back to a probability, rounded the right way.
:func:`ratio_up`
    ``num / (num + head)`` rounded up, **failing closed**: NaN or an overflow anywhere
    gives 1 (the trivial bound), never a small number.
:func:`add_up` / :func:`add_down`
    ``a + b`` moved outward by ``2 U |a + b|`` (a score bound plus an additive mask bias).

Log-sum-exp
-----------
:func:`lse`, :func:`lse_parts`, :func:`lse_diff`, :func:`masked_weights`: the masked
log-sum-exp family every module uses (shifted by the row maximum, ``-inf`` for empty
sets, accurate differences of two LSEs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "CLIP",
    "EXP_ABS_ERR",
    "EXP_FLOOR",
    "EXP_POLY_ERR",
    "GAMMA_EXP",
    "NORMAL_MIN",
    "SMALLEST",
    "U",
    "add_down",
    "add_up",
    "budget_under_slack",
    "log_cumsum",
    "lse",
    "lse_diff",
    "lse_parts",
    "margin",
    "masked_weights",
    "neg_inf",
    "quant_step_factor",
    "ratio_log",
    "ratio_up",
    "round_down",
    "round_up",
    "row_max",
    "scaled_norm",
    "score_abs_margin",
    "score_margin",
    "score_slack",
    "slack_error",
    "sum_gamma",
    "widen_tail",
]

Array = Any

U = 2.0**-53
"""Unit roundoff of float64."""
SMALLEST = 2.0**-1074
"""Smallest positive (subnormal) float64."""
EXP_ABS_ERR = 2.0 * SMALLEST
"""Absolute error bound of one ``exp`` that underflows (``2^-1073``)."""
NORMAL_MIN = 2.0**-1022
"""Smallest normal float64."""
EXP_FLOOR = -700.0
"""Exponents below it are raised to it before ``exp`` (no subnormal results)."""
CLIP = EXP_FLOOR
"""Alias of :data:`EXP_FLOOR` used by the log-space tail sums."""
GAMMA_EXP = 2100 * U
"""Relative error of one term ``exp(s_i - c)`` (subtraction plus 4 ulps of ``exp``)."""
EXP_POLY_ERR = 192 * U
"""Relative error of the compiled kernel's polynomial ``exp`` on ``[EXP_FLOOR, 709.7]``."""
_DCAP = 1e300  # |d| is capped in the margin so that it stays finite


def sum_gamma(n: int, extra: int = 0) -> float:
    """Relative error bound ``2 (n + extra) U`` of a float64 sum of ``n`` non-negative
    terms in any order (twice Higham's ``1.01 (n - 1) U``, plus ``extra`` for the
    operations around it)."""
    return 2.0 * (n + extra) * U


def score_margin(d: int) -> float:
    """Relative rounding margin ``(2 d + 8) U`` of a float64 score ``scale * q.k`` (or a
    score bound built from one dot product, a norm product and a scale) in dimension ``d``."""
    return (2.0 * d + 8.0) * U


def quant_step_factor(bits: int) -> float:
    r"""Steps a float64-rounded ``b``-bit code may miss its key by: ``1/2 + 2^(b+2) U``.

    With ``lo <= k <= lo + L step`` (``L = 2^b - 1``) the real quotient ``t = (k - lo)/step``
    lies in ``[0, L]``; float64 computes ``t' = t (1 + e_1)(1 + e_2)``, ``|e_i| <= U``, so
    ``|t' - t| <= 2.01 U L``, and the code ``c = clip(rint(t'), 0, L)`` has
    ``|t' - c| <= 1/2``.  Hence ``|k - (lo + step c)| = step |t - c| <=
    step (1/2 + 2.01 U L) <= step (1/2 + 2^(b+2) U)``.
    """
    return 0.5 + 2.0 ** (int(bits) + 2) * U


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


def margin(a: Array, b: Array, n: Any, xp: Any, *, factor: float = 4.0) -> Array:
    """Log-space margin ``U (factor (|a| + |b|) + 4 n + 2^14)``.

    ``-inf`` (an empty set's log-sum, no rounding) counts as 0; other magnitudes are capped
    at 1e300, so ``+inf`` gives a margin that makes :func:`round_up` return 1 (fail closed);
    NaN stays NaN, which :func:`round_up` also maps to 1.
    ``factor = 4`` for log-sums of terms, ``8`` for log-sums of bounds (module docstring).
    """
    a = xp.minimum(xp.abs(xp.where(a > -xp.inf, a, xp.zeros_like(a))), _DCAP)
    b = xp.minimum(xp.abs(xp.where(b > -xp.inf, b, xp.zeros_like(b))), _DCAP)
    return U * (factor * (a + b) + 4.0 * n + 16384.0)


def round_up(log_b: Array, sigma: Array, positive: Array, xp: Any) -> Array:
    r"""Sound upper bound :math:`\min(1, e^{L+\sigma}(1+4u) + 2^{-1073})`.

    Where ``positive`` (the exact quantity is > 0) the result is at least the smallest
    subnormal, elsewhere it is 0.  Fails closed: NaN in ``log_b`` or ``sigma`` gives 1.
    """
    # + 2^-1073: an exp that lands among the subnormals errs by up to half of 2^-1074
    t = log_b + sigma
    t = xp.where(xp.isnan(t), xp.zeros_like(t), t)
    v = xp.exp(xp.minimum(t, 0.0)) * (1.0 + 4 * U) + 2 * SMALLEST
    v = xp.minimum(v, 1.0)
    return xp.where(positive, v, xp.zeros_like(v))


def round_down(log_b: Array, sigma: Array, xp: Any) -> Array:
    r"""Sound lower bound :math:`\max(0, e^{L-\sigma}(1-4u) - 2^{-1073})`; NaN gives 0."""
    v = xp.exp(log_b - sigma) * (1.0 - 4 * U) - 2 * SMALLEST
    v = xp.where(xp.isnan(v), xp.zeros_like(v), v)
    return xp.minimum(xp.maximum(v, 0.0), 1.0)


def ratio_log(log_x: Array, log_d: Array, xp: Any) -> Array:
    """``log(X / (D + X))`` from ``log X`` and ``log D``; ``-inf`` where ``X = 0``."""
    lx = xp.where(log_x > -xp.inf, log_x, xp.zeros_like(log_x))
    out = lx - xp.logaddexp(log_d, lx)
    return xp.where(log_x > -xp.inf, out, neg_inf(xp, out))


def ratio_up(num: Array, head: Array, xp: Any) -> Array:
    """``num / (num + head)`` rounded up, in [0, 1]; ``0`` where ``num == 0``.

    Fails closed: a NaN (``0 * inf``, ``inf / inf``) or an overflow in either input gives
    ``1``, the trivial tail bound, never a small number.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        r = num / (num + head)
        r = r * (1.0 + 4 * U)
    bad = xp.isnan(r) | xp.isnan(num) | xp.isnan(head) | (num == xp.inf)
    r = xp.where(num == 0, xp.zeros_like(r), r)
    r = xp.where(bad, xp.ones_like(r), r)
    return xp.minimum(r, 1.0)


def add_up(a: Array, b: Array, xp: Any) -> Array:
    r"""``a + b`` rounded up: an upper bound on the exact sum of two float64 arrays.

    The float64 sum ``s`` errs by at most :math:`u|a + b| \le 2u|s|`, and adding
    :math:`2u|s|` (at least one unit in the last place of ``s``) moves ``s`` past it.
    Infinite sums are returned as they are; ``-inf + inf`` (NaN) becomes ``+inf``
    (fails closed for an upper bound).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        s = a + b
        out = xp.where(xp.isfinite(s), s + 2 * U * xp.abs(s), s)
    return xp.where(xp.isnan(out), xp.full_like(out, xp.inf), out)


def add_down(a: Array, b: Array, xp: Any) -> Array:
    """``a + b`` rounded down (the mirror of :func:`add_up`; NaN becomes ``-inf``)."""
    return -add_up(-a, -b, xp)


# --------------------------------------------------------------------------
# Masked log-sum-exp
# --------------------------------------------------------------------------


def row_max(x: Array, xp: Any) -> Array:
    """Row maximum over the last axis (keepdims), 0 for rows with no finite entry."""
    m = xp.max(x, axis=-1, keepdims=True)
    return xp.where(m > -xp.inf, m, xp.zeros_like(m))


def lse_parts(x: Array, xp: Any) -> tuple[Array, Array]:
    """``(m, log sum exp(x - m))`` per row, ``m`` the row's own maximum (``-inf`` = absent).

    The log-sum lies in ``[0, log n]`` (``-inf`` for an empty row), so differences of two
    LSEs are formed as ``(m_a - m_b) + (l_a - l_b)``: no ``log(29) + 1e38`` absorption,
    and no underflow of a far tail against the other set's maximum.
    """
    m = row_max(x, xp)
    with np.errstate(over="ignore"):
        s = xp.sum(xp.exp(x - m), axis=-1)  # masked keys: exp(-inf) = 0
    with np.errstate(divide="ignore"):
        return m[..., 0], xp.log(s)


def lse(x: Array, xp: Any, keep: Array | None = None) -> Array:
    """Row-wise log-sum-exp over the last axis of the entries where ``keep`` (all if
    None); ``-inf`` for rows with no finite kept entry."""
    if keep is not None:
        x = xp.where(keep, x, neg_inf(xp, x))
    m, ls = lse_parts(x, xp)
    return ls + m


def lse_diff(a: Array, b: Array, xp: Any) -> Array:
    """``LSE(a) - LSE(b)`` row-wise, accurate (see :func:`lse_parts`)."""
    ma, la = lse_parts(a, xp)
    mb, lb = lse_parts(b, xp)
    return (ma - mb) + (la - lb)


def masked_weights(x: Array, keep: Array, xp: Any) -> tuple[Array, Array]:
    """Normalised weights ``exp(x_i - LSE(keep))`` on ``keep`` (0 elsewhere) and the LSE."""
    xm = xp.where(keep, x, neg_inf(xp, x))
    m = row_max(xm, xp)  # finite (0 for an empty row): exp(-inf - m) = 0 off ``keep``
    e = xp.exp(xm - m)
    z = xp.sum(e, axis=-1, keepdims=True)
    zs = xp.where(z > 0, z, xp.ones_like(z))
    with np.errstate(divide="ignore"):
        out_lse = xp.where(z > 0, xp.log(zs) + m, xp.full_like(z, -xp.inf))
    return e / zs, out_lse[..., 0]


def scaled_norm(a: Array, xp: Any) -> Array:
    """Euclidean norm over the last axis, without underflow or overflow of the squares.

    Each row is divided by its largest magnitude first (``|a| = m |a / m|``), so tiny
    vectors (|a| below 1e-154, whose squares underflow) and huge ones keep their norm.
    The division adds at most one rounding per entry: the result is within a relative
    ``(d + 4) U`` of the exact norm, as for the plain formula (callers' margins); a norm
    beyond the float64 range is ``inf``, silently.
    """
    m = xp.max(xp.abs(a), axis=-1, keepdims=True)
    safe = (m > 0) & (m < xp.inf)
    m1 = xp.where(safe, m, xp.ones_like(m))
    with np.errstate(over="ignore"):  # a norm past the float64 range is inf (callers fail closed)
        n = xp.linalg.vector_norm(a / m1, axis=-1) * m1[..., 0] * (1.0 + 2 * U)
    return xp.where(safe[..., 0], n, m[..., 0])


def score_abs_margin(
    queries: Array, keys: Array, scale: float, xp: Any, *, key_norms: Array | None = None
) -> Array:
    r"""Absolute rounding bound of every float64 score ``scale * q_i.k_j`` of a query row.

    :math:`|\mathrm{fl}(\mathrm{fl}(q_i\cdot k_j)\,\mathrm{scale}) - \mathrm{scale}\,
    q_i\cdot k_j| \le (2d + 8) u\, \mathrm{scale}\, |q_i|\, \max_j |k_j|`
    (:func:`score_margin`); the norms come from :func:`scaled_norm` (within
    :math:`(d + 4) u`), so the product is widened by twice the margin and ``NORMAL_MIN``.

    Parameters
    ----------
    queries : float64 array (..., m, d)
    keys : float64 array (..., n, d)
        Leading axes broadcast with the queries'.
    scale : float
    xp : namespace
    key_norms : float64 array (..., n), optional
        ``scaled_norm(keys, xp)``, when the caller already has it (chunked loops).

    Returns
    -------
    float64 array (..., m)
        ``inf`` where a norm overflows (callers then fail closed).
    """
    d = int(queries.shape[-1])
    kn = scaled_norm(keys, xp) if key_norms is None else key_norms
    kmax = xp.max(kn, axis=-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        r = score_margin(d) * float(scale) * scaled_norm(queries, xp) * kmax
        r = r * (1.0 + 2 * score_margin(d)) + NORMAL_MIN
    return xp.where(xp.isnan(r), xp.full_like(r, xp.inf), r)


def widen_tail(tail: Array, delta: Array, xp: Any) -> Array:
    r"""A tail bound for computed scores made a bound for the exact ones, rounded up.

    If every visible score of a row is within ``delta`` of its exact value and ``tail``
    bounds the discarded mass under the computed scores, the exact discarded mass is at
    most :math:`t / (t + (1 - t) e^{-2\delta}) \le t e^{2\delta}` (the tail's weights
    grow by at most :math:`e^{\delta}`, the head's shrink by at most as much, and
    :math:`T/(T + H)` increases in :math:`T` and decreases in :math:`H`).  The head term is
    shrunk by ``8 u`` (``1 - t``, ``exp`` and the product) and the ratio rounded up
    (:func:`ratio_up`).

    Parameters
    ----------
    tail : float64 array (..., m)
        Sound bound for the computed scores (values above 1 act as 1).
    delta : float64 array broadcastable to ``tail``
        Per-row bound on ``|computed score - exact score|``.
    xp : namespace

    Returns
    -------
    float64 array (..., m)
        In [0, 1]; 0 where ``tail`` is 0 (a bound of 0 means nothing visible was dropped,
        whatever ``delta``); 1 (fails closed) where ``tail`` or ``delta`` is NaN or the
        head term is not a number.
    """
    t = xp.minimum(tail, 1.0)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        head = (1.0 - t) * xp.exp(-2.0 * delta) * (1.0 - 8 * U)
    r = ratio_up(t, head, xp)
    bad = xp.isnan(tail) | xp.isnan(delta + xp.zeros_like(t))
    r = xp.where(bad, xp.ones_like(r), r)
    return xp.where(tail == 0, xp.zeros_like(r), r)  # nothing dropped: nothing to widen


def budget_under_slack(eps: float, delta: float) -> float:
    r"""The largest safe budget ``eps'`` with :func:`widen_tail` of any ``t <= eps'`` at
    most ``eps``, for scores within ``delta`` of the exact ones.

    :math:`\varepsilon e^{-2\delta}`, shrunk by ``64 u`` (the rounding of ``exp`` and the
    product here and of :func:`widen_tail`); 0 when ``delta`` is NaN or infinite (the
    caller then keeps every key).
    """
    d = float(delta)
    if not math.isfinite(d):
        return 0.0
    return float(eps) * math.exp(-2.0 * max(d, 0.0)) * (1.0 - 64 * U)


def score_slack(margin: Array, s: Array, valid: Array, bias: Array | None, xp: Any) -> Array:
    r"""Per query row, a bound :math:`\delta_i` on ``|computed - exact score|`` over its
    visible keys, ``(..., m)``.

    ``margin`` (:func:`certattn._fp.score_abs_margin`) bounds the rounding of
    ``scale q.k``; with a ``bias`` the float64 sum ``s = raw + b`` adds at most
    :math:`u |raw + b| \le 2u \max_j |s_j|` over the visible keys with :math:`b_j \ne 0`
    (adding 0 is exact; as in :func:`certattn.search.certified_search`).  Rounded up;
    ``inf`` on overflow.
    """
    slack = xp.broadcast_to(margin, s.shape[:-1])
    if bias is not None:
        added = valid & (bias != 0)
        big = xp.max(xp.where(added, xp.abs(s), xp.zeros_like(s)), axis=-1)
        slack = xp.where(big > 0, add_up(slack, 2 * U * big, xp), slack)
    return xp.where(xp.isnan(slack), xp.full_like(slack, xp.inf), slack)


def slack_error(
    err: Array, slack: Array, v: Array, valid: Array, xp: Any, *,
    value_norms: Array | None = None,
) -> Array:
    r"""``err`` plus the distance between attention under the exact and the computed scores.

    With every visible score within :math:`\delta` of its exact value, each weight
    changes by a factor in :math:`[e^{-2\delta}, e^{2\delta}]`, so
    :math:`\sum_j |p_j - p'_j| \le e^{2\delta} - 1` and the outputs differ by at most
    :math:`(e^{2\delta} - 1) \max_j |v_j|` over the visible keys.  Rounded up (the norms
    of :func:`certattn._fp.scaled_norm` widened by ``(d_v + 8) u``; ``value_norms``:
    ``scaled_norm(v, xp)`` when the caller already has it); ``inf`` on overflow.
    """
    dv = int(v.shape[-1])
    with np.errstate(over="ignore", invalid="ignore"):
        vn = scaled_norm(v, xp) if value_norms is None else value_norms
        vn = vn * (1.0 + (dv + 8) * U)  # (..., n)
        zero = xp.zeros_like(vn[..., None, :])
        vmax = xp.max(xp.where(valid, vn[..., None, :], zero), axis=-1)
        term = xp.expm1(2.0 * slack) * (1.0 + 8 * U) * vmax * (1.0 + 2 * U)
    term = xp.where(xp.isnan(term), xp.full_like(term, xp.inf), term)
    return add_up(err, term, xp)
