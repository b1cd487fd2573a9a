r"""Blockwise tail bounds from per-block score bounds (THEORY section 3, eq. 4.4).

Keys are grouped into blocks :math:`B_b` of :math:`n_b` keys whose scores satisfy
:math:`l_b \le s_i \le u_b`; the kept set is a union of blocks :math:`S`.

**BLOCK-BOUNDS** [paper names it, eq. 4.4; form derived]:

.. math::
    \frac{\sum_{b\notin S} n_b e^{l_b}}{\sum_{b\in S} n_b e^{u_b} + \sum_{b\notin S} n_b e^{l_b}}
    \;\le\; \tau \;\le\;
    \frac{\sum_{b\notin S} n_b e^{u_b}}{\sum_{b\in S} n_b e^{l_b} + \sum_{b\notin S} n_b e^{u_b}},

because :math:`\tau = T/(H + T)` increases in the tail sum :math:`T` and decreases in the
head sum :math:`H`.  Both are attained by block-constant logits (:math:`s_i = u_b` on the
tail and :math:`l_b` on the head, or the mirror), so neither can be improved from
(l, u, n) alone.

**Choosing blocks.**  The upper bound is at most :math:`\varepsilon` iff

.. math:: \sum_{b \in S} v_b \ge (1-\varepsilon) \sum_b n_b e^{u_b},\qquad
          v_b = n_b\big(\varepsilon e^{l_b} + (1-\varepsilon) e^{u_b}\big),

a covering knapsack.  :func:`greedy_block_set` sorts blocks by :math:`v_b / c_b` and keeps
the shortest certifying prefix (every prefix is evaluated: :math:`O(n_{blocks}^2)`).
With ``cost="blocks"`` (:math:`c_b = 1`) the prefix of the largest :math:`v_b` is an
*exact* minimiser of the number of kept blocks (any j blocks have value at most the j
largest).  With ``cost="keys"`` (:math:`c_b = n_b`) the greedy
prefix keeps at most ``OPT + max_b n_b`` keys (its cost exceeds the fractional-knapsack
optimum, a lower bound on OPT, by less than the last block's size); with equal block
sizes both costs coincide and greedy is exact.

Floating point: as in :mod:`certattn.bounds`, values are shifted by the row maximum of
:math:`\log n_b + u_b`, evaluated in log space and rounded outward by
:math:`\sigma = u(8(|\mathrm{LSE}_1| + |\mathrm{LSE}_2|) + 4 n_{blocks} + 2^{14})` in log space
(upper bounds up, lower bounds down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import as_float_array, asarray_on, device_of, namespace
from ._fp import NORMAL_MIN, lse, margin, neg_inf, ratio_log, round_down, round_up, score_margin
from ._results import Unpackable
from ._validate import InputError, check_eps, first_bad_position

__all__ = [
    "BlockScoreBounds",
    "BlockSelection",
    "BlockTailBounds",
    "block_tail_bounds",
    "greedy_block_set",
    "key_block_bounds",
    "smallest_block_count",
]

Array = Any


@dataclass(frozen=True)
class BlockSelection:
    """A kept block set chosen by :func:`greedy_block_set`.

    Attributes
    ----------
    kept : bool array (..., n_blocks)
    tail_upper, tail_lower : float64 arrays, batch shape
        BLOCK-BOUNDS of the kept set (``tail_upper <= eps``).
    n_blocks, n_keys : int64 arrays, batch shape
        Kept blocks and the keys they hold.
    """

    kept: Array
    tail_upper: Array
    tail_lower: Array
    n_blocks: Array
    n_keys: Array


@dataclass(frozen=True)
class BlockTailBounds(Unpackable):
    """Theorem BLOCK-BOUNDS for one kept block set: ``lower <= tau <= upper`` (sound).

    Unpacks as ``lower, upper = block_tail_bounds(...)``.
    """

    lower: Array
    upper: Array


@dataclass(frozen=True)
class BlockScoreBounds(Unpackable):
    """Per-block score bounds ``lower <= s_i <= upper`` and block sizes (BLOCK-SCORE).

    Unpacks as ``lower, upper, sizes = key_block_bounds(...)``.
    """

    lower: Array
    upper: Array
    sizes: Array


def _block_inputs(lower: Any, upper: Any, sizes: Any, axis: int) -> tuple[Array, ...]:
    """Validated float64 ``(a, b, n, valid, xp)``: ``a = (u - M) + log n``, likewise ``b``."""
    lo, xp, dev = as_float_array(lower, name="lower")
    up, _, _ = as_float_array(asarray_on(upper, xp=xp, device=dev), name="upper")
    n = asarray_on(sizes, xp=xp, device=dev)
    lo, up = xp.astype(lo, xp.float64), xp.astype(up, xp.float64)
    n = xp.astype(n, xp.float64)
    lo, up, n = xp.broadcast_arrays(lo, up, n)
    if lo.ndim == 0:
        raise InputError("block bounds need a block axis")
    if axis not in (-1, lo.ndim - 1):
        lo, up, n = (xp.moveaxis(a, axis, -1) for a in (lo, up, n))
    for name, a in (("lower", lo), ("upper", up), ("sizes", n)):
        bad = xp.isnan(a) | (a == xp.inf)
        if bool(xp.any(bad)):
            raise InputError(f"{name} contain NaN or +inf at {first_bad_position(bad)}")
    if bool(xp.any(n < 0)) or bool(xp.any(n != xp.round(n))):
        raise InputError("sizes must be non-negative integers")
    valid = (n > 0) & (up > -xp.inf)
    if bool(xp.any(valid & (lo > up))):
        raise InputError(f"lower > upper at block {first_bad_position(valid & (lo > up))}")
    if bool(xp.any(~xp.any(valid, axis=-1))):
        raise InputError("a row has no non-empty block with a finite upper bound")
    logn = xp.log(xp.where(valid, n, xp.ones_like(n)))
    # Shift by the largest upper bound *before* adding log n: log n + u would lose log n
    # entirely next to a huge |u| (log 4 - 1e300 == -1e300), beyond any margin taken on
    # the shifted values.  A difference that overflows to -inf is a term below e^-1e308.
    m = xp.max(xp.where(valid, up, neg_inf(xp, up)), axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        a = xp.where(valid, (up - m) + logn, neg_inf(xp, up))
        b = xp.where(valid, (lo - m) + logn, neg_inf(xp, lo))
    return a, b, n, valid, xp


def _bounds_of_set(
    a: Array, b: Array, valid: Array, kept: Array, xp: Any, *, lower: bool = True
) -> tuple[Array | None, Array]:
    """``(lo, hi)`` of one kept set per row (``lo`` None unless ``lower``)."""
    nb = int(a.shape[-1])
    tail = valid & ~kept
    head = valid & kept
    positive = xp.any(tail, axis=-1)
    t_up, h_lo = lse(a, xp, tail), lse(b, xp, head)
    # log-sums of bounds (log n_b + u_b, each rounded once already): factor 8
    hi = round_up(ratio_log(t_up, h_lo, xp), margin(t_up, h_lo, nb, xp, factor=8.0), positive, xp)
    if not lower:
        return None, hi
    t_lo, h_up = lse(b, xp, tail), lse(a, xp, head)
    lo = round_down(ratio_log(t_lo, h_up, xp), margin(t_lo, h_up, nb, xp, factor=8.0), xp)
    return lo, hi


def block_tail_bounds(
    lower: Any, upper: Any, sizes: Any, kept: Any, *, axis: int = -1
) -> BlockTailBounds:
    r"""Theorem BLOCK-BOUNDS (eq. 4.4 of Tzachristas et al.; form derived): ``(lo, hi)``.

    Parameters
    ----------
    lower, upper : array (..., n_blocks)
        Per-block score bounds :math:`l_b \le s_i \le u_b` (``upper = -inf`` marks a block
        whose keys are all masked).
    sizes : array (..., n_blocks)
        Keys per block :math:`n_b` (zero-size blocks are ignored).
    kept : bool array (..., n_blocks)
        The kept block set :math:`S`.
    axis : int
        Block axis.

    Returns
    -------
    BlockTailBounds
        ``lower``, ``upper`` (float64, batch shape): sound bounds on the exact discarded
        mass of every logit row compatible with the block bounds, ``lower`` rounded down,
        ``upper`` rounded up.
    """
    a, b, _, valid, xp = _block_inputs(lower, upper, sizes, axis)
    kept = asarray_on(kept, xp=xp, device=device_of(a))
    if kept.dtype != xp.bool:
        raise InputError(f"kept must be a boolean mask, got dtype {kept.dtype}")
    kept = xp.broadcast_to(
        kept if axis in (-1, kept.ndim - 1) else xp.moveaxis(kept, axis, -1), a.shape
    )
    return BlockTailBounds(*_bounds_of_set(a, b, valid, kept, xp))


def greedy_block_set(
    lower: Any, upper: Any, sizes: Any, eps: float, *, cost: str = "keys", axis: int = -1
) -> BlockSelection:
    r"""Greedy certified block set: the shortest prefix by :math:`v_b / c_b` certifying eps.

    The kept set's BLOCK-BOUNDS upper bound is at most ``eps``.

    ``cost="blocks"``: exact minimum number of blocks; ``cost="keys"``: at most
    ``OPT + max n_b`` keys (module docstring).  Minimal up to the rounding margin.
    """
    eps = check_eps(eps)
    if cost not in ("keys", "blocks"):
        raise InputError(f"cost must be 'keys' or 'blocks', got {cost!r}")
    a, b, n, valid, xp = _block_inputs(lower, upper, sizes, axis)
    dev = device_of(a)
    nb = int(a.shape[-1])
    if eps > 0:
        logv = xp.logaddexp(math.log(eps) + b, math.log1p(-eps) + a)
    else:
        logv = a
    if cost == "keys":
        logv = logv - xp.log(xp.where(valid, n, xp.ones_like(n)))
    logv = xp.where(valid, logv, neg_inf(xp, logv))
    order = xp.argsort(logv, axis=-1, descending=True, stable=True)
    rank = xp.argsort(order, axis=-1, stable=True)
    # every prefix j = 1..nb at once, (..., j, block): O(nb^2), evaluated exactly as
    # block_tail_bounds evaluates one set, so the choice is minimal for that bound
    j = xp.arange(1, nb + 1, dtype=xp.int64, device=dev)
    prefixes = (rank[..., None, :] < j[:, None]) & valid[..., None, :]
    ex = (a[..., None, :], b[..., None, :], valid[..., None, :])
    ex = tuple(xp.broadcast_to(z, prefixes.shape) for z in ex)
    _, ub = _bounds_of_set(*ex, prefixes, xp, lower=False)  # only the upper bound decides
    first = xp.min(xp.where(ub <= eps, j, xp.full_like(j, nb)), axis=-1)
    kept = (rank < first[..., None]) & valid
    lo, hi = _bounds_of_set(a, b, valid, kept, xp)
    n_keys = xp.sum(
        xp.where(kept, xp.astype(n, xp.int64), xp.zeros_like(first)[..., None]), axis=-1
    )
    n_blocks = xp.sum(xp.astype(kept, xp.int64), axis=-1)
    if axis not in (-1, kept.ndim - 1):
        kept = xp.moveaxis(kept, -1, axis)
    return BlockSelection(kept=kept, tail_upper=hi, tail_lower=lo, n_blocks=n_blocks, n_keys=n_keys)


def smallest_block_count(
    lower: Any, upper: Any, sizes: Any, eps: float, *, axis: int = -1
) -> Array:
    """Smallest number of blocks whose BLOCK-BOUNDS upper bound is ``<= eps`` (exact, per row)."""
    return greedy_block_set(lower, upper, sizes, eps, cost="blocks", axis=axis).n_blocks


def key_block_bounds(
    q: Any, keys: Any, block_size: int, *, scale: float | None = None, kind: str = "box"
) -> BlockScoreBounds:
    r"""Per-block ``(lower, upper, sizes)`` for contiguous blocks of ``block_size`` keys.

    Thin convenience over :mod:`certattn.cells` (Theorem BLOCK-SCORE): ``kind="box"``
    uses the per-channel min/max of each block (as in Quest), ``"ball"`` the block mean
    and a sound radius, ``"both"`` the tighter of the two.  The last block may be short.

    Parameters
    ----------
    q : array (..., m, d)
    keys : array (n, d)
    block_size : int
    scale : float, optional
        Logit scale, default ``1/sqrt(d)``.

    Returns
    -------
    BlockScoreBounds
        ``lower``, ``upper``: float64 arrays (..., m, n_blocks); ``sizes``: int64 array
        (n_blocks,).
    """
    from .cells import (
        ball_score_lower,
        ball_score_upper,
        box_score_lower,
        box_score_upper,
    )

    xp, dev = namespace(q, keys)
    if keys.ndim != 2:
        raise InputError(f"keys must be (n, d), got shape {tuple(keys.shape)}")
    n, d = (int(s) for s in keys.shape)
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise InputError(f"block_size must be a positive integer, got {block_size!r}")
    if kind not in ("box", "ball", "both"):
        raise InputError(f"kind must be 'box', 'ball' or 'both', got {kind!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bs = int(block_size)
    nb = -(-n // bs)
    kf = xp.astype(keys, xp.float64)
    pad = nb * bs - n
    if pad:  # repeat the last key: min, max and radius of the last block are unchanged
        kf = xp.concat([kf, xp.broadcast_to(kf[-1:, :], (pad, d))], axis=0)
    kb = xp.reshape(kf, (nb, bs, d))
    sizes = xp.asarray([min(bs, n - i * bs) for i in range(nb)], dtype=xp.int64, device=dev)
    out = []
    if kind in ("box", "both"):
        kmin, kmax = xp.min(kb, axis=1), xp.max(kb, axis=1)
        out.append(
            (
                box_score_lower(q, kmin, kmax, scale=scale),
                box_score_upper(q, kmin, kmax, scale=scale),
            )
        )
    if kind in ("ball", "both"):
        c = xp.mean(kb, axis=1)
        r = xp.max(xp.linalg.vector_norm(kb - c[:, None, :], axis=-1), axis=1)
        # |k - c| errs by at most (d + 4) u (|k| + |c|): enlarge r by twice that
        size = xp.max(xp.linalg.vector_norm(kb, axis=-1), axis=1) + xp.linalg.vector_norm(
            c, axis=-1
        )
        r = r * (1.0 + score_margin(d)) + score_margin(d) * size + NORMAL_MIN
        out.append((ball_score_lower(q, c, r, scale=scale), ball_score_upper(q, c, r, scale=scale)))
    lo = out[0][0] if len(out) == 1 else xp.maximum(out[0][0], out[1][0])
    up = out[0][1] if len(out) == 1 else xp.minimum(out[0][1], out[1][1])
    return BlockScoreBounds(lo, up, sizes)
