"""Attention heads: ungated flatness and its scope, gate criteria, closed forms, depth.

Theorems GEO-UNGATED-FLAT, GEO-SCOPE, GEO-HEADWISE, GEO-SPHERE-GATE, GEO-SIGMOID-GATE,
GEO-DEPTH (THEORY.md section 8)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from certattn.geometry import (
    Compose,
    Gated,
    SigmoidGate,
    SoftmaxAttention,
    SphereCapGate,
    curvature,
    depth_curvature,
    gated_attention,
    gaussian_curvature,
    hessian_fd,
    jacobian_fd,
    sigmoid_gate_curvature_at_zero,
    softmax_chart_attention,
    sphere_cap_curvature,
    structured_depth_map,
    ungated_simplex,
)
from certattn.geometry.gating import headwise_second_fundamental_form, sigmoid_gate_map
from certattn.geometry.maps import ReciprocalQuadraticGate

seeds = st.integers(0, 2**31 - 1)


def _sym(rng: np.random.Generator, p: int = 2) -> np.ndarray:
    A = rng.normal(size=(p, p))
    return A + A.T


# ----------------------------------------------------------------------------- GEO-UNGATED-FLAT
@given(seed=seeds, n=st.integers(3, 5), d=st.integers(2, 5))
def test_ungated_flat_in_simplex_chart(seed: int, n: int, d: int) -> None:
    """Simplex chart: mu = U_n + D theta, Hessian exactly 0, g = D^T D constant, R = 0."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(n, max(d, n - 1)))
    m = ungated_simplex(U)
    th = rng.dirichlet(np.ones(n), size=4)[:, :-1]
    alpha = np.concatenate([th, 1 - th.sum(1, keepdims=True)], 1)
    np.testing.assert_allclose(m(th), alpha @ U, rtol=1e-10, atol=1e-12)
    cv = curvature(m, th)
    assert np.all(cv.riemann == 0)
    np.testing.assert_allclose(cv.metric, np.broadcast_to(m.D.T @ m.D, cv.metric.shape))


@given(seed=seeds, d=st.integers(2, 5))
def test_ungated_flat_in_softmax_chart(seed: int, d: int) -> None:
    """alpha = softmax(q1, q2, 0): g is not constant but K = 0 (both routes, relative 1e-8)."""
    rng = np.random.default_rng(seed)
    m = softmax_chart_attention(rng.normal(size=(3, d)))
    q = rng.normal(size=(5, 2))
    cv = curvature(m, q)
    assert np.ptp(cv.metric[..., 0, 0]) > 1e-6  # the metric really varies
    II = cv.second_fundamental_form
    cond = np.max(np.linalg.cond(cv.metric))
    assert np.max(np.abs(II)) < 1e-13 * cond * np.max(np.abs(m.hessian(q)))  # in-plane
    Gs = np.max(np.abs(m.hessian(q))) ** 2 / np.min(np.linalg.eigvalsh(cv.metric))
    assert np.max(np.abs(cv.gaussian)) < 1e-10 * Gs
    if cond < 1e3:  # the metric-only route loses ~cond(g)^2 digits (see curvature tests)
        Km = curvature(m, q, route="metric").gaussian
        assert np.max(np.abs(Km)) < 1e-5 * Gs


@given(seed=seeds)
def test_ungated_stack_ending_in_three_token_layer_is_flat(seed: int) -> None:
    """GEO-DEPTH: ungated stacks whose last layer has 3 tokens stay flat."""
    rng = np.random.default_rng(seed)
    first = SoftmaxAttention(rng.normal(size=(5, 2)), rng.normal(size=(5, 3)))
    last = SoftmaxAttention(rng.normal(size=(3, 3)), rng.normal(size=(3, 4)))
    stack = Compose([first, last])
    q = rng.normal(size=(4, 2))
    cv = curvature(stack, q)
    assume(np.all(np.linalg.cond(cv.metric) < 1e6))
    H = stack.hessian(q)
    scale = np.max(np.abs(H)) ** 2 / np.min(np.linalg.eigvalsh(cv.metric))
    assert np.max(np.abs(cv.gaussian)) < 1e-9 * scale
    # and the chain-rule Hessian is right
    np.testing.assert_allclose(H, hessian_fd(stack, q), atol=1e-5 * np.max(np.abs(H)))
    np.testing.assert_allclose(stack.jacobian(q), jacobian_fd(stack, q),
                               atol=1e-8 * np.max(np.abs(stack.jacobian(q))))


# ----------------------------------------------------------------------------- GEO-SCOPE
def test_scope_four_keys_two_dim_query_is_curved() -> None:
    """n = 4 keys with a 2-D query: the ungated head is curved (K(0) = -4 exactly)."""
    m = SoftmaxAttention([[1, 0], [0, 1], [0, 0], [1, 1]], np.eye(4), scale=1.0)
    np.testing.assert_allclose(gaussian_curvature(m, np.zeros(2)), -4.0, rtol=1e-10)
    np.testing.assert_allclose(gaussian_curvature(m, np.zeros(2), route="metric"), -4.0,
                               rtol=1e-6)


