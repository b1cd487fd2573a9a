r"""The compiled kernels of :mod:`certattn._topk_numba` (imports numba; loaded lazily).

One compiled signature per logits dtype (float32, float64), compiled once and cached on
disk (``cache=True``), ``nogil=True`` so that the NumPy path's worker threads run chunks
in parallel.  The error analysis is in :mod:`certattn._topk_numba`.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import boolean, float32, float64, int64, njit, types, void
from numba.core import cgutils
from numba.extending import intrinsic

from ._topk_numba import CACHE, FLOOR  # FLOOR: the error model's EXP_FLOOR, fixed

# Compile-time constants of the kernels.  They are defined here, in the file that
# defines the kernels, because numba's disk cache is keyed on this file: a change here
# recompiles, a change elsewhere would not.
CAP = 512  # most keys of one bin gathered and sorted
SUB_BINS = 256  # sub-bins when a bin is split
TILED_GATHER = 1 << 16  # most terms gathered from a tiled (long) row: 512 KiB
MAX_LEVELS = 8  # levels of splitting (the last resolves by sorting, whatever the size)

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
def _add_sorted(part, s, t, budget):
    """Sort ``part`` in place and add it to the running sum ``s`` smallest first while the
    sum stays within ``budget``: ``(stop, s, t, cut)``, ``cut`` the first value that did
    not fit (``stop``), else 0."""
    part.sort()
    for i in range(part.shape[0]):
        s_new = s + part[i]
        if s_new > budget:
            return True, s, t, part[i]
        s = s_new
        t += 1
    return False, s, t, 0.0


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
    stop, s, t, _ = _add_sorted(work[:g], s, t, budget)
    return stop, s, t


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


SETTLE_ROUNDS = 8  # passes of 4 thresholds tried before the full kernel
SETTLE_OFFSETS = (-1.5, -0.5, 0.5, 1.5)  # first thresholds: centre + spread * these
FIRST_GUESS = (-6.0, 0.5)  # (centre, spread) of log(cut / B) before any row is settled
SPREAD_MIN, SPREAD_MAX = 0.05, 4.0  # the spread is kept within these (nats)
SPLIT_AROUND = (-0.08, -0.02, 0.02, 0.08)  # later rounds: interpolated cut + these (of w)


# ---------------------------------------------------------------------------------------
# The fused path: terms by a polynomial exp inside the kernel (error bound derived in
# certattn._topk_numba, "Terms, fused pass"), then the settling in log space of the terms.
# ---------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634  # float64 nearest 1/log(2); only steers n (any integer works)
ROUNDER = 6755399441055744.0  # 1.5 * 2**52: (t + ROUNDER) - ROUNDER rounds t to an integer
LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: n * LN2_HI exact for |n| < 2^21
LN2_LO = 1.90821492927058770002e-10  # log(2) - LN2_HI, rounded
EXP_TOP = 710.0  # exponents are clamped to [FLOOR, EXP_TOP]; exp(EXP_TOP) overflows to inf
_P11 = 1.0 / 39916800.0  # Taylor coefficients 1/i!, i = 11 .. 3, rounded to float64
_P10 = 1.0 / 3628800.0
_P9 = 1.0 / 362880.0
_P8 = 1.0 / 40320.0
_P7 = 1.0 / 5040.0
_P6 = 1.0 / 720.0
_P5 = 1.0 / 120.0
_P4 = 1.0 / 24.0
_P3 = 1.0 / 6.0


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose IEEE bit pattern is the int64 ``bits`` (an LLVM bitcast)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _bits_from_f64(typingctx, x):
    """The IEEE bit pattern of the float64 ``x`` as an int64 (an LLVM bitcast: defined for
    every input, NaN included, unlike a float-to-int conversion)."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


_ROUNDER_BITS = 0x4338000000000000  # the bits of ROUNDER; t + ROUNDER holds n in its low bits


