"""Curvature machinery: sign convention, oracles (GEO-ORACLES), routes (GEO-GAUSS-EQ),
pull-back metric (GEO-METRIC) and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from certattn.geometry import (
    ExplicitMetric,
    brioschi,
    curvature,
    gated_attention,
    gaussian_curvature,
    hessian_fd,
    jacobian_fd,
    normal_curvature,
    pullback_metric,
)
from certattn.geometry.curvature import christoffel_pullback, riemann_from_metric
from certattn.geometry.metric import gaussian_fisher_metric
from certattn.geometry.oracles import (
    cylinder_map,
    half_plane_metric,
    normal_family_metric,
    sphere_map,
    sphere_metric,
)

pos = st.floats(0.2, 5.0)
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------- sign convention
@given(r=pos, seed=seeds)
def test_sphere_positive_every_route(r: float, seed: int) -> None:
    """GEO-ORACLES: sphere of radius r has K = 1/r^2 by all four routes; S = 2K; Ric = K g."""
    th = np.random.default_rng(seed).uniform([0.3, -3.0], [2.8, 3.0], size=(6, 2))
    for cv in (curvature(sphere_map(r), th), curvature(sphere_map(r), th, route="metric"),
               curvature(sphere_metric(r), th)):
        np.testing.assert_allclose(cv.gaussian, 1 / r**2, rtol=1e-6)
        np.testing.assert_allclose(cv.scalar, 2 / r**2, rtol=1e-6)
        np.testing.assert_allclose(cv.ricci, cv.metric / r**2, rtol=1e-6, atol=1e-9 * r**2)
    fd = curvature(sphere_metric(r, analytic=False), th).gaussian  # metric by differences
    np.testing.assert_allclose(fd, 1 / r**2, rtol=1e-5)
    np.testing.assert_allclose(brioschi(*sphere_metric(r).derivatives(th)), 1 / r**2, rtol=1e-10)


@given(lam=pos, seed=seeds)
def test_half_plane_negative_and_scaling(lam: float, seed: int) -> None:
    """GEO-ORACLES: half-plane K = -1; g -> lam g gives K -> -1/lam (metric route, Brioschi)."""
    th = np.random.default_rng(seed).uniform([-3, 0.2], [3, 4], size=(5, 2))
    cv = curvature(half_plane_metric(lam), th)
    np.testing.assert_allclose(cv.gaussian, -1 / lam, rtol=1e-10)
    np.testing.assert_allclose(brioschi(*half_plane_metric(lam).derivatives(th)), -1 / lam,
                               rtol=1e-10)
    np.testing.assert_allclose(cv.scalar, -2 / lam, rtol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_normal_family_constant_negative(d: int) -> None:
    """GEO-ORACLES: N(mu, s^2 I_d) has every sectional curvature -1/(2d); S = -(d+1)/2."""
    rng = np.random.default_rng(d)
    th = np.concatenate([rng.normal(size=(4, d)), rng.uniform(0.5, 2.0, (4, 1))], -1)
    metric = normal_family_metric(d)
    g = metric(th)
    np.testing.assert_allclose(
        g, np.eye(d + 1) * np.r_[np.ones(d), 2 * d] / th[:, d, None, None] ** 2, rtol=1e-12)
    cv = curvature(metric, th)
    for _ in range(3):
        u, v = rng.normal(size=(2, d + 1)) if d > 0 else None
        np.testing.assert_allclose(cv.sectional(u, v), -1 / (2 * d), rtol=1e-5)
    np.testing.assert_allclose(cv.scalar, -(d + 1) / 2, rtol=1e-5)


def test_univariate_normal_is_minus_half() -> None:
    """GEO-ORACLES: the univariate normal's Fisher metric diag(1,2)/s^2 has K = -1/2."""
    th = np.array([[0.3, 0.7], [-1.0, 1.9]])
    np.testing.assert_allclose(gaussian_curvature(normal_family_metric(1), th), -0.5, rtol=1e-6)


@given(r=pos, seed=seeds)
def test_cylinder_bent_but_flat(r: float, seed: int) -> None:
    """GEO-ORACLES: cylinder K = 0 (differenced Hessian) though its normal curvature is 1/r."""
    th = np.random.default_rng(seed).uniform(-3, 3, size=(4, 2))
    np.testing.assert_allclose(gaussian_curvature(cylinder_map(r), th), 0.0, atol=1e-6 / r**2)
    kn = normal_curvature(cylinder_map(r), th, np.array([1.0, 0.0]))
    np.testing.assert_allclose(kn, 1 / r, rtol=1e-6)


@given(lam=pos, seed=seeds)
def test_covariance_scaling(lam: float, seed: int) -> None:
    """GEO-ORACLES scaling: Sigma -> lam Sigma divides g by lam, multiplies K by lam."""
    th = np.random.default_rng(seed).uniform([0.3, -3.0], [2.8, 3.0], size=(3, 2))
    np.testing.assert_allclose(gaussian_curvature(sphere_map(1.5), th, cov=lam), lam / 1.5**2,
                               rtol=1e-8)


# ----------------------------------------------------------------------------- GEO-METRIC
def test_metric_with_variance_term() -> None:
    """GEO-METRIC: g = J^T S^-1 J + 1/2 tr(S^-1 dS S^-1 dS) for N(m, s^2): diag(1, 2)/s^2."""
    s = 1.7
    J = np.array([[1.0, 0.0]])
    dS = np.array([[[0.0]], [[2 * s]]])
    np.testing.assert_allclose(gaussian_fisher_metric(J, [[s**2]], dS),
                               np.diag([1.0, 2.0]) / s**2, rtol=1e-14)
    np.testing.assert_allclose(gaussian_fisher_metric(J, [[s**2]]), np.diag([1.0, 0.0]) / s**2)


