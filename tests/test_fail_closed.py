"""Fail closed (issue 16): every function that returns a bound, driven to the edges of the
float range, returns a bound that exact arithmetic accepts, or the trivial bound, or a
one-line ValueError; never a small wrong number, never NaN.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import certattn
from certattn.bounds import TAIL_BOUNDS

from ._exact import exact_tail_of_set, exact_tails
from .test_output import NAMES, _exact_error

EDGES = [1e-300, 1.0, 1e150, 1e300, 1.7e308]
VALUE_EDGES = [5e-324, 1e-310, 1e-300, 1.0, 1e300, 2.0**1023, 1.7e308]


@st.composite
def edge_rows(draw, n_max: int = 8):
    n = draw(st.integers(2, n_max))
    mag = draw(st.sampled_from(EDGES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.choice([-mag, -mag / 2, 0.0, mag / 3, mag, -np.inf], size=(2, n))
    x[:, 0] = draw(st.sampled_from([0.0, mag, -mag]))
    return x


@st.composite
def edge_values(draw, n: int):
    """Values ``(n, dv)`` of one or two magnitudes of VALUE_EDGES (subnormal to 2^1023,
    mixed), random signs and zeros."""
    dv = draw(st.integers(1, 3))
    mags = draw(st.lists(st.sampled_from(VALUE_EDGES), min_size=1, max_size=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.choice(mags, size=(n, dv)) * rng.choice([-1.0, 0.0, 1.0], size=(n, dv))


def _accepts(bound: float, exact: mpmath.mpf) -> bool:
    return not np.isnan(bound) and mpmath.mpf(bound) >= exact


@given(x=edge_rows(), k=st.integers(1, 8), name=st.sampled_from(TAIL_BOUNDS))
def test_logit_only_tail_bounds(x, k, name):
    k = min(k, x.shape[1])
    kw = {"n_cuts": 2} if name == "optimal_cuts" else {}
    try:
        b = np.asarray(certattn.tail_bound(x, k, bound=name, **kw))
    except ValueError:
        return
    for i in range(x.shape[0]):
        assert _accepts(float(b[i]), exact_tails(x[i])[min(k, np.isfinite(x[i]).sum())])


@given(x=edge_rows(), eps=st.sampled_from([0.0, 1e-300, 0.01, 0.5]))
def test_topk_and_kept(x, eps):
    cert = certattn.certify_topk(x, eps)
    kept = cert.kept_mask()
    again = certattn.certify_kept(x, kept)
    for i in range(x.shape[0]):
        exact = exact_tail_of_set(x[i], kept[i])
        assert _accepts(float(cert.tail_upper[i]), exact)
        assert _accepts(float(again.tail_upper[i]), exact)
        assert float(cert.tail_upper[i]) <= eps


@given(
    mag=st.sampled_from(EDGES),
    seed=st.integers(0, 2**16),
    eps=st.sampled_from([0.01, 0.3]),
)
def test_block_bounds_and_greedy_sets(mag, seed, eps):
    """BLOCK-BOUNDS against its extreme (block-constant) logits in exact arithmetic."""
    rng = np.random.default_rng(seed)
    nb = 5
    centre = rng.choice([-mag, 0.0, mag / 2], size=nb)
    with np.errstate(over="ignore"):  # an infinite bound is refused or trivially sound
        lo = centre - rng.choice([0.0, 1.0, mag / 4], size=nb)
        up = centre + rng.choice([0.0, 1.0, mag / 4], size=nb)
    sizes = rng.integers(1, 4, nb)
    kept = rng.random(nb) < 0.5
    try:
        b = certattn.block_tail_bounds(lo, up, sizes, kept)
        sel = certattn.greedy_block_set(lo, up, sizes, eps)
    except ValueError:
        return

    def extreme(tail_at, head_at, keep):
        row = np.concatenate([np.full(int(n), (tail_at if not c else head_at)[j])
                              for j, (n, c) in enumerate(zip(sizes, keep, strict=True))])
        mask = np.concatenate([np.full(int(n), c) for n, c in zip(sizes, keep, strict=True)])
        return exact_tail_of_set(row, mask)

    assert _accepts(float(b.upper), extreme(up, lo, kept))
    assert float(b.lower) <= extreme(lo, up, kept)
    assert float(sel.tail_upper) <= eps
    assert _accepts(float(sel.tail_upper), extreme(up, lo, np.asarray(sel.kept)))


@given(mag=st.sampled_from(EDGES), seed=st.integers(0, 2**16))
def test_score_bounds(mag, seed):
    """BLOCK-SCORE box and ball bounds hold for every key of the box, at any magnitude."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(0, 1, (6, 3)) * min(mag, 1e300)
    q = rng.normal(0, 1, (2, 3)) * rng.choice([1.0, min(mag, 1e300)])
    kmin, kmax = keys.min(0, keepdims=True), keys.max(0, keepdims=True)
    try:
        box = np.asarray(certattn.box_score_upper(q, kmin, kmax, scale=0.5))
    except ValueError:
        return
    with mpmath.workdps(60):
        for i in range(2):
            best = max(
                sum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(q[i], key,
                                                                                strict=True))
                for key in keys
            ) * mpmath.mpf(0.5)
            assert _accepts(float(box[i, 0]), best)


