r"""Certified Top-k: the smallest k whose discarded softmax mass is at most eps.

For one row of logits :math:`s` (``-inf`` = masked key), sorted descending, the Top-k
tail mass is :math:`\tau_k = \sum_{i>k} p_i` and the minimal budget is

.. math:: k_\varepsilon = \min\{k : \tau_k \le \varepsilon\},

which by Theorem TV-TAIL (Lemma 4.1 of Tzachristas et al.) is the smallest Top-k
truncation with :math:`\mathrm{TV}(P, \hat P) \le \varepsilon`, and by Theorem TV-KL the
smallest with :math:`\mathrm{KL}(\hat P \Vert P) \le -\log(1-\varepsilon)`.

Soundness (THEORY section 7)
----------------------------
The certificate is a claim about the *exact* real-number softmax of the given logits.
With :math:`e_i = e^{s_i - c}` for a per-row constant :math:`c` (it cancels), the tail
condition is :math:`T_k = \sum_{i>k} e_i \le \varepsilon Z` with :math:`Z = \sum_i e_i`.
For ordinary logits (every computed row sum in :math:`[e^{-650}/\varepsilon, e^{700}]`)
:math:`c = 0`: the terms are ``exp`` of the exact float64 value of each logit, with no
rounded subtraction; otherwise :math:`c = \max s - \text{shift}`.  We compute
:math:`\hat e_i` and every sum in float64 and bound the rounding error rigorously (the
bounds hold for any summation order; the generic kernel sums tails from the small end,
the NumPy kernel sums the keys below its bracket in one pass):

* each term: :math:`|\hat e_i - e_i| \le \gamma_e e_i + 2^{-1074}`, with
  :math:`\gamma_e = 2100\,u` (:math:`u = 2^{-53}`) covering the rounding of
  :math:`s_i - \max s` (exponents up to about 900 in magnitude matter; smaller terms
  underflow and are covered by the absolute part) and 4 ulps for ``exp``;
* exponents below :math:`-700` (masked keys included) are raised to :math:`-700` before
  ``exp`` when a chunk has any (``exp`` then never lands among the subnormals, where
  NumPy is several times slower): such a term *over*-estimates its exact value, by at
  most :math:`e^{-699}`;
* each sum of :math:`m` non-negative terms: relative error :math:`\le 1.01\,m u`.

A cut is accepted only if the *upper* bound of the tail is at most :math:`\varepsilon`
times the *lower* bound of :math:`Z`, with :math:`\gamma = 2(n + 4096)u` (about
:math:`10^{-12}` for :math:`n = 4096`) and the absolute term :math:`\alpha = n\,2^{-1073}`
(underflow), or :math:`n e^{-699}` where exponents were raised.  For tiny budgets
(:math:`\varepsilon < e^{-600}`) all terms are scaled by :math:`e^{c}`,
:math:`c = -\log\varepsilon - 600`, so that :math:`\alpha` stays negligible against
:math:`\varepsilon Z` (below :math:`n e^{-49}` relative to it).  Hence:

* **sound**: the reported ``k`` is never below the exact :math:`k_\varepsilon`, and the
  reported ``tail_upper`` is never below the exact :math:`\tau_k` (and never above eps);
* **minimal up to the margin**: ``k`` exceeds :math:`k_\varepsilon` only if the exact
  :math:`\tau_{k-1}` lies within a relative :math:`3\gamma + 10^{-12}` of eps (far inside the
  promised :math:`10^{-6}`).

Ties are harmless: :math:`\tau_k` depends only on the multiset of the ``n - k`` smallest
logits; :meth:`TopkCertificate.kept_mask` breaks ties at the cut by position.

The cut logit
-------------
:attr:`TopkCertificate.cut` is the ``k``-th largest valid logit of each row (exact, in
float64).  Keeping every key whose logit is at least the cut keeps the Top-k set and
every key tied with its smallest member: it drops only keys whose logits are *below* the
``k``-th largest, a subset of the ``n - k`` smallest, so ``tail_upper`` bounds its dropped
mass too (a subset of the tail has at most the tail's exact mass).  It is one
comparison per key (``logits >= cut``) on the logits' own device, where :meth:`kept_mask`
ranks every row.  It is computed from ``k`` alone, so every kernel (NumPy, compiled,
generic) gives the same cut for the same ``k``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np

from . import _topk_numba as _nb_path
from . import _topk_numpy as _np_path
from ._array import as_float_array, device_of, is_numpy, namespace
from ._backends import adapter, device_kernel
from ._fp import GAMMA_EXP, SMALLEST, U
from ._topk_array import cut_search
from ._topk_generic import cut_sorted, exp_terms
from ._validate import InputError, check_eps, check_logits, check_number, first_bad_position
from .distribution import topk_mask
from .kept import kl_upper_from_tail

__all__ = ["TopkCertificate", "certify_topk", "certify_topp"]

Array = Any

_CHUNK_BYTES = 1 << 26  # 64 MiB of float64 temporaries per chunk (generic path)


@dataclass(frozen=True)
class TopkCertificate:
    r"""A certified Top-k truncation of every row of a batch of logits.

    Attributes
    ----------
    k : integer array, batch shape
        Keys to keep per row: never below the exact minimal :math:`k_\varepsilon`.
    tail_upper : float64 array, batch shape
        Sound upper bound on the exact discarded mass :math:`\tau_k` of the kept set,
        never above ``eps`` (it equals TV by Theorem TV-TAIL).
    kl_upper : float64 array, batch shape
        ``-log1p(-tail_upper)`` rounded up: a sound upper bound on
        :math:`\mathrm{KL}(\hat P\Vert P)` (Theorem TV-KL).
    n_valid : integer array, batch shape
        Finite (unmasked) keys per row.
    masked : bool array, batch shape
        Rows with no valid key (only with ``masked_rows="skip"``; they get ``k = 0``).
    eps : float
        The budget.
    n : int
        Length of the key axis.
    axis : int
        The key axis of the logits, as given.
    """

    k: Array
    tail_upper: Array
    kl_upper: Array
    n_valid: Array
    masked: Array
    eps: float
    n: int
    axis: int
    _logits: Array = field(repr=False)

    @property
    def tail_mass(self) -> Array:
        """Deprecated (0.1): the sound bound is :attr:`tail_upper`."""
        warnings.warn(
            "TopkCertificate.tail_mass is deprecated; use tail_upper", DeprecationWarning,
            stacklevel=2,
        )
        return self.tail_upper

    @property
    def kl(self) -> Array:
        """Deprecated (0.1): use :attr:`kl_upper`."""
        warnings.warn(
            "TopkCertificate.kl is deprecated; use kl_upper", DeprecationWarning, stacklevel=2
        )
        return self.kl_upper

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the batch (the logits' shape without the key axis)."""
        return tuple(self.k.shape)

    def kept_mask(self) -> Array:
        """Boolean mask of the kept keys, same shape as the logits.

        Row ``r`` keeps its ``k[r]`` largest logits; ties at the cut go to the earlier
        key.  Masked keys are never kept.
        """
        return topk_mask(self._logits, self.k, axis=self.axis)

    @cached_property
    def cut(self) -> Array:
        """The smallest kept logit per row: float64, batch shape (computed once, on use).

        The ``k``-th largest valid logit of the row, exactly; ``+inf`` for fully masked
        rows (``k = 0``).  Tie rule: ``logits >= cut`` keeps every key tied at the cut, so
        it keeps at least ``k`` keys (exactly ``k`` without ties) and never a masked one;
        ``tail_upper`` bounds its dropped mass (module docstring, "The cut logit").  Count
        the kept keys from that comparison, not from ``k``, where ties matter.
        """
        return topk_cut(self._logits, self.k, axis=self.axis)

    def kept_indices(self) -> Array:
        """Indices of the kept keys, largest logit first, padded with ``-1``.

        Shape: batch shape + ``(max(k),)``; row ``r`` holds ``k[r]`` valid indices.
        """
        x = self._logits
        xp, _ = namespace(x)
        if self.axis not in (-1, x.ndim - 1):
            x = xp.moveaxis(x, self.axis, -1)
        width = int(xp.max(self.k)) if self.k.size else 0
        order = xp.argsort(x, axis=-1, descending=True, stable=True)[..., :width]
        pos = xp.arange(width, device=device_of(x))
        keep = pos < xp.astype(self.k, pos.dtype)[..., None]
        return xp.where(keep, order, xp.full_like(order, -1))