@njit(fastmath={"contract"}, **_JIT)
def _exp_poly(a):
    """``exp(a)`` for a float64 ``a`` in ``[FLOOR, EXP_TOP]``, within ``EXP_POLY_ERR`` (192u).

    Cody-Waite reduction ``a = n log 2 + r`` (``|r| <= 0.35``), the degree-11 Taylor
    polynomial of ``e^r`` by Horner, times ``2^(n-1)`` (bits) times 2: both exact for
    ``a >= FLOOR`` (normal results), ``inf`` past ``log(fmax)``.  Compiled with
    ``contract`` only (an FMA may fuse a multiply-add: one rounding instead of two, inside
    the bound); no reassociation, which would undo the reduction.  Vectorises.
    """
    t = a * LOG2E + ROUNDER  # an integer n + ROUNDER (|n| < 2^51): n sits in the low bits
    kf = t - ROUNDER
    r = (a - kf * LN2_HI) - kf * LN2_LO
    p = _P11
    p = p * r + _P10
    p = p * r + _P9
    p = p * r + _P8
    p = p * r + _P7
    p = p * r + _P6
    p = p * r + _P5
    p = p * r + _P4
    p = p * r + _P3
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # 2^(n-1) from n's bits: integer arithmetic on the bit pattern, defined for a NaN ``a``
    # too (then p is NaN and so is the result), where a float-to-int conversion is not
    n = _bits_from_f64(t) - _ROUNDER_BITS
    return (p * _f64_from_bits((n + 1022) << 52)) * 2.0


@intrinsic
def _compress8(typingctx, er, j, lo, hi, out, g):
    """Store the terms ``er[j + q]`` (``q < 8``) with ``lo <= er[j + q] < hi`` at
    ``out[g:]``, contiguously and in order (``llvm.masked.compressstore``: one AVX-512
    ``vcompresspd``, a scalar loop elsewhere).  Returns ``stored + 16 * below``, where
    ``below`` counts the terms ``< lo``.  The caller keeps ``j + 8 <= len(er)`` and
    ``g + 8 <= len(out)``."""
    sig = types.int64(er, j, lo, hi, out, g)

    def codegen(context, builder, signature, args):
        ea, jj, lo_, hi_, oa, gg = args
        ety, _, _, _, oty, _ = signature.args
        earr = context.make_array(ety)(context, builder, ea)
        oarr = context.make_array(oty)(context, builder, oa)
        f64, i8, i32 = ir.DoubleType(), ir.IntType(8), ir.IntType(32)
        vd = ir.VectorType(f64, 8)
        undef = ir.Constant(vd, ir.Undefined)
        zeros = ir.Constant(ir.VectorType(i32, 8), [0] * 8)

        def splat(s):
            v = builder.insert_element(undef, s, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, undef, zeros)

        ve = builder.load(builder.bitcast(builder.gep(earr.data, [jj]), vd.as_pointer()),
                          align=8)
        below = builder.fcmp_ordered("<", ve, splat(lo_))
        inside = builder.and_(builder.not_(below), builder.fcmp_ordered("<", ve, splat(hi_)))
        store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [vd, f64.as_pointer(), ir.VectorType(ir.IntType(1), 8)]),
            "llvm.masked.compressstore.v8f64",
        )
        builder.call(store, [ve, builder.gep(oarr.data, [gg]), inside])
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i8, [i8]), "llvm.ctpop.i8"
        )
        n_in = builder.zext(builder.call(popcount, [builder.bitcast(inside, i8)]), ir.IntType(64))
        n_below = builder.zext(builder.call(popcount, [builder.bitcast(below, i8)]), ir.IntType(64))
        return builder.add(n_in, builder.shl(n_below, ir.Constant(ir.IntType(64), 4)))

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, j):
    """Ask the cache for the line holding ``arr[j]`` (``llvm.prefetch``; a hint only)."""
    sig = types.void(arr, j)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3),
            "llvm.prefetch.p0i8",
        )
        i32 = ir.IntType(32)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(**_JIT)
