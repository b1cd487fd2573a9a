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
  reported ``tail_mass`` is never below the exact :math:`\tau_k` (and never above eps);
* **minimal up to the margin**: ``k`` exceeds :math:`k_\varepsilon` only if the exact
  :math:`\tau_{k-1}` lies within a relative :math:`3\gamma + 10^{-12}` of eps (far inside the
  promised :math:`10^{-6}`).

Ties are harmless: :math:`\tau_k` depends only on the multiset of the ``n - k`` smallest
logits; :meth:`TopkCertificate.kept_mask` breaks ties at the cut by position.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ._array import as_float_array, device_of, is_numpy, namespace
from ._validate import check_eps, check_logits, check_number, first_bad_position

__all__ = ["TopkCertificate", "certify_topk", "certify_topp"]

Array = Any

_U = 2.0**-53  # unit roundoff of float64
_TINY = 2.0**-1073  # bound on the absolute error of one underflowing exp
_SMALLEST = 2.0**-1074  # smallest positive float64
_GAMMA_TERM = 2100 * _U
_FLOOR = -700.0  # exponents below are raised to it before exp (see _exp_terms)
_CHUNK_BYTES = 1 << 26  # 64 MiB of float64 temporaries per chunk (generic path)
_FAST_KEYS = 1 << 20  # keys per chunk of the NumPy fast path
_THREAD_KEYS = 1 << 18  # fewest keys per chunk worth a hand-off to a worker thread