def topk_cut(logits: Any, k: Any, *, axis: int = -1) -> Array:
    """The ``k``-th largest valid logit per row (float64; ``+inf`` where ``k`` is 0).

    ``k`` is clipped to the row's valid keys (so ``-inf`` is never the cut).  Rows are
    sorted in chunks of about ``2^22`` keys (NumPy's value sort, several times faster
    than the ranking of :meth:`TopkCertificate.kept_mask`).
    """
    x, xp, dev = as_float_array(logits, name="logits")
    if axis not in (-1, x.ndim - 1):
        x = xp.moveaxis(x, axis, -1)
    batch = tuple(int(d) for d in x.shape[:-1])
    n = int(x.shape[-1])
    rows = math.prod(batch)
    flat = xp.reshape(x, (rows, n))
    kk = xp.reshape(xp.astype(xp.asarray(k, device=dev), xp.int64), (rows,))
    step = max(1, (1 << 22) // max(n, 1))
    parts = []
    for start in range(0, rows, step):
        chunk = flat[start:start + step, ...]
        if is_numpy(xp) and chunk.dtype.itemsize < 4:
            chunk = chunk.astype(np.float32)  # exact; NumPy sorts float32 natively
        srt = xp.sort(chunk, axis=-1, stable=False)  # ascending, -inf first (values only)
        n_valid = xp.astype(xp.count_nonzero(srt > -xp.inf, axis=-1), xp.int64)
        kc = xp.minimum(kk[start:start + step], n_valid)
        idx = xp.reshape(xp.clip(n - kc, 0, n - 1), (-1, 1))
        cut = xp.astype(xp.take_along_axis(srt, idx, axis=-1)[:, 0], xp.float64)
        parts.append(xp.where(kc > 0, cut, xp.full_like(cut, math.inf)))
    if not parts:
        return xp.reshape(xp.zeros(0, dtype=xp.float64, device=dev), batch)
    return xp.reshape(xp.concat(parts) if len(parts) > 1 else parts[0], batch)


def certify_topp(
    logits: Any,
    p: float,
    *,
    axis: int = -1,
    masked_rows: str = "error",
    progress: Callable[[int, int], None] | None = None,
) -> TopkCertificate:
    """Certified top-p (nucleus) selection: :func:`certify_topk` with ``eps = 1 - p``.

    Top-p with ``p = 1 - eps`` is exactly a TV budget (Theorem BUDGET-EQUIV): the kept
    keys carry at least mass ``p`` of the exact softmax.  ``p`` must lie in (0, 1].
    """
    eps = topp_budget(p)
    return certify_topk(logits, eps, axis=axis, masked_rows=masked_rows, progress=progress)


def topp_budget(p: float) -> float:
    """The largest float64 TV budget at most the exact ``1 - p`` (``p`` in (0, 1])."""
    pv = check_number(p, name="p", low=0.0, high=1.0, closed_low=False, closed_high=True)
    # fl(1 - p) can round above the exact 1 - p when p < 1/2: step down to the largest
    # float budget that does not exceed it, so the kept mass is at least p exactly.
    eps = 1.0 - pv
    if Fraction(eps) > 1 - Fraction(pv):
        eps = math.nextafter(eps, 0.0)
    return eps


def certify_topk(
    logits: Any,
    eps: float,
    *,
    axis: int = -1,
    masked_rows: str = "error",
    progress: Callable[[int, int], None] | None = None,
) -> TopkCertificate:
    r"""Smallest sound Top-k per row: the exact :math:`k_\varepsilon` up to a rounding margin.

    Implements the tail-mass certificate of Theorems TV-TAIL and TV-KL (Lemma 4.1 and
    Thm 4.3 of Tzachristas et al.): keeping the ``k`` largest logits loses
    :math:`\mathrm{TV}(P,\hat P) = \tau_k \le \varepsilon`.

    Parameters
    ----------
    logits : array
        Any real floating dtype (float16, bfloat16, float32, float64) of any array-API
        library; ``-inf`` marks masked keys.  Need not be sorted.
    eps : float
        TV budget in [0, 1).  ``eps = 0`` keeps every valid key.
    axis : int
        The key axis.
    masked_rows : {"error", "skip"}
        What to do with rows whose keys are all masked: raise, or give them ``k = 0``,
        ``tail_mass = 0`` and flag them in ``masked``.
    progress : callable, optional
        Called as ``progress(rows_done, rows_total)`` after each chunk of rows.

    Returns
    -------
    TopkCertificate
        ``k``, ``tail_upper`` (sound upper bound on the exact tail, at most ``eps``),
        ``kl_upper``, ``n_valid``, ``masked``; arrays in the input's namespace and device.

    Notes
    -----
    The rounding analysis is in the module docstring: ``k`` is never below the exact
    minimal :math:`k_\varepsilon` and exceeds it only when the exact tail of ``k - 1``
    keys is within a relative :math:`10^{-9}` of eps (for ``n`` up to :math:`10^6`).
    Work is done in row chunks of bounded size, so peak extra memory does not grow with
    the batch: about 2^20 keys a chunk on NumPy (some 12 MiB of scratch per worker
    thread, ``CERTATTN_NUM_THREADS`` of them, kept between calls), 64 MiB of float64
    temporaries on other array libraries.  A dask array is certified lazily, one task per
    block of rows (:func:`certattn._dask.certify_topk_dask`; errors surface at compute).
    A row is never split, so on the NumPy path a
    row longer than a chunk needs about 10 bytes a key (159 MiB for a 2^24-key float32
    row, tracemalloc); the compiled path (``certattn[fast]``, :mod:`certattn._topk_numba`,
    chosen by ``CERTATTN_KERNEL``) streams long rows in under 1 MiB per worker thread.

    Raises
    ------
    ValueError
        NaN or ``+inf`` logits, an empty key axis, a fully masked row (unless
        ``masked_rows="skip"``), ``eps`` outside [0, 1).
    """
    lazy = adapter("certify_topk", logits)  # dask: lazily, block by block (certattn._dask)
    if lazy is not None:
        return lazy(logits, eps, axis=axis, masked_rows=masked_rows, progress=progress)
    eps = check_eps(eps)
    if masked_rows not in ("error", "skip"):
        raise InputError(f"masked_rows must be 'error' or 'skip', got {masked_rows!r}")
    x, xp, _ = as_float_array(logits, name="logits")
    if x.ndim == 0:
        raise InputError("logits must have a key axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise InputError(f"axis {axis} is out of range for logits of shape {tuple(x.shape)}")
    xl = xp.moveaxis(x, axis, -1) if axis not in (-1, x.ndim - 1) else x
    n = int(xl.shape[-1])
    batch = tuple(int(s) for s in xl.shape[:-1])
    rows = math.prod(batch)
    if n == 0:
        check_logits(xl, xp)  # raises: empty key axis
    flat = xp.reshape(xl, (rows, n))
    try:
        k, tail, n_valid, row_top = _certify_rows(flat, eps, xp=xp, progress=progress)
    except Exception:
        check_logits(flat if batch else xl, xp)  # bad input explains the failure: say so
        raise
    # NaN and +inf propagate into row_top: a clear error, never a wrong answer.
    check_logits(flat if batch else xl, xp, row_max=row_top)
    masked = n_valid == 0
    if masked_rows == "error" and bool(xp.any(masked)):
        pos = first_bad_position(xp.reshape(masked, batch) if batch else masked)
        where = f"row {pos if len(pos) > 1 else pos[0]}" if batch else "the only row"
        raise InputError(f"logits are fully masked (all -inf) in {where}")

    k = xp.where(masked, xp.zeros_like(k), k)
    tail = xp.where(masked, xp.zeros_like(tail), tail)
    kl = kl_upper_from_tail(tail, xp)  # KL(P_hat || P) = -log1p(-tail), rounded up
    return TopkCertificate(
        k=xp.reshape(k, batch),
        tail_upper=xp.reshape(tail, batch),
        kl_upper=xp.reshape(kl, batch),
        n_valid=xp.reshape(n_valid, batch),
        masked=xp.reshape(masked, batch),
        eps=eps,
        n=n,
        axis=axis,
        _logits=x,
    )


# --------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------


def _chunk(
    chunk: Array,
    eps: float,
    gamma: float,
    xp: Any,
    cut: Callable[..., tuple[Array, Array]] | None,
    *,
    terms: Callable[[Array, float | None], Array] | None = None,
) -> tuple[Array, Array, Array, Array]:
    """``(k, tail before widening, n_valid, row_top)`` of one ``(rows, n)`` chunk.

    ``cut(e, budget[, xp])`` finds the tail: the NumPy bracket (``terms`` given, with
    the logits and shifts), the sort-free array kernel, or (None) the sorted kernel.
    """
    rows, n = chunk.shape
    lowest = float(xp.min(chunk))  # NaN if the chunk holds NaN
    if lowest > -math.inf:
        n_valid = xp.full((rows,), n, dtype=xp.int64, device=device_of(chunk))
    elif terms is not None:
        n_valid = _np_path.valid_counts(chunk)
    else:
        n_valid = xp.astype(xp.count_nonzero(chunk > -xp.inf, axis=-1), xp.int64)
    zeros = xp.zeros(rows, dtype=xp.float64, device=device_of(chunk))
    if eps == 0.0:  # every valid key has positive exact mass: keep them all
        return n_valid, zeros, n_valid, xp.max(chunk, axis=-1)
    e, c, z, top, alpha = exp_terms(chunk, eps, xp, lowest, terms=terms)
    if e is None:  # NaN or +inf in the chunk: skip the work, the caller raises
        return n_valid, zeros, n_valid, top
    z_lo = z * (1.0 - gamma) - alpha
    # accept a tail T-hat iff T-hat * (1 + gamma) + alpha <= eps * z_lo
    budget = (eps * z_lo - alpha) / (1.0 + gamma)
    if terms is not None:
        t, t_hat = cut(chunk, e, c, budget)
    else:
        t, t_hat = (cut or cut_sorted)(e, budget, xp)
    return n - t, (t_hat * (1.0 + gamma) + alpha) / z_lo, n_valid, top


def _triton_chunk(xp: Any, fallback: Callable[..., Any]) -> Callable[..., Any]:
    """The Triton kernel's per-chunk function (imported only when it is chosen)."""
    from . import _topk_triton

    return _topk_triton.chunk_function(fallback)


def _certify_rows(
    flat: Array,
    eps: float,
    *,
    xp: Any,
    progress: Callable[[int, int], None] | None,
) -> tuple[Array, Array, Array, Array]:
    """``(k, tail_upper, n_valid, row_top)`` for a (rows, n) batch, chunk by chunk.

    Everything per row happens inside the chunks (in parallel threads on NumPy).  Fully
    masked rows give meaningless ``k`` and ``tail`` (the caller decides); rows with NaN
    or ``+inf`` are caught by the caller from ``row_top``, which is NaN or ``+inf``
    exactly for those rows (a row maximum or a row sum of terms).
    """
    rows, n = flat.shape
    gamma = 2.0 * (n + 4096) * U + GAMMA_EXP
    route = device_kernel(xp, flat, _nb_path.choice())  # "triton", "array" or None
    fast = is_numpy(xp) and route is None
    compiled = _nb_path.chunk_function(rows, n) if fast else None  # certattn[fast]
    cut = _np_path.cut_bracket if fast else cut_search if route else None
    if route == "triton":  # rows it cannot settle go to the array kernel, same chunk code
        compiled = _triton_chunk(xp, lambda sub, e_, g_: _chunk(sub, e_, g_, xp, cut))
    workers = _np_path.threads() if fast else 1
    if fast:
        step = _np_path.chunk_rows(rows, n, workers)
    else:
        step = max(1, _CHUNK_BYTES // (8 * max(n, 1)))

    def one_chunk(start: int) -> tuple[Array, Array, Array, Array]:
        chunk = flat[start:min(rows, start + step), ...]
        if fast and chunk.dtype.itemsize < 4:  # float16, bfloat16: exact in float32, and
            chunk = _np_path.as_float32(chunk)  # NumPy compares and casts those natively
        if compiled is not None:  # numba or Triton: same terms, test and analysis
            return compiled(chunk, eps, gamma)
        return _chunk(chunk, eps, gamma, xp, cut, terms=_np_path.terms if fast else None)

    starts = range(0, rows, step)
    parts: list[tuple[Array, Array, Array, Array]] = []
    # NumPy releases the GIL in every heavy call of a chunk: spread chunks over the cores.
    if min(workers, len(starts)) > 1:  # the pool keeps its threads whatever the count
        chunks = _np_path.pool(workers).map(one_chunk, starts)
    else:
        chunks = map(one_chunk, starts)
    for start, part in zip(starts, chunks, strict=True):
        parts.append(part)
        if progress is not None:
            progress(min(rows, start + step), rows)
    if not parts:  # no rows at all
        empty = xp.zeros(0, dtype=xp.float64, device=device_of(flat))
        ints = xp.zeros(0, dtype=xp.int64, device=device_of(flat))
        return ints, empty, ints, empty
    k, tail, n_valid, row_top = (
        xp.concat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(4)
    )
    k = xp.astype(k, xp.int64)
    if eps == 0.0:
        return k, tail, n_valid, row_top
    # Cover the rounding of the division: relative for normal results, absolute (half a
    # subnormal spacing) for subnormal ones, so a positive tail never rounds to zero.
    tail = tail * (1.0 + 4 * U) + SMALLEST
    tail = xp.where(k < n_valid, tail, xp.zeros_like(tail))
    return k, xp.minimum(tail, eps), n_valid, row_top
