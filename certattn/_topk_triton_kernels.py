r"""The Triton kernel of :func:`certattn.certify_topk` (``pip install "certattn[triton]"``).

Imported only by :mod:`certattn._topk_triton` (which reloads it when ``TRITON_INTERPRET``
changes: Triton reads it when a kernel is decorated).  The analysis is in
:mod:`certattn._topk_triton`; the constants below are the polynomial exp's of
:mod:`certattn._topk_numba_kernels` (the same digits: a test compares them), and every
float64 constant enters as ``tl.full(..., tl.float64)`` (a bare Python float would be a
float32 literal).
"""

from __future__ import annotations

import triton
import triton.language as tl

FLOOR = tl.constexpr(-700.0)  # exponents are raised to it (masked keys too): EXP_FLOOR
EXP_TOP = tl.constexpr(710.0)  # clamped to it; exp(EXP_TOP) is inf (the row falls back)
LOG2E = tl.constexpr(1.4426950408889634)  # nearest 1/log(2); steers n only
ROUNDER = tl.constexpr(6755399441055744.0)  # 1.5 * 2**52: (t + R) - R rounds t
LN2_HI = tl.constexpr(6.93147180369123816490e-01)  # 32 bits: n * LN2_HI exact
LN2_LO = tl.constexpr(1.90821492927058770002e-10)  # log(2) - LN2_HI, rounded
ROUNDER_BITS = tl.constexpr(0x4338000000000000)  # the bits of ROUNDER
P11 = tl.constexpr(1.0 / 39916800.0)  # Taylor coefficients 1/i!, i = 11 .. 3
P10 = tl.constexpr(1.0 / 3628800.0)
P9 = tl.constexpr(1.0 / 362880.0)
P8 = tl.constexpr(1.0 / 40320.0)
P7 = tl.constexpr(1.0 / 5040.0)
P6 = tl.constexpr(1.0 / 720.0)
P5 = tl.constexpr(1.0 / 120.0)
P4 = tl.constexpr(1.0 / 24.0)
P3 = tl.constexpr(1.0 / 6.0)


@triton.jit
def _c(value: tl.constexpr):
    """The float64 constant ``value`` (exactly its Python float)."""
    return tl.full([1], value, tl.float64)


@triton.jit
def exp_poly(a):
    """``exp(a)`` for float64 ``a`` in ``[FLOOR, EXP_TOP]`` within ``EXP_POLY_ERR``:
    the steps of :func:`certattn._topk_numba_kernels._exp_poly`, one rounding each
    (compiled with ``enable_fp_fusion=False``)."""
    rounder = _c(ROUNDER)
    t = a * _c(LOG2E) + rounder
    kf = t - rounder
    r = (a - kf * _c(LN2_HI)) - kf * _c(LN2_LO)
    p = _c(P11)
    p = p * r + _c(P10)
    p = p * r + _c(P9)
    p = p * r + _c(P8)
    p = p * r + _c(P7)
    p = p * r + _c(P6)
    p = p * r + _c(P5)
    p = p * r + _c(P4)
    p = p * r + _c(P3)
    p = p * r + _c(0.5)
    p = p * r + _c(1.0)
    p = p * r + _c(1.0)
    n = t.to(tl.int64, bitcast=True) - ROUNDER_BITS
    scale = ((n + 1022) << 52).to(tl.float64, bitcast=True)
    return (p * scale) * _c(2.0)