@dataclass(frozen=True)
class TopkCertificate:
    r"""A certified Top-k truncation of every row of a batch of logits.

    Attributes
    ----------
    k : integer array, batch shape
        Keys to keep per row: never below the exact minimal :math:`k_\varepsilon`.
    tail_mass : float64 array, batch shape
        Sound upper bound on the exact discarded mass :math:`\tau_k` of the kept set,
        never above ``eps`` (it equals TV by Theorem TV-TAIL).
    kl : float64 array, batch shape
        ``-log1p(-tail_mass)``: a sound upper bound on :math:`\mathrm{KL}(\hat P\Vert P)`
        (Theorem TV-KL).
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
    tail_mass: Array
    kl: Array
    n_valid: Array
    masked: Array
    eps: float
    n: int
    axis: int
    _logits: Array

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the batch (the logits' shape without the key axis)."""
        return tuple(self.k.shape)

    def kept_mask(self) -> Array:
        """Boolean mask of the kept keys, same shape as the logits.

        Row ``r`` keeps its ``k[r]`` largest logits; ties at the cut go to the earlier
        key.  Masked keys are never kept.
        """
        from .distribution import topk_mask

        return topk_mask(self._logits, self.k, axis=self.axis)

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
    pv = check_number(p, name="p", low=0.0, high=1.0, closed_low=False, closed_high=True)
    # fl(1 - p) can round above the exact 1 - p when p < 1/2: step down to the largest
    # float budget that does not exceed it, so the kept mass is at least p exactly.
    eps = 1.0 - pv
    if Fraction(eps) > 1 - Fraction(pv):
        eps = math.nextafter(eps, 0.0)
    return certify_topk(logits, eps, axis=axis, masked_rows=masked_rows, progress=progress)


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
        ``k``, ``tail_mass`` (sound upper bound on the exact tail, at most ``eps``),
        ``kl``, ``n_valid``, ``masked``; arrays in the input's namespace and device.

    Notes
    -----
    The rounding analysis is in the module docstring: ``k`` is never below the exact
    minimal :math:`k_\varepsilon` and exceeds it only when the exact tail of ``k - 1``
    keys is within a relative :math:`10^{-9}` of eps (for ``n`` up to :math:`10^6`).
    Work is done in row chunks of bounded size (64 MiB of float64 temporaries), so
    peak extra memory does not grow with the batch.

    Raises
    ------
    ValueError
        NaN or ``+inf`` logits, an empty key axis, a fully masked row (unless
        ``masked_rows="skip"``), ``eps`` outside [0, 1).
    """
    eps = check_eps(eps)
    if masked_rows not in ("error", "skip"):
        raise ValueError(f"masked_rows must be 'error' or 'skip', got {masked_rows!r}")
    x, xp, _ = as_float_array(logits, name="logits")
    if x.ndim == 0:
        raise ValueError("logits must have a key axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for logits of shape {tuple(x.shape)}")
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
        raise ValueError(f"logits are fully masked (all -inf) in {where}")

    k = xp.where(masked, xp.zeros_like(k), k)
    tail = xp.where(masked, xp.zeros_like(tail), tail)
    # KL(P_hat || P) = -log1p(-tail), rounded up so it stays an upper bound.
    kl = -xp.log1p(-tail)
    kl = xp.where(tail > 0, xp.nextafter(kl, xp.full_like(kl, math.inf)), kl)
    return TopkCertificate(
        k=xp.reshape(k, batch),
        tail_mass=xp.reshape(tail, batch),
        kl=xp.reshape(kl, batch),
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
    gamma = 2.0 * (n + 4096) * _U + _GAMMA_TERM
    fast = is_numpy(xp)
    workers = _threads() if fast else 1
    if fast:  # about 2^20 keys a chunk (8 MiB of float64), and work for every thread,
        # but at least 2^18 keys a chunk: a thread hand-off costs more than smaller work
        step = min(_FAST_KEYS // max(n, 1), -(-rows // workers))
        step = max(1, step, _THREAD_KEYS // max(n, 1))
    else:
        step = max(1, _CHUNK_BYTES // (8 * max(n, 1)))

    def one_chunk(start: int) -> tuple[Array, Array, Array, Array]:
        stop = min(rows, start + step)
        chunk = flat[start:stop, ...]
        if fast and chunk.dtype.itemsize < 4:  # float16, bfloat16: exact in float32, and
            chunk = chunk.astype(np.float32)  # NumPy compares and casts those natively
        lowest = float(xp.min(chunk))  # NaN if the chunk holds NaN
        if lowest > -math.inf:
            n_valid = xp.full((stop - start,), n, dtype=xp.int64, device=device_of(flat))
        elif fast:
            n_valid = _popcount_rows(np.packbits(chunk > -np.inf, axis=1))
        else:
            n_valid = xp.astype(xp.count_nonzero(chunk > -xp.inf, axis=-1), xp.int64)
        zeros = xp.zeros(stop - start, dtype=xp.float64, device=device_of(flat))
        if eps == 0.0:  # every valid key has positive exact mass: keep them all
            return n_valid, zeros, n_valid, xp.max(chunk, axis=-1)
        e, c, z, top, alpha = _exp_terms(chunk, eps, xp, lowest)
        if e is None:  # NaN or +inf in the chunk: skip the work, the caller raises
            return n_valid, zeros, n_valid, top
        z_lo = z * (1.0 - gamma) - alpha
        # accept a tail T-hat iff T-hat * (1 + gamma) + alpha <= eps * z_lo
        budget = (eps * z_lo - alpha) / (1.0 + gamma)
        t, t_hat = _cut_bracket(chunk, e, c, budget) if fast else _cut_sorted(e, budget, xp)
        return n - t, (t_hat * (1.0 + gamma) + alpha) / z_lo, n_valid, top

    starts = range(0, rows, step)
    parts: list[tuple[Array, Array, Array, Array]] = []
    # NumPy releases the GIL in every heavy call of a chunk: spread chunks over the cores.
    workers = min(workers, len(starts))
    chunks = _pool(workers).map(one_chunk, starts) if workers > 1 else map(one_chunk, starts)
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
    tail = tail * (1.0 + 4 * _U) + _SMALLEST
    tail = xp.where(k < n_valid, tail, xp.zeros_like(tail))
    return k, xp.minimum(tail, eps), n_valid, row_top


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads of the NumPy path, started once and kept (each keeps its
    scratch buffer, :func:`_workspace`, so repeated calls reuse warm memory)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != workers:
            if _POOL is not None:
                _POOL[1].shutdown(wait=False)
            _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="certattn"))
        return _POOL[1]


def _forget_pool() -> None:
    """In a forked child the parent's threads do not exist: start afresh."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _threads() -> int:
    """Worker threads for the NumPy path: ``CERTATTN_NUM_THREADS`` or the usable cores."""
    env = os.environ.get("CERTATTN_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _exp_terms(
    x: Array, eps: float, xp: Any, lowest: float
) -> tuple[Array | None, Array, Array, Array, float]:
    r"""Terms :math:`\hat e_i \approx e^{s_i - c}` in float64, ``c``, their row sums.

    Returns ``(e, c, z, top, alpha)``.  The common factor :math:`e^{-c}` cancels in every
    ratio, so ``c`` only has to keep the terms in range.  First ``c = 0``: ``exp`` of the
    exact float64 value of each logit, no rounded subtraction.  It is kept when every row
    sum satisfies :math:`e^{-650}/\varepsilon \le Z \le e^{700}` (all practical logits):
    then no term overflowed and ``alpha`` is negligible against :math:`\varepsilon Z`.
    Otherwise ``c = m - shift`` per row (``m`` the row maximum), formed as
    ``(s - m) + shift``, where ``shift = max(0, -log(eps) - 600)`` lifts tiny budgets
    clear of underflow.

    Exponents below ``_FLOOR`` (masked keys included) are raised to it first when the
    chunk has any (``lowest`` is its minimum): ``exp`` then never produces a subnormal
    or a zero, which costs NumPy several times the normal speed.  A raised term
    over-estimates its exact value, by at most :math:`e^{-699}`; ``alpha`` bounds the
    total absolute error of the terms, :math:`n e^{-699}` with raising, else
    :math:`n 2^{-1073}` (underflow).

    ``top`` is finite exactly for the rows without NaN or ``+inf`` (the row sums on the
    first path, the row maxima on the second) and feeds the caller's input check; ``e``
    is ``None`` when some row has NaN or ``+inf``.
    """
    n = x.shape[-1]
    raised = not lowest >= _FLOOR
    alpha = n * (math.exp(_FLOOR + 1.0) if raised else _TINY)
    with np.errstate(over="ignore"):  # an overflow only sends the chunk on
        if is_numpy(xp) and raised:  # raise into the float64 buffer, exp in place
            e = np.exp(np.maximum(x, _FLOOR, out=_workspace(x.shape)), out=_workspace(x.shape))
        elif is_numpy(xp):
            e = _exp64(x, out=_workspace(x.shape))
        else:
            e = xp.exp(xp.astype(xp.clip(x, min=_FLOOR) if raised else x, xp.float64))
    z = xp.sum(e, axis=-1)
    z_min, z_max = math.exp(-650.0) / eps, math.exp(700.0)
    if bool(xp.all(xp.logical_and(z >= z_min, z <= z_max))):  # False for NaN
        return e, xp.zeros_like(z[:, None]), z, z, alpha
    m = xp.max(x, axis=-1)
    if not bool(xp.all(m < xp.inf)):
        return None, m, z, m, alpha
    shift = max(0.0, -math.log(eps) - 600.0)
    top = m
    m = xp.reshape(xp.astype(m, xp.float64), (-1, 1))
    m = xp.where(m > -xp.inf, m, xp.zeros_like(m))  # fully masked rows: any shift
    e = xp.exp(xp.clip((xp.astype(x, xp.float64) - m) + shift, min=_FLOOR))
    return e, m - shift, xp.sum(e, axis=-1), top, n * math.exp(_FLOOR + 1.0)


