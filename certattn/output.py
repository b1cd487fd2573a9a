r"""Output level: what a truncation of attention costs at the output (THEORY section 4).

Logits :math:`s` (``(..., Lq, n)``, ``-inf`` = masked key), values :math:`v`
(``(..., n, dv)``, batch axes broadcast with the logits' axes before ``Lq``), any kept
set :math:`H` (a boolean mask or the Top-k set), tail :math:`T` = the other valid keys,
:math:`\tau = P(T)`, :math:`\mu_H = \mathrm{Attn}_k`, :math:`\mu_T = E_P[V \mid T]`.

* **OUT-HEAD-TAIL** (Thm 5.2 of Tzachristas et al.): :math:`\mathrm{Attn} - \mathrm{Attn}_k
  = \tau(\mu_T - \mu_H)`, exact for any kept set and any norm.
* **OUT-BOUNDED** (Prop 5.1): :math:`|\mathrm{Attn} - \mathrm{Attn}_k| \le 2C\tau` if every
  :math:`|v_j| \le C` (here :math:`C = \max_{j \text{ valid}} |v_j|`).
* **OUT-DIAMETER** (Prop 5.3 + chain [derived]):
  :math:`|\mathrm{Attn}-\mathrm{Attn}_k| \le \tau\max_{j\in T}|v_j - \mu_H|
  \le \tau\,\mathrm{diam}_{H,T} \le \tau\,\mathrm{diam}(V) \le 2C\tau`,
  :math:`\mathrm{diam}_{H,T} = \max_{i\in H, j\in T}|v_i - v_j|`
  (the first step because :math:`\mu_T` is a convex combination of the tail values).
* **OUT-BEST** (Thm 5.6): the minimum of the above and
  :math:`\sqrt{\tau/(1-\tau)}\sqrt{\mathrm{Var}_P(V)}` (Euclidean norm only).
* **OUT-VAR-DECOMP** [derived]:
  :math:`\mathrm{Var}_P(V) = (1-\tau)\mathrm{Var}_H + \tau\mathrm{Var}_T
  + \tau(1-\tau)|\mu_T - \mu_H|^2`, hence :math:`|\mathrm{Attn}-\mathrm{Attn}_k| =
  \sqrt{\tau/(1-\tau)}\sqrt{\text{between-group variance}}`.

Norms are Euclidean throughout (the identity and the diameter bounds hold for any norm,
the variance bound only for this one).

Costs: the head-tail terms, ``2 C tau``, the tail-to-head bound and the variance bound
are :math:`O(L_q\, n\, d_v)`; the two diameters need every pairwise value distance,
:math:`O(n^2 d_v)` per value set plus :math:`O(L_q\, n^2)` masked maxima; everything is
processed in query chunks of bounded size (``chunk_elems`` float64 temporaries).

Soundness: the bounds are claims about the exact :math:`|\mathrm{Attn} - \mathrm{Attn}_k|`
of the given float arrays.  They use a sound upper bound :math:`\bar\tau` of the tail mass
(computed here with the margin of :mod:`certattn.bounds`, or given, e.g. a certificate's
``tail_mass``), the absolute error of the computed :math:`\mu_H`
(:math:`\delta = C(u(2n + 2d_v + 2048) + n 2^{-1074})`, from float64 weights of relative
error :math:`u(|s_i - \max s| + n + 8)` and float64 sums), and distances and variances
rounded up as described in :class:`_Centred` (tail-to-head, variance: one matmul per query
chunk) or by :math:`(d_v + 8)u` relative (diameters, computed as differences).  Values whose
largest magnitude is beyond :math:`2^{\pm 100}` are first scaled by a power of two (every
bound is homogeneous in the values), and every bound carries :math:`\bar\tau 2^{-500}`
for what underflow can cost (:data:`_FLOOR`), so no finite value, subnormal or near the
float maximum, raises or gives an unsound bound (a bound beyond the range is ``inf``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import as_float_array, asarray_on, device_of
from ._fp import SMALLEST, U, log_cumsum, round_up
from ._fp import masked_weights as _weights
from ._validate import InputError, check_finite, first_bad_position, valid_rows
from .distribution import topk_mask
from .kept import shift_rows as _shift_rows
from .kept import tail_upper_of as _tau_upper

__all__ = [
    "OUTPUT_BOUNDS",
    "HeadTail",
    "OutputBounds",
    "VarianceDecomposition",
    "head_tail_terms",
    "output_bounds",
    "smallest_k_for_output",
    "sound_output_bounds",
    "variance_decomposition",
]

Array = Any

_CHUNK_ELEMS = 1 << 22
OUTPUT_BOUNDS = ("bounded", "diameter_all", "diameter", "tail_head", "variance")
"""Names of the output-error bounds, in the order of every ``tightest`` index."""
BOUND_NAMES = OUTPUT_BOUNDS  # deprecated name (0.1); use OUTPUT_BOUNDS


# --------------------------------------------------------------------------
# Inputs and exact terms
# --------------------------------------------------------------------------


def _inputs(logits: Any, values: Any, kept: Any, k: Any) -> tuple[Array, ...]:
    x, n_valid, xp, dev = valid_rows(logits, -1)
    v, _, _ = as_float_array(asarray_on(values, xp=xp, device=dev), name="values")
    v = xp.astype(v, xp.float64)
    if v.ndim < 2 or v.shape[-2] != x.shape[-1]:
        raise InputError(
            f"values must be (..., n, dv) with n = {x.shape[-1]} keys, got {tuple(v.shape)}"
        )
    check_finite(v, xp, "values")
    x = _shift_rows(x, xp)
    valid = x > -xp.inf
    if kept is None and k is None:
        raise InputError("give a kept set: `kept` (boolean mask) or `k` (count)")
    if kept is not None and k is not None:
        raise InputError("give only one of `kept` and `k`")
    if k is not None:
        kept = topk_mask(x, asarray_on(k, xp=xp, device=dev) if not isinstance(k, int) else k)
    kept = asarray_on(kept, xp=xp, device=dev)
    if kept.dtype != xp.bool:
        raise InputError(f"kept must be a boolean mask, got dtype {kept.dtype}")
    kept = xp.broadcast_to(kept, x.shape) & valid
    empty = ~xp.any(kept, axis=-1)
    if bool(xp.any(empty)):
        pos = first_bad_position(empty) if empty.ndim else ()
        raise InputError(f"kept set holds no valid key in row {pos}")
    return x, v, valid, kept, n_valid, xp


@dataclass(frozen=True)
class HeadTail:
    r"""Terms of Theorem OUT-HEAD-TAIL (float64 values, not bounds).

    ``tau`` (batch), ``attn``, ``attn_k`` (= ``mu_head``), ``mu_tail`` (``(..., Lq, dv)``;
    ``mu_tail = mu_head`` where the tail is empty), ``error = attn - attn_k``.
    """

    tau: Array
    attn: Array
    attn_k: Array
    mu_head: Array
    mu_tail: Array
    error: Array


def _head_tail(
    x: Array, v: Array, valid: Array, kept: Array, xp: Any
) -> tuple[HeadTail, tuple[Array, Array, Array]]:
    """The OUT-HEAD-TAIL terms and the weights ``(p, p_hat, p_tail)`` they come from."""
    tail = valid & ~kept
    p, lse_all = _weights(x, valid, xp)
    ph, _ = _weights(x, kept, xp)
    pt, lse_tail = _weights(x, tail, xp)
    tau = xp.exp(lse_tail - lse_all)
    attn = xp.matmul(p, v)
    mu_h = xp.matmul(ph, v)
    has_tail = xp.any(tail, axis=-1)[..., None]
    mu_t = xp.where(has_tail, xp.matmul(pt, v), mu_h)
    ht = HeadTail(tau=tau, attn=attn, attn_k=mu_h, mu_head=mu_h, mu_tail=mu_t, error=attn - mu_h)
    return ht, (p, ph, pt)


def head_tail_terms(logits: Any, values: Any, kept: Any = None, *, k: Any = None) -> HeadTail:
    r"""Theorem OUT-HEAD-TAIL (Thm 5.2 of Tzachristas et al.): the exact decomposition terms.

    :math:`\mathrm{Attn} - \mathrm{Attn}_k = \tau(\mu_T - \mu_H)` for any kept set.

    Parameters
    ----------
    logits : array (..., Lq, n)
        Key axis last, ``-inf`` for masked keys.
    values : array (..., n, dv)
    kept : bool array (..., Lq, n), optional
        Kept set (masked keys are dropped from it); or give ``k`` (Top-k, ties by position).
    """
    x, v, valid, kept, _, xp = _inputs(logits, values, kept, k)
    return _head_tail(x, v, valid, kept, xp)[0]


@dataclass(frozen=True)
class VarianceDecomposition:
    r"""Theorem OUT-VAR-DECOMP: ``total = (1 - tau) within_head + tau within_tail + between``.

    ``total`` = :math:`\mathrm{Var}_P(V)`, ``within_head`` = :math:`\mathrm{Var}_{\hat P}(V)`,
    ``within_tail`` = :math:`\mathrm{Var}_{P(\cdot|T)}(V)`, ``between`` =
    :math:`\tau(1-\tau)|\mu_T-\mu_H|^2`;
    ``error`` = :math:`\sqrt{\tau/(1-\tau)}\sqrt{\text{between}}`
    (equal to :math:`|\mathrm{Attn}-\mathrm{Attn}_k|`).
    """

    tau: Array
    total: Array
    within_head: Array
    within_tail: Array
    between: Array
    error: Array


def _variance(w: Array, v: Array, mean: Array, xp: Any, chunk_elems: int) -> Array:
    """``sum_i w_i |v_i - mean|^2`` per row, chunked over the query axis.

    The squared distances are summed one value dimension at a time (``(Lq, n)``
    temporaries, no ``(Lq, n, d_v)`` difference and no reduction over a short axis)."""

    def one(sl: slice) -> Array:
        sq = None
        for j in range(int(v.shape[-1])):
            t = v[..., None, :, j] - mean[..., sl, j][..., None]
            sq = t * t if sq is None else sq + t * t
        if sq is None:  # d_v = 0: every distance is 0
            return xp.zeros_like(w[..., sl, 0])
        return xp.sum(w[..., sl, :] * sq, axis=-1)

    return _by_query_chunks(one, w.shape, v.shape[-1], xp, chunk_elems)


def _by_query_chunks(fn: Any, shape: tuple[int, ...], width: int, xp: Any, chunk: int) -> Array:
    lq, n = int(shape[-2]), int(shape[-1])
    lead = math.prod(int(s) for s in shape[:-2])
    step = max(1, chunk // max(1, lead * n * width))
    parts = [fn(slice(i, min(lq, i + step))) for i in range(0, lq, step)]
    return xp.concat(parts, axis=-1) if len(parts) > 1 else parts[0]


def variance_decomposition(
    logits: Any, values: Any, kept: Any = None, *, k: Any = None, chunk_elems: int = _CHUNK_ELEMS
) -> VarianceDecomposition:
    """Theorem OUT-VAR-DECOMP [derived]: the exact law-of-total-variance split (float64 values)."""
    x, v, valid, kept, _, xp = _inputs(logits, values, kept, k)
    ht, (p, ph, pt) = _head_tail(x, v, valid, kept, xp)
    total = _variance(p, v, ht.attn, xp, chunk_elems)
    vh = _variance(ph, v, ht.mu_head, xp, chunk_elems)
    vt = _variance(pt, v, ht.mu_tail, xp, chunk_elems)
    gap = ht.mu_tail - ht.mu_head
    between = ht.tau * (1.0 - ht.tau) * xp.sum(gap * gap, axis=-1)
    head = 1.0 - ht.tau
    ok = head > 0
    ratio = ht.tau / xp.where(ok, head, xp.ones_like(head))
    # where tau rounds to 1 the product is 0 * inf: use its limit tau |mu_T - mu_H|
    err = xp.where(
        ok, xp.sqrt(ratio) * xp.sqrt(between), ht.tau * xp.sqrt(xp.sum(gap * gap, axis=-1))
    )
    return VarianceDecomposition(ht.tau, total, vh, vt, between, err)


# --------------------------------------------------------------------------
# Sound bounds
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputBounds:
    r"""All output-error bounds of one kept set (Theorems OUT-BOUNDED ... OUT-BEST).

    Sound upper bounds on the exact :math:`|\mathrm{Attn} - \mathrm{Attn}_k|` (Euclidean):
    ``bounded`` (:math:`2C\bar\tau`), ``diameter_all`` (:math:`\bar\tau\,\mathrm{diam}(V)`),
    ``diameter`` (:math:`\bar\tau\,\mathrm{diam}_{H,T}`), ``tail_head``
    (:math:`\bar\tau\max_{T}|v_j-\mu_H|`), ``variance``
    (:math:`\sqrt{\bar\tau/(1-\bar\tau)}\sqrt{\mathrm{Var}_P V}`), ``best`` (their minimum),
    ``tightest`` (index into :attr:`names` of the minimiser).  ``error`` is the float64
    value of :math:`|\mathrm{Attn}-\mathrm{Attn}_k|` (an estimate, not a bound),
    ``tail_upper`` the :math:`\bar\tau` used.  Diameters are NaN when not computed.
    """

    error: Array
    tail_upper: Array
    bounded: Array
    diameter_all: Array
    diameter: Array
    tail_head: Array
    variance: Array
    best: Array
    tightest: Array
    names: tuple[str, ...] = OUTPUT_BOUNDS

    @property
    def tau_upper(self) -> Array:
        """Deprecated (0.1): use :attr:`tail_upper`."""
        warnings.warn("OutputBounds.tau_upper is deprecated; use tail_upper",
                      DeprecationWarning, stacklevel=2)
        return self.tail_upper

    def tightest_names(self) -> np.ndarray:
        """The name of the tightest bound per row, as a NumPy string array."""
        from ._array import to_numpy

        return np.asarray(self.names)[to_numpy(self.tightest)]


def _norm(a: Array, xp: Any) -> Array:
    """Euclidean norm over the last axis without overflow or underflow of the squares
    (a power-of-two rescaling where the entries are far from 1)."""
    shift = _pow2_shift(a, xp, 500)
    if shift == 0:
        return xp.linalg.vector_norm(a, axis=-1)
    with np.errstate(over="ignore"):  # a norm beyond the float range: inf
        return _times_pow2(xp.linalg.vector_norm(_times_pow2(a, shift), axis=-1), -shift)


def _pow2_shift(a: Array, xp: Any, within: int) -> int:
    r"""``k`` such that :math:`2^k \max|a|` lies in ``[1/2, 1)``, or 0 where
    :math:`\max|a|` is 0, not finite or already in :math:`[2^{-within}, 2^{within}]`."""
    top = float(xp.max(xp.abs(a))) if a.size else 0.0
    if top == 0.0 or not math.isfinite(top) or 2.0**-within <= top <= 2.0**within:
        return 0
    return -math.frexp(top)[1]


def _up(x: Array, rel: float) -> Array:
    return x * (1.0 + rel)


def _value_scale(v: Array, valid: Array, xp: Any) -> Array:
    """Sound ``C = max_{j valid} |v_j|`` per query row."""
    vn = xp.linalg.vector_norm(v, axis=-1)[..., None, :]  # (..., 1, n)
    c = xp.max(xp.where(valid, vn, xp.zeros_like(vn)), axis=-1)
    return _up(c, (v.shape[-1] + 4) * U)


def _mu_error(c: Array, n: int, dv: int) -> Array:
    """Absolute error bound of a computed float64 weighted mean of values of norm <= C."""
    return c * (U * (2 * n + 2 * dv + 2048) + n * SMALLEST)


def _chi_sqrt(tau: Array, xp: Any) -> Array:
    """Rounded-up :math:`\\sqrt{\\tau/(1-\\tau)}` (``inf`` at ``tau = 1``)."""
    one = xp.ones_like(tau)
    denom = one - tau
    safe = xp.where(denom > 0, denom, one)
    # tau / (1 - tau) raised by 4u and the smallest subnormal (it may underflow)
    ratio = xp.where(tau > 0, tau / safe * (1.0 + 4 * U) + SMALLEST, xp.zeros_like(tau))
    return xp.where(denom > 0, xp.sqrt(ratio) * (1.0 + 8 * U), xp.full_like(tau, xp.inf))


class _Centred:
    r"""Values centred at their key mean ``c``, for BLAS-speed sound distance/variance bounds.

    With :math:`w_j = v_j - c`, :math:`a_j = |w_j|^2` and a point :math:`y`:
    :math:`|v_j - y|^2 = a_j - 2 w_j\cdot(y - c) + |y - c|^2` (one matmul for all queries), and
    :math:`\mathrm{Var}_P V = E_P|V - c|^2 - |E_P V - c|^2` (any ``c``; the mean keeps the
    cancellation small).  Rounding: the squared distance errs by at most
    :math:`4(d_v + 16)u(a_j + |y-c|^2)`, added before the square root; the variance is bounded
    by :math:`E(1+\gamma) - ((|m - c|(1-(d_v+4)u) - \delta)_+)^2 (1-\gamma)`.
    """

    def __init__(self, v: Array, xp: Any) -> None:
        self.xp = xp
        self.dv = int(v.shape[-1])
        self.c = xp.mean(v, axis=-2, keepdims=True)  # (..., 1, dv)
        self.w = v - self.c
        self.a = xp.sum(self.w * self.w, axis=-1)  # (..., n)

    def max_dist(self, y: Array, keys: Array) -> Array:
        """Sound ``max_{j in keys} |v_j - y_q|`` per query (0 if ``keys`` is empty)."""
        xp = self.xp
        yc = y - self.c
        b = xp.sum(yc * yc, axis=-1)[..., None]  # (..., Lq, 1)
        g = xp.matmul(yc, xp.matrix_transpose(self.w))  # (..., Lq, n)
        a = self.a[..., None, :]
        sq = a - 2.0 * g + b + 4.0 * (self.dv + 16) * U * (a + b)
        dist = xp.sqrt(xp.maximum(sq, 0.0)) * (1.0 + 4 * U)
        dist = dist + 2 * U * (xp.sqrt(a) + xp.sqrt(b))
        return xp.max(xp.where(keys, dist, xp.zeros_like(dist)), axis=-1)

    def variance_upper(self, p: Array, mean: Array, delta: Array, scale: Array) -> Array:
        r"""Sound upper bound on :math:`\mathrm{Var}_P V` from weights ``p`` and computed mean."""
        xp = self.xp
        n = int(p.shape[-1])
        gam = U * (2 * n + 2 * self.dv + 2048)
        e2 = xp.matmul(p, self.a[..., :, None])[..., 0]
        e2 = e2 * (1.0 + gam) + 4.0 * n * SMALLEST * scale * scale
        mc = xp.linalg.vector_norm(mean - self.c, axis=-1) * (1.0 - (self.dv + 4) * U)
        low = xp.maximum(mc - delta, 0.0)
        return xp.maximum(e2 - low * low * (1.0 - gam), 0.0)


def _pair_dist(v: Array, xp: Any, chunk: int) -> Array:
    """All pairwise ``|v_i - v_j|`` ``(..., n, n)``, chunked over ``i`` (``O(n^2 dv)``)."""
    n, dv = int(v.shape[-2]), int(v.shape[-1])
    lead = math.prod(int(s) for s in v.shape[:-2])
    step = max(1, chunk // max(1, lead * n * dv))
    parts = []
    for i in range(0, n, step):
        diff = v[..., i : min(n, i + step), None, :] - v[..., None, :, :]
        parts.append(xp.linalg.vector_norm(diff, axis=-1))
    return xp.concat(parts, axis=-2) if len(parts) > 1 else parts[0]


def _masked_pair_max(dist: Array, rows: Array, cols: Array, xp: Any, chunk: int) -> Array:
    """``max_{i in rows, j in cols} dist_ij`` per query (0 if empty), chunked over queries."""
    n = int(dist.shape[-1])

    def one(sl: slice) -> Array:
        m = rows[..., sl, :, None] & cols[..., sl, None, :]
        d = xp.where(m, dist[..., None, :, :], xp.zeros_like(dist[..., None, :, :]))
        return xp.max(xp.max(d, axis=-1), axis=-1)

    return _by_query_chunks(one, rows.shape, n, xp, chunk)


def sound_output_bounds(
    x: Array,
    v: Array,
    valid: Array,
    kept: Array,
    tau_up: Array,
    xp: Any,
    *,
    diameters: bool = False,
    full_softmax: bool = True,
    chunk: int = _CHUNK_ELEMS,
) -> dict[str, Array]:
    r"""The output-error engine: every sound bound of one kept set, by name.

    The one implementation behind :func:`output_bounds`, :func:`certattn.certify_attention`
    and :func:`certattn.certified_search` (Theorems OUT-BOUNDED, OUT-DIAMETER, OUT-BEST;
    rounding in the module docstring).

    Parameters
    ----------
    x : float64 array (..., Lq, n)
        Logits shifted by their row maximum (:func:`certattn.kept.shift_rows`).  Only the
        kept entries are read unless ``full_softmax``.
    v : float64 array (..., n, dv)
    valid, kept : bool arrays (..., Lq, n)
        Visible keys and the kept set (a subset of ``valid``, non-empty per row).
    tau_up : float64 array (..., Lq)
        A sound upper bound on the exact tail mass of ``kept``.
    diameters : bool
        Also the two diameter bounds (:math:`O(n^2 d_v)`); NaN otherwise.
    full_softmax : bool
        The logits of every valid key are known: also the variance bound (OUT-BEST) and
        the dense output ``attn``.  A search that did not score every key passes False:
        then only bounds that need the kept logits and the values are formed.

    Returns
    -------
    dict
        ``attn_k`` (the truncated output), ``mu_err`` (its absolute rounding bound), each
        name of :data:`OUTPUT_BOUNDS` (NaN where not computed), ``best`` (their minimum,
        NaN ignored; ``error_bound = best + mu_err``) and ``tightest`` (index into
        :data:`OUTPUT_BOUNDS`); ``attn`` when ``full_softmax``.

    Notes
    -----
    Values far from 1 in magnitude (beyond :math:`2^{\pm 100}`) are first scaled by a
    power of two into :math:`[1/2, 1)` and every result is scaled back
    (:func:`_rescaled`).  Every bound is homogeneous of degree 1 in the values, so this
    changes nothing else.  What underflow can still cost (rows whose values are far below
    the largest, scaled entries among the subnormals) is covered by :data:`_FLOOR`.
    """
    shift = _pow2_shift(v, xp, 100)
    if shift == 0:
        return _engine(x, v, valid, kept, tau_up, xp, diameters=diameters,
                       full_softmax=full_softmax, chunk=chunk)
    return _rescaled(x, v, valid, kept, tau_up, xp, shift,
                     diameters=diameters, full_softmax=full_softmax, chunk=chunk)


def _times_pow2(a: Array, k: int) -> Array:
    """``a * 2^k`` for any ``k >= -1074`` (the factor :math:`2^k` need not be a float:
    beyond :math:`2^{1000}` in two steps, both exact unless the result overflows)."""
    if k > 1000:
        a = a * 2.0**1000
        k -= 1000
    return a * 2.0**k


def _rescaled(
    x: Array, v: Array, valid: Array, kept: Array, tau_up: Array, xp: Any, shift: int,
    **engine: Any,
) -> dict[str, Array]:
    r""":func:`_engine` on the values times :math:`2^{shift}`, results scaled back.

    ``shift`` takes the largest magnitude into :math:`[1/2, 1)`.  Scaling up (tiny values)
    is exact.  Scaling down (huge values) rounds only the entries that land among the
    subnormals, each by at most :math:`2^{-1075}`: within :math:`\eta = \sqrt{d_v}
    2^{-1075}` per key, which moves :math:`\mathrm{Attn}_k` by at most :math:`\eta` and
    :math:`|\mathrm{Attn} - \mathrm{Attn}_k|` by at most :math:`2\tau\eta`, far below the
    engine's :data:`_FLOOR`.  Scaling back up is exact or overflows to ``inf`` (fail
    closed); scaling back down may land among the subnormals, hence the bounds are raised
    by the smallest subnormal.
    """
    out = _engine(x, _times_pow2(v, shift), valid, kept, tau_up, xp, **engine)
    with np.errstate(over="ignore"):  # a result beyond the float range: inf
        for name in ("attn_k", "attn"):
            if name in out:
                out[name] = _times_pow2(out[name], -shift)
        for name in ("mu_err", "best", *OUTPUT_BOUNDS):
            out[name] = _times_pow2(out[name], -shift) + SMALLEST
    return out


_FLOOR = 2.0**-500
r"""Absolute slack of the engine per unit of tail mass, for what underflow costs.

