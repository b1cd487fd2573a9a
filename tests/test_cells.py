"""Theorem BLOCK-SCORE (ball/box score bounds) and BLOCK-MASS (Bennett cell mass bound)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import certattn
from certattn._array import to_numpy
from certattn.cells import (
    ball_box_score_upper,
    ball_score_lower,
    ball_score_upper,
    bennett_log_mass,
    box_score_lower,
    box_score_upper,
    cell_tree,
    kmeans_cells,
)


@mpmath.workdps(60)
def _exact_scores(q: np.ndarray, keys: np.ndarray, scale: float) -> list[list[mpmath.mpf]]:
    """Exact ``scale * q.k`` (every float is a rational number)."""
    sc = mpmath.mpf(scale)
    return [
        [
            sc
            * mpmath.fsum(
                mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(qi, k, strict=False)
            )
            for k in keys
        ]
        for qi in q
    ]


def _geometry(keys: np.ndarray) -> tuple[np.ndarray, ...]:
    c = keys.mean(axis=0)
    r = float(np.max(np.linalg.norm(keys - c, axis=1))) * (1 + 1e-12)
    return c[None], np.array([r]), keys.min(axis=0)[None], keys.max(axis=0)[None]


@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1e-3, 1.0, 1e3, 1e6]),
)
def test_block_score_bounds_hold_exactly(d: int, n: int, seed: int, mag: float) -> None:
    """BLOCK-SCORE: lower <= every exact score <= upper, ball, box and both."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)) * mag
    q = rng.normal(size=(3, d)) * rng.choice([1e-3, 1.0, 1e3])
    scale = 1.0 / math.sqrt(d)
    c, r, lo, hi = _geometry(keys)
    exact = _exact_scores(q, keys, scale)
    ub = ball_score_upper(q, c, r, scale=scale)[:, 0]
    lb = ball_score_lower(q, c, r, scale=scale)[:, 0]
    ux = box_score_upper(q, lo, hi, scale=scale)[:, 0]
    lx = box_score_lower(q, lo, hi, scale=scale)[:, 0]
    both = ball_box_score_upper(q, c, r, lo, hi, scale=scale)[:, 0]
    for i in range(3):
        top, bottom = max(exact[i]), min(exact[i])
        assert mpmath.mpf(float(ub[i])) >= top and mpmath.mpf(float(ux[i])) >= top
        assert mpmath.mpf(float(both[i])) >= top
        assert mpmath.mpf(float(lb[i])) <= bottom and mpmath.mpf(float(lx[i])) <= bottom
        assert both[i] <= min(ub[i], ux[i])


def test_block_score_ball_equality_case() -> None:
    """BLOCK-SCORE: the ball bound is attained by k = c + r q/|q| (up to the margin)."""
    rng = np.random.default_rng(3)
    d = 16
    c = rng.normal(size=d)
    q = rng.normal(size=(1, d))
    r = 2.5
    k_star = c + r * q[0] / np.linalg.norm(q[0])
    ub = ball_score_upper(q, c[None], np.array([r]), scale=0.25)[0, 0]
    s = float(q[0] @ k_star) * 0.25
    assert s <= ub <= s + 1e-12 * (1 + abs(s))


def test_block_score_box_attained_at_corner() -> None:
    """BLOCK-SCORE: the box bound equals the score of the best corner."""
    rng = np.random.default_rng(4)
    lo = rng.normal(size=5)
    hi = lo + rng.uniform(0, 2, size=5)
    q = rng.normal(size=(1, 5))
    corner = np.where(q[0] > 0, hi, lo)
    ux = box_score_upper(q, lo[None], hi[None], scale=1.0)[0, 0]
    assert abs(ux - float(q[0] @ corner)) <= 1e-12 * (1 + abs(ux))


def test_block_score_any_backend(backend) -> None:
    """Results stay in the input's namespace and device and match NumPy."""
    rng = np.random.default_rng(5)
    q = rng.normal(size=(4, 8))
    c = rng.normal(size=(3, 8))
    r = rng.uniform(0.5, 1.5, size=3)
    lo = c - 1.0
    hi = c + 1.0
    want = ball_box_score_upper(q, c, r, lo, hi, scale=0.3)
    got = ball_box_score_upper(
        backend.asarray(q),
        backend.asarray(c),
        backend.asarray(r),
        backend.asarray(lo),
        backend.asarray(hi),
        scale=0.3,
    )
    assert type(got) is type(backend.asarray(q))
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12)


def test_block_score_rejects_bad_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        ball_score_upper(np.ones((1, 2)), np.ones((1, 2)), np.ones(1), scale=0.0)


