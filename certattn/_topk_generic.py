r"""Generic (any array-API namespace) kernel of :func:`certattn.certify_topk`.

The terms :math:`\hat e_i \approx e^{s_i - c}` and the sorted cut.  A leaf module: the
NumPy fast path (:mod:`certattn._topk_numpy`) and the delegation layer
(:mod:`certattn.topk`) import it; it imports neither.  The rounding analysis is in
:mod:`certattn.topk`; its constants live in :mod:`certattn._fp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._fp import EXP_ABS_ERR, EXP_FLOOR

__all__ = ["cut_sorted", "exp_terms"]

Array = Any


def exp_terms(
    x: Array,
    eps: float,
    xp: Any,
    lowest: float,
    *,
    terms: Callable[[Array, float | None], Array] | None = None,
) -> tuple[Array | None, Array, Array, Array, Any]:
    r"""Terms :math:`\hat e_i \approx e^{s_i - c}` in float64, ``c``, their row sums.

    Returns ``(e, c, z, top, alpha)``.  The common factor :math:`e^{-c}` cancels in every
    ratio, so ``c`` only has to keep the terms in range.  First ``c = 0``: ``exp`` of the
    exact float64 value of each logit, no rounded subtraction.  It is kept for every row
    whose sum satisfies :math:`e^{-650}/\varepsilon \le Z \le e^{700}` (all practical
    logits): then no term overflowed and ``alpha`` is negligible against
    :math:`\varepsilon Z`.  The other rows take ``c = m - shift`` (``m`` the row
    maximum), formed as ``(s - m) + shift``, where ``shift = max(0, -log(eps) - 600)``
    lifts tiny budgets clear of underflow.  Every decision is per row, so a row's
    certificate is a function of that row alone (whatever chunk it is computed in).

    Exponents below ``EXP_FLOOR`` (masked keys included) are raised to it first when the
    chunk has any (``lowest`` is its minimum): ``exp`` then never produces a subnormal
    or a zero, which costs NumPy several times the normal speed.  A raised term
    over-estimates its exact value, by at most :math:`e^{-699}`; ``alpha`` (a scalar, or
    one per row) bounds the total absolute error of a row's terms, :math:`n e^{-699}`
    for a row with a raised exponent, else :math:`n 2^{-1073}` (underflow).

    ``top`` is finite exactly for the rows without NaN or ``+inf`` (the row sums on the
    first path, the row maxima on the second) and feeds the caller's input check; ``e``
    is ``None`` when some row has NaN or ``+inf``.
    """
    n = x.shape[-1]
    raised = not lowest >= EXP_FLOOR
    big, small = n * math.exp(EXP_FLOOR + 1.0), n * EXP_ABS_ERR
    if raised:  # per row: only rows holding an exponent below the floor are raised
        rmin = xp.astype(xp.min(x, axis=-1), xp.float64)
        alpha = xp.where(rmin < EXP_FLOOR, xp.full_like(rmin, big), xp.full_like(rmin, small))
    else:
        alpha = small
    with np.errstate(over="ignore"):  # an overflow (of a term or the sum) sends the row on
        if terms is not None:  # a native fast path (NumPy: per-thread scratch buffers)
            e = terms(x, EXP_FLOOR if raised else None)
        else:
            e = xp.exp(xp.astype(xp.clip(x, min=EXP_FLOOR) if raised else x, xp.float64))
        z = xp.sum(e, axis=-1)
    z_min, z_max = math.exp(-650.0) / eps, math.exp(700.0)
    ok = xp.logical_and(z >= z_min, z <= z_max)  # False for NaN
    if bool(xp.all(ok)):
        return e, xp.zeros_like(z[:, None]), z, z, alpha
    m = xp.max(x, axis=-1)
    if not bool(xp.all(m < xp.inf)):
        return None, m, z, m, alpha
    # Rows outside the range (only those: every row's certificate depends on its own
    # logits alone) take c = m - shift.
    shift = max(0.0, -math.log(eps) - 600.0)
    m64 = xp.reshape(xp.astype(m, xp.float64), (-1, 1))
    m64 = xp.where(m64 > -xp.inf, m64, xp.zeros_like(m64))  # fully masked rows: any shift
    with np.errstate(over="ignore"):  # x - m below -float max: -inf, raised to the floor
        e2 = xp.exp(xp.clip((xp.astype(x, xp.float64) - m64) + shift, min=EXP_FLOOR))
    keep = xp.reshape(ok, (-1, 1))
    e = xp.where(keep, e, e2)
    c = xp.where(keep, xp.zeros_like(m64), m64 - shift)
    z = xp.where(ok, z, xp.sum(e2, axis=-1))
    alpha = xp.where(ok, alpha * xp.ones_like(z), xp.full_like(z, big))
    top = xp.where(ok, z, xp.astype(m, xp.float64))
    return e, c, z, top, alpha


def cut_sorted(e: Array, budget: Array, xp: Any) -> tuple[Array, Array]:
    """Generic kernel: longest prefix of the ascending order whose sum <= budget.

    Returns ``(t, T)``: the number of tail keys and the computed tail sum (float64,
    accumulated from the small end).
    """
    es = xp.sort(e, axis=-1, stable=False)  # values only: the unstable sort is faster
    cs = xp.cumulative_sum(es, axis=-1)
    ok = cs <= budget[:, None]
    t = xp.astype(xp.count_nonzero(ok, axis=-1), xp.int64)
    idx = xp.reshape(xp.where(t > 0, t - 1, xp.zeros_like(t)), (-1, 1))
    t_hat = xp.take_along_axis(cs, idx, axis=-1)[:, 0]
    t_hat = xp.where(t > 0, t_hat, xp.zeros_like(t_hat))
    return t, t_hat