@given(seed=seeds)
def test_pullback_metric_general_cov(seed: int) -> None:
    """GEO-METRIC: pullback_metric equals J^T Sigma^{-1} J and is batched."""
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(3, 4, 2))
    A = rng.normal(size=(4, 4))
    S = A @ A.T + 0.5 * np.eye(4)
    g = pullback_metric(J, S)
    for b in range(3):
        np.testing.assert_allclose(g[b], J[b].T @ np.linalg.solve(S, J[b]), rtol=1e-10)


# ----------------------------------------------------------------------------- GEO-GAUSS-EQ
def _random_gated(rng: np.random.Generator, dq: int, dv: int, headwise: bool):
    keys = rng.normal(size=(4, dq))
    values = rng.normal(size=(4, dv))
    W = rng.normal(size=dq) if headwise else rng.normal(size=(dv, dq))
    return gated_attention(keys, values, W, rng.normal(size=1 if headwise else dv))


@given(seed=seeds, dq=st.sampled_from([2, 3]), headwise=st.booleans(), general_cov=st.booleans())
def test_gauss_route_equals_metric_route(seed: int, dq: int, headwise: bool,
                                         general_cov: bool) -> None:
    """GEO-GAUSS-EQ: Riemann, Ricci, scalar and sectional agree between the two routes."""
    rng = np.random.default_rng(seed)
    m = _random_gated(rng, dq, 4, headwise)
    A = rng.normal(size=(4, 4))
    cov = A @ A.T + np.eye(4) if general_cov else None
    q = rng.normal(size=(3, dq))
    a = curvature(m, q, cov)
    assume(np.all(np.linalg.cond(a.metric) < 1e4))
    b = curvature(m, q, cov, route="metric")
    # R = dGamma - dGamma + Gamma Gamma - Gamma Gamma cancels: the metric route (dg
    # differentiated by the 5-point stencil) is accurate relative to |Gamma|^2, not to |R|
    G = christoffel_pullback(m.jacobian(q), m.hessian(q), cov)
    tol = 1e-7 * (np.max(np.abs(G)) ** 2 + np.max(np.abs(a.riemann)))
    np.testing.assert_allclose(b.riemann, a.riemann, atol=tol)
    # Gauss-equation scalar curvature S = <H, H> - g^ik g^jl <II_ij, II_kl>
    P = np.eye(4) if cov is None else np.linalg.inv(cov)
    gi = np.linalg.inv(a.metric)
    II, H = a.second_fundamental_form, a.mean_curvature
    S = np.einsum("...a,ab,...b->...", H, P, H) - np.einsum(
        "...ik,...jl,...aij,ab,...bkl->...", gi, gi, II, P, II)
    np.testing.assert_allclose(a.scalar, S, rtol=1e-8, atol=1e-10 * np.max(np.abs(S)))
    scale = np.max(np.abs(a.riemann))
    # Riemann symmetries of the lowered tensor R_{lijk} = g_la R^a_ijk
    Rl = np.einsum("...la,...aijk->...lijk", a.metric, a.riemann)
    np.testing.assert_allclose(Rl, -np.swapaxes(Rl, -3, -2), atol=1e-12 * scale)
    np.testing.assert_allclose(Rl, -np.swapaxes(Rl, -4, -1), atol=1e-12 * scale)
    if dq == 2:
        np.testing.assert_allclose(a.scalar, 2 * a.gaussian, rtol=1e-9)


def test_metric_route_of_constant_metric_is_zero() -> None:
    """A constant metric has R = 0 exactly (sanity of riemann_from_metric)."""
    g = np.array([[2.0, 0.3], [0.3, 1.0]])
    R = riemann_from_metric(g, np.zeros((2, 2, 2)), np.zeros((2, 2, 2, 2)))
    assert np.all(R == 0)
    em = ExplicitMetric(lambda t: np.broadcast_to(g, (*t.shape[:-1], 2, 2)), 2)
    assert np.max(np.abs(curvature(em, np.zeros((3, 2))).riemann)) < 1e-6


# ----------------------------------------------------------------------------- derivatives
@given(seed=seeds)
def test_finite_differences_match_analytic(seed: int) -> None:
    """Documented steps: Jacobian to ~1e-9, Hessian from values to ~1e-6 (relative)."""
    rng = np.random.default_rng(seed)
    m = _random_gated(rng, 2, 3, False)
    q = rng.normal(size=(5, 2))
    J, H = m.jacobian(q), m.hessian(q)
    np.testing.assert_allclose(jacobian_fd(m, q), J, atol=1e-8 * (1 + np.abs(J).max()))
    np.testing.assert_allclose(jacobian_fd(m, q, order=4), J, atol=1e-11 * (1 + np.abs(J).max()))
    np.testing.assert_allclose(hessian_fd(m, q), H, atol=1e-5 * (1 + np.abs(H).max()))


def test_batched_over_leading_axes() -> None:
    """Every routine batches: a (2, 3, 2) grid equals the point-by-point loop."""
    rng = np.random.default_rng(0)
    m = _random_gated(rng, 2, 3, True)
    q = rng.normal(size=(2, 3, 2))
    K = gaussian_curvature(m, q)
    assert K.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(K[i, j], gaussian_curvature(m, q[i, j]), rtol=1e-10)
