"""Theorem QUANT-SCORE and certified search from low-bit key estimates (issue 13).

Exact arithmetic (Fractions for the quantization error and the scores, mpmath for the
softmax tails) on small cases; hypothesis over bits, groups and adversarial keys
(outliers in one channel, keys at the grid's half-way points and edges, zero-range
channels, magnitudes beyond float16 and float32, ``-inf``-masked keys).
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from certattn import certify_topk
from certattn._fp import quant_step_factor
from certattn.policies import Search
from certattn.quant import QuantKeys, quantize_keys
from certattn.search import certified_search, search_quant
from tests.test_search import _exact_tail

KINDS = ("gauss", "outlier", "halfway", "zero_range", "huge", "beyond_f32", "tiny")


def _keys(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Adversarial keys of one kind (module docstring)."""
    k = rng.normal(size=(n, d))
    if kind == "outlier":
        k[:, rng.integers(d)] *= 1e3
        k[rng.integers(n), rng.integers(d)] = -5e3
    elif kind == "halfway":  # keys half-way between grid points and at the grid's edges
        qk = quantize_keys(k, 4, group=None, residual=False)
        lo = qk.lo.astype(np.float64)[0]
        st_ = qk.step.astype(np.float64)[0]
        c = rng.integers(0, 15, size=(n, d))
        k = lo + st_ * (c + 0.5)
        k[0] = lo
        k[1 % n] = lo + 15 * st_
        k[2 % n] = np.nextafter(lo + st_ * 7.5, np.inf)
    elif kind == "zero_range":
        k[:, 0] = 0.1  # not a float16 number
        if d > 1:
            k[:, 1] = 0.5  # a float16 number: exact, step 0
        if d > 2:
            k[:, 2] = -3.0e-8  # a float16 subnormal neighbourhood
    elif kind == "huge":
        k *= 1e6  # beyond float16: float32 metadata
    elif kind == "beyond_f32":
        k[:, 0] *= 1e40  # beyond float32: trivial bounds for those groups
    elif kind == "tiny":
        k *= 1e-30
    return k


def _frac(x: float) -> Fraction:
    return Fraction(float(x))


@given(
    st.integers(1, 12),
    st.integers(1, 5),
    st.sampled_from((2, 4, 8)),
    st.sampled_from((0, 2, 4, 6)),
    st.sampled_from((1, 3, None)),
    st.sampled_from(KINDS),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_quant_error_and_score_bounds_hold_exactly(
    n: int, d: int, bits: int, extra: int, group: int | None, kind: str, residual: bool,
    seed: int
) -> None:
    """QUANT-SCORE: |k - khat| <= delta per entry and lower <= scale q.k <= upper, exactly
    (Fractions: every float is a rational), on plain grids and on the top ``bits`` bits of
    a finer grid (nested: ``grid_bits = bits + extra`` when that is a width)."""
    rng = np.random.default_rng(seed)
    keys = _keys(kind, n, d, rng)
    grid = bits + extra if bits + extra in (2, 4, 8) else bits
    qk = quantize_keys(keys, bits, group=group, residual=residual, grid_bits=grid)
    assert qk.codes.max(initial=0) <= 2**bits - 1 and qk.grid_bits == grid
    khat, delta = qk.reconstruct(), qk.error_bound()
    for i in range(n):
        for j in range(d):
            if np.isfinite(delta[i, j]):
                assert abs(_frac(keys[i, j]) - _frac(khat[i, j])) <= _frac(delta[i, j])
        if residual and np.isfinite(qk.resid[i]) and np.all(np.isfinite(delta[i])):
            r2 = sum((_frac(keys[i, j]) - _frac(khat[i, j])) ** 2 for j in range(d))
            assert r2 <= _frac(qk.resid[i]) ** 2
    q = rng.normal(size=(3, d)) * rng.choice([1e-200, 1e-3, 1.0, 30.0])
    scale = 1.0 / math.sqrt(d)
    lower, upper = qk.score_bounds(q, scale=scale)
    pu = qk.page_upper(q, scale=scale)
    for a in range(3):
        for i in range(n):
            s = _frac(scale) * sum(_frac(q[a, j]) * _frac(keys[i, j]) for j in range(d))
            if np.isfinite(lower[a, i]):
                assert _frac(lower[a, i]) <= s
            if np.isfinite(upper[a, i]):
                assert s <= _frac(upper[a, i])
            if np.isfinite(pu[a, qk.group_of[i]]):
                assert s <= _frac(pu[a, qk.group_of[i]])


def test_quant_step_factor_and_zero_range_channels() -> None:
    """A constant float16 channel has step 0 and an exact reconstruction; a constant
    channel that is not a float16 number gets a positive step covering it."""
    assert quant_step_factor(4) > 0.5 and quant_step_factor(4) - 0.5 < 1e-13
    keys = np.zeros((6, 3))
    keys[:, 0] = 0.5
    keys[:, 1] = 0.1
    keys[:, 2] = np.arange(6.0)
    qk = quantize_keys(keys, 4)
    assert qk.step[0, 0] == 0 and qk.reconstruct()[0, 0] == 0.5 and qk.error_bound()[0, 0] == 0
    assert qk.step[0, 1] > 0 and qk.lo[0, 1] <= 0.1 <= qk.lo[0, 1] + 15 * qk.step[0, 1]
    assert qk.lo.dtype == np.float16
    assert np.all(np.abs(qk.reconstruct()[:, 2] - keys[:, 2]) <= qk.error_bound()[:, 2])
    assert quantize_keys(keys * 1e6, 4).lo.dtype == np.float32  # beyond float16


def test_quant_bounds_shrink_with_bits() -> None:
    """More bits, tighter bounds (and every bound contains the exact score)."""
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(64, 16))
    q = rng.normal(size=(4, 16))
    s = q @ keys.T / 4
    widths = []
    for bits in (2, 4, 8):
        lo, up = quantize_keys(keys, bits).score_bounds(q, scale=0.25)
        assert np.all(lo <= s) and np.all(s <= up)
        widths.append(float(np.mean(up - lo)))
    assert widths[0] > 3 * widths[1] > 9 * widths[2]