@pytest.mark.parametrize("method", ["ours", "mc", "tree", "gap"])
@pytest.mark.parametrize("mag", [1e19, 1e150, 1e300])
def test_search_at_the_edges(method, mag):
    q = np.array([[1.0, 1.0], [1.0, -1.0]])
    k = np.array([[mag, 1023.0], [mag, 1025.0], [-mag, 0.0], [0.5, 0.5]])
    v = np.array([[0.0], [1.0], [2.0], [3.0]])
    try:
        res = certattn.certified_search(q, k, v, 0.01, scale=1.0, method=method)
    except ValueError as exc:  # scores that overflow float64 are refused in one line
        assert "overflow" in str(exc) or "too large" in str(exc)
        return
    for i in range(2):
        s = [float(a) for a in (q[i] @ k.T)]
        exact = exact_tail_of_set(np.asarray(s), res.kept[i])
        assert _accepts(float(res.tail_upper[i]), exact)
        assert not np.isnan(res.error_bound[i])


@given(x=edge_rows(n_max=5), data=st.data())
def test_output_bounds_at_the_edges(x, data):
    """Every output bound covers the exact error, and the smallest k for a budget meets it
    exactly, for logits and values at the edges."""
    v = data.draw(edge_values(x.shape[1]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    kept = (rng.random(x.shape) < 0.5) & np.isfinite(x)
    kept[:, 0] = True
    ob = certattn.output_bounds(x, v, kept)
    for i in range(x.shape[0]):
        exact = _exact_error(x[i], v, kept[i])
        for name in (*NAMES, "best"):
            assert _accepts(float(getattr(ob, name)[i]), exact), name
    delta = 0.3 * float(np.abs(v).max())
    ks = certattn.smallest_k_for_output(x, v, delta)
    for i in range(x.shape[0]):
        top = np.zeros(x.shape[1], bool)
        top[np.argsort(-x[i], kind="stable")[: int(ks[i])]] = True
        assert _exact_error(x[i], v, top & np.isfinite(x[i])) <= mpmath.mpf(delta)


@given(data=st.data(), eps=st.sampled_from([0.0, 0.01, 0.5]))
def test_attention_and_search_at_value_edges(data, eps):
    """certify_attention and certified_search with values at the edges (issue 20)."""
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    k = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, 2.0]])
    v = data.draw(edge_values(k.shape[0]))
    x = q @ k.T
    for res in (certattn.certify_attention(q, k, v, eps, scale=1.0),
                certattn.certified_search(q, k, v, eps, scale=1.0)):
        for i in range(2):
            kept = np.asarray(res.kept)[i]
            assert _accepts(float(res.error_bound[i]), _exact_error(x[i], v, kept))