@given(seed=seeds)
def test_scope_generic_four_key_heads_are_curved(seed: int) -> None:
    """A generic 4-key head with 2-D query and values in R^4 has K != 0 somewhere.

    "Non-zero" means 1e3 times above the rounding bound the flatness tests use
    (``1e-10 * |Hess mu|^2 / lambda_min(g)``)."""
    rng = np.random.default_rng(seed)
    m = SoftmaxAttention(rng.normal(size=(4, 2)), np.eye(4) + 0.1 * rng.normal(size=(4, 4)),
                         scale=1.0)
    q = rng.normal(scale=0.5, size=(8, 2))
    cv = curvature(m, q)
    scale = np.max(np.abs(m.hessian(q))) ** 2 / np.min(np.linalg.eigvalsh(cv.metric))
    assert np.max(np.abs(cv.gaussian)) > 1e-7 * scale


# ----------------------------------------------------------------------------- GEO-HEADWISE
@given(seed=seeds)
def test_headwise_criterion_sign(seed: int) -> None:
    """mu = s m, m affine, 1/s = f quadratic: sign K = sign det Hess(1/s) = sign det Q."""
    rng = np.random.default_rng(seed)
    Q = _sym(rng)
    assume(abs(np.linalg.det(Q)) > 0.05 * np.sum(Q**2))
    gate = ReciprocalQuadraticGate(Q, rng.normal(size=2), 0.0)
    th = rng.dirichlet(np.ones(3), size=8)[:, :2]
    f = gate.f(th)
    gate.c0 = 1.0 - float(np.min(f)) + abs(float(np.min(f)))  # make 1/s > 0 on the sample
    U = rng.normal(size=(3, 3))
    m = Gated(ungated_simplex(U), gate)
    K = gaussian_curvature(m, th)
    assert np.all(np.sign(K) == np.sign(np.linalg.det(Q)))
    # II formula: <II_ij, nu> = -(nu . m) s^2 Hess(1/s)_ij
    cv = curvature(m, th)
    J = m.jacobian(th)
    nu = np.cross(J[..., 0], J[..., 1])
    nu /= np.linalg.norm(nu, axis=-1, keepdims=True)
    h = np.einsum("...a,...aij->...ij", nu, cv.second_fundamental_form)
    s = gate(th)[..., 0]
    claim = headwise_second_fundamental_form(ungated_simplex(U)(th), nu, s,
                                             np.broadcast_to(Q, (len(th), 2, 2)))
    np.testing.assert_allclose(h, claim, atol=1e-9 * np.max(np.abs(claim)))


@given(seed=seeds)
def test_headwise_sigmoid_of_affine_is_flat(seed: int) -> None:
    """s = sigmoid(w . alpha + b) in the simplex chart: developable, K = 0."""
    rng = np.random.default_rng(seed)
    m = Gated(ungated_simplex(rng.normal(size=(3, 3))), SigmoidGate(rng.normal(size=2),
                                                                    rng.normal()))
    th = rng.dirichlet(np.ones(3), size=6)[:, :2]
    cv = curvature(m, th)
    scale = np.max(np.abs(m.hessian(th))) ** 2 / np.min(np.linalg.eigvalsh(cv.metric))
    assert np.max(np.abs(cv.gaussian)) < 1e-9 * scale


# ----------------------------------------------------------------------------- GEO-SPHERE-GATE
@given(c=st.floats(0.05, 0.57), sigma=st.floats(0.1, 3.0), seed=seeds)
def test_sphere_cap_gate(c: float, sigma: float, seed: int) -> None:
    """U = I_3, s = c/|alpha|: K = sigma^2/c^2, S = 2K (rtol 1e-8; metric route 1e-5)."""
    m = Gated(ungated_simplex(np.eye(3)), SphereCapGate(c))
    th = np.random.default_rng(seed).dirichlet(np.ones(3), size=5)[:, :2]
    assert np.all(m.gate(th) < 1.0)  # a valid gate for c < 1/sqrt(3)
    np.testing.assert_allclose(np.linalg.norm(m(th), axis=-1), c, rtol=1e-12)
    cv = curvature(m, th, cov=sigma**2)
    np.testing.assert_allclose(cv.gaussian, sphere_cap_curvature(c, sigma), rtol=1e-8)
    np.testing.assert_allclose(cv.scalar, 2 * sphere_cap_curvature(c, sigma), rtol=1e-8)
    np.testing.assert_allclose(curvature(m, th, cov=sigma**2, route="metric").gaussian,
                               sigma**2 / c**2, rtol=1e-5)


# ----------------------------------------------------------------------------- GEO-SIGMOID-GATE
@given(t=st.floats(-3, 3), b=st.floats(-3, 3))
def test_sigmoid_gate_curvature_at_zero(t: float, b: float) -> None:
    """Query-driven headwise sigmoid gate: K(0) equals the closed form (rtol 1e-9)."""
    K = gaussian_curvature(sigmoid_gate_map(t, b), np.zeros(2))
    closed = sigmoid_gate_curvature_at_zero(t, b)
    np.testing.assert_allclose(K, closed, rtol=1e-9, atol=1e-13)