def test_quant_nested_grids_share_metadata_and_hold_at_run_edges() -> None:
    """Nested grids: the 4-bit codes of an 8-bit grid are its codes' top 4 bits on the same
    metadata; keys at every grid point and half-way between (the ends of each run of 16
    codes included) stay within the nested bound, exactly; the nested 4-bit bound is no
    wider than 8.5 steps of the 8-bit grid plus rounding."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(4, 3))
    fine = quantize_keys(base, 8, group=None, residual=False)
    lo, step = fine.lo.astype(np.float64)[0], fine.step.astype(np.float64)[0]
    c = np.arange(256.0)[:, None]
    keys = np.concatenate([lo + step * c, lo + step * (c[:-1] + 0.5),
                           np.nextafter(lo + step * (c[:-1] + 0.5), np.inf)])
    for bits in (2, 4):
        fine = quantize_keys(keys, 8, group=None, residual=True)
        nested = quantize_keys(keys, bits, group=None, residual=True, grid_bits=8)
        np.testing.assert_array_equal(nested.lo, fine.lo)
        np.testing.assert_array_equal(nested.step, fine.step)
        np.testing.assert_array_equal(nested.codes, fine.codes >> (8 - bits))
        assert nested.hidden == 8 - bits and nested.page_upper(keys[:2], scale=1.0).shape == (2, 1)
        khat, delta = nested.reconstruct(), nested.error_bound()
        run = 2 ** (8 - bits)
        grid_step = fine.step.astype(np.float64)[0]
        assert np.all(delta <= grid_step * (run / 2 + 1e-9) + 1e-12)
        for i in range(0, keys.shape[0], 7):
            for j in range(3):
                assert abs(_frac(keys[i, j]) - _frac(khat[i, j])) <= _frac(delta[i, j])
            r2 = sum((_frac(keys[i, j]) - _frac(khat[i, j])) ** 2 for j in range(3))
            assert r2 <= _frac(nested.resid[i]) ** 2
    with pytest.raises(ValueError, match="grid_bits"):
        quantize_keys(np.ones((3, 2)), 8, grid_bits=4)


def test_quant_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_keys(np.ones((3, 2)), 3)
    with pytest.raises(ValueError, match="NaN"):
        quantize_keys(np.full((3, 2), np.nan), 4)
    with pytest.raises(ValueError, match="group"):
        quantize_keys(np.ones((3, 2)), 4, group=0)
    with pytest.raises(ValueError, match="bits and group"):
        certified_search(np.ones((1, 2)), np.ones((3, 2)), np.ones((3, 2)), 0.1, bits=4)
    with pytest.raises(ValueError, match="QuantKeys"):
        certified_search(np.ones((1, 2)), np.ones((3, 2)), np.ones((3, 2)), 0.1,
                         method="quant", cells=quantize_keys(np.ones((4, 2))))


@given(
    st.integers(2, 14),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 1e-3, 0.01, 0.1, 0.5]),
    st.sampled_from(("quant", "paged")),
    st.sampled_from((2, 4, 8)),
    st.sampled_from(KINDS),
    st.booleans(),
)
def test_search_quant_sound_exact(
    n: int, d: int, seed: int, eps: float, method: str, bits: int, kind: str, masked: bool
) -> None:
    """SEARCH-SOUND with QUANT-SCORE bounds: exact tail of kept <= tail_upper <= eps
    (mpmath), masked keys never kept, scored keys at least the kept ones."""
    rng = np.random.default_rng(seed)
    keys = _keys(kind, n, d, rng)
    q = rng.normal(size=(2, d)) * rng.choice([0.3, 3.0])
    mask = None
    if masked:
        mask = rng.random((2, n)) < 0.7
        mask[:, rng.integers(n)] = True
    res = certified_search(q, keys, rng.normal(size=(n, 3)), eps, method=method, bits=bits,
                           group=rng.choice([2, 5, 32]), mask=mask)
    kept = np.asarray(res.kept)
    for i in range(2):
        vis = None if mask is None else mask[i]
        tail = _exact_tail(q[i], keys, kept[i], 1.0 / math.sqrt(d), vis)
        assert tail <= mpmath.mpf(float(res.tail_upper[i]))
        assert float(res.tail_upper[i]) <= eps
        assert 0 < res.scored[i] <= (n if vis is None else vis.sum())
        assert kept[i].sum() <= res.scored[i]
        if vis is not None:
            assert not np.any(kept[i] & ~vis)
        assert res.bytes_read[i] > 0 and res.bytes_dense[i] == 2 * d * res.n_valid[i]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["quant", "paged"])
def test_quant_adversarial_keys(kind: str, method: str) -> None:
    """Wide rows of adversarial keys with a causal mask: sound (float64 reference with a
    relative tolerance far above its own error, and exact mpmath on a few rows)."""
    rng = np.random.default_rng(hash(kind) % 2**32)
    n, d = 96, 8
    keys = _keys(kind, n, d, rng)
    q = rng.normal(size=(n, d))
    mask = np.tril(np.ones((n, n), dtype=bool))
    res = certified_search(q, keys, rng.normal(size=(n, 4)), 0.01, mask=mask, method=method)
    kept = np.asarray(res.kept)
    assert not np.any(kept & ~mask)
    scale = 1 / math.sqrt(d)
    for i in (0, 1, 17, 60, 95):
        tail = _exact_tail(q[i], keys, kept[i], scale, mask[i])
        assert tail <= mpmath.mpf(float(res.tail_upper[i])) <= 0.01
    if kind == "beyond_f32":  # no usable estimate: every visible key scored, tail 0
        assert np.array_equal(np.asarray(res.scored), mask.sum(axis=1))


def test_search_quant_fails_closed_when_bounds_overflow() -> None:
    """Bounds that overflow (keys of 1e300) never certify early: every key is scored."""
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(20, 4))
    keys[3] = 1e150
    q = rng.normal(size=(2, 4)) * 1e-150
    res = certified_search(q, keys, np.ones((20, 1)), 0.1, method="quant")
    tails = [_exact_tail(q[i], keys, res.kept[i], 0.5) for i in range(2)]
    assert all(t <= mpmath.mpf(float(b)) for t, b in zip(tails, res.tail_upper, strict=True))


def test_quant_bytes_accounting() -> None:
    """bytes_read = group metadata + estimates of every visible key + 2 d per scored key."""
    rng = np.random.default_rng(3)
    n, d, g = 40, 8, 16
    keys, q = rng.normal(size=(n, d)), rng.normal(size=(3, d))
    mask = np.ones((3, n), dtype=bool)
    mask[1, 20:] = False  # groups 0, 1 visible (keys 0..19)
    res = certified_search(q, keys, np.ones((n, 2)), 0.05, method="quant", bits=4, group=g,
                           mask=mask)
    nvis = mask.sum(axis=1)
    groups = np.array([3, 2, 3])
    meta = 2 * d * 2  # lo and step in float16 per channel
    want = groups * meta + nvis * (d * 4 / 8 + 2) + np.asarray(res.scored) * 2 * d
    np.testing.assert_allclose(np.asarray(res.bytes_read), want)
    np.testing.assert_allclose(res.read_fraction, want / (2 * d * nvis))
    mc = certified_search(q, keys, np.ones((n, 2)), 0.05, method="mc", mask=mask)
    np.testing.assert_allclose(mc.bytes_read, mc.scored * 2 * d + mc.bounded * 2 * (d + 1))


def test_paged_skips_pages_it_can_bound() -> None:
    """Pages whose box bound is far below the head are never opened: the paged search
    reads fewer bytes than reading every estimate, and stays sound."""
    rng = np.random.default_rng(4)
    n, d = 256, 16
    keys = rng.normal(size=(n, d)) * 0.3
    q = np.tile(rng.normal(size=(1, d)), (4, 1)) * 3
    keys[:32] += 6.0 * q[0] / np.linalg.norm(q[0])  # the first page is the head
    vals = rng.normal(size=(n, 2))
    paged = certified_search(q, keys, vals, 0.01, method="paged", group=32)
    flat = certified_search(q, keys, vals, 0.01, method="quant", group=32)
    assert np.all(paged.bounded < n // 32)  # some pages never opened
    assert np.all(paged.bytes_read < flat.bytes_read)
    tails = [_exact_tail(q[i], keys, paged.kept[i], 0.25) for i in range(4)]
    assert all(t <= mpmath.mpf(float(b)) <= 0.01 for t, b in zip(tails, paged.tail_upper,
                                                                   strict=True))


def test_quant_near_the_floor_on_real_attention() -> None:
    """MiniLM sample (all heads, eps = 0.01): 4-bit estimates score within 1.15x of the
    floor k_eps on average and 8-bit within 1.02x; every certificate sound (float64)."""
    from certattn.models import load_sample

    for att in load_sample()[:2]:
        q, k, v = att.queries[1], att.keys[1], att.values[1]
        floor = np.asarray(certify_topk(np.matmul(q, np.swapaxes(k, -1, -2)).astype(np.float64)
                                        * att.scale, 0.01).k)
        for bits, ratio in ((4, 1.15), (8, 1.02)):
            res = certified_search(q, k, v, 0.01, scale=att.scale, method="quant", bits=bits)
            assert np.mean(res.scored) <= ratio * np.mean(floor)
            s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2))
            s = s * att.scale
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            tail = 1 - np.sum(np.where(res.kept, p, 0), axis=-1)
            assert np.all(tail <= res.tail_upper * (1 + 1e-9) + 1e-15)


def test_search_quant_reuses_given_keys_and_policy() -> None:
    """A precomputed QuantKeys gives the same search; the Search policy runs "quant"."""
    import certattn

    rng = np.random.default_rng(5)
    q, keys, vals = rng.normal(size=(6, 8)), rng.normal(size=(50, 8)), rng.normal(size=(50, 2))
    qk = quantize_keys(keys, 8, group=16)
    assert isinstance(qk, QuantKeys)
    a = certified_search(q, keys, vals, 0.02, method="quant", bits=8, group=16)
    b = certified_search(q, keys, vals, 0.02, method="quant", cells=qk)
    assert np.array_equal(a.kept, b.kept) and np.array_equal(a.scored, b.scored)
    r = search_quant(qk, q, keys, np.ones((6, 50), bool), 0.02, scale=1 / math.sqrt(8))
    assert np.array_equal(r["kept"], a.kept)
    cert = certattn.certify_attention(q, keys, vals, policy=Search(0.02, method="quant", bits=8))
    assert np.all(np.asarray(cert.tail_upper) <= 0.02)
    with pytest.raises(ValueError, match="bits and group"):
        Search(0.02, method="mc", bits=4)


@pytest.mark.parametrize("method", ["quant", "paged"])
def test_search_quant_additive_mask_and_gqa_heads(method: str) -> None:
    """-inf-masked keys (additive mask) are never kept or counted; grouped-query heads
    search their own key head and agree with searching it alone."""
    rng = np.random.default_rng(6)
    q = rng.normal(size=(4, 12, 8))
    keys = rng.normal(size=(2, 70, 8))
    vals = rng.normal(size=(2, 70, 3))
    vis = rng.random((4, 12, 70)) < 0.6
    vis[..., 0] = True
    add = np.where(vis, 0.0, -np.inf)
    res = certified_search(q, keys, vals, 0.02, mask=add, method=method, bits=2)
    kept = np.asarray(res.kept)
    assert not np.any(kept & ~vis)
    assert np.array_equal(np.asarray(res.n_valid), vis.sum(axis=-1))
    for h in range(4):
        one = certified_search(q[h], keys[h // 2], vals[h // 2], 0.02, mask=vis[h],
                               method=method, bits=2)
        assert np.array_equal(np.asarray(one.kept), kept[h])
        for i in (0, 5, 11):
            tail = _exact_tail(q[h, i], keys[h // 2], kept[h, i], 1 / math.sqrt(8), vis[h, i])
            assert tail <= mpmath.mpf(float(res.tail_upper[h, i])) <= 0.02
