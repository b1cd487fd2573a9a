r"""Sort-free array kernel of :func:`certattn.certify_topk` (``CERTATTN_KERNEL=array``).

The native path on CuPy and on torch CUDA tensors (where the generic kernel's row sort
never ran), and selectable on every backend with ``CERTATTN_KERNEL=array``, so that the
CPU tests run the very same code through NumPy and torch.  A leaf module: plain
array-API operations (``where``, ``sum``, ``min``, ``max``, ``count_nonzero``,
``nextafter``, ``exp``, ``log``) on a ``(rows, n)`` chunk, no sort, no scatter, no
atomics, no host loop over rows.

The cut, by bisection on thresholds
-----------------------------------
Input: the float64 terms :math:`\hat e_i > 0` and the budget :math:`B` per row, exactly
those of the generic kernel (:func:`certattn._topk_generic.exp_terms` and the acceptance
test of :func:`certattn.topk._certify_rows`).  Let :math:`S(\theta)` be the float64 sum of
``where(e <= theta, e, 0)`` over the row: for a fixed shape the library sums in a fixed
order, and float addition is monotone in each operand, so :math:`S` is non-decreasing in
:math:`\theta` and two thresholds that select the same terms give bit-identical sums.
The cut term :math:`v^*` is the smallest term with :math:`S(v^*) > B`.  Each row keeps
a threshold ``lo`` with :math:`S(\mathrm{lo}) \le B` and a term ``hi`` with
:math:`S(\mathrm{hi}) > B`; a round finds the smallest term ``nxt`` above ``lo`` (the
row is done when ``nxt = hi``: no term lies between), evaluates :math:`S` at a point
``mid`` in ``[nxt, hi)`` (the geometric mean while ``hi > 2 nxt``, else the arithmetic
one) and moves ``lo`` to ``mid`` or ``hi`` to the largest term at most ``mid``.  Every
round removes a term from ``(lo, hi]`` or halves the interval (in log space, then
linearly), so a row settles in about 20-40 rounds of three reductions each.

Exact ties: all terms below :math:`v^*` form the tail prefix (sum :math:`S_<`, which is
:math:`S(\mathrm{lo})` bit for bit: the same selection), and of the :math:`c` terms
equal to :math:`v^*` the largest :math:`j \le c` with
:math:`\mathrm{fl}(S_< + \mathrm{fl}(j v^*)) \le B` join it (integer bisection on row
scalars).  The tail is the :math:`t = |\{e < v^*\}| + j` smallest terms, as in the
sorted kernel.

Rounding (THEORY section 7, :mod:`certattn.topk`): :math:`\hat T = \mathrm{fl}(S_< +
\mathrm{fl}(j v^*))` is a float64 sum of exactly the tail's terms (zeros add exactly;
the product rounds once, where adding ``j`` copies would round ``j - 1`` times), so the
bound :math:`1.01\,m u` for any summation order covers it, and the acceptance test is
the sorted kernel's.  Thresholds only steer: they never enter a certified value.
Should a library's sum ever not be reproducible (so that :math:`S_< > B`), those rows
are recomputed by the sorted kernel: the kernel fails over, never to a wrong answer.
"""

from __future__ import annotations

from typing import Any

from ._topk_generic import cut_sorted

__all__ = ["cut_search"]

Array = Any

MAX_ROUNDS = 4096  # a safety net only: a round removes a term or halves the interval