@given(b=st.floats(-3, 3), eps=st.floats(1e-3, 0.1))
def test_sigmoid_gate_sign_change_at_one_sixth(b: float, eps: float) -> None:
    """K(0) < 0 for 0 < t < 1/6, = 0 at t = 1/6, > 0 for t > 1/6 (computed, not closed form)."""
    below = gaussian_curvature(sigmoid_gate_map(1 / 6 - eps, b), np.zeros(2))
    above = gaussian_curvature(sigmoid_gate_map(1 / 6 + eps, b), np.zeros(2))
    at = gaussian_curvature(sigmoid_gate_map(1 / 6, b), np.zeros(2))
    assert below < 0 < above
    assert abs(at) < 1e-10 * (abs(below) + abs(above))


# ----------------------------------------------------------------------------- GEO-DEPTH
@given(seed=seeds, L=st.integers(1, 6), beta=st.floats(0.1, 2.0))
def test_depth_tied_layers_square_law(seed: int, L: int, beta: float) -> None:
    """Tied layers: K_L(theta0) = L^2 K_1 = closed form (rtol 1e-8)."""
    rng = np.random.default_rng(seed)
    A, U = _sym(rng), rng.normal(size=(3, 3))
    t0 = np.full(2, 1 / 3)
    K1 = gaussian_curvature(structured_depth_map(U, [A], beta), t0)
    KL = gaussian_curvature(structured_depth_map(U, [A] * L, beta), t0)
    np.testing.assert_allclose(KL, L**2 * K1, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(KL, depth_curvature(U, [A] * L, beta), rtol=1e-8, atol=1e-12)


@given(seed=seeds, L=st.integers(2, 5))
def test_depth_aligned_layers_superadditive(seed: int, L: int) -> None:
    """Aligned (PSD) layers: sqrt K_L >= sum_l sqrt K_l (Minkowski)."""
    rng = np.random.default_rng(seed)
    As = [(lambda B: B @ B.T)(rng.normal(size=(2, 2))) for _ in range(L)]
    U = rng.normal(size=(3, 3))
    t0 = np.full(2, 1 / 3)
    KL = gaussian_curvature(structured_depth_map(U, As), t0)
    Ks = [gaussian_curvature(structured_depth_map(U, [A]), t0) for A in As]
    assert np.sqrt(KL) >= sum(np.sqrt(k) for k in Ks) * (1 - 1e-9)


@given(seed=seeds)
def test_depth_opposite_layers_cancel(seed: int) -> None:
    """Layers with Hessians A and -A cancel: K_2(theta0) = 0 while K_1 != 0."""
    rng = np.random.default_rng(seed)
    A, U = _sym(rng), rng.normal(size=(3, 3))
    t0 = np.full(2, 1 / 3)
    K1 = gaussian_curvature(structured_depth_map(U, [A]), t0)
    K2 = gaussian_curvature(structured_depth_map(U, [A, -A]), t0)
    assert abs(K2) < 1e-12 * max(abs(K1), 1e-300) + 1e-15
    assume(abs(np.linalg.det(A)) > 1e-3)
    assert abs(K1) > 0


@given(seed=seeds, c=st.floats(0.2, 1.0), L=st.integers(2, 4))
def test_depth_law_needs_normalisation(seed: int, c: float, L: int) -> None:
    """phi_l(theta0) = c != 0: K_L / K_1 = L^2 exp(2 beta (L-1) c), not L^2."""
    rng = np.random.default_rng(seed)
    A, U = _sym(rng), rng.normal(size=(3, 3))
    assume(abs(np.linalg.det(A)) > 1e-2)
    t0 = np.full(2, 1 / 3)
    K1 = gaussian_curvature(structured_depth_map(U, [A], offsets=[c]), t0)
    KL = gaussian_curvature(structured_depth_map(U, [A] * L, offsets=[c] * L), t0)
    np.testing.assert_allclose(KL / K1, L**2 * np.exp(2 * (L - 1) * c), rtol=1e-8)
    assert abs(KL / K1 - L**2) > 0.1


# ----------------------------------------------------------------------------- maps
@given(seed=seeds, headwise=st.booleans())
def test_gated_attention_derivatives(seed: int, headwise: bool) -> None:
    """Analytic Jacobian/Hessian of gated heads (Qiu et al. gate after SDPA) match FD."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=3) if headwise else rng.normal(size=(2, 3))
    m = gated_attention(rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), W, 0.3)
    q = rng.normal(size=(4, 3))
    y = SoftmaxAttention(m.base.keys, m.base.values)(q)
    g = 1 / (1 + np.exp(-(q @ np.atleast_2d(W).T + 0.3)))
    np.testing.assert_allclose(m(q), y * g, rtol=1e-12)
    J, H = m.jacobian(q), m.hessian(q)
    np.testing.assert_allclose(J, jacobian_fd(m, q), atol=1e-8 * np.max(np.abs(J)))
    np.testing.assert_allclose(H, hessian_fd(m, q), atol=1e-5 * np.max(np.abs(H)))
