r"""Tail bounds from ordered logits alone (THEORY section 3).

For a row of logits sorted descending, :math:`s_1 \ge \dots \ge s_n` (``n`` = number of
valid keys; ``-inf`` marks a masked key and never counts), the Top-k set
:math:`H = \{1..k\}` discards :math:`\tau_k = \sum_{i>k} p_i`.  Every bound here is an
upper bound on :math:`\tau_k` of the form :math:`X / (D + X)`, with :math:`X \ge` the
tail sum and :math:`D \le` the head sum (in units of :math:`e^{s_1}`):

* **GAP-SINGLE** (Thm 4.5 of Tzachristas et al.): :math:`X = (n-k)e^{s_{k+1}}`,
  :math:`D = k e^{s_k}`, i.e. :math:`\tau_k \le 1/(1 + \tfrac{k}{n-k} e^{\Delta_k})`,
  :math:`\Delta_k = s_k - s_{k+1}`; equality iff the logits take two levels; certifies
  :math:`\tau_k \le \varepsilon` iff
  :math:`\Delta_k \ge \ln\tfrac{n-k}{k} + \ln\tfrac{1-\varepsilon}{\varepsilon}`.
* **GAP-EXACT-HEAD** [derived]: the same :math:`X`, :math:`D = \sum_{i \le k} e^{s_i}` (the
  exact head sum, when the head is scored anyway).  Never looser than GAP-SINGLE.
* **GAP-MULTI** [paper names it; form derived]: cut points :math:`k = j_0 < \dots < j_m < n`,
  :math:`X = \sum_r (j_{r+1} - j_r)\, e^{s_{j_r+1}}` (:math:`j_{m+1} = n`), :math:`D = k e^{s_k}`.
  ``n_cuts = m = 0`` is GAP-SINGLE; cutting everywhere (the *all-gap* form) makes
  :math:`X` the exact tail sum.  For a given number of cuts the library chooses the cut
  points by **dynamic programming** (the exact minimiser of :math:`X`, hence of the
  bound): for all k at once in :math:`O(m n^2)` time per row.
* **GAP-UNIFORM** [derived corollary]: if every gap past k is at least :math:`\delta`
  (:math:`s_i - s_{i+1} \ge \delta` for :math:`k \le i < n`), then
  :math:`\tau_k \le 1/(1 + k(e^\delta - 1))`, independent of n.  The library takes
  :math:`\delta_k = \min_{k \le i < n} (s_i - s_{i+1})`.

Every function accepts unsorted logits of any array-API namespace, any batch shape, and
``k`` as an int or an integer array of the batch shape.  ``k >= n_valid`` gives 0 (the
tail is empty).  :func:`certified_k` returns, per row, the smallest k whose bound is at
most eps (the bounds need not be monotone in k, so every k is evaluated).

Soundness (THEORY section 7)
----------------------------
Each bound is a claim about the exact real-number softmax of the given logits.  It is
evaluated in float64, in log space, as :math:`L = \log X - \log(D + X)` with logits shifted
by the row maximum (:math:`d_i = s_i - s_1`), and reported as
:math:`\min(1, e^{L + \sigma}(1 + 4u) + 2^{-1073})`, :math:`u = 2^{-53}` (the last term
covers an ``exp`` that lands among the subnormals), with the log-space margin

.. math:: \sigma_k = u\,\big(4(|d_k| + |d_{k+1}|) + 4 n + 2^{14}\big)

(:math:`|d_{k+1}|` replaced by 700 in the all-gap and checkpoint forms, whose tail terms are
all rounded up at -700), which covers the rounding of the differences (at most :math:`u|d|`
each; terms of the cumulative head sums lie in :math:`[d_k, 0]`), of
``exp``/``log``/``logaddexp`` (a few ulps of arguments below about 800 in magnitude), and of
the :math:`n`-term sums (relative :math:`1.01 n u`), with a factor of about two to spare.
For ordinary rows :math:`\sigma \approx 2\cdot 10^{-12}`. Tail terms more than 700 nats
below the row maximum are rounded *up* to :math:`e^{-700}` before summation (so underflow
can never shrink a tail); head terms that underflow only shrink the head (conservative).
This makes the all-gap and checkpoint forms loose (never unsound) on rows spanning more than
700 nats. A non-empty tail never reports 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ._array import asarray_on, device_of, is_numpy
from ._fp import (
    CLIP,
    log_cumsum,
    margin,
    neg_inf,
    ratio_log,
    round_up,
)
from ._validate import InputError, check_eps, valid_rows
from .kept import shift_rows

__all__ = [
    "TAIL_BOUNDS",
    "bound_k",
    "gap_bound",
    "gap_exact_head_bound",
    "gap_threshold",
    "multigap_bound",
    "tail_bound",
    "uniform_gap_bound",
]

Array = Any

_CHUNK_ELEMS = 1 << 22  # float64 temporaries per chunk of the dynamic programme

TAIL_BOUNDS = ("gap", "exact_head", "all_gap", "optimal_cuts", "uniform_gap")
"""Names accepted by :func:`tail_bound` and :func:`bound_k`."""

_RENAMED = {"BOUNDS": "TAIL_BOUNDS", "certified_k": "bound_k",
            "exact_head_bound": "gap_exact_head_bound"}


def __getattr__(name: str) -> Any:
    """Deprecated names (0.1): ``BOUNDS``, ``certified_k``, ``exact_head_bound``."""
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"certattn.{name} is deprecated; use {new}", DeprecationWarning,
                      stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bound_name(bound: str) -> str:
    if bound == "checkpoint":
        warnings.warn("bound='checkpoint' is deprecated; use bound='optimal_cuts'",
                      DeprecationWarning, stacklevel=4)
        return "optimal_cuts"
    return bound


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _shift_left(x: Array, xp: Any, fill: float) -> Array:
    """``y[..., i] = x[..., i + 1]``, last entry ``fill``."""
    pad = xp.full((*x.shape[:-1], 1), fill, dtype=x.dtype, device=device_of(x))
    return xp.concat([x[..., 1:], pad], axis=-1)


# --------------------------------------------------------------------------
# The bounds as curves over k = 1..n (column j <-> k = j + 1)
# --------------------------------------------------------------------------


def _sorted_parts(x: Array, n_valid: Array, xp: Any, k: Array | None = None) -> dict[str, Any]:
    """The sorted row and the per-column quantities of every bound.

    ``k`` None: every column (k = 1..n, column j <-> k = j + 1, for :func:`bound_k`).
    ``k`` (int64, batch shape): only column ``k - 1`` (shape ``(..., 1)``), for
    :func:`tail_bound`; the row-wide steps (sort, shift, cumulative sums) run once and
    the rest elementwise on the gathered columns, so the values are those of the full
    curve at ``k``.  ``at`` / ``at_next`` take a full-row array to the columns ``k - 1``
    / ``k`` (``fill`` past the last key).
    """
    # values only: an unstable sort gives the same array (NumPy's is ~10x faster)
    s = xp.sort(x, axis=-1, descending=True, stable=False)
    n = s.shape[-1]
    dev = device_of(s)
    k_row = xp.arange(1, n + 1, dtype=xp.float64, device=dev)
    nv = xp.astype(n_valid, xp.float64)[..., None]
    valid_row = k_row <= nv  # position k (1-based) holds a valid key
    d_row = shift_rows(s, xp)  # s - s_1; a difference past -float max stays finite (valid)
    d_row = xp.where(valid_row, d_row, neg_inf(xp, d_row))
    s0_row = xp.where(valid_row, s, xp.zeros_like(s))  # masked entries as 0 (no inf - inf)
    if k is None:
        kf = k_row

        def at(a: Array) -> Array:
            return a

        def at_next(a: Array, fill: float) -> Array:
            return _shift_left(a, xp, fill)
    else:
        j = xp.astype(k, xp.int64)[..., None] - 1
        jn = xp.minimum(j + 1, n - 1)
        past = j + 1 >= n
        kf = xp.astype(j + 1, xp.float64)

        def at(a: Array) -> Array:
            return xp.take_along_axis(a, j, axis=-1)

        def at_next(a: Array, fill: float) -> Array:
            nxt = xp.take_along_axis(a, jn, axis=-1)
            return xp.where(past, xp.full_like(nxt, fill), nxt)

    valid = kf <= nv
    d = at(d_row)
    d_next = at_next(d_row, -math.inf)
    m = nv - kf  # tail size of the top-k set
    has_tail = m > 0
    return {
        "s": at(s),
        "s0_next": at_next(s0_row, 0.0),
        "d": d,
        "d_next": d_next,
        "k": kf,
        "m": m,
        "valid": valid,
        "has_tail": has_tail,
        "margin": margin(d, xp.where(has_tail, d_next, xp.zeros_like(d)), nv, xp),
        # forms whose tail terms are all rounded up at -700 only need |d_{k+1}| <= 700
        "margin_clipped": margin(d, xp.zeros_like(d) + 700.0, nv, xp),
        "at": at,
        "at_next": at_next,
        "d_row": d_row,
        "valid_row": valid_row,
        "s0_row": s0_row,
        "nv": nv,
    }


def _log_k(p: dict[str, Array], xp: Any) -> Array:
    return xp.log(p["k"])


def _log_m(p: dict[str, Array], xp: Any) -> Array:
    return xp.log(xp.where(p["has_tail"], p["m"], xp.ones_like(p["m"])))


def _gap_pair(p: dict[str, Array], xp: Any) -> tuple[Array, Array]:
    """``(s_k, s_{k+1})`` per column, with 0 in place of masked entries (no inf - inf)."""
    s = xp.where(p["valid"], p["s"], xp.zeros_like(p["s"]))
    return s, xp.where(p["has_tail"], p["s0_next"], s)


def _curve_gap(p: dict[str, Array], xp: Any, n_cuts: Any) -> Array:
    """GAP-SINGLE: ``L = -log(1 + (k/(n-k)) e^{Delta_k})`` with Delta from the raw logits."""
    s, s_next = _gap_pair(p, xp)
    with np.errstate(over="ignore"):  # a gap past float max is +inf: the bound's tiny floor
        delta = xp.where(p["has_tail"], s - s_next, xp.zeros_like(s))
    z = _log_k(p, xp) - _log_m(p, xp) + delta
    out = -xp.logaddexp(xp.zeros_like(z), z)
    return xp.where(p["has_tail"], out, neg_inf(xp, out))


def _curve_exact_head(p: dict[str, Array], xp: Any, n_cuts: Any) -> Array:
    """GAP-EXACT-HEAD: ``X = (n-k) e^{d_{k+1}}``, ``D = sum_{i<=k} e^{d_i}``."""
    head = p["at"](log_cumsum(p["d_row"], p["valid_row"], xp, reverse=False, upper=False))
    log_x = xp.where(p["has_tail"], _log_m(p, xp) + p["d_next"], neg_inf(xp, head))
    return ratio_log(log_x, head, xp)


def _curve_all_gap(p: dict[str, Array], xp: Any, n_cuts: Any) -> Array:
    """GAP-MULTI with every cut: ``X = sum_{i>k} e^{d_i}`` (rounded up), ``D = k e^{d_k}``."""
    suffix = log_cumsum(p["d_row"], p["valid_row"], xp, reverse=True, upper=True)
    log_x = p["at_next"](suffix, -math.inf)
    log_x = xp.where(p["has_tail"], log_x, neg_inf(xp, log_x))
    return ratio_log(log_x, _log_k(p, xp) + p["d"], xp)


def _curve_checkpoint(p: dict[str, Array], xp: Any, n_cuts: Any) -> Array:
    """GAP-MULTI with ``n_cuts`` optimal cut points (dynamic programming)."""
    try:
        ok = not isinstance(n_cuts, bool) and int(n_cuts) == n_cuts and n_cuts >= 0
    except (TypeError, ValueError, OverflowError):  # None, NaN, inf, a string
        ok = False
    if not ok:
        raise InputError(f"n_cuts must be a non-negative integer, got {n_cuts!r}")
    # More than n - 1 cuts cannot lower the cost (every position is cut by then): cap the
    # dynamic programming's rounds, so the cost is bounded by the input, not by n_cuts.
    g = _checkpoint_costs(p, xp, min(int(n_cuts), max(0, p["d"].shape[-1] - 1)))
    log_g = xp.log(xp.where(g > 0, g, xp.ones_like(g)))
    log_g = xp.where(g > 0, log_g, neg_inf(xp, g))
    log_x = _shift_left(log_g, xp, -math.inf)  # top-k tail starts at 0-based position k
    log_x = xp.where(p["has_tail"], log_x, neg_inf(xp, log_x))
    return ratio_log(log_x, _log_k(p, xp) + p["d"], xp)


def _checkpoint_costs(p: dict[str, Array], xp: Any, m: int) -> Array:
    r"""``G[..., a]`` = min over at most ``m`` extra cuts of the segment cost covering
    0-based positions ``a..n_valid-1``, a segment ``[a, b)`` costing ``(b - a) e^{d_a}``.

    Recurrence: ``G_0(a) = (n_v - a) w_a``;
    ``G_r(a) = min(G_{r-1}(a), min_{a < b < n_v} (b - a) w_a + G_{r-1}(b))``.
    Weights use tail rounding (``d`` clipped at -700), so ``G`` never underestimates.
    """
    d, valid = p["d"], p["valid"]
    w = xp.where(valid, xp.exp(xp.maximum(d, CLIP)), xp.zeros_like(d))
    n = d.shape[-1]
    dev = device_of(d)
    pos = p["k"] - 1.0  # 0-based positions as float64
    nv = p["m"][..., :1] + 1.0  # n_valid, shape (..., 1)
    g = xp.where(valid, (nv - pos) * w, xp.zeros_like(w))
    if m == 0 or n < 2:
        return g
    batch = tuple(g.shape[:-1])
    rows = math.prod(batch)
    gf, wf, nvf = (xp.reshape(a, (rows, -1)) for a in (g, w, xp.broadcast_to(nv, (*batch, 1))))
    idx = xp.arange(n, dtype=xp.float64, device=dev)
    step_a = max(1, _CHUNK_ELEMS // max(1, n * max(1, rows)))
    for _ in range(m):
        parts = []
        for a0 in range(0, n, step_a):
            a1 = min(n, a0 + step_a)
            a = idx[a0:a1][:, None]  # (A, 1)
            ok = (idx[None, :] > a) & (idx[None, :] < nvf[:, :, None])  # (rows, A, n)
            cand = idx[None, None, :] * wf[:, a0:a1, None] + gf[:, None, :]
            cand = xp.where(ok, cand, xp.full_like(cand, xp.inf))
            best = xp.min(cand, axis=-1) - a[None, :, 0] * wf[:, a0:a1]
            parts.append(xp.minimum(gf[:, a0:a1], best))
        gf = xp.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
    return xp.reshape(gf, g.shape)


def _suffix_min(g: Array, xp: Any) -> Array:
    """``out[..., i] = min(g[..., i:])`` by doubling (``O(n log n)``, array-API only)."""
    if is_numpy(xp):  # one pass
        return np.flip(np.minimum.accumulate(np.flip(g, axis=-1), axis=-1), axis=-1)
    n = g.shape[-1]
    step = 1
    while step < n:
        g = xp.minimum(g, _shift_by(g, step, xp))
        step *= 2
    return g


def _shift_by(x: Array, step: int, xp: Any) -> Array:
    pad = xp.full((*x.shape[:-1], step), xp.inf, dtype=x.dtype, device=device_of(x))
    return xp.concat([x[..., step:], pad], axis=-1)


def _curve_uniform_gap(p: dict[str, Array], xp: Any, n_cuts: Any) -> Array:
    r"""GAP-UNIFORM: ``L = -log(1 + k(e^{delta_k} - 1))``, ``delta_k`` = min gap past k."""
    s0 = p["s0_row"]
    tail_row = p["nv"] - xp.arange(1, s0.shape[-1] + 1, dtype=xp.float64,
                                   device=device_of(s0)) > 0
    with np.errstate(over="ignore"):  # a gap past float max is +inf (sound, see _curve_gap)
        gap = xp.where(tail_row, s0 - _shift_left(s0, xp, 0.0), xp.full_like(s0, xp.inf))
    delta = p["at"](_suffix_min(gap, xp))
    k = p["k"]
    small = delta < 600.0
    dc = xp.where(small, delta, xp.zeros_like(delta))
    direct = -xp.log1p(k * xp.expm1(dc))
    # delta >= 600: 1 + k(e^delta - 1) = k e^delta (1 + (1-k) e^{-delta}/k), the last
    # factor is 1 to within 1e-260, so the log is log k + delta to within rounding.
    large = -(xp.log(k) + xp.where(small, xp.zeros_like(delta), delta))
    out = xp.where(small, direct, large)
    return xp.where(p["has_tail"], out, neg_inf(xp, out))


_CURVES: dict[str, Callable[[dict[str, Array], Any, Any], Array]] = {
    "gap": _curve_gap,
    "exact_head": _curve_exact_head,
    "all_gap": _curve_all_gap,
    "optimal_cuts": _curve_checkpoint,
    "uniform_gap": _curve_uniform_gap,
}


def _bound_curve(
    logits: Any, bound: str, n_cuts: Any, axis: int, k: Any = None
) -> tuple[Array, Array, Any]:
    """Sound upper bounds for every k = 1..n (column k - 1) and ``n_valid``; with ``k``
    given, only at ``k`` (shape ``(..., 1)``; the same values as the full curve there)."""
    bound = _bound_name(bound)
    if bound not in _CURVES:
        raise InputError(f"bound must be one of {TAIL_BOUNDS}, got {bound!r}")
    if bound != "optimal_cuts" and n_cuts is not None:
        raise InputError("n_cuts is only used by bound='optimal_cuts'")
    x, n_valid, xp, _ = valid_rows(logits, axis)
    cols = None
    if k is not None:
        cols = _k_index(k, tuple(x.shape[:-1]), int(x.shape[-1]), xp, device_of(x))
    full = cols is None or bound == "optimal_cuts"  # the dynamic programme needs every k
    p = _sorted_parts(x, n_valid, xp, None if full else cols)
    log_b = _CURVES[bound](p, xp, n_cuts)
    sigma = p["margin_clipped" if bound in ("all_gap", "optimal_cuts") else "margin"]
    out = round_up(log_b, sigma, p["has_tail"], xp)
    if cols is not None and full:
        out = xp.take_along_axis(out, (cols - 1)[..., None], axis=-1)
    return out, n_valid, xp


def _k_index(k: Any, batch: tuple[int, ...], n: int, xp: Any, dev: Any) -> Array:
    if isinstance(k, bool):
        raise InputError(f"k must be a positive integer or integer array, got {k!r}")
    if isinstance(k, int | np.integer):
        k_arr = xp.full(batch, int(k), dtype=xp.int64, device=dev)
    else:
        k_arr = asarray_on(k, xp=xp, device=dev)
        if not xp.isdtype(k_arr.dtype, "integral"):
            raise InputError(f"k must hold integers, got dtype {k_arr.dtype}")
        k_arr = xp.broadcast_to(xp.astype(k_arr, xp.int64), batch)
    if bool(xp.any(k_arr < 1)) or bool(xp.any(k_arr > n)):
        raise InputError(f"k must lie in [1, {n}] (the key-axis length)")
    return k_arr


def tail_bound(
    logits: Any, k: Any, *, bound: str = "gap", n_cuts: int | None = None, axis: int = -1
) -> Array:
    r"""Sound upper bound on the exact tail mass :math:`\tau_k` of the Top-k set.

    Parameters
    ----------
    logits : array
        Unsorted logits, ``-inf`` for masked keys; batch over the other axes.
    k : int or integer array (batch shape)
        Kept keys per row, ``1 <= k <= n`` (``n`` = length of the key axis); ``k`` at or
        above the number of valid keys gives 0.
    bound : {"gap", "exact_head", "all_gap", "optimal_cuts", "uniform_gap"}
        GAP-SINGLE, GAP-EXACT-HEAD, GAP-MULTI (every cut / ``n_cuts`` optimal cuts),
        GAP-UNIFORM (module docstring).
    n_cuts : int, optional
        Number of extra cut points for ``bound="optimal_cuts"`` (``"checkpoint"``, its
        old name, is deprecated).
    axis : int
        Key axis.

    Returns
    -------
    float64 array, batch shape
        Upper bounds in [0, 1], rounded upwards (module docstring).
    """
    at_k, _, _ = _bound_curve(logits, bound, n_cuts, axis, k)
    return at_k[..., 0]


def gap_bound(logits: Any, k: Any, *, axis: int = -1) -> Array:
    r"""Theorem GAP-SINGLE (Thm 4.5 of Tzachristas et al.), rounded upwards.

    .. math:: \tau_k \le \frac{(n-k) e^{s_{k+1}}}{k e^{s_k} + (n-k) e^{s_{k+1}}}
              = \frac{1}{1 + \frac{k}{n-k} e^{\Delta_k}}, \qquad \Delta_k = s_k - s_{k+1},

    with ``n`` the number of valid keys of the row; equality iff the logits take two
    levels.  See :func:`tail_bound` for parameters.
    """
    return tail_bound(logits, k, bound="gap", axis=axis)


def gap_exact_head_bound(logits: Any, k: Any, *, axis: int = -1) -> Array:
    r"""Theorem GAP-EXACT-HEAD [derived]: GAP-SINGLE with the exact head sum.

    .. math:: \tau_k \le \frac{(n-k) e^{s_{k+1}}}{\sum_{i \le k} e^{s_i} + (n-k) e^{s_{k+1}}}

    Never above :func:`gap_bound` (the head sum is at least :math:`k e^{s_k}`).
    """
    return tail_bound(logits, k, bound="exact_head", axis=axis)


def multigap_bound(logits: Any, k: Any, *, n_cuts: int | None = None, axis: int = -1) -> Array:
    r"""Theorem GAP-MULTI [paper names it; form derived].

    .. math:: \tau_k \le \frac{X}{k + X}, \quad
              X = \sum_{r=0}^{m} (j_{r+1} - j_r)\, e^{-(s_k - s_{j_r + 1})},
              \quad j_0 = k,\ j_{m+1} = n.

    ``n_cuts=None`` cuts at every position (the all-gap form, :math:`X` = the exact tail
    over :math:`e^{s_k}`); ``n_cuts=m`` uses the ``m`` cut points that minimise :math:`X`,
    found by dynamic programming (exact optimum; :math:`O(m n^2)` time per row, chunked
    to bounded memory).  ``n_cuts=0`` is GAP-SINGLE.
    """
    if n_cuts is None:
        return tail_bound(logits, k, bound="all_gap", axis=axis)
    return tail_bound(logits, k, bound="optimal_cuts", n_cuts=n_cuts, axis=axis)


def uniform_gap_bound(logits: Any, k: Any, *, axis: int = -1) -> Array:
    r"""Theorem GAP-UNIFORM [derived corollary of GAP-MULTI].

    .. math:: \tau_k \le \frac{1}{1 + k (e^{\delta_k} - 1)}, \qquad
              \delta_k = \min_{k \le i < n} (s_i - s_{i+1}),

    since :math:`s_k - s_{k+r} \ge r\delta_k` gives :math:`X \le \sum_{r \ge 1} e^{-r\delta_k}
    = 1/(e^{\delta_k} - 1)`.  Independent of ``n``; vacuous (1) when the tail has a tie.
    """
    return tail_bound(logits, k, bound="uniform_gap", axis=axis)


def bound_k(
    logits: Any, eps: float, *, bound: str = "gap", n_cuts: int | None = None, axis: int = -1
) -> Array:
    r"""Smallest k whose ``bound`` certifies :math:`\tau_k \le \varepsilon`, per row.

    ``min{k >= 1 : tail_bound(logits, k, bound=...) <= eps}`` with the same rounded
    bound as :func:`tail_bound`, so it is minimal *for that bound* and sound (the exact
    tail of the returned k is at most eps).  Every k is evaluated because the bounds are
    not monotone in k in general (e.g. ``s = (10, 0, 0, 0)``: GAP-SINGLE certifies k = 1
    but not k = 2).  At most the number of valid keys (whose tail is empty).

    For GAP-SINGLE the condition is the solved form
    :math:`\Delta_k \ge \ln\frac{n-k}{k} + \ln\frac{1-\varepsilon}{\varepsilon}`
    (:func:`gap_threshold`), up to the rounding margin.

    Returns
    -------
    int64 array, batch shape
    """
    eps = check_eps(eps)
    curve, n_valid, xp = _bound_curve(logits, bound, n_cuts, axis)
    ok = curve <= eps
    n = int(curve.shape[-1])
    k = xp.arange(1, n + 1, dtype=xp.int64, device=device_of(curve))
    first = xp.min(xp.where(ok, k, xp.full_like(k, n + 1)), axis=-1)
    return xp.minimum(first, n_valid)


def gap_threshold(k: Any, n: Any, eps: Any) -> Any:
    r"""The gap GAP-SINGLE needs: :math:`\ln\frac{n-k}{k} + \ln\frac{1-\varepsilon}{\varepsilon}`.

    ``gap_bound <= eps`` iff :math:`\Delta_k` is at least this (Thm 4.5 of Tzachristas et
    al., solved for :math:`\Delta_k`); exact real formula, no rounding margin.
    """
    k, n, eps = (np.asarray(a, dtype=np.float64) for a in (k, n, eps))
    return np.log((n - k) / k) + np.log((1.0 - eps) / eps)
