r"""The compiled kernels of :mod:`certattn._topk_numba` (imports numba; loaded lazily).

One compiled signature per logits dtype (float32, float64), compiled once and cached on
disk (``cache=True``), ``nogil=True`` so that the NumPy path's worker threads run chunks
in parallel.  The error analysis is in :mod:`certattn._topk_numba`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import boolean, float32, float64, int64, njit, void

from ._topk_numba import (
    CACHE,
    CAP,
    FLOOR,
    MAX_LEVELS,
    STEER_MIN_KEYS,
    STEER_SAMPLE,
    SUB_BINS,
)

_JIT = {"cache": CACHE, "nogil": True}


@njit(**_JIT)
def _exponent(v, mode, m, shift):
    """The exponent whose ``exp`` is the term of logit ``v`` (before raising)."""
    if mode == 2:
        return (v - m) + shift
    return v


@njit(**_JIT)
def _term(a, er, j, mode):
    """The float64 term of key ``j`` with exponent ``a`` (not raised: ``a >= FLOOR``,
    or raised: then ``exp(FLOOR)``).  Mode 0 reads the NumPy-computed term ``er[j]``."""
    if mode == 0:
        return er[j]
    if a < FLOOR:
        a = FLOOR
    return math.exp(a)


@njit(**_JIT)
def _in_window(d, lo, hi, closed):
    return d >= lo and (d < hi or (closed and d == hi))


@njit(**_JIT)
def _gather(xr, er, mode, m, shift, lo, hi, closed, out):
    """Terms of the (not raised) keys whose distance lies in the window, into ``out``;
    returns how many."""
    g = 0
    for j in range(xr.shape[0]):
        v = np.float64(xr[j])
        d = m - v
        if d < lo or d > hi or (d == hi and not closed):
            continue
        a = _exponent(v, mode, m, shift)
        if a < FLOOR:
            continue
        if g == out.shape[0]:  # more keys than counted: cannot happen, never overrun
            return -1
        out[g] = _term(a, er, j, mode)
        g += 1
    return g


@njit(**_JIT)
def _add_in_row_order(xr, er, mode, m, shift, lo, hi, closed, raised, s, t, budget):
    """Add the keys of a window (or the raised class) in row order while the running sum
    stays within ``budget``; their terms are equal up to rounding.  ``(stop, s, t)``."""
    for j in range(xr.shape[0]):
        v = np.float64(xr[j])
        a = _exponent(v, mode, m, shift)
        if raised:
            if not a < FLOOR:
                continue
        elif a < FLOOR or not _in_window(m - v, lo, hi, closed):
            continue
        s_new = s + _term(a, er, j, mode)
        if s_new > budget:
            return True, s, t
        s = s_new
        t += 1
    return False, s, t


@njit(**_JIT)
def _resolve(xr, er, mode, m, shift, lo, hi, closed, equal, count, raised, s, t, budget, buf):
    """Add the keys of one window (or of the raised class) to the tail, smallest term
    first, while the running float64 sum stays within ``budget``.

    Returns ``(stop, s, t)``: ``stop`` is True when some key did not fit (the cut is
    found).  The terms of a window are gathered and sorted (in ``buf`` when at most
    ``CAP``); a window whose keys all have the same distance, and the raised class (all
    terms ``exp(FLOOR)``, or equal exponents), are added in row order.
    """
    if raised or equal:
        return _add_in_row_order(xr, er, mode, m, shift, lo, hi, closed, raised, s, t, budget)
    work = buf if count <= CAP else np.empty(count, dtype=np.float64)
    g = _gather(xr, er, mode, m, shift, lo, hi, closed, work)
    if g < 0:  # defensive: room for the whole row
        work = np.empty(xr.shape[0], dtype=np.float64)
        g = _gather(xr, er, mode, m, shift, lo, hi, closed, work)
    part = work[:g]
    part.sort()
    for i in range(g):
        s_new = s + part[i]
        if s_new > budget:
            return True, s, t
        s = s_new
        t += 1
    return False, s, t


@njit(**_JIT)
def _row(xr, er, use_e, eps, gamma, z_min, z_max, shift, alpha_raised, alpha_tiny, nb0,
         cnt, mass, dmn, dmx, jc, buf):
    """``(k, tail_pre, n_valid, top)`` of one row; see :mod:`certattn._topk_numba`."""
    n = xr.shape[0]
    m = -np.inf
    nan = False
    n_valid = 0
    for j in range(n):
        v = np.float64(xr[j])
        if v > m:
            m = v
        elif v != v:
            nan = True
        if v > -np.inf:
            n_valid += 1
    if nan:
        return n, 0.0, n_valid, np.nan
    if m == np.inf:
        return n, 0.0, n_valid, np.inf
    if eps == 0.0:  # every valid key has positive exact mass: keep them all
        return n_valid, 0.0, n_valid, m
    if n_valid == 0:  # fully masked: the caller decides
        return 0, 0.0, 0, m
    top_d = nb0 * 0.125  # distances >= top_d: the overflow bin (index nb0)
    mode = 0 if use_e else 1
    z = 0.0
    cnt_r = 0
    mass_r = 0.0
    over_max = 0.0
    while True:
        for b in range(nb0 + 1):
            cnt[0, b] = 0
            mass[0, b] = 0.0
        cnt_r = 0
        mass_r = 0.0
        over_max = top_d
        for j in range(n):
            v = np.float64(xr[j])
            a = _exponent(v, mode, m, shift)
            tv = _term(a, er, j, mode)
            if a < FLOOR:
                cnt_r += 1
                mass_r += tv
                continue
            d = m - v
            if d >= top_d:
                b = nb0
                if d > over_max:
                    over_max = d
            else:
                b = int(d * 8.0)
            cnt[0, b] += 1
            mass[0, b] += tv
        z = mass_r
        for b in range(nb0 + 1):
            z += mass[0, b]
        if mode == 2 or (z >= z_min and z <= z_max):
            break
        mode = 2  # row sum out of range: c = max - shift, terms recomputed
    if mode == 2 or cnt_r > 0:
        alpha = alpha_raised
    else:
        alpha = alpha_tiny
    z_lo = z * (1.0 - gamma) - alpha
    # accept a tail T-hat iff T-hat * (1 + gamma) + alpha <= eps * z_lo
    budget = (eps * z_lo - alpha) / (1.0 + gamma)
    s = 0.0
    t = 0
    stop = False
    if cnt_r > 0:
        s_new = s + mass_r
        if s_new <= budget:
            s = s_new
            t += cnt_r
        else:
            stop, s, t = _resolve(xr, er, mode, m, shift, 0.0, 0.0, False, False, cnt_r,
                                  True, s, t, budget, buf)
    lev = 0
    jc[0] = nb0
    while not stop:
        b = jc[lev]
        if b < 0:
            if lev == 0:
                break
            lev -= 1
            jc[lev] -= 1
            continue
        c = cnt[lev, b]
        if c == 0:
            jc[lev] -= 1
            continue
        s_new = s + mass[lev, b]
        if s_new <= budget:
            s = s_new
            t += c
            jc[lev] -= 1
            continue
        if lev == 0:
            if b == nb0:
                lo, hi, closed = top_d, over_max, True
            else:
                lo, hi, closed = b * 0.125, (b + 1) * 0.125, False
            equal = False
        else:
            lo, hi, closed = dmn[lev, b], dmx[lev, b], True
            equal = lo == hi
        if c <= CAP or equal or lev + 1 == MAX_LEVELS:
            stop, s, t = _resolve(xr, er, mode, m, shift, lo, hi, closed, equal, c, False,
                                  s, t, budget, buf)
            jc[lev] -= 1
            continue
        # zoom: split this window into SUB_BINS sub-bins, one more pass over the row
        nl = lev + 1
        for i in range(SUB_BINS):
            cnt[nl, i] = 0
            mass[nl, i] = 0.0
            dmn[nl, i] = np.inf
            dmx[nl, i] = -np.inf
        scale = SUB_BINS / (hi - lo) if hi > lo else 0.0
        if not scale <= 1e300:  # a window of a few subnormal widths: one sub-bin (an
            scale = 0.0  # infinite scale would make 0 * inf = NaN, and int(NaN) garbage)
        for j in range(n):
            v = np.float64(xr[j])
            a = _exponent(v, mode, m, shift)
            if a < FLOOR:
                continue
            d = m - v
            if not _in_window(d, lo, hi, closed):
                continue
            i = int((d - lo) * scale)
            if i >= SUB_BINS:
                i = SUB_BINS - 1
            cnt[nl, i] += 1
            mass[nl, i] += _term(a, er, j, mode)
            if d < dmn[nl, i]:
                dmn[nl, i] = d
            if d > dmx[nl, i]:
                dmx[nl, i] = d
        lev = nl
        jc[lev] = SUB_BINS - 1
    tail_pre = (s * (1.0 + gamma) + alpha) / z_lo
    return n - t, tail_pre, n_valid, m


N_THRESHOLDS = 8  # thresholds of the vectorised pass (unrolled below)
STEER_ROUNDS = 4  # vectorised passes tried before the full kernel
FRACTIONS = (0.1, 0.25, 0.45, 0.7, 1.0, 1.4, 2.2, 4.0)  # of the estimated budget


@njit(fastmath={"reassoc"}, **_JIT)
def _threshold_sums(xr, er, th, sums, counts):
    """One vectorised pass: for each of the 8 thresholds the float64 sum and the number
    of the terms of keys below it; the valid keys and the raised ones.

    ``reassoc`` lets the compiler split each sum over SIMD lanes: a float64 sum of the
    same non-negative terms in another order, covered by the order-free bound.  Nothing
    else is computed in this function (no other arithmetic may be reassociated).
    """
    t0, t1, t2, t3, t4, t5, t6, t7 = th[0], th[1], th[2], th[3], th[4], th[5], th[6], th[7]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = 0
    nv = 0
    nr = 0
    for j in range(xr.shape[0]):
        v = np.float64(xr[j])
        ev = er[j]
        nv += v > -np.inf
        nr += v < FLOOR
        s0 += ev if v < t0 else 0.0
        c0 += v < t0
        s1 += ev if v < t1 else 0.0
        c1 += v < t1
        s2 += ev if v < t2 else 0.0
        c2 += v < t2
        s3 += ev if v < t3 else 0.0
        c3 += v < t3
        s4 += ev if v < t4 else 0.0
        c4 += v < t4
        s5 += ev if v < t5 else 0.0
        c5 += v < t5
        s6 += ev if v < t6 else 0.0
        c6 += v < t6
        s7 += ev if v < t7 else 0.0
        c7 += v < t7
    sums[0], sums[1], sums[2], sums[3] = s0, s1, s2, s3
    sums[4], sums[5], sums[6], sums[7] = s4, s5, s6, s7
    counts[0], counts[1], counts[2], counts[3] = c0, c1, c2, c3
    counts[4], counts[5], counts[6], counts[7] = c4, c5, c6, c7
    return nv, nr


@njit(**_JIT)
def _gather_between(xr, er, lo, hi, out):
    """Terms of the keys with ``lo <= x < hi`` into ``out``, without branches (a store
    per key, kept only where the key is in the bracket): ``out`` must hold one more
    than the keys of the bracket.  Returns how many."""
    g = 0
    last = out.shape[0] - 1  # never written past, whatever the comparisons say
    for j in range(xr.shape[0]):
        v = np.float64(xr[j])
        out[min(g, last)] = er[j]
        g += (v >= lo) & (v < hi)
    return g


@njit(**_JIT)
def _row_steered(xr, er, m, z, eps, gamma, z_min, z_max, alpha_raised, alpha_tiny, nb0,
                 stride, smass, th, sums, counts, buf, sub_cnt, sub_mass):
    """The common case in one vectorised pass: ``(ok, k, tail_pre, n_valid)``.

    ``z`` is the float64 row sum of the terms (NumPy's, in its own order).
    A strided sample of the row (``stride``) is histogrammed in 1/8-nat bins of
    ``m - x``; where its scaled cumulative tail crosses ``FRACTIONS`` of the estimated
    budget gives 8 thresholds.  One pass sums the terms below each (and the row), the
    exact budget then picks the two neighbouring thresholds around the cut, and only
    the keys between them are gathered, sorted and added smallest first.  ``ok`` is
    False (and the caller runs the full kernel) when the cut lies outside the
    thresholds, the row needs the shifted terms, or the bracket holds over ``CAP`` keys.
    """
    n = xr.shape[0]
    if not (z >= z_min and z <= z_max):
        return False, 0, 0.0, 0
    top_d = nb0 * 0.125
    for b in range(nb0 + 1):
        smass[b] = 0.0
    taken = 0
    for j in range(0, n, stride):
        v = np.float64(xr[j])
        d = m - v
        b = nb0 if not d < top_d else int(d * 8.0)
        smass[b] += er[j]
        taken += 1
    target = eps * z * taken / n  # about the budget, in units of the sample
    acc = 0.0
    i = 0
    for b in range(nb0, -1, -1):  # from the bottom: thresholds at bin edges, ascending
        acc += smass[b]
        while i < N_THRESHOLDS and acc > FRACTIONS[i] * target:
            th[i] = m - b * 0.125 if b < nb0 else m - top_d  # keys below: about bins >= b
            i += 1
    while i < N_THRESHOLDS:
        th[i] = m  # above every key but the maximum
        i += 1
    nv = 0
    for _ in range(STEER_ROUNDS):
        nv, nr = _threshold_sums(xr, er, th, sums, counts)
        alpha = alpha_raised if nr > 0 else alpha_tiny
        z_lo = z * (1.0 - gamma) - alpha
        # accept a tail T-hat iff T-hat * (1 + gamma) + alpha <= eps * z_lo
        budget = (eps * z_lo - alpha) / (1.0 + gamma)
        a = -1
        for i in range(N_THRESHOLDS):
            if sums[i] <= budget:
                a = i
        b = a + 1
        while b < N_THRESHOLDS and not sums[b] > budget:
            b += 1
        if a >= 0 and b < N_THRESHOLDS and counts[b] - counts[a] < buf.shape[0]:
            g = _gather_between(xr, er, th[a], th[b], buf)
            if g != counts[b] - counts[a]:  # cannot happen (the same comparisons)
                return False, 0, 0.0, nv
            stop, s, t = _add_smallest_first(buf, g, sums[a], counts[a], budget, sub_cnt,
                                             sub_mass)
            if not stop:  # every bracket key fits (only by rounding): full kernel
                return False, 0, 0.0, nv
            return True, n - t, (s * (1.0 + gamma) + alpha) / z_lo, nv
        # The cut is outside the thresholds, or between two that hold too many keys:
        # place 8 new thresholds where it must lie (steering only) and pass again.
        if a < 0:  # below the lowest: step down, doubling
            hi = th[0]
            for i in range(N_THRESHOLDS):
                th[i] = hi - 0.25 * 2.0 ** (N_THRESHOLDS - 1 - i)
            th[N_THRESHOLDS - 1] = hi
        else:
            lo = th[a]
            hi = th[b] if b < N_THRESHOLDS else m
            if not hi > lo:  # the cut is among the keys equal to the maximum
                return False, 0, 0.0, nv
            for i in range(N_THRESHOLDS):
                th[i] = lo + (hi - lo) * (i / N_THRESHOLDS)
    return False, 0, 0.0, nv


@njit(**_JIT)
def _add_smallest_first(vals, g, s, t, budget, sub_cnt, sub_mass):
    """Add ``vals[:g]`` to the running sum ``s`` smallest first while it stays within
    ``budget``: ``(stop, s, t)``, as in :func:`_resolve`.

    Instead of sorting all ``g`` values, they are split into ``SUB_BINS`` bins linear in
    the value (monotone, so each bin is a contiguous range of the sorted values): whole
    bins are added while they fit (their float64 sums), and only the bin holding the cut
    is sorted (the values are moved to its front, in place).
    """
    if g == 0:
        return False, s, t
    lo = vals[0]
    hi = vals[0]
    for i in range(g):
        lo = min(lo, vals[i])
        hi = max(hi, vals[i])
    nbin = SUB_BINS
    scale = nbin / (hi - lo) if hi > lo else 0.0
    if not scale <= 1e300:  # values a few subnormal spacings apart: one bin (no NaN)
        scale = 0.0
    for i in range(nbin):
        sub_cnt[i] = 0
        sub_mass[i] = 0.0
    for i in range(g):
        j = min(nbin - 1, int((vals[i] - lo) * scale))
        sub_cnt[j] += 1
        sub_mass[j] += vals[i]
    for j in range(nbin):
        c = sub_cnt[j]
        if c == 0:
            continue
        s_new = s + sub_mass[j]
        if s_new <= budget:
            s = s_new
            t += c
            continue
        # the cut is in bin j: gather its values to the front, sort, add one by one
        h = 0
        for i in range(g):
            if min(nbin - 1, int((vals[i] - lo) * scale)) == j:
                v = vals[i]
                vals[i] = vals[h]
                vals[h] = v
                h += 1
        part = vals[:h]
        part.sort()
        for i in range(h):
            s_new = s + part[i]
            if s_new > budget:
                return True, s, t
            s = s_new
            t += 1
        # every value of bin j fits by itself (rounding): the rest of the values are
        # behind the front h; re-bin them would cost; add the remaining bins whole
        vals_rest_start = h
        for jj in range(j + 1, nbin):
            c2 = sub_cnt[jj]
            if c2 == 0:
                continue
            s_new = s + sub_mass[jj]
            if s_new <= budget:
                s = s_new
                t += c2
                continue
            return _add_bin_sorted(vals, vals_rest_start, g, lo, scale, nbin, jj, s, t,
                                   budget)
        return False, s, t
    return False, s, t


@njit(**_JIT)
def _add_bin_sorted(vals, start, g, lo, scale, nbin, j, s, t, budget):
    """Sort the values of bin ``j`` among ``vals[start:g]`` and add them smallest first."""
    h = start
    for i in range(start, g):
        if min(nbin - 1, int((vals[i] - lo) * scale)) == j:
            v = vals[i]
            vals[i] = vals[h]
            vals[h] = v
            h += 1
    part = vals[start:h]
    part.sort()
    for i in range(part.shape[0]):
        s_new = s + part[i]
        if s_new > budget:
            return True, s, t
        s = s_new
        t += 1
    return False, s, t


def _signature(xtype):
    return void(
        xtype[:, ::1], float64[:, ::1], float64[::1], float64[::1], boolean, boolean, float64,
        float64, float64, float64, float64, float64, float64, int64, int64[::1],
        float64[::1], int64[::1], float64[::1],
    )


def _certify_block(x, e, mx, zr, use_e, steer, eps, gamma, z_min, z_max, shift, alpha_raised,
                  alpha_tiny, nb0, k_out, tail_out, nv_out, top_out):
    """Per row of ``x``, write ``k``, the tail before the final division rounding,
    ``n_valid`` and ``top`` (NaN or ``+inf`` exactly for rows holding NaN or ``+inf``).

    With ``use_e``, ``e`` holds the NumPy terms ``exp(max(x, FLOOR))`` and ``mx`` the
    NumPy row maxima (NaN-propagating), ``zr`` the NumPy row sums of ``e``, and the
    steered pass is tried first if ``steer``.
    """
    n = x.shape[1]
    width = max(nb0 + 1, SUB_BINS)
    cnt = np.empty((MAX_LEVELS, width), dtype=np.int64)
    mass = np.empty((MAX_LEVELS, width), dtype=np.float64)
    dmn = np.empty((MAX_LEVELS, SUB_BINS), dtype=np.float64)  # levels >= 1 only
    dmx = np.empty((MAX_LEVELS, SUB_BINS), dtype=np.float64)
    jc = np.empty(MAX_LEVELS, dtype=np.int64)
    # the steered pass gathers up to n / 32 terms (rows of NumPy terms only)
    buf = np.empty((max(CAP, n // 32) if use_e and steer else CAP) + 1, dtype=np.float64)
    smass = np.empty(nb0 + 1, dtype=np.float64)
    th = np.empty(N_THRESHOLDS, dtype=np.float64)
    sums = np.empty(N_THRESHOLDS, dtype=np.float64)
    counts = np.empty(N_THRESHOLDS, dtype=np.int64)
    stride = max(1, n // STEER_SAMPLE)
    for i in range(x.shape[0]):
        er = e[i] if use_e else e[0]
        if use_e:
            m = mx[i]
            if m == np.inf or m != m:  # the caller raises
                k_out[i] = n
                tail_out[i] = 0.0
                nv_out[i] = n
                top_out[i] = m
                continue
            if steer and m > -np.inf and n >= STEER_MIN_KEYS:
                ok, k, tail, nv = _row_steered(
                    x[i], er, m, zr[i], eps, gamma, z_min, z_max, alpha_raised, alpha_tiny, nb0,
                    stride, smass, th, sums, counts, buf, cnt[1], mass[1],
                )
                if ok:
                    k_out[i] = k
                    tail_out[i] = tail
                    nv_out[i] = nv
                    top_out[i] = m
                    continue
        k, tail, nv, top = _row(x[i], er, use_e, eps, gamma, z_min, z_max, shift,
                                alpha_raised, alpha_tiny, nb0, cnt, mass, dmn, dmx, jc, buf)
        k_out[i] = k
        tail_out[i] = tail
        nv_out[i] = nv
        top_out[i] = top


_BLOCKS: dict = {}


def certify_block(dtype):
    """The compiled block kernel for logits of ``dtype`` (float32 or float64): one
    explicit signature per dtype, compiled (or loaded from numba's disk cache) at its
    first use only, so a process that sees one dtype loads one."""
    key = np.dtype(dtype).name
    if key not in _BLOCKS:
        sig = [_signature({"float32": float32, "float64": float64}[key])]
        try:
            _BLOCKS[key] = njit(sig, **_JIT)(_certify_block)
        except RuntimeError as err:  # numba: "cannot cache ... no locator available"
            if "cache" not in str(err):
                raise
            _BLOCKS[key] = njit(sig, nogil=True)(_certify_block)
    return _BLOCKS[key]