@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_block_mass_bennett_bound(n: int, d: int, seed: int) -> None:
    """BLOCK-MASS: sum_i e^{s_i} <= the Bennett bound, exactly (mpmath)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n) * rng.choice([0.1, 1.0, 5.0]) + rng.normal() * 3
    s[rng.integers(n)] += rng.choice([0.0, 4.0])
    mu = float(np.mean(s))
    var = float(np.var(s)) * (1 + 1e-9)
    up = float(np.max(s)) + 1e-9
    bound = bennett_log_mass(mu - 1e-9, mu + 1e-9, up, var, n)
    exact = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(x))) for x in s))
    assert exact <= mpmath.mpf(float(bound))
    assert bound <= math.log(n) + up + 1e-9  # never worse than the trivial bound


def test_block_mass_bennett_attained_by_two_points() -> None:
    """BLOCK-MASS: two-level scores at mu + b and mu - v/b attain the bound."""
    b, v = 2.0, 0.5
    a = -v / b
    # weights p at b and 1 - p at a with mean 0: p b + (1 - p) a = 0
    p = -a / (b - a)
    n = 1000
    k = round(p * n)
    s = np.concatenate([np.full(k, b), np.full(n - k, a)])
    mu, var = float(s.mean()), float(s.var())
    bound = bennett_log_mass(mu, mu, float(s.max()), var, n)
    exact = math.log(np.sum(np.exp(s)))
    assert exact <= bound <= exact + 1e-6


def test_block_mass_degenerate_cells() -> None:
    """Equal scores (b = 0, v = 0) give exactly n e^mu; a zero variance with b > 0 too."""
    assert bennett_log_mass(1.0, 1.0, 1.0, 0.0, 5) == pytest.approx(math.log(5) + 1.0)
    assert bennett_log_mass(1.0, 1.0, 3.0, 0.0, 5) == pytest.approx(math.log(5) + 1.0)


def test_cell_tree_mass_bound_per_node() -> None:
    """log_mass_upper bounds every node's exact mass (float64 reference, wide rows)."""
    rng = np.random.default_rng(6)
    keys = rng.normal(size=(200, 12)) * 2
    q = rng.normal(size=(5, 12))
    tree = cell_tree(keys, branching=4, leaf_size=6, seed=1)
    up = tree.score_upper(q, scale=0.3, kind="both")
    lm = tree.log_mass_upper(q, up, scale=0.3)
    s = (q @ keys[tree.order].T) * 0.3
    for v in range(tree.n_nodes):
        seg = s[:, tree.start[v] : tree.stop[v]]
        mx = seg.max(axis=1)
        true = mx + np.log(np.exp(seg - mx[:, None]).sum(axis=1))
        assert np.all(true <= lm[:, v] + 1e-12)
        assert np.all(mx <= up[:, v])


@pytest.mark.parametrize("maker", ["flat", "tree"])
def test_partition_is_a_partition(maker: str) -> None:
    """Every key in exactly one direct parent; node ranges nest; radii and boxes sound."""
    rng = np.random.default_rng(7)
    keys = np.concatenate([rng.normal(size=(90, 5)), np.repeat(rng.normal(size=(1, 5)), 10, 0)])
    tree = kmeans_cells(keys, seed=2) if maker == "flat" else cell_tree(keys, seed=2)
    assert np.array_equal(np.sort(tree.order), np.arange(100))
    assert tree.start[0] == 0 and tree.stop[0] == 100
    for v in range(1, tree.n_nodes):
        p = tree.parent[v]
        assert tree.start[p] <= tree.start[v] < tree.stop[v] <= tree.stop[p]
        members = keys[tree.order[tree.start[v] : tree.stop[v]]]
        assert np.all(np.linalg.norm(members - tree.centre[v], axis=1) <= tree.radius[v])
        assert np.all(members >= tree.kmin[v]) and np.all(members <= tree.kmax[v])
    # each key's direct parent covers it
    pos = np.empty(100, dtype=np.int64)
    pos[tree.order] = np.arange(100)
    kp = tree.key_parent
    assert np.all((tree.start[kp] <= pos) & (pos < tree.stop[kp]))


def test_partition_deterministic_and_nested_top() -> None:
    """Fixed seed => same cells; the nested tree's top level is MC-Search's partition."""
    rng = np.random.default_rng(8)
    keys = rng.normal(size=(150, 6))
    a, b = kmeans_cells(keys, seed=4), kmeans_cells(keys, seed=4)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.start, b.start)
    nested = cell_tree(keys, seed=4, top_cells=math.ceil(math.sqrt(150)))
    top = np.flatnonzero(nested.parent == 0)
    flat_sets = {frozenset(a.order[a.start[v] : a.stop[v]].tolist()) for v in range(1, a.n_nodes)}
    nest_sets = {frozenset(nested.order[nested.start[v] : nested.stop[v]].tolist()) for v in top}
    assert flat_sets == nest_sets


def test_partition_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        kmeans_cells(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="keys"):
        kmeans_cells(np.zeros((0, 3)))


def test_adaptive_cells_split_only_structured_keys() -> None:
    """max_scatter: clustered keys get sub-cells, a diffuse Gaussian cloud stays flat."""
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(8, 16)) * 3
    clustered = centres[rng.integers(0, 8, 256)] + 0.1 * rng.normal(size=(256, 16))
    diffuse = rng.normal(size=(256, 16))
    a = cell_tree(clustered, seed=1, top_cells=2, max_scatter=0.6)
    b = cell_tree(diffuse, seed=1, top_cells=2, max_scatter=0.6)
    assert a.depth.max() >= 2
    assert b.depth.max() == 1


def test_ball_bound_keeps_tiny_queries():
    """|q| below 1e-154 used to square to 0: the bound lost its |q| r term (unsound)."""
    q = np.array([[1e-200, 0.0]])
    k = np.array([1.0, 0.0])  # inside the unit ball around 0: its score is 1e-200
    up = float(certattn.ball_score_upper(q, np.zeros((1, 2)), np.array([1.0]), scale=1.0)[0, 0])
    assert up >= float(q[0] @ k) == 1e-200