@triton.jit
def probe(trow, n, thr, BLOCK: tl.constexpr, K: tl.constexpr):
    """For ``K`` thresholds ``thr`` (int64 bit patterns of non-negative float64): the
    float64 sum, the largest term, the count of the row's terms at most each threshold,
    and the smallest term above it.  Tiles are added in row order, each by ``tl.sum``
    over a ``[BLOCK, K]`` tile: every column is summed the same way, so two thresholds
    that select the same terms give bit-identical sums, and a sum grows with its
    threshold."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    s = tl.zeros([K], tl.float64)
    top = tl.zeros([K], tl.float64)
    mn = tl.full([K], float("inf"), tl.float64)
    cnt = tl.zeros([K], tl.int64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        inside = idx < n
        e = tl.load(trow + idx, mask=inside, other=0.0)
        le = (e.to(tl.int64, bitcast=True)[:, None] <= thr[None, :]) & inside[:, None]
        sel = tl.where(le, e[:, None], 0.0)
        s += tl.sum(sel, axis=0)
        top = tl.maximum(top, tl.max(sel, axis=0))
        cnt += tl.sum(le.to(tl.int64), axis=0)
        above = tl.where(le, float("inf"), tl.where(inside[:, None], e[:, None], float("inf")))
        mn = tl.minimum(mn, tl.min(above, axis=0))
    return s, top, cnt, mn


@triton.jit
def terms_pass(xrow, trow, n, BLOCK: tl.constexpr):
    """The only read of the logits: each term ``exp_poly(clamp(x))`` stored at ``trow``;
    returns the float64 row sum, the smallest and largest term, the valid keys, the keys
    below ``FLOOR`` and the NaN / ``+inf`` keys."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    z = tl.zeros([1], tl.float64)
    tmin = tl.full([1], float("inf"), tl.float64)
    tmax = tl.zeros([1], tl.float64)
    n_valid = tl.zeros([1], tl.int64)
    raised = tl.zeros([1], tl.int64)
    bad = tl.zeros([1], tl.int64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        inside = idx < n
        v = tl.load(xrow + idx, mask=inside, other=float("-inf")).to(tl.float64)
        bad += tl.sum(((v != v) | (v == float("inf"))).to(tl.int64), axis=0)
        n_valid += tl.sum(((v > float("-inf")) & inside).to(tl.int64), axis=0)
        raised += tl.sum(((v < FLOOR) & inside).to(tl.int64), axis=0)
        a = tl.minimum(tl.maximum(v, _c(FLOOR)), _c(EXP_TOP))
        e = tl.where(inside, exp_poly(a), 0.0)
        tl.store(trow + idx, e, mask=inside)
        z += tl.sum(e, axis=0)
        tmax = tl.maximum(tmax, tl.max(e, axis=0))
        tmin = tl.minimum(tmin, tl.min(tl.where(inside, e, float("inf")), axis=0))
    return z, tmin, tmax, n_valid, raised, bad


@triton.jit
def pick(vec, j, at):
    """``vec[at]`` (``at`` a one-element index, within range)."""
    return tl.sum(tl.where(j == at, vec, 0), axis=0)


@triton.jit(do_not_specialize=["stride", "n"])
def certify_rows_kernel(
    x_ptr, stride, n, par_ptr, terms_ptr, k_ptr, tail_ptr, nvalid_ptr, top_ptr, status_ptr,
    BLOCK: tl.constexpr, K: tl.constexpr,
):
    """One program per row: terms, budget, the cut by ``K``-way search on the terms'
    bit patterns, exact ties, the tail bound before widening (:mod:`certattn._topk_triton`).
    ``status`` is 0 when the row is settled, else the host recomputes it."""
    row = tl.program_id(0).to(tl.int64)
    one = tl.zeros([1], tl.int64)
    n64 = n.to(tl.int64)
    xrow = x_ptr + row * stride
    trow = terms_ptr + row * n64
    eps = tl.load(par_ptr + 0 + one)
    gamma = tl.load(par_ptr + 1 + one)
    z_min = tl.load(par_ptr + 2 + one)
    z_max = tl.load(par_ptr + 3 + one)
    big = tl.load(par_ptr + 4 + one)
    small = tl.load(par_ptr + 5 + one)
    z, tmin, tmax, n_valid, raised, bad = terms_pass(xrow, trow, n64, BLOCK)
    ok = ((bad == 0) & (z >= z_min) & (z <= z_max)).to(tl.int32)
    alpha = tl.where(raised > 0, big, small)
    z_lo = z * (_c(1.0) - gamma) - alpha
    one_g = _c(1.0) + gamma
    budget = (eps * z_lo - alpha) / one_g
    j = tl.arange(0, K).to(tl.int64)
    hb = tmax.to(tl.int64, bitcast=True)
    s_all, _t0, _c0, _m0 = probe(trow, n64, tl.zeros([K], tl.int64) + hb, BLOCK, K)
    total = pick(s_all, j, 0)
    all_fit = (total <= budget).to(tl.int32)
    none_fit = (budget < 0.0).to(tl.int32)
    ab = tmin.to(tl.int64, bitcast=True)  # the smallest term above the last false threshold
    go = tl.max(ok * (1 - all_fit) * (1 - none_fit) * (ab < hb).to(tl.int32), axis=0)
    while go > 0:
        d = hb - ab
        thr = ab + (d // K) * j + ((d % K) * j) // K  # in [ab, hb), from ab: no overflow
        s, top, _cnt, mn = probe(trow, n64, thr, BLOCK, K)
        nf = tl.sum((s <= budget).to(tl.int64), axis=0)  # thresholds that fit (a prefix)
        top_b = top.to(tl.int64, bitcast=True)
        mn_b = mn.to(tl.int64, bitcast=True)
        hb = tl.where(nf < K, pick(top_b, j, nf), hb)  # the largest term <= first over
        ab = tl.where(nf > 0, pick(mn_b, j, nf - 1), hb)  # the next term past last fit
        go = tl.max((ab < hb).to(tl.int32), axis=0)
    # hb is the cut term v: the terms below it fit, with as many equal to it as fit
    v = hb.to(tl.float64, bitcast=True)
    s, _top, cnt, _mn = probe(trow, n64, tl.where(j == 0, hb - 1, hb), BLOCK, K)
    s_lt = pick(s, j, 0)
    c_lt = pick(cnt, j, 0)
    j_lo = tl.zeros([1], tl.int64)
    j_hi = tl.zeros([1], tl.int64) + (pick(cnt, j, 1) - c_lt)
    go = tl.max((j_hi > j_lo).to(tl.int32), axis=0)
    while go > 0:
        j_mid = (j_lo + j_hi + 1) // 2
        fits = s_lt + j_mid.to(tl.float64) * v <= budget
        j_lo = tl.where(fits, j_mid, j_lo)
        j_hi = tl.where(fits, j_hi, j_mid - 1)
        go = tl.max((j_hi > j_lo).to(tl.int32), axis=0)
    t = c_lt + j_lo
    t_hat = s_lt + j_lo.to(tl.float64) * v
    unsettled = (s_lt > budget).to(tl.int32) * (1 - all_fit) * (1 - none_fit)
    t = tl.where(all_fit > 0, n64, tl.where(none_fit > 0, 0, t))
    t_hat = tl.where(all_fit > 0, total, tl.where(none_fit > 0, 0.0, t_hat))
    tail = (t_hat * one_g + alpha) / z_lo
    status = 1 - ok * (1 - unsettled)
    tl.store(k_ptr + row + one, n64 - t)
    tl.store(tail_ptr + row + one, tail)
    tl.store(nvalid_ptr + row + one, n_valid)
    tl.store(top_ptr + row + one, z)
    tl.store(status_ptr + row + one, status.to(tl.int32))


@triton.jit(do_not_specialize=["n"])
def exp_poly_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``out = exp_poly(a)`` elementwise (float64): for the tests and the GPU check, which
    compare it bit for bit with a one-operation-at-a-time NumPy reference."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = idx < n
    a = tl.load(a_ptr + idx, mask=inside, other=0.0)
    tl.store(out_ptr + idx, exp_poly(a), mask=inside)