def _exp64(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``exp`` of a NumPy float array computed and returned in float64 (one pass)."""
    if a.dtype in (np.float16, np.float32, np.float64):
        return np.exp(a, dtype=np.float64, out=out)
    return np.exp(a.astype(np.float64), out=out)  # e.g. ml_dtypes' bfloat16


_local = threading.local()


def _workspace(shape: tuple[int, ...]) -> np.ndarray:
    """A float64 scratch array of ``shape``, reused by the calling thread.

    The terms of a chunk are recomputed for every chunk; reusing one buffer per thread
    saves the page faults of a fresh multi-MiB allocation each time (about 20% of the
    ``exp`` pass).  Nothing returned from a chunk may point into it.  Only chunk-sized
    buffers are kept (a row longer than a chunk gets a fresh one), so the threads hold at
    most 8 MiB each between calls.
    """
    size = math.prod(shape)
    if size > _FAST_KEYS:
        return np.empty(shape)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size)
    return buf[:size].reshape(shape)


_SAMPLE = 512  # keys sampled per row to place the bracket (NumPy fast path)
_BLOCK = 16  # sample ranks per block of the two-level prefix sum
_HALF_WIDTHS = (8, 24)  # bracket half-widths tried in turn, in sample ranks


def _cut_bracket(
    x: np.ndarray, e: np.ndarray, c: np.ndarray, budget: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy fast path of :func:`_cut_sorted`: the same answer without sorting rows.

    A strided sample of each row (``_SAMPLE`` keys, or a quarter of a shorter row)
    estimates where the cumulative tail crosses the budget; its neighbours in sample
    rank give a bracket ``[lo, hi)`` of logit values.  Keys below ``lo`` are summed
    exactly (in float64, one pass), keys in the bracket are sorted, and the tail grows
    from the small end as in the generic kernel.  The answer is exact whenever the
    crossing falls inside the bracket, which is checked: rows where it does not get a
    wider bracket (``_HALF_WIDTHS``), and the rare rows that still miss are sorted.  The
    sample only steers the work; it never enters a sum that is certified.
    """
    r, n = x.shape
    m = min(_SAMPLE, n // 4 // _BLOCK * _BLOCK)  # sample size: whole blocks, stride >= 4
    if m < 2 * _BLOCK:  # rows too short to be worth a sample
        import array_api_compat.numpy as xnp

        return _cut_sorted(e, budget, xnp)
    stride = n // m
    samp = np.sort(x[:, ::stride][:, :m], axis=1)  # exact order, x's own dtype
    j = _sample_rank(samp, c, budget * (m / n))
    t = np.empty(r, dtype=np.int64)
    t_hat = np.empty(r)
    todo = np.arange(r)
    # The rank error of the estimate grows like the square root of the sample size.
    scale = math.sqrt(m / _SAMPLE)
    for half in (max(min(h, 1), round(h * scale)) for h in _HALF_WIDTHS):
        sel = todo if todo.size < r else slice(None)
        tt, th, miss = _bracket_pass(x[sel], e[sel], samp[sel], j[sel], half, budget[sel])
        t[todo], t_hat[todo] = tt, th
        todo = todo[miss]
        if todo.size == 0:
            return t, t_hat
    # Still outside every bracket: sort those rows (same arithmetic as _cut_sorted).
    cs = np.cumsum(np.sort(e[todo], axis=1), axis=1)
    t_m = (cs <= budget[todo][:, None]).sum(axis=1)
    t[todo] = t_m
    t_hat[todo] = np.where(t_m > 0, cs[np.arange(t_m.size), np.maximum(t_m - 1, 0)], 0.0)
    return t, t_hat


def _sample_rank(samp: np.ndarray, c: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Per row, how many of the ascending ``samp`` fit under ``thr`` (an estimate only).

    ``thr`` is in the units of the terms ``exp(s - c)``.  The rank only steers the
    bracket, so single precision will do: the sample terms are taken relative to the
    sample maximum, summed in blocks of ``_BLOCK``, and one cumulative sum over the
    block totals finds the crossing block, a second one inside it the crossing rank
    (a full row ``cumsum`` is several times slower).
    """
    r, m = samp.shape
    s = samp if samp.dtype.itemsize >= 4 else samp.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        top = s[:, -1:]
        top = np.where(np.isfinite(top), top, np.zeros_like(top))  # all-masked sample
        est = np.exp(s - top)  # in (0, 1]; masked keys give 0
        thr = thr * np.exp(c[:, 0] - top[:, 0].astype(np.float64))
    blocks = est.reshape(r, m // _BLOCK, _BLOCK)
    cb = np.cumsum(np.einsum("ijk->ij", blocks), axis=1)  # faster than sum(axis=2)
    jb = (cb <= thr[:, None]).sum(axis=1)  # whole blocks under the threshold
    rows = np.arange(r)
    inner = np.minimum(jb, cb.shape[1] - 1)
    base = np.where(jb > 0, cb[rows, np.maximum(jb - 1, 0)], 0.0)
    part = np.cumsum(blocks[rows, inner], axis=1) + base[:, None]
    within = (part <= thr[:, None]).sum(axis=1)
    return jb * _BLOCK + np.where(jb < cb.shape[1], within, 0)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_rows(packed: np.ndarray) -> np.ndarray:
    """Set bits per row of a 2-D ``uint8`` array (int64)."""
    bits = np.bitwise_count(packed) if hasattr(np, "bitwise_count") else _POPCOUNT8[packed]
    return bits.sum(axis=1, dtype=np.int64)


def _packed_positions(packed: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row, flat)`` of every set bit of a row-wise packed ``(r, n)`` boolean array.

    ``packed`` is ``np.packbits(mask, axis=1)``; ``flat = row * n + column`` indexes the
    C-ordered ``(r, n)`` array.  Scans the packed bytes (an eighth of the bits) for the
    non-zero ones and unpacks only those: about twice as fast as ``np.nonzero`` on the
    boolean array when set bits are few.
    """
    nb = packed.shape[1]
    flat = packed.ravel()
    hit = np.flatnonzero(flat != 0)
    sub = np.flatnonzero(np.unpackbits(flat[hit]).view(bool))
    byte = hit[sub >> 3]
    row = byte // nb
    pos = (byte << 3) | (sub & 7)  # bit index in the packed layout
    if n != 8 * nb:  # rows were padded to whole bytes: drop the padding
        pos -= row * (8 * nb - n)
    return row, pos


def _bracket_pass(
    x: np.ndarray, e: np.ndarray, samp: np.ndarray, j: np.ndarray, half: int,
    budget: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One bracket of ``half`` sample ranks around ``j``: ``(t, t_hat, miss)`` per row."""
    r = x.shape[0]
    m = samp.shape[1]
    ends = np.take_along_axis(samp, np.clip(np.stack([j - half, j + half], 1), 0, m - 1), 1)
    # Thresholds stay in the logits' dtype, so the comparisons below never cast x.
    # lo is at least the most negative finite value: masked keys always count as below
    # (their raised terms are summed there) and never crowd the bracket.
    lo = np.where(j - half >= 0, ends[:, 0], -np.inf).astype(x.dtype, copy=False)
    lo = np.maximum(lo, -np.finfo(x.dtype).max)
    hi = np.where(j + half < m, ends[:, 1], np.inf).astype(x.dtype, copy=False)
    hi = np.maximum(hi, lo)  # so that x < lo implies x < hi
    below = x < lo[:, None]
    s_lo = np.einsum("ij,ij->i", e, below)  # float64 sum of the keys below, one pass
    packed_lo = np.packbits(below, axis=1)
    n_lo = _popcount_rows(packed_lo)
    # Keys in [lo, hi): the bits of x < hi that are not below lo (below is a subset).
    packed_mid = np.packbits(np.less(x, hi[:, None], out=below), axis=1)
    np.bitwise_xor(packed_mid, packed_lo, out=packed_mid)
    ri, pos = _packed_positions(packed_mid, x.shape[1])
    vals = e.ravel()[pos]
    widths = np.bincount(ri, minlength=r)
    w = int(widths.max()) if r else 0
    # Row i's bracket terms go to pad[i, 1:1 + widths[i]]; pad[i, 0] holds s_lo.
    pad = np.full((r, w + 1), np.inf)
    pad[:, 0] = s_lo
    first = np.cumsum(widths) - widths  # index in ``vals`` of each row's first term
    slot = np.arange(vals.size) + (ri * (w + 1) + 1 - first[ri])
    pad.ravel()[slot] = vals
    pad[:, 1:].sort(axis=1)
    cs = np.cumsum(pad, axis=1)
    extra = (cs[:, 1:] <= budget[:, None]).sum(axis=1)
    # Exact iff the prefix below the bracket fits and some bracket key does not.
    miss = (s_lo > budget) | (extra >= widths)
    return n_lo + extra, cs[np.arange(r), extra], miss


def _cut_sorted(e: Array, budget: Array, xp: Any) -> tuple[Array, Array]:
    """Generic kernel: longest prefix of the ascending order whose sum <= budget.

    Returns ``(t, T)``: the number of tail keys and the computed tail sum (float64,
    accumulated from the small end).
    """
    es = xp.sort(e, axis=-1)
    cs = xp.cumulative_sum(es, axis=-1)
    ok = cs <= budget[:, None]
    t = xp.astype(xp.count_nonzero(ok, axis=-1), xp.int64)
    idx = xp.reshape(xp.where(t > 0, t - 1, xp.zeros_like(t)), (-1, 1))
    t_hat = xp.take_along_axis(cs, idx, axis=-1)[:, 0]
    t_hat = xp.where(t > 0, t_hat, xp.zeros_like(t_hat))
    return t, t_hat