def _prefetch_row(xr):
    """Prefetch a row (one hint per 64-byte line) while the previous one is worked on."""
    step = max(1, 64 // xr.itemsize)
    for j in range(0, xr.shape[0], step):
        _prefetch(xr, j)


@njit(fastmath={"reassoc"}, **_JIT)
def _terms_pass(xr, er):
    r"""The fused pass: ``er[j] = exp(clamp(x_j))`` (:func:`_exp_poly`), their float64 sum
    :math:`\hat Z` and the number of raised keys (below ``FLOOR``, masked ones included):
    ``(z, n_raised)``.  ``reassoc`` lets the sum split over SIMD lanes (order-free
    bound); the exp's own instructions keep their ``contract``-only flags (numba sets
    flags per function)."""
    z = 0.0
    nr = 0
    for j in range(xr.shape[0]):
        v = np.float64(xr[j])
        # numba's max / min return their first argument when it is NaN: the term and z
        # are NaN (tested); +inf gives exp(EXP_TOP) = inf.  (Explicit selects or
        # np.maximum would not vectorise here: 6x slower.)
        ev = _exp_poly(min(max(v, FLOOR), EXP_TOP))
        er[j] = ev
        z += ev
        nr += v < FLOOR
    return z, nr


@njit(**_JIT)
def _count_valid(xr):
    """Keys above ``-inf`` (only rows with raised keys can hold masked ones)."""
    nv = 0
    for j in range(xr.shape[0]):
        nv += xr[j] > -np.inf
    return nv


@njit(fastmath={"reassoc"}, **_JIT)
def _tail_sums(er, tau, sums, counts):
    """For each of the 4 term thresholds ``tau``, the float64 sum of the terms below it,
    and their number (a float64 count, exact below 2^53) unless ``counts`` is None (numba
    compiles that case apart, without the counting).  ``reassoc`` splits the sums over
    SIMD lanes: a float64 sum of the same terms in another order (order-free bound);
    nothing else is computed here."""
    t0, t1, t2, t3 = tau[0], tau[1], tau[2], tau[3]
    s0 = s1 = s2 = s3 = 0.0
    c0 = c1 = c2 = c3 = 0.0
    for j in range(er.shape[0]):
        ev = er[j]
        s0 += ev if ev < t0 else 0.0
        s1 += ev if ev < t1 else 0.0
        s2 += ev if ev < t2 else 0.0
        s3 += ev if ev < t3 else 0.0
        if counts is not None:
            c0 += 1.0 if ev < t0 else 0.0
            c1 += 1.0 if ev < t1 else 0.0
            c2 += 1.0 if ev < t2 else 0.0
            c3 += 1.0 if ev < t3 else 0.0
    sums[0], sums[1], sums[2], sums[3] = s0, s1, s2, s3
    if counts is not None:
        counts[0], counts[1], counts[2], counts[3] = c0, c1, c2, c3


@njit(**_JIT)
def _gather_fast(er, lo, hi, out):
    """The terms with ``lo <= e < hi`` into ``out`` (8 per ``vcompresspd``):
    ``(stored, below)``, ``below`` counting the terms ``< lo``; ``stored = -1`` if they
    would not fit (``out`` keeps 8 spare slots)."""
    n = er.shape[0]
    lim = out.shape[0] - 8
    g = 0
    below = 0
    j = 0
    while j + 8 <= n:
        if g > lim:
            return -1, below
        packed = _compress8(er, j, lo, hi, out, g)
        g += packed & 15
        below += packed >> 4
        j += 8
    for jj in range(j, n):
        ev = er[jj]
        if ev < lo:
            below += 1
        elif ev < hi:
            if g >= out.shape[0]:
                return -1, below
            out[g] = ev
            g += 1
    return g, below


@njit(**_JIT)
def _row_terms(xr, er, tiled):
    """:func:`_terms_pass` over the row: into ``er`` (the row's terms), or, ``tiled``,
    tile by tile through the tile buffer ``er`` (nothing kept): ``(z, n_raised)``, ``z``
    a float64 sum of the tiles' sums (order-free bound)."""
    if not tiled:
        return _terms_pass(xr, er)
    n, w = xr.shape[0], er.shape[0]
    z = 0.0
    nr = 0
    for j in range(0, n, w):
        m = min(w, n - j)
        zt, nrt = _terms_pass(xr[j : j + m], er[:m])
        z += zt
        nr += nrt
    return z, nr


@njit(**_JIT)
def _row_sums(xr, er, tiled, tau, sums, counts, tsums, tcounts):
    """:func:`_tail_sums` over the row (``tiled``: the terms recomputed tile by tile,
    identical to those of :func:`_row_terms`, then the tiles' sums and counts added)."""
    if not tiled:
        _tail_sums(er, tau, sums, counts)
        return
    n, w = xr.shape[0], er.shape[0]
    for i in range(4):
        sums[i] = 0.0
        if counts is not None:
            counts[i] = 0.0
    for j in range(0, n, w):
        m = min(w, n - j)
        _terms_pass(xr[j : j + m], er[:m])
        if counts is None:
            _tail_sums(er[:m], tau, tsums, None)
        else:
            _tail_sums(er[:m], tau, tsums, tcounts)
        for i in range(4):
            sums[i] += tsums[i]
            if counts is not None:
                counts[i] += tcounts[i]


@njit(**_JIT)
def _row_gather(xr, er, tiled, lo, hi, out):
    """:func:`_gather_fast` over the row (``tiled``: tile by tile): ``(stored, below)``,
    ``stored = -1`` if the terms would not fit ``out``."""
    if not tiled:
        return _gather_fast(er, lo, hi, out)
    n, w = xr.shape[0], er.shape[0]
    g = 0
    below = 0
    for j in range(0, n, w):
        m = min(w, n - j)
        _terms_pass(xr[j : j + m], er[:m])
        gt, bt = _gather_fast(er[:m], lo, hi, out[g:])
        below += bt
        if gt < 0:
            return -1, below
        g += gt
    return g, below


@njit(**_JIT)
def _settle(xr, er, tiled, z, nr, eps, gamma, z_min, z_max, alpha_raised, alpha_tiny, state,
            tau, sums, counts, tsums, tcounts, buf, sub_cnt, sub_mass):
    """Certify row ``xr`` from its terms and their sum ``z``: ``(ok, k, tail_pre)``.
    ``er`` holds the row's terms, or, ``tiled`` (long rows, bounded memory), is a tile
    buffer and every pass recomputes the terms tile by tile (:func:`_row_sums`,
    :func:`_row_gather`: the same function of the same logits, so the same terms).

    The cut term (the smallest kept one) is searched in log space relative to the budget
    :math:`B`.  Each round puts 4 term thresholds, one vectorised pass sums the terms
    below each (:func:`_tail_sums`), and the exact budget narrows the bracket ``[lo, hi)``
    holding the cut: ``T(lo) <= B < T(hi)``.  The first round puts them around the
    prediction ``state`` (running means of ``log(cut / B)`` and of its deviation over the
    rows settled so far; rows of one head are alike) and only sums;
    its bracket is gathered at once (:func:`_gather_fast`, which gives up when the
    bracket overflows ``buf``).  Later rounds also count and narrow the bracket known so
    far (within ``[B / n, z]``, where the cut term must lie): around the interpolated
    crossing of ``log T`` and ``log B`` when both ends have positive sums, else evenly in
    log space (5 times narrower a round); they gather once it fits.  The gathered terms
    are added smallest first (:func:`_add_smallest_first`).  ``ok`` is False (the caller
    runs the full kernel) after ``SETTLE_ROUNDS`` rounds, or when the row needs the
    shifted terms.  Thresholds only steer.
    """
    n = xr.shape[0]
    if not (z >= z_min and z <= z_max):
        return False, 0, 0.0
    alpha = alpha_raised if nr > 0 else alpha_tiny
    z_lo = z * (1.0 - gamma) - alpha
    # accept a tail T-hat iff T-hat * (1 + gamma) + alpha <= eps * z_lo
    budget = (eps * z_lo - alpha) / (1.0 + gamma)
    if not budget > 0.0:
        return False, 0, 0.0
    lo, lo_sum = 0.0, 0.0  # T(lo) <= B: nothing is below 0
    hi, hi_sum = np.inf, z  # B < T(inf) = z-hat (up to rounding: then no cut is found)
    lo_cnt, hi_cnt = 0.0, float(n)  # terms below lo, below hi: known unless round 0 set it
    lo_known = hi_known = True
    # the cut term lies in [B / n, z]: B < T(t + 1) <= (t + 1) cut, and no term exceeds z
    low, high = budget / n, z
    g = below = -1
    for rnd in range(SETTLE_ROUNDS):
        if rnd == 0:  # around the prediction, kept inside [B / n, z]; sums only
            centre = min(max(state[0], math.log(low / budget)), math.log(high / budget))
            for i in range(4):
                tau[i] = budget * math.exp(centre + state[1] * SETTLE_OFFSETS[i])
            _row_sums(xr, er, tiled, tau, sums, None, tsums, None)
        else:  # narrow the bracket known so far (log space); sums and counts
            left = lo if lo > 0.0 else low
            right = hi if hi < np.inf else high
            if not right > left:
                break
            w = math.log(right / left)
            if lo_sum > 0.0 and hi < np.inf and hi_sum > lo_sum:
                # where the budget falls, interpolating log T linearly in log tau, and
                # thresholds close around it (kept inside the bracket, ascending)
                at = math.log(budget / lo_sum) / math.log(hi_sum / lo_sum)
                for i in range(4):
                    f = min(max(at + SPLIT_AROUND[i], 0.01 * (i + 1)), 0.96 + 0.01 * i)
                    tau[i] = left * math.exp(w * f)
            else:  # evenly
                for i in range(4):
                    tau[i] = left * math.exp(w * (i + 1) / 5.0)
            _row_sums(xr, er, tiled, tau, sums, counts, tsums, tcounts)
        for i in range(4):
            if sums[i] <= budget:
                if tau[i] > lo:
                    lo, lo_sum, lo_cnt, lo_known = tau[i], sums[i], counts[i], rnd > 0
            elif tau[i] < hi:
                hi, hi_sum, hi_cnt, hi_known = tau[i], sums[i], counts[i], rnd > 0
        if lo_known and hi_known and hi_cnt - lo_cnt > buf.shape[0] - 9:
            continue  # too full for buf: split again
        g, below = _row_gather(xr, er, tiled, lo, hi, buf)  # -1: it does not fit after all
        if g >= 0:
            break
    if g < 0:
        return False, 0, 0.0
    stop, s, t, cut = _add_smallest_first(buf, g, lo_sum, below, budget, sub_cnt, sub_mass)
    if not stop:  # every bracket term fits (only by rounding, or hi = inf): full kernel
        return False, 0, 0.0
    # the next row's prediction: a running mean of log(cut / B) and of its deviation
    seen = math.log(cut / budget)
    state[1] = min(SPREAD_MAX, max(SPREAD_MIN, 0.7 * state[1] + 0.3 * abs(seen - state[0])))
    state[0] = 0.5 * state[0] + 0.5 * seen
    return True, n - t, (s * (1.0 + gamma) + alpha) / z_lo


@njit(**_JIT)
def _bin_of(v, lo, scale, nbin):
    """The sub-bin of value ``v`` (linear in the value, so monotone)."""
    return min(nbin - 1, int((v - lo) * scale))


@njit(**_JIT)
def _add_smallest_first(vals, g, s, t, budget, sub_cnt, sub_mass):
    """Add ``vals[:g]`` to the running sum ``s`` smallest first while it stays within
    ``budget``: ``(stop, s, t, cut)``, as in :func:`_resolve`, with ``cut`` the first value
    that did not fit (0 when all did).

    Instead of sorting all ``g`` values, they are split into ``SUB_BINS`` bins linear in
    the value (monotone, so each bin is a contiguous range of the sorted values): whole
    bins are added while they fit (their float64 sums), and only the bin holding the cut
    is sorted (the values are moved to its front, in place).
    """
    if g == 0:
        return False, s, t, 0.0
    lo = vals[0]
    hi = vals[0]
    for i in range(g):
        lo = min(lo, vals[i])
        hi = max(hi, vals[i])
    nbin = min(SUB_BINS, max(16, g >> 1))  # about 2 values a bin
    scale = nbin / (hi - lo) if hi > lo else 0.0
    if not scale <= 1e300:  # values a few subnormal spacings apart: one bin (no NaN)
        scale = 0.0
    for i in range(nbin):
        sub_cnt[i] = 0
        sub_mass[i] = 0.0
    for i in range(g):
        j = _bin_of(vals[i], lo, scale, nbin)
        sub_cnt[j] += 1
        sub_mass[j] += vals[i]
    start = 0  # values of bins resolved one by one (all fitted) lie before start
    for j in range(nbin):
        c = sub_cnt[j]
        if c == 0:
            continue
        s_new = s + sub_mass[j]
        if s_new <= budget:
            s = s_new
            t += c
            continue
        # the cut is in bin j: move its values to vals[start:h], sort, add one by one
        h = start
        for i in range(start, g):
            if _bin_of(vals[i], lo, scale, nbin) == j:
                v = vals[i]
                vals[i] = vals[h]
                vals[h] = v
                h += 1
        stop, s, t, cut = _add_sorted(vals[start:h], s, t, budget)
        if stop:
            return True, s, t, cut
        start = h  # every value of bin j fitted by itself (rounding): on to the next bin
    return False, s, t, 0.0


@njit(**_JIT)
def _gather_cap(n):
    """Most terms the settling gathers: ``max(128, min(n/8, 512), n/32)`` (measured: the
    resolve costs about 5 ns a term, a counted pass about 0.25 ns a key)."""
    return max(128, min(n // 8, CAP), n // 32)


def _signature(xtype):
    return void(
        xtype[:, ::1], int64, boolean, float64, float64, float64, float64, float64, float64,
        float64, int64, int64[::1], float64[::1], int64[::1], float64[::1],
    )


def _certify_block(x, tile, steer, eps, gamma, z_min, z_max, shift, alpha_raised,
                   alpha_tiny, nb0, k_out, tail_out, nv_out, top_out):
    """Per row of ``x``, write ``k``, the tail before the final division rounding,
    ``n_valid`` and ``top`` (NaN or ``+inf`` exactly for rows holding NaN or ``+inf``).

    ``tile = n``: each row's terms are computed by the fused pass into one row buffer;
    ``0 < tile < n`` (long rows): into a tile buffer, recomputed by every pass; then the
    settling is tried first if ``steer``.  A settled row's ``top`` is its (finite) sum of
    terms, which is all the caller needs of it: NaN or ``+inf`` rows make that sum NaN
    or ``inf`` and go to the full kernel, which reports their maximum.  ``tile = 0``
    (``eps = 0``), and whatever is not settled, takes the full kernel (on the row's terms
    when they are kept, else streamed with ``math.exp``).
    """
    n = x.shape[1]
    width = max(nb0 + 1, SUB_BINS)
    cnt = np.empty((MAX_LEVELS, width), dtype=np.int64)
    mass = np.empty((MAX_LEVELS, width), dtype=np.float64)
    dmn = np.empty((MAX_LEVELS, SUB_BINS), dtype=np.float64)  # levels >= 1 only
    dmx = np.empty((MAX_LEVELS, SUB_BINS), dtype=np.float64)
    jc = np.empty(MAX_LEVELS, dtype=np.int64)
    buf = np.empty(CAP + 1, dtype=np.float64)  # the full kernel's resolve
    tiled = 0 < tile < n
    kept = tile >= n  # the row's terms stay in erow: the full kernel reads them
    # the settling gathers at most _gather_cap(n) terms (a fuller bracket is split first:
    # a pass over the row costs less than resolving many terms; tiled rows at most
    # TILED_GATHER, bounded memory), 8 spare slots
    cap = min(_gather_cap(n), TILED_GATHER) if tiled else _gather_cap(n)
    gbuf = np.empty((cap if tile > 0 and steer else 0) + 9, dtype=np.float64)
    erow = np.empty(min(tile, n), dtype=np.float64)
    tau = np.empty(4, dtype=np.float64)
    sums = np.empty(4, dtype=np.float64)
    counts = np.empty(4, dtype=np.float64)
    tsums = np.empty(4, dtype=np.float64)
    tcounts = np.empty(4, dtype=np.float64)
    state = np.array(FIRST_GUESS)
    for i in range(x.shape[0]):
        if tile > 0 and (kept or steer):
            if kept and i + 4 < x.shape[0]:
                _prefetch_row(x[i + 4])
            z, nr = _row_terms(x[i], erow, tiled)
            if steer and z <= z_max:  # z NaN or inf: full kernel
                nv = n if nr == 0 else _count_valid(x[i])
                ok = False
                if nv > 0:
                    ok, k, tail = _settle(x[i], erow, tiled, z, nr, eps, gamma, z_min, z_max,
                                          alpha_raised, alpha_tiny, state, tau, sums, counts,
                                          tsums, tcounts, gbuf, cnt[1], mass[1])
                if ok:
                    k_out[i] = k
                    tail_out[i] = tail
                    nv_out[i] = nv
                    top_out[i] = z
                    continue
        k, tail, nv, top = _row(x[i], erow, kept, eps, gamma, z_min, z_max, shift,
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