Where a row's values are tiny next to the largest value (at most :math:`2^{100}`
after the rescaling of :func:`sound_output_bounds`) their squares, products and weights
land among the subnormals, whose absolute errors (:math:`2^{-1075}` each) the relative
margins miss: at most :math:`(n + d_v) 2^{-1074}` in a squared distance or variance,
:math:`\sqrt{(n + d_v) 2^{-1074}} < 2^{-500}` in a distance, a norm or a mean (for
:math:`n + d_v < 2^{70}`).  The engine adds :math:`\bar\tau 2^{-500}` to every bound
(:math:`2^{-500}` to ``mu_err``), at most :math:`2^{-400}` relative to the largest value.
"""


def _floored(b: Array, tau_up: Array, xp: Any) -> Array:
    """``b + tau_up 2^-500`` rounded up (``b`` where ``tau_up = 0``: no tail, no error)."""
    pad = xp.where(tau_up > 0, tau_up * _FLOOR + SMALLEST, xp.zeros_like(tau_up))
    return _up(b + pad, 4 * U)


def _flattened(x: Array, kept: Array, xp: Any) -> Array:
    """Rows whose kept logits were all clamped to ``-float max`` by the shift (their
    differences overflowed, :func:`certattn.kept.shift_rows`) and hold several keys: the
    computed head weights are then uniform, not the exact ones, and the computed head
    mean is only known to lie within ``2 C`` of the exact one."""
    lowest = float(xp.finfo(x.dtype).min)
    top = xp.max(xp.where(kept, x, xp.full_like(x, -xp.inf)), axis=-1)
    several = xp.sum(xp.astype(kept, xp.int64), axis=-1) > 1
    return (top == lowest) & several


def _engine(
    x: Array,
    v: Array,
    valid: Array,
    kept: Array,
    tau_up: Array,
    xp: Any,
    *,
    diameters: bool,
    full_softmax: bool,
    chunk: int,
) -> dict[str, Array]:
    """:func:`sound_output_bounds` on values of moderate magnitude."""
    n, dv = int(x.shape[-1]), int(v.shape[-1])
    rel = (dv + 8) * U
    tail = valid & ~kept
    ph, _ = _weights(x, kept, xp)
    mu_h = xp.matmul(ph, v)
    c = _value_scale(v, valid, xp)
    delta = _mu_error(c, n, dv) + xp.where(_flattened(x, kept, xp), 2.0 * c, 0.0)
    out: dict[str, Array] = {"attn_k": mu_h, "mu_err": _up(delta + _FLOOR, 4 * U)}
    out["bounded"] = _floored(_up(2.0 * c * tau_up, 4 * U), tau_up, xp)
    centred = _Centred(v, xp)
    th = centred.max_dist(mu_h, tail)
    out["tail_head"] = _floored(_up(tau_up * (th + delta), 4 * U), tau_up, xp)
    if full_softmax:
        p, _ = _weights(x, valid, xp)
        attn = xp.matmul(p, v)
        out["attn"] = attn
        var = centred.variance_upper(p, attn, delta, c)
        # sqrt(var) + 2^-500 > 0: chi = inf (tau_up = 1) gives inf, not NaN; 6u: one
        # rounding more (the sum) than the product alone
        out["variance"] = _up(_chi_sqrt(tau_up, xp) * (xp.sqrt(var) + _FLOOR), 6 * U)
    else:
        out["variance"] = xp.full_like(tau_up, xp.nan)
    if diameters:
        dist = _pair_dist(v, xp, chunk)
        for name, rows, cols in (("diameter", kept, tail), ("diameter_all", valid, valid)):
            far = _up(_masked_pair_max(dist, rows, cols, xp, chunk), rel)
            out[name] = _floored(_up(tau_up * far, 4 * U), tau_up, xp)
    else:
        out["diameter"] = xp.full_like(tau_up, xp.nan)
        out["diameter_all"] = xp.full_like(tau_up, xp.nan)
    stack = xp.stack([out[name] for name in OUTPUT_BOUNDS], axis=-1)
    stack = xp.where(xp.isnan(stack), xp.full_like(stack, xp.inf), stack)
    out["best"] = xp.min(stack, axis=-1)
    out["tightest"] = xp.argmin(stack, axis=-1)
    return out


def output_bounds(
    logits: Any,
    values: Any,
    kept: Any = None,
    *,
    k: Any = None,
    tail_upper: Any = None,
    diameters: bool = True,
    chunk_elems: int = _CHUNK_ELEMS,
    **deprecated: Any,
) -> OutputBounds:
    r"""Every output-error bound of Theorems OUT-BOUNDED, OUT-DIAMETER and OUT-BEST at once.

    Parameters
    ----------
    logits : array (..., Lq, n)
        Key axis last, ``-inf`` for masked keys.
    values : array (..., n, dv)
    kept : bool array (..., Lq, n), optional
        The kept set; or give ``k`` (Top-k, ties by position).
    tail_upper : array (..., Lq), optional
        A sound upper bound on the tail mass to use (e.g. a certificate's ``tail_upper``);
        by default the exact tail mass rounded up (:func:`certattn.certify_kept`).
    diameters : bool
        Compute the two diameter bounds (:math:`O(n^2 d_v)` per value set and
        :math:`O(L_q n^2)`; never the tightest, since ``tail_head`` is at most
        ``diameter``).  If False they are NaN.
    chunk_elems : int
        Float64 temporaries per chunk.

    Returns
    -------
    OutputBounds
    """
    x, v, valid, kept, _, xp = _inputs(logits, values, kept, k)
    single = x.ndim == 1
    if single:  # one row: give it a query axis
        x, valid, kept = x[None, :], valid[None, :], kept[None, :]
    if "tau_upper" in deprecated:
        warnings.warn("output_bounds(tau_upper=...) is deprecated; use tail_upper",
                      DeprecationWarning, stacklevel=2)
        tail_upper = deprecated.pop("tau_upper")
    if deprecated:
        raise TypeError(f"unexpected keyword arguments {sorted(deprecated)}")
    tau = _tau_upper(x, valid, kept, xp)
    if tail_upper is not None:
        given = xp.astype(asarray_on(tail_upper, xp=xp, device=device_of(x)), xp.float64)
        bad = xp.isnan(given) | (given < 0)
        if bool(xp.any(bad)):
            raise InputError("tail_upper must be >= 0 (a bound on a probability), got NaN or < 0")
        tau = xp.broadcast_to(given, tau.shape)
    b = sound_output_bounds(x, v, valid, kept, tau, xp, diameters=diameters, chunk=chunk_elems)
    with np.errstate(over="ignore"):  # an error beyond the float range: inf
        err = _norm(b["attn"] - b["attn_k"], xp)
    if single:
        b = {name: b[name][0, ...] for name in (*OUTPUT_BOUNDS, "best", "tightest")}
        err, tau = err[0, ...], tau[0, ...]
    return OutputBounds(
        error=err,
        tail_upper=tau,
        **{name: b[name] for name in (*OUTPUT_BOUNDS, "best", "tightest")},
    )


def smallest_k_for_output(
    logits: Any,
    values: Any,
    delta: float,
    *,
    bound: str = "best",
    chunk_elems: int = _CHUNK_ELEMS,
) -> Array:
    r"""Smallest Top-k whose sound output-error bound is at most ``delta``, per query.

    ``bound`` is ``"bounded"`` (:math:`2C\bar\tau_k`), ``"variance"``
    (:math:`\sqrt{\bar\tau_k/(1-\bar\tau_k)}\sqrt{\mathrm{Var}_P V}`), ``"tail_head"``
    (:math:`\bar\tau_k \max_{j>k}|v_j - \mu_{H_k}|`) or ``"best"`` (their minimum, which
    equals the OUT-BEST minimum since the diameter bounds are never below ``tail_head``).
    Every k is evaluated (``tail_head`` is not monotone in k): :math:`O(n^2 d_v)` per
    query for ``tail_head``/``best``, :math:`O(n d_v)` otherwise.  Minimal for the chosen
    bound and sound.  At most the number of valid keys (where the bound is 0).

    Returns
    -------
    int64 array (..., Lq)
    """
    if bound not in ("bounded", "variance", "tail_head", "best"):
        raise InputError(
            f"bound must be 'bounded', 'variance', 'tail_head' or 'best', got {bound!r}"
        )
    delta = float(delta)
    if not (math.isfinite(delta) and delta >= 0):
        raise InputError(f"delta must be a finite number >= 0, got {delta!r}")
    x, n_valid, xp, dev = valid_rows(logits, -1)
    single = x.ndim == 1
    if single:
        x, n_valid = x[None, :], n_valid[None]
    x = _shift_rows(x, xp)
    v, _, _ = as_float_array(asarray_on(values, xp=xp, device=dev), name="values")
    v = xp.astype(v, xp.float64)
    n, dv = int(x.shape[-1]), int(v.shape[-1])
    if v.ndim < 2 or v.shape[-2] != n:
        raise InputError(f"values must be (..., n, dv) with n = {n} keys, got {tuple(v.shape)}")
    check_finite(v, xp, "values")
    v, delta = _scaled_problem(v, delta, xp)
    valid = x > -xp.inf
    p, _ = _weights(x, valid, xp)
    attn = xp.matmul(p, v)
    c = _value_scale(v, valid, xp)[..., None]
    mu_err = _mu_error(c, n, dv)
    # tau upper bounds for every k, in sorted order
    order = xp.argsort(x, axis=-1, descending=True, stable=True)
    s = xp.take_along_axis(x, order, axis=-1)
    sv = s > -xp.inf
    d = xp.where(sv, s - s[..., :1], xp.full_like(s, -xp.inf))
    z = log_cumsum(d, sv, xp, reverse=False, upper=False)[..., -1:]
    t = log_cumsum(d, sv, xp, reverse=True, upper=True)
    t = xp.concat([t[..., 1:], xp.full_like(t[..., :1], -xp.inf)], axis=-1)  # tail of top-k
    ks = xp.arange(1, n + 1, dtype=xp.int64, device=dev)
    has_tail = ks < n_valid[..., None]
    tau = round_up(t - z, U * (4.0 * n + 16384.0) + (8.0 * U) * xp.abs(z), has_tail, xp)
    curves = []
    if bound in ("bounded", "best"):
        curves.append(_floored(_up(2.0 * c * tau, 4 * U), tau, xp))
    if bound in ("variance", "best"):
        var = _Centred(v, xp).variance_upper(p, attn, mu_err[..., 0], c[..., 0])
        root = xp.sqrt(var)[..., None] + _FLOOR
        curves.append(_up(_chi_sqrt(tau, xp) * root, 6 * U))
    if bound in ("tail_head", "best"):
        dist = _tail_head_curve(s, v, order, xp, chunk_elems)
        far = _up(dist, (dv + 8) * U) + mu_err
        curves.append(_floored(_up(tau * far, 4 * U), tau, xp))
    best = curves[0]
    for cv in curves[1:]:
        best = xp.minimum(best, cv)
    best = xp.where(has_tail, best, xp.zeros_like(best))
    first = xp.minimum(xp.min(xp.where(best <= delta, ks, xp.full_like(ks, n)), axis=-1), n_valid)
    return first[0] if single else first


def _scaled_problem(v: Array, delta: float, xp: Any) -> tuple[Array, float]:
    """Values and budget times one power of two (the smallest k is invariant to it): the
    values' largest magnitude in ``[2^-100, 2^100]`` (as in :func:`sound_output_bounds`);
    a budget that rounds among the subnormals is lowered by one (stricter, still sound)."""
    shift = _pow2_shift(v, xp, 100)
    if shift == 0:
        return v, delta
    scaled = _times_pow2(delta, shift)  # a Python float: overflow gives inf
    if scaled < 2.0**-1022:
        scaled = max(scaled - SMALLEST, 0.0)
    return _times_pow2(v, shift), scaled


def _tail_head_curve(s: Array, v: Array, order: Array, xp: Any, chunk: int) -> Array:
    """``max_{j > k} |v_(j) - mu_H(k)|`` for every k (``(..., Lq, n)``), sorted order.

    ``mu_H(k)`` is the prefix softmax mean of the k largest logits.  Chunked over queries;
    ``O(n^2 d_v)`` work per query.
    """
    n, dv = int(s.shape[-1]), int(v.shape[-1])
    lead = math.prod(int(a) for a in s.shape[:-2])
    lq = int(s.shape[-2])
    step = max(1, chunk // max(1, lead * n * max(n, dv)))
    jj = xp.arange(n, device=device_of(s))
    later = jj[None, :] > jj[:, None]  # (k0, j): j after position k0 (0-based k0 = k - 1)
    parts = []
    for q0 in range(0, lq, step):
        sl = slice(q0, min(lq, q0 + step))
        ss = s[..., sl, :]
        valid = ss > -xp.inf
        w = xp.where(valid, xp.exp(ss - ss[..., :1]), xp.zeros_like(ss))
        vs = xp.take_along_axis(
            xp.broadcast_to(v[..., None, :, :], (*ss.shape, dv)),
            xp.broadcast_to(order[..., sl, :][..., None], (*ss.shape, dv)),
            axis=-2,
        )
        num = xp.cumulative_sum(w[..., None] * vs, axis=-2)
        den = xp.cumulative_sum(w, axis=-1)[..., None]
        mu = num / den  # (..., q, k0, dv)
        rows = []
        for k0 in range(n):
            diff = vs - mu[..., k0 : k0 + 1, :]
            dist = xp.linalg.vector_norm(diff, axis=-1)  # (..., q, j)
            ok = later[k0, :] & valid
            rows.append(xp.max(xp.where(ok, dist, xp.zeros_like(dist)), axis=-1))
        parts.append(xp.stack(rows, axis=-1))
    return xp.concat(parts, axis=-2) if len(parts) > 1 else parts[0]
