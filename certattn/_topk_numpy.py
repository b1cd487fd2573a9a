r"""NumPy fast path of :func:`certattn.certify_topk`: threads, scratch memory, the bracket.

The generic kernel (:func:`certattn._topk_generic.cut_sorted`) sorts every row.  On NumPy the cut
is found without sorting rows: a strided sample of each row places a bracket around the
cut, the keys below it are summed exactly in one masked pass, and only the keys inside the
bracket (about 3% of a row) are sorted.  The sample only steers the work; every sum that
is certified is a float64 sum of the same terms as in the generic kernel, so the rounding
analysis of :mod:`certattn.topk` applies unchanged.

Chunks of rows run on a kept pool of worker threads (NumPy releases the GIL in every heavy
call), each with its own reusable float64 buffer for the terms.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import array_api_compat.numpy as _XNP
import numpy as np

from ._backends import usable_cores
from ._topk_generic import cut_sorted

FAST_KEYS = 1 << 20  # keys per chunk
THREAD_KEYS = 1 << 18  # fewest keys per chunk worth a hand-off to a worker thread


def chunk_rows(rows: int, n: int, workers: int) -> int:
    """Rows per chunk: about 2^20 keys (8 MiB of float64 terms) and work for every
    thread, but at least 2^18 keys (a thread hand-off costs more than smaller work)."""
    step = min(FAST_KEYS // max(n, 1), -(-rows // workers))
    return max(1, step, THREAD_KEYS // max(n, 1))


def valid_counts(chunk: np.ndarray) -> np.ndarray:
    """Keys above ``-inf`` per row (int64)."""
    valid = np.greater(chunk, -np.inf, out=workspace(chunk.shape, "valid", bool))
    return popcount_rows(np.packbits(valid, axis=1))


def as_float32(chunk: np.ndarray) -> np.ndarray:
    """A float16 or bfloat16 chunk in float32 (exact), in a scratch buffer."""
    out = workspace(chunk.shape, "float32", np.float32)
    if chunk.dtype == np.float16:
        np.copyto(out, chunk)
    else:  # ml_dtypes' bfloat16 casts only through astype
        out[...] = chunk.astype(np.float32)
    return out


def terms(x: np.ndarray, floor: float | None) -> np.ndarray:
    """``exp`` of ``x`` (raised to ``floor`` first, if given) in float64, in the calling
    thread's ``"terms"`` buffer."""
    if floor is None:
        return np.exp(x, dtype=np.float64, out=workspace(x.shape, "terms"))
    # raise into the float64 buffer, exp in place
    e = np.maximum(x, floor, out=workspace(x.shape, "terms"))
    return np.exp(e, out=e)


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads of the NumPy path, started once and kept (each keeps its
    scratch buffer, :func:`workspace`, so repeated calls reuse warm memory)."""
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


def threads() -> int:
    """Worker threads for the NumPy path: ``CERTATTN_NUM_THREADS`` or the usable cores."""
    env = os.environ.get("CERTATTN_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(usable_cores(), 8))


_local = threading.local()


def workspace(shape: tuple[int, ...], name: str, dtype: Any = np.float64) -> np.ndarray:
    """The calling thread's scratch array ``name``, as ``shape`` and ``dtype``.

    Every chunk needs the same temporaries again; reusing them per thread saves the page
    faults of fresh allocations, which cost about a fifth of the running time on a
    virtual machine.  Each use has its own ``name``; nothing returned from a chunk may
    point into one.  Only chunk-sized buffers are kept (a row longer than a chunk gets
    fresh ones), so a thread holds at most about 16 MiB between calls.
    """
    size = math.prod(shape)
    if size > FAST_KEYS:
        return np.empty(shape, dtype=dtype)
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = bufs[name] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


SAMPLE = 512  # keys sampled per row to place the bracket (NumPy fast path)
BLOCK = 16  # sample ranks per block of the two-level prefix sum
HALF_WIDTHS = (8, 24)  # bracket half-widths tried in turn, in sample ranks


def cut_bracket(
    x: np.ndarray, e: np.ndarray, c: np.ndarray, budget: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy fast path of :func:`certattn._topk_generic.cut_sorted`, without sorting rows.

    A strided sample of each row (``SAMPLE`` keys, or a quarter of a shorter row)
    estimates where the cumulative tail crosses the budget; its neighbours in sample
    rank give a bracket ``[lo, hi)`` of logit values.  Keys below ``lo`` are summed
    exactly (in float64, one pass), keys in the bracket are sorted, and the tail grows
    from the small end as in the generic kernel.  The answer is exact whenever the
    crossing falls inside the bracket, which is checked: rows where it does not get a
    wider bracket (``HALF_WIDTHS``), and the rare rows that still miss are sorted.  The
    sample only steers the work; it never enters a sum that is certified.
    """
    r, n = x.shape
    m = min(SAMPLE, n // 4 // BLOCK * BLOCK)  # sample size: whole blocks, stride >= 4
    if m < 2 * BLOCK:  # rows too short to be worth a sample
        return sorted_cut(e, budget)
    stride = n // m
    samp = workspace((r, m), "sample", x.dtype)  # sorted in place: exact order, x's own dtype
    np.copyto(samp, x[:, ::stride][:, :m])
    samp.sort(axis=1)
    j = sample_rank(samp, c, budget * (m / n))
    t = np.empty(r, dtype=np.int64)
    t_hat = np.empty(r)
    todo = np.arange(r)
    # The rank error of the estimate grows like the square root of the sample size.
    scale = math.sqrt(m / SAMPLE)
    for half in (max(min(h, 1), round(h * scale)) for h in HALF_WIDTHS):
        sel = todo if todo.size < r else slice(None)
        tt, th, miss = bracket_pass(x[sel], e[sel], samp[sel], j[sel], half, budget[sel])
        t[todo], t_hat[todo] = tt, th
        todo = todo[miss]
        if todo.size == 0:
            return t, t_hat
    # Still outside every bracket: sort those rows.
    t[todo], t_hat[todo] = sorted_cut(e[todo], budget[todo])
    return t, t_hat


def sorted_cut(e: np.ndarray, budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The generic kernel (sort, sum from the small end, cut) on NumPy rows."""
    return cut_sorted(e, budget, _XNP)


def sample_rank(samp: np.ndarray, c: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Per row, how many of the ascending ``samp`` fit under ``thr`` (an estimate only).

    ``thr`` is in the units of the terms ``exp(s - c)``.  The rank only steers the
    bracket, so single precision will do: the sample terms are taken relative to the
    sample maximum, summed in blocks of ``BLOCK``, and one cumulative sum over the
    block totals finds the crossing block, a second one inside it the crossing rank
    (a full row ``cumsum`` is several times slower).
    """
    r, m = samp.shape  # float32 or float64: half precision was widened with its chunk
    with np.errstate(over="ignore", invalid="ignore"):
        top = samp[:, -1:]
        top = np.where(np.isfinite(top), top, np.zeros_like(top))  # all-masked sample
        est = np.subtract(samp, top, out=workspace(samp.shape, "estimate", samp.dtype))
        np.exp(est, out=est)  # in (0, 1]; masked keys give 0
        thr = thr * np.exp(c[:, 0] - top[:, 0].astype(np.float64))
    blocks = est.reshape(r, m // BLOCK, BLOCK)
    cb = np.cumsum(np.einsum("ijk->ij", blocks), axis=1)  # faster than sum(axis=2)
    jb = (cb <= thr[:, None]).sum(axis=1)  # whole blocks under the threshold
    rows = np.arange(r)
    inner = np.minimum(jb, cb.shape[1] - 1)
    base = np.where(jb > 0, cb[rows, np.maximum(jb - 1, 0)], 0.0)
    part = np.cumsum(blocks[rows, inner], axis=1) + base[:, None]
    within = (part <= thr[:, None]).sum(axis=1)
    return jb * BLOCK + np.where(jb < cb.shape[1], within, 0)


POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount_rows(packed: np.ndarray) -> np.ndarray:
    """Set bits per row of a 2-D ``uint8`` array (int64)."""
    bits = np.bitwise_count(packed) if hasattr(np, "bitwise_count") else POPCOUNT8[packed]
    return bits.sum(axis=1, dtype=np.int64)


def packed_positions(packed: np.ndarray, n: int) -> np.ndarray:
    """Flat indices ``row * n + column`` of the set bits of a packed ``(r, n)`` mask.

    ``packed`` is ``np.packbits(mask, axis=1)``; the indices address the C-ordered
    ``(r, n)`` array, in row-major order.  Scans the packed bytes (an eighth of the
    bits) for the non-zero ones and unpacks only those: about twice as fast as
    ``np.nonzero`` on the boolean array when set bits are few.
    """
    nb = packed.shape[1]
    flat = packed.ravel()
    hit = np.flatnonzero(np.not_equal(flat, 0, out=workspace(flat.shape, "nonzero", bool)))
    sub = np.flatnonzero(np.unpackbits(flat[hit]).view(bool))
    pos = hit[sub >> 3]  # the byte of each bit
    row = pos // nb if n != 8 * nb else None
    np.left_shift(pos, 3, out=pos)
    pos |= np.bitwise_and(sub, 7, out=sub)  # bit index in the packed layout
    if row is not None:  # rows were padded to whole bytes: drop the padding
        pos -= row * (8 * nb - n)
    return pos


def bracket_pass(
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
    below = np.less(x, lo[:, None], out=workspace(x.shape, "below", bool))
    s_lo = np.einsum("ij,ij->i", e, below)  # float64 sum of the keys below, one pass
    packed_lo = np.packbits(below, axis=1)
    n_lo = popcount_rows(packed_lo)
    # Keys in [lo, hi): the bits of x < hi that are not below lo (below is a subset).
    packed_mid = np.packbits(np.less(x, hi[:, None], out=below), axis=1)
    np.bitwise_xor(packed_mid, packed_lo, out=packed_mid)
    pos = packed_positions(packed_mid, x.shape[1])
    vals = np.take(e.ravel(), pos, out=workspace(pos.shape, "values"))  # row by row
    widths = popcount_rows(packed_mid)
    w = int(widths.max()) if r else 0
    # Row i's bracket terms go to pad[i, 1:1 + widths[i]]; pad[i, 0] holds s_lo.
    pad = workspace((r, w + 1), "pad")
    pad.fill(np.inf)
    pad[:, 0] = s_lo
    pad[:, 1:][np.arange(w) < widths[:, None]] = vals  # fills row by row, in order
    pad[:, 1:].sort(axis=1)
    cs = np.cumsum(pad, axis=1, out=pad)
    extra = (cs[:, 1:] <= budget[:, None]).sum(axis=1)
    # Exact iff the prefix below the bracket fits and some bracket key does not.
    miss = (s_lo > budget) | (extra >= widths)
    return n_lo + extra, cs[np.arange(r), extra], miss
