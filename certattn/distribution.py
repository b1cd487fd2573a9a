r"""Distribution level: what a truncation of the softmax loses (THEORY section 2).

For logits :math:`s` (``-inf`` marks a masked key), :math:`P = \mathrm{softmax}(s)` and a
kept set :math:`A` with discarded mass :math:`\tau = 1 - P(A)`, the renormalised
truncation :math:`\hat P = P(\cdot \mid A)` satisfies

* **TV-TAIL** (Lemma 4.1 of Tzachristas et al.; any kept set [derived]):
  :math:`\mathrm{TV}(P, \hat P) = \tau`;
* **TV-KL** (Thm 4.3 of Tzachristas et al.):
  :math:`\mathrm{KL}(\hat P \Vert P) = \mathrm{LSE}(s) - \mathrm{LSE}(s_A) = -\log(1-\tau)` and
  :math:`\mathrm{TV} = 1 - e^{-\mathrm{KL}}`; :math:`\mathrm{KL}(P \Vert \hat P) = +\infty`
  whenever :math:`\tau > 0`;
* **DIV-COROLLARIES** [derived]: :math:`\chi^2(\hat P \Vert P) = \tau / (1-\tau)`, squared
  Hellinger :math:`1 - \sqrt{1-\tau}`, every Renyi divergence
  :math:`D_\alpha(\hat P \Vert P) = -\log(1-\tau)`;
* **BUDGET-EQUIV** [derived]: :math:`\mathrm{TV} \le \varepsilon` iff
  :math:`\mathrm{KL}(\hat P\Vert P) \le -\log(1-\varepsilon)`.

Every function here is batched over the leading axes, works on any array-API namespace
and computes in float64, in log space, so tiny tails keep their relative accuracy:
:math:`\tau = \exp(\mathrm{LSE}(s_T) - \mathrm{LSE}(s))`, KL as ``-log1p(-tau)`` and TV from
KL as ``-expm1(-KL)`` (THEORY section 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import as_float_array, is_numpy, namespace
from ._fp import lse as _lse_all
from ._fp import lse_diff as _lse_diff
from ._fp import lse_parts as _lse_parts
from ._validate import (
    InputError,
    check_eps,
    check_logits,
    check_number,
    first_bad_position,
    move_key_axis,
)

__all__ = [
    "Divergences",
    "kl_budget_to_tv",
    "kl_from_tail",
    "log_partition",
    "tail_mass",
    "topk_mask",
    "truncation_divergences",
    "tv_budget_to_kl",
    "tv_from_kl",
]

Array = Any


def _prepare(logits: Any, axis: int) -> tuple[Array, Any, Any]:
    x, xp, dev = as_float_array(logits, name="logits")
    x = move_key_axis(x, axis, xp)
    check_logits(x, xp)
    return xp.astype(x, xp.float64), xp, dev


def topk_mask(logits: Any, k: Any, *, axis: int = -1) -> Array:
    """Boolean mask of the ``k`` largest logits along ``axis``.

    Ties are broken by position (the earlier key is kept), masked keys (``-inf``) are
    never kept, so a row keeps ``min(k, n_valid)`` keys.  ``k`` is an integer or an
    integer array broadcastable to the batch shape.

    One sort of the values gives the ``k``-th largest value ``t``; every key above ``t``
    is kept, and of the keys equal to ``t`` the first ``k - #{x > t}`` by position.
    """
    x, xp, dev = as_float_array(logits, name="logits")
    moved = axis not in (-1, x.ndim - 1)
    if moved:
        x = xp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    k_arr = k if hasattr(k, "shape") else xp.asarray(k, device=dev)
    k_arr = xp.broadcast_to(xp.astype(k_arr, xp.int64), x.shape[:-1])
    k_cl = xp.clip(k_arr, 0, n)[..., None]
    if n == 0:
        kept = x > -xp.inf
    else:
        t = _kth_largest(x, xp.clip(k_cl, 1, n), xp)
        above = x > t
        tied = x == t
        need = k_cl - xp.sum(xp.astype(above, xp.int64), axis=-1, keepdims=True)
        first = xp.cumulative_sum(xp.astype(tied, xp.int64), axis=-1) <= need
        kept = (above | (tied & first)) & (k_cl > 0) & (x > -xp.inf)
    return xp.moveaxis(kept, -1, axis) if moved else kept


def _kth_largest(x: Array, k: Array, xp: Any) -> Array:
    """The ``k``-th largest value of each row (``k`` in ``[1, n]``, shape ``(..., 1)``).

    NumPy with one ``k`` for every row selects it (``np.partition``, linear time);
    otherwise one sort of the values."""
    n = x.shape[-1]
    if is_numpy(xp) and x.size and bool(xp.all(k == k.flat[0])):
        j = n - int(k.flat[0])
        return np.partition(np.asarray(x), j, axis=-1)[..., j : j + 1]
    top = xp.sort(x, axis=-1, descending=True, stable=False)  # values: order of ties moot
    return xp.take_along_axis(top, k - 1, axis=-1)


def _kept_from(x: Array, xp: Any, kept: Any, k: Any) -> Array:
    if (kept is None) == (k is None):
        raise InputError("give exactly one of `kept` (a boolean mask) or `k` (a count)")
    if k is not None:
        return topk_mask(x, k)
    kept = kept if hasattr(kept, "dtype") else np.asarray(kept)
    if tuple(kept.shape) != tuple(x.shape):
        raise InputError(
            f"kept mask has shape {tuple(kept.shape)} but logits have shape {tuple(x.shape)}"
        )
    if kept.dtype != xp.bool:
        raise InputError(f"kept must be a boolean mask, got dtype {kept.dtype}")
    return kept


def log_partition(logits: Any, kept: Any = None, *, axis: int = -1) -> Array:
    r""":math:`\mathrm{LSE}(s_A) = \log \sum_{i \in A} e^{s_i}` in float64.

    ``A`` is every key when ``kept`` is None, else the keys where ``kept`` is True
    (masked keys never count).  Empty sets give ``-inf``.
    """
    x, xp, _ = _prepare(logits, axis)
    if kept is not None:
        if axis not in (-1, x.ndim - 1):
            kept = xp.moveaxis(kept, axis, -1)
        kept = _kept_from(x, xp, kept, None)
        x = xp.where(kept, x, -math.inf)
    return _lse_all(x, xp)


def tail_mass(logits: Any, kept: Any = None, *, k: Any = None, axis: int = -1) -> Array:
    r"""Discarded softmax mass :math:`\tau = 1 - P(A)` of a kept set (Theorem TV-TAIL).

    .. math::

        \tau = \exp\big(\mathrm{LSE}(s_T) - \mathrm{LSE}(s)\big),
        \qquad T = \text{valid keys} \setminus A

    which equals :math:`\mathrm{TV}(P, P(\cdot\mid A))` (Lemma 4.1 of Tzachristas et al.,
    for any kept set).  Computed in float64 in log space: accurate to a few ulps relative
    even for tails far below 1e-16.  This is a *value*, not a certificate: for a sound
    upper bound use :func:`certattn.certify_topk`.

    Parameters
    ----------
    logits : array
        Logits, ``-inf`` for masked keys.  Rows must have at least one finite entry.
    kept : boolean array, optional
        Kept set, same shape as ``logits``.
    k : int or integer array, optional
        Keep the top ``k`` keys (ties by position) instead of an explicit mask.
    axis : int
        Key axis.
    """
    x, xp, _ = _prepare(logits, axis)
    if kept is not None and axis not in (-1, x.ndim - 1):
        kept = xp.moveaxis(kept, axis, -1)
    kept = _kept_from(x, xp, kept, k)
    return xp.exp(_lse_diff(xp.where(kept, -math.inf, x), x, xp))


def kl_from_tail(tau: Any) -> Array:
    r""":math:`\mathrm{KL}(\hat P \Vert P) = -\log(1 - \tau)` (Theorem TV-KL).

    Computed as ``-log1p(-tau)``, accurate for tiny tails; ``inf`` at ``tau = 1``.

    Raises
    ------
    ValueError
        ``tau`` outside [0, 1] or NaN (a tail mass is a probability).
    """
    xp, _ = namespace(tau)
    t = xp.asarray(tau)
    _check_range(t, xp, "tau", 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return -xp.log1p(-t)


def tv_from_kl(kl: Any) -> Array:
    r""":math:`\mathrm{TV} = 1 - e^{-\mathrm{KL}}` (Theorem TV-KL), as ``-expm1(-kl)``.

    Raises
    ------
    ValueError
        ``kl`` negative or NaN (``+inf`` gives 1).
    """
    xp, _ = namespace(kl)
    k = xp.asarray(kl)
    _check_range(k, xp, "kl", 0.0, math.inf)
    return -xp.expm1(-k)


def _check_range(a: Array, xp: Any, name: str, low: float, high: float) -> None:
    """Reject NaN and values outside [low, high], naming the first offender."""
    bad = xp.isnan(a) | (a < low) | (a > high)
    if bool(xp.any(bad)):
        pos = first_bad_position(bad) if bad.ndim else ()
        where = f" at index {pos}" if pos else ""
        raise InputError(f"{name} must lie in [{low:g}, {high:g}]{where}")


def tv_budget_to_kl(eps: float) -> float:
    r"""The KL budget equivalent to a TV budget: :math:`-\log(1-\varepsilon)` (BUDGET-EQUIV)."""
    return float(-np.log1p(-check_eps(eps)))


def kl_budget_to_tv(kl: float) -> float:
    r"""The TV budget equivalent to a KL budget: :math:`1 - e^{-\mathrm{KL}}` (BUDGET-EQUIV)."""
    v = check_number(kl, name="kl", low=0.0, high=math.inf, closed_low=True, closed_high=True)
    return float(-np.expm1(-v))


@dataclass(frozen=True)
class Divergences:
    r"""Divergences between :math:`P` and its renormalised truncation :math:`\hat P`.

    All are functions of the tail mass :math:`\tau` alone (THEORY section 2):
    ``tv`` = :math:`\tau`; ``kl`` = :math:`\mathrm{KL}(\hat P\Vert P) = -\log(1-\tau)`;
    ``kl_reverse`` = :math:`\mathrm{KL}(P\Vert\hat P)` (``+inf`` where :math:`\tau>0`);
    ``chi2`` = :math:`\chi^2(\hat P\Vert P) = \tau/(1-\tau)`;
    ``hellinger2`` = :math:`1-\sqrt{1-\tau}` (squared Hellinger, :math:`1 - \sum\sqrt{p\hat p}`).
    """

    tv: Array
    kl: Array
    kl_reverse: Array
    chi2: Array
    hellinger2: Array

    def renyi(self, alpha: float) -> Array:
        r""":math:`D_\alpha(\hat P \Vert P) = -\log(1-\tau)` for every order :math:`\alpha > 0`.

        Since :math:`\hat p_i / p_i = 1/(1-\tau)` is constant on the support of
        :math:`\hat P`, every Renyi divergence equals the KL (DIV-COROLLARIES).
        """
        if not (alpha > 0):
            raise InputError(f"Renyi order alpha must be > 0, got {alpha}")
        return self.kl


def truncation_divergences(
    logits: Any, kept: Any = None, *, k: Any = None, axis: int = -1
) -> Divergences:
    """TV, both KLs, chi-square and squared Hellinger of a truncation (TV-KL, DIV-COROLLARIES).

    Computed from the float64 log-space tail mass :func:`tail_mass`; ``kl`` uses
    :math:`\\mathrm{LSE}(s) - \\mathrm{LSE}(s_A)` directly, which stays accurate when the
    tail is tiny and when it is close to 1.
    """
    x, xp, _ = _prepare(logits, axis)
    if kept is not None and axis not in (-1, x.ndim - 1):
        kept = xp.moveaxis(kept, axis, -1)
    kept = _kept_from(x, xp, kept, k)
    head = xp.where(kept, x, -math.inf)
    empty = xp.max(head, axis=-1) == -xp.inf
    if bool(xp.any(empty)):
        where = f" in row {first_bad_position(empty)}" if empty.ndim else ""
        raise InputError(f"kept set holds no valid key{where}")
    m_all, l_all = _lse_parts(x, xp)  # LSE(s), shared by tau and the KL
    m_tail, l_tail = _lse_parts(xp.where(kept, -math.inf, x), xp)
    m_head, l_head = _lse_parts(head, xp)
    tau = xp.exp((m_tail - m_all) + (l_tail - l_all))
    # KL = -log(1 - tau): from tau where the tail is small (no cancellation), from the
    # LSE difference LSE(all) - LSE(head) where it is large (1 - tau would cancel).
    with np.errstate(divide="ignore", over="ignore"):
        kl = xp.where(tau < 0.5, -xp.log1p(-tau), (m_all - m_head) + (l_all - l_head))
        kl = xp.where(kl > 0, kl, xp.zeros_like(kl))
        chi2 = xp.expm1(kl)  # 1/(1-tau) - 1 = tau/(1-tau)
    kl_rev = xp.where(tau > 0, xp.full_like(tau, xp.inf), xp.zeros_like(tau))
    hell2 = -xp.expm1(-0.5 * kl)  # 1 - sqrt(1 - tau)
    return Divergences(tv=tau, kl=kl, kl_reverse=kl_rev, chi2=chi2, hellinger2=hell2)