def cut_search(e: Array, budget: Array, xp: Any) -> tuple[Array, Array]:
    """Sort-free cut: ``(t, T)`` as :func:`certattn._topk_generic.cut_sorted` returns them.

    Parameters
    ----------
    e : float64 array (rows, n)
        The terms, all positive (exponents are raised to the floor before ``exp``).
    budget : float64 array (rows,)
        Largest certified tail per row.
    xp : namespace
        The array namespace of ``e``.

    Returns
    -------
    t, T : int64 and float64 arrays (rows,)
        The number of tail keys (the ``t`` smallest terms) and their float64 sum, the
        largest such prefix with ``T <= budget``.
    """
    n = e.shape[-1]
    total = _sum_at_most(e, xp.max(e, axis=-1), xp)  # S(max): every term
    all_fit = total <= budget
    none_fit = budget < 0.0
    lo = xp.zeros_like(budget)  # S(0) = 0 <= budget unless none fit
    hi = xp.max(e, axis=-1)
    active = xp.logical_not(xp.logical_or(all_fit, none_fit))
    for _ in range(MAX_ROUNDS):
        nxt = xp.min(xp.where(e > lo[:, None], e, xp.inf), axis=-1)
        active = xp.logical_and(active, nxt < hi)
        if not bool(xp.any(active)):
            break
        mid = _midpoint(nxt, hi, xp)
        below = xp.where(e <= mid[:, None], e, 0.0)
        over = xp.sum(below, axis=-1) > budget
        top = xp.max(below, axis=-1)  # largest term <= mid (0 if none: then not over)
        hi = xp.where(xp.logical_and(active, over), top, hi)
        lo = xp.where(xp.logical_and(active, xp.logical_not(over)), mid, lo)
    else:  # pragma: no cover - unreachable: every round makes progress
        raise RuntimeError("certify_topk: the array kernel's search did not settle")
    t, t_hat, bad = _resolve_ties(e, hi, budget, xp)
    n_all = xp.full_like(t, n)
    t = xp.where(all_fit, n_all, xp.where(none_fit, xp.zeros_like(t), t))
    t_hat = xp.where(all_fit, total, xp.where(none_fit, xp.zeros_like(t_hat), t_hat))
    bad = xp.logical_and(bad, xp.logical_not(xp.logical_or(all_fit, none_fit)))
    if bool(xp.any(bad)):  # fail over to the sorted kernel (see the module docstring)
        ts, hs = cut_sorted(e, budget, xp)
        t, t_hat = xp.where(bad, ts, t), xp.where(bad, hs, t_hat)
    return t, t_hat


def _sum_at_most(e: Array, theta: Array, xp: Any) -> Array:
    """:math:`S(\\theta)`: the float64 row sums of the terms at most ``theta``."""
    return xp.sum(xp.where(e <= theta[:, None], e, 0.0), axis=-1)


def _midpoint(a: Array, b: Array, xp: Any) -> Array:
    """A point in ``[a, b)`` (``0 < a < b``) splitting it: geometric mean while
    ``b > 2a`` (halves the log range), else the arithmetic mean (halves the range)."""
    geo = xp.exp(0.5 * (xp.log(a) + xp.log(b)))
    mid = xp.where(b > 2.0 * a, geo, a + 0.5 * (b - a))
    return xp.minimum(xp.maximum(mid, a), xp.nextafter(b, xp.zeros_like(b)))


def _resolve_ties(
    e: Array, v: Array, budget: Array, xp: Any
) -> tuple[Array, Array, Array]:
    """``(t, T, bad)`` for cut term ``v``: the terms below ``v`` plus as many of those
    equal to ``v`` as fit; ``bad`` flags rows whose prefix alone does not fit."""
    below = e < v[:, None]
    s_lt = xp.sum(xp.where(below, e, 0.0), axis=-1)
    c_lt = xp.astype(xp.count_nonzero(below, axis=-1), xp.int64)
    c_eq = xp.astype(xp.count_nonzero(e == v[:, None], axis=-1), xp.int64)
    bad = s_lt > budget
    j_lo, j_hi = xp.zeros_like(c_eq), c_eq  # largest j in [j_lo, j_hi] that fits
    while bool(xp.any(j_hi > j_lo)):
        j_mid = (j_lo + j_hi + 1) // 2
        fits = s_lt + xp.astype(j_mid, xp.float64) * v <= budget
        j_lo = xp.where(fits, j_mid, j_lo)
        j_hi = xp.where(fits, j_hi, j_mid - 1)
    return c_lt + j_lo, s_lt + xp.astype(j_lo, xp.float64) * v, bad
