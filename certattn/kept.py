r"""One certificate for any kept set (Theorems TV-TAIL and TV-KL, any-set form).

For logits :math:`s` (``-inf`` = masked key), :math:`P = \mathrm{softmax}(s)` and ANY kept
set :math:`A` of keys, the renormalised truncation :math:`\hat P = P(\cdot\mid A)` satisfies

.. math::

    \mathrm{TV}(P, \hat P) = 1 - P(A) = \tau(A), \qquad
    \mathrm{KL}(\hat P \Vert P) = -\log(1 - \tau(A))

(Lemma 4.1 and Thm 4.3 of Tzachristas et al.; the any-set form is derived, THEORY
section 2).  This is what makes every selection policy certifiable: Top-k, top-p, a
sliding window with sinks, Quest pages, certified search.  :func:`certify_kept` turns a
kept set into a sound certificate: ``tail_upper`` is never below the exact
:math:`\tau(A)` of the exact softmax of the given logits.

Rounding (the error model of :mod:`certattn._fp`): logits are shifted by their row
maximum (exact up to :math:`|s_i - m| u`), :math:`\mathrm{LSE}(T) - \mathrm{LSE}(\text{all})`
is formed from two shifted log-sum-exps and widened by the log-space margin
:math:`\sigma = u(4(|a| + |b|) + 4n + 2^{14})`, then :math:`e^{L+\sigma}` is rounded up
(:func:`certattn._fp.round_up`).  A NaN anywhere gives the trivial bound 1.

Selection policies live in :mod:`certattn.policies`; :func:`certattn.certify_attention`
runs any of them query chunk by query chunk and attaches output-error bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backends import adapter
from ._fp import lse, margin, round_up
from ._validate import InputError, check_kept, first_bad_position, valid_rows

__all__ = ["KeptCertificate", "certify_kept", "kl_upper_from_tail", "tail_upper_of"]

Array = Any


@dataclass(frozen=True)
class KeptCertificate:
    r"""Certificate of one kept set per row (Theorems TV-TAIL, TV-KL).

    Attributes
    ----------
    kept : bool array, the logits' shape
        The kept set (masked keys removed from it).
    tail_upper : float64 array, batch shape
        Sound upper bound on the exact discarded mass :math:`\tau(A) = 1 - P(A)`,
        which is :math:`\mathrm{TV}(P, \hat P)`.
    kl_upper : float64 array, batch shape
        Sound upper bound on :math:`\mathrm{KL}(\hat P\Vert P) = -\log(1-\tau)` (``inf``
        where the kept set holds no valid key).
    n_kept : int64 array, batch shape
        Valid keys kept.
    n_valid : int64 array, batch shape
        Valid (unmasked) keys.
    axis : int
        The key axis, as given.
    """

    kept: Array
    tail_upper: Array
    kl_upper: Array
    n_kept: Array
    n_valid: Array
    axis: int = -1

    def kept_mask(self) -> Array:
        """The kept set (the same protocol as every certificate)."""
        return self.kept


def shift_rows(x: Array, xp: Any) -> Array:
    r"""Logits minus their row maximum (softmax-invariant; keeps log-sums near 0, so the
    rounding of every derived quantity is relative to the differences that matter).

    A valid key whose difference overflows (below ``-float max``: its exact weight is
    below :math:`e^{-1.7 \cdot 10^{308}}`) gets ``-float max``, not ``-inf``: it stays a
    valid key of positive exact mass, so a tail holding it keeps a positive bound.
    """
    m = xp.max(x, axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        d = x - xp.where(m > -xp.inf, m, xp.zeros_like(m))
    lowest = float(xp.finfo(d.dtype).min)
    return xp.where((d == -xp.inf) & (x > -xp.inf), xp.full_like(d, lowest), d)


def tail_upper_of(x: Array, valid: Array, kept: Array, xp: Any) -> Array:
    r"""Sound upper bound on the exact tail mass of ``kept`` (last axis, float64 ``x``).

    ``x`` must be shifted by the row maximum (:func:`shift_rows`) or at least have
    finite row maxima; rows whose kept set holds no valid key get 1.
    """
    tail = valid & ~kept
    lse_all = lse(x, xp, valid)  # the same LSEs as masked_weights, without the weights
    lse_tail = lse(x, xp, tail)
    m = xp.max(xp.where(valid, x, xp.full_like(x, -xp.inf)), axis=-1)
    m = xp.where(m > -xp.inf, m, xp.zeros_like(m))
    n = x.shape[-1]
    a = xp.where(lse_tail > -xp.inf, lse_tail - m, xp.zeros_like(m))
    sigma = margin(a, lse_all - m, n, xp)
    up = round_up(lse_tail - lse_all, sigma, xp.any(tail, axis=-1), xp)
    nothing_kept = ~xp.any(valid & kept, axis=-1)
    return xp.where(nothing_kept, xp.ones_like(up), up)


def kl_upper_from_tail(tail_upper: Array, xp: Any) -> Array:
    r"""``-log1p(-tail_upper)`` rounded up: a sound bound on :math:`\mathrm{KL}(\hat P\Vert P)`
    (Theorem TV-KL; ``inf`` at ``tail_upper = 1``)."""
    with np.errstate(divide="ignore"):
        kl = -xp.log1p(-tail_upper)
    return xp.where(tail_upper > 0, xp.nextafter(kl, xp.full_like(kl, math.inf)), kl)


def certify_kept(logits: Any, kept: Any, *, axis: int = -1) -> KeptCertificate:
    r"""Certify any kept set: a sound upper bound on its discarded softmax mass.

    Theorem TV-TAIL (Lemma 4.1 of Tzachristas et al., any kept set [derived]):
    :math:`\mathrm{TV}(P, P(\cdot\mid A)) = 1 - P(A)`; Theorem TV-KL (Thm 4.3):
    :math:`\mathrm{KL}(P(\cdot\mid A)\Vert P) = -\log(1 - \tau)`.

    Parameters
    ----------
    logits : array (..., n, ...)
        Any real floating dtype and array library; ``-inf`` marks masked keys.
    kept : bool array
        The kept set, broadcastable to the logits' shape.  Masked keys in it are ignored.
        An empty kept set certifies the trivial tail 1.
    axis : int
        The key axis.

    Returns
    -------
    KeptCertificate
        In the logits' namespace and on their device.

    Raises
    ------
    ValueError
        NaN or ``+inf`` logits, a fully masked row, a non-boolean or mis-shaped ``kept``.
        On dask arrays (certified lazily, :func:`certattn._dask.certify_kept_dask`) the
        logits' errors surface at compute time.

    Examples
    --------
    >>> import numpy as np, certattn
    >>> s = np.array([3.0, 2.0, 0.0, -np.inf])
    >>> cert = certattn.certify_kept(s, np.array([True, True, False, False]))
    >>> bool(cert.tail_upper >= 1 / (1 + np.exp(3) + np.exp(2)))
    True
    """
    lazy = adapter("certify_kept", logits, kept)  # dask: lazily, block by block
    if lazy is not None:
        return lazy(logits, kept, axis=axis)
    x, n_valid, xp, dev = valid_rows(logits, axis)
    shape = tuple(int(s) for s in x.shape)
    kept_in = check_kept(kept, shape if axis in (-1, len(shape) - 1) else _axis_shape(shape, axis),
                         xp, dev)
    if axis not in (-1, len(shape) - 1):
        kept_in = xp.moveaxis(kept_in, axis, -1)
    xs = shift_rows(x, xp)
    valid = xs > -xp.inf
    kept_b = kept_in & valid
    tail = tail_upper_of(xs, valid, kept_b, xp)
    n_kept = xp.sum(xp.astype(kept_b, xp.int64), axis=-1)
    kept_out = xp.moveaxis(kept_b, -1, axis) if axis not in (-1, len(shape) - 1) else kept_b
    return KeptCertificate(
        kept=kept_out,
        tail_upper=tail,
        kl_upper=kl_upper_from_tail(tail, xp),
        n_kept=n_kept,
        n_valid=n_valid,
        axis=axis,
    )


def _axis_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """The original shape of logits whose key axis ``axis`` was moved last."""
    out = list(shape[:-1])
    out.insert(axis if axis >= 0 else len(shape) + axis, shape[-1])
    return tuple(out)


def require_nonempty(kept: Array, valid: Array, xp: Any, what: str = "kept set") -> None:
    """Raise if some row keeps no valid key (an output over it is undefined)."""
    empty = ~xp.any(kept & valid, axis=-1)
    if bool(xp.any(empty)):
        pos = first_bad_position(empty) if empty.ndim else ()
        raise InputError(f"{what} holds no valid key in row {pos}")
