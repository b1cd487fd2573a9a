"""Batch checks of the geometry of attention: GEO-METRIC, GEO-GAUSS-EQ, GEO-ORACLES,
GEO-UNGATED-FLAT, GEO-SCOPE, GEO-HEADWISE, GEO-SPHERE-GATE, GEO-SIGMOID-GATE, GEO-DEPTH
and GEO-PROXY.

Host-side NumPy checks on tiny matrices: Fisher and pullback metrics against finite
differences of a closed-form KL, curvatures of gated and ungated heads (both routes)
against closed forms and oracles, measured relative to the size the curvature terms would
have without cancellation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._common import Worst, _ctx, _steps


def _k_scale(cv: Any, hess: Any) -> np.ndarray:
    """The size curvature terms would have without cancellation: ``sum |d_i d_j mu|^2 / det g``
    (Sigma = I).  A curvature that is "zero" is small against this."""
    h = np.asarray(hess, dtype=np.float64)
    num = np.sum(h * h, axis=tuple(range(h.ndim - 3, h.ndim)))
    return num / np.abs(np.linalg.det(cv.metric)) + 1e-300


def _batches(rows: int, per: int) -> Iterator[int]:
    """Split ``rows`` points into batches of at most ``per`` (one random object each)."""
    done = 0
    while done < rows:
        r = min(per, rows - done)
        yield r
        done += r


def _simplex_points(rng: np.random.Generator, r: int) -> np.ndarray:
    a = rng.dirichlet(np.full(3, 2.0), r)
    return a[:, :2]


def _gauss_kl(m0, s0, m1, s1, logdet0=None):
    """KL(N(m0, s0) || N(m1, s1)) for batches, from the closed form of two Gaussians
    (one solve with ``s1`` gives both ``s1^-1 s0`` and ``s1^-1 (m1 - m0)``)."""
    n = s0.shape[-1]
    dm = m1 - m0
    sol = np.linalg.solve(s1, np.concatenate([s0, dm[..., None]], axis=-1))
    tr = np.trace(sol[..., :n], axis1=-2, axis2=-1)
    quad = np.einsum("...i,...i->...", dm, sol[..., n])
    ld0 = np.linalg.slogdet(s0)[1] if logdet0 is None else logdet0
    return 0.5 * (tr + quad - n + np.linalg.slogdet(s1)[1] - ld0)


def _kl_hessian(fam: tuple[np.ndarray, ...], step: float) -> np.ndarray:
    """Central second differences at 0 of ``theta -> KL(N(0, S0) || N(J theta, S0 + theta.dS))``
    (each point ``+-e_i +- e_j`` evaluated once; the matrix is symmetric)."""
    jac, s0, ds = fam
    r, n, p = jac.shape
    logdet0 = np.linalg.slogdet(s0)[1]
    cache: dict[tuple[float, ...], np.ndarray] = {}

    def kl(th: np.ndarray) -> np.ndarray:
        key = tuple(th.tolist())
        if key not in cache:
            tb = np.broadcast_to(th, (r, p))
            m1 = np.einsum("rij,rj->ri", jac, tb)
            s1 = s0 + np.einsum("rk,rkij->rij", tb, ds)
            cache[key] = _gauss_kl(np.zeros((r, n)), s0, m1, s1, logdet0)
        return cache[key]

    g = np.empty((r, p, p))
    for i in range(p):
        for j in range(i, p):
            ei, ej = np.eye(p)[i] * step, np.eye(p)[j] * step
            g[:, i, j] = (kl(ei + ej) - kl(ei - ej) - kl(ej - ei) + kl(-ei - ej)) / (4 * step**2)
            g[:, j, i] = g[:, i, j]
    return g


def check_geo_metric(rows, *, xp, device, rng, progress):
    """GEO-METRIC: ``gaussian_fisher_metric(J, Sigma, dSigma)`` and ``pullback_metric(J,
    Sigma)`` against the Hessian of ``theta -> KL(N(mu_0, Sigma_0) || N(mu_theta,
    Sigma_theta))`` at 0 (the Fisher metric's definition as the KL's second order):
    central differences of the closed-form Gaussian KL with steps 1e-3 and 5e-4,
    Richardson-extrapolated, for random linear families (n = 3, p = 2).  Error relative to
    ``max |g|``; tolerance 1e-6 (truncation ``O(h^4)``, rounding ``u/h^2`` about 1e-9)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.metric import gaussian_fisher_metric, pullback_metric

    n, p, h = 3, 2, 1e-3
    for r in _steps(rows, 200):
        a = ctx.rng.standard_normal((r, n, n))
        s0 = a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(n)
        jac = ctx.rng.standard_normal((r, n, p))
        ds = ctx.rng.standard_normal((r, p, n, n)) * 0.3
        ds = ds + np.swapaxes(ds, -1, -2)
        for with_var in (True, False):
            dsv = ds if with_var else np.zeros_like(ds)

            fam = (jac, s0, dsv)
            g = (4 * _kl_hessian(fam, h / 2) - _kl_hessian(fam, h)) / 3  # Richardson: O(h^4)
            lib = gaussian_fisher_metric(jac, s0, ds) if with_var else pullback_metric(jac, s0)
            scale = np.max(np.abs(g), axis=(-2, -1))
            w.add(np.max(np.abs(lib - g), axis=(-2, -1)) / scale)
        ctx.tick(r)
    return w.value, 1e-6


def check_geo_gauss_eq(rows, *, xp, device, rng, progress):
    """GEO-GAUSS-EQ: for random gated heads (``gated_attention``, 3 or 4 keys, 2-D queries,
    headwise or elementwise sigmoid gates) at random queries, the Gauss-equation route's
    scalar curvature equals the metric-only route's (Christoffel/Riemann of the pull-back
    metric, fourth-order differences).  Error divided by ``sum |II|^2 / det g``;
    tolerance 1e-6 (the differences' truncation error)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import curvature
    from ..geometry.maps import gated_attention

    for r in _batches(rows, 16):
        nk = int(ctx.rng.integers(3, 5))
        keys, vals = ctx.rng.standard_normal((nk, 2)), ctx.rng.standard_normal((nk, 3))
        gw = ctx.rng.standard_normal(2 if ctx.rng.random() < 0.5 else (3, 2))
        head = gated_attention(keys, vals, gw, ctx.rng.standard_normal())
        q = ctx.rng.standard_normal((r, 2))
        a = curvature(head, q, route="gauss")
        b = curvature(head, q, route="metric")
        w.add(np.abs(a.scalar - b.scalar) / _k_scale(a, head.hessian(q)))
        ctx.tick(r)
    return w.value, 1e-6


def check_geo_oracles(rows, *, xp, device, rng, progress):
    """GEO-ORACLES at random points and parameters: sphere (embedding, both routes; metric)
    ``1/r^2``; half-plane ``scale (dx^2 + dy^2)/y^2``: ``-1/scale``; ``N(m, s^2)``: ``-1/2``;
    ``N(mu, s^2 I_2)``: sectional ``-1/4``; cylinder: 0 (relative to ``1/r^2``).  Relative
    error; tolerance 1e-4: the normal families, the cylinder and the metric route of the
    sphere take second differences of a differenced metric (absolute step ``eps^(1/4)``,
    "loses about 8 digits" per ``GaussianFamilyMetric``), measured up to 7e-6 at s = 0.2;
    the analytic routes agree to 1e-14.  ``christoffel(g, dg)`` of the sphere and the
    half-plane metrics (g and dg written out here) against their closed forms (error over
    the largest symbol: rounding only, so it is held to 1e-12, rescaled to the common
    tolerance)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import christoffel, curvature, gaussian_curvature
    from ..geometry.oracles import (
        cylinder_map,
        half_plane_metric,
        normal_family_metric,
        sphere_map,
        sphere_metric,
    )

    for r in _batches(rows, 32):
        rad, lam = float(ctx.rng.uniform(0.3, 3.0)), float(ctx.rng.uniform(0.2, 5.0))
        th = np.stack([ctx.rng.uniform(0.3, math.pi - 0.3, r), ctx.rng.uniform(-3, 3, r)], -1)
        for route in ("gauss", "metric"):
            k = gaussian_curvature(sphere_map(rad), th, route=route)
            w.add(np.abs(k * rad**2 - 1.0))
        w.add(np.abs(gaussian_curvature(sphere_metric(rad), th) * rad**2 - 1.0))
        hp = np.stack([ctx.rng.uniform(-3, 3, r), ctx.rng.uniform(0.2, 3, r)], -1)
        w.add(np.abs(gaussian_curvature(half_plane_metric(lam), hp) * lam + 1.0))
        nm = np.stack([ctx.rng.uniform(-3, 3, r), ctx.rng.uniform(0.2, 3, r)], -1)
        w.add(np.abs(gaussian_curvature(normal_family_metric(1), nm) * 2 + 1.0))
        n2 = np.concatenate([ctx.rng.uniform(-3, 3, (r, 2)), ctx.rng.uniform(0.2, 3, (r, 1))], -1)
        w.add(np.abs(curvature(normal_family_metric(2), n2).sectional() * 4 + 1.0))
        w.add(np.abs(gaussian_curvature(cylinder_map(rad), th)) * rad**2)
        for g, dg, closed in (_sphere_symbols(rad, th[:, 0]), _half_plane_symbols(lam, hp[:, 1])):
            err = np.abs(christoffel(g, dg) - closed).max(axis=(-3, -2, -1))
            w.add(err / np.abs(closed).max(axis=(-3, -2, -1)) * (1e-4 / 1e-12))
        ctx.tick(r)
    return w.value, 1e-4


def _sphere_symbols(rad, u):
    """``g = rad^2 diag(1, sin^2 u)``, ``dg[m, i, j] = d_m g_ij`` and the closed-form
    ``Gamma^k_ij`` at ``[k, i, j]``: ``Gamma^0_11 = -sin u cos u``, ``Gamma^1_01 = cot u``."""
    r = u.shape[0]
    g = np.zeros((r, 2, 2))
    g[:, 0, 0], g[:, 1, 1] = rad**2, (rad * np.sin(u)) ** 2
    dg = np.zeros((r, 2, 2, 2))
    dg[:, 0, 1, 1] = 2 * rad**2 * np.sin(u) * np.cos(u)
    gam = np.zeros((r, 2, 2, 2))
    gam[:, 0, 1, 1] = -np.sin(u) * np.cos(u)
    gam[:, 1, 0, 1] = gam[:, 1, 1, 0] = np.cos(u) / np.sin(u)
    return g, dg, gam


def _half_plane_symbols(lam, y):
    """``g = lam I / y^2``: ``Gamma^x_xy = Gamma^y_yy = -1/y``, ``Gamma^y_xx = 1/y``."""
    r = y.shape[0]
    g = np.zeros((r, 2, 2))
    g[:, 0, 0] = g[:, 1, 1] = lam / y**2
    dg = np.zeros((r, 2, 2, 2))
    dg[:, 1, 0, 0] = dg[:, 1, 1, 1] = -2 * lam / y**3
    gam = np.zeros((r, 2, 2, 2))
    gam[:, 0, 0, 1] = gam[:, 0, 1, 0] = gam[:, 1, 1, 1] = -1 / y
    gam[:, 1, 0, 0] = 1 / y
    return g, dg, gam


def check_geo_ungated_flat(rows, *, xp, device, rng, progress):
    """GEO-UNGATED-FLAT: random values U (3 x d_v, d_v = 3..5): the simplex-chart head has a
    constant metric (relative change between two points) and K = 0 exactly; the
    ``softmax(q1, q2, 0)`` head has K = 0 at random q (divided by ``sum |II|^2/det g``).
    Tolerance 1e-9 (analytic derivatives: rounding only)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import curvature
    from ..geometry.maps import softmax_chart_attention, ungated_simplex

    for r in _batches(rows, 32):
        u = ctx.rng.standard_normal((3, int(ctx.rng.integers(3, 6))))
        flat = ungated_simplex(u)
        th = _simplex_points(ctx.rng, r)
        a = curvature(flat, th)
        b = curvature(flat, th[::-1])
        w.add(np.max(np.abs(a.metric - b.metric), axis=(-2, -1))
              / np.max(np.abs(a.metric), axis=(-2, -1)))
        w.add(np.abs(a.scalar))
        sm, q = softmax_chart_attention(u), ctx.rng.standard_normal((r, 2)) * 2
        c = curvature(sm, q)
        w.add(np.abs(c.scalar) / _k_scale(c, sm.hessian(q)))
        ctx.tick(r)
    return w.value, 1e-9


def check_geo_scope(rows, *, xp, device, rng, progress):
    """GEO-SCOPE: logits (q1, q2, 0, q1+q2), U = I_4 give K(0) = -4 (both routes, relative
    error), and generic 4-key heads with 2-D queries are curved (the fraction of random
    heads with ``|K| <= 1e-6 sum|II|^2/det g`` must stay below 1/2, else 1).  Tolerance
    1e-6 (the metric route's differences)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import curvature, gaussian_curvature
    from ..geometry.maps import SoftmaxAttention

    keys = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    head = SoftmaxAttention(keys, np.eye(4), scale=1.0)
    for route in ("gauss", "metric"):
        w.add(abs(float(gaussian_curvature(head, np.zeros(2), route=route)) / -4.0 - 1.0))
    flat = 0
    total = 0
    for r in _batches(rows, 16):
        h = SoftmaxAttention(ctx.rng.standard_normal((4, 2)), ctx.rng.standard_normal((4, 4)))
        q = ctx.rng.standard_normal((r, 2))
        c = curvature(h, q)
        flat += int(np.sum(np.abs(c.scalar) <= 1e-6 * _k_scale(c, h.hessian(q))))
        total += r
        ctx.tick(r)
    w.flag(total > 0 and flat >= total / 2)
    return w.value, 1e-6


def check_geo_headwise(rows, *, xp, device, rng, progress):
    """GEO-HEADWISE: ``Gated(ungated_simplex(U), ReciprocalQuadraticGate(Q, b, c0))``
    (``Hess(1/s) = Q``) at random simplex points: the normal part of the Gauss route's
    second fundamental form equals ``headwise_second_fundamental_form(m, nu, s, Q)``
    (error / max |II|), sign K = sign det Q where ``|det Q|`` is not tiny (else 1), and a
    sigmoid-of-affine gate gives K = 0 (divided by ``sum|II|^2/det g``).  Tolerance 1e-9."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import curvature
    from ..geometry.gating import headwise_second_fundamental_form
    from ..geometry.maps import Gated, ReciprocalQuadraticGate, SigmoidGate, ungated_simplex

    for r in _batches(rows, 32):
        u = ctx.rng.standard_normal((3, 3))
        qm = ctx.rng.standard_normal((2, 2))
        qm = qm + qm.T
        b = ctx.rng.standard_normal(2)
        c0 = 2.0 + np.abs(b).sum() + np.abs(qm).sum()
        base = ungated_simplex(u)
        gated = Gated(base, ReciprocalQuadraticGate(qm, b, c0))
        th = _simplex_points(ctx.rng, r)
        cv = curvature(gated, th)
        jac = gated.jacobian(th)
        nu = np.cross(jac[..., 0], jac[..., 1])
        nu /= np.linalg.norm(nu, axis=-1, keepdims=True)
        ii_n = np.einsum("ra,raij->rij", nu, cv.second_fundamental_form)
        s = 1.0 / (c0 + th @ b + 0.5 * np.einsum("ri,ij,rj->r", th, qm, th))
        claim = headwise_second_fundamental_form(base(th), nu, s, np.broadcast_to(qm, (r, 2, 2)))
        w.add(np.max(np.abs(ii_n - claim), axis=(-2, -1)) / np.max(np.abs(claim)))
        det = np.linalg.det(qm)
        if abs(det) > 1e-3 * np.sum(qm * qm):
            w.flag(np.sign(cv.scalar) != np.sign(det))
        sg = Gated(base, SigmoidGate(ctx.rng.standard_normal(2), ctx.rng.standard_normal()))
        c2 = curvature(sg, th)
        w.add(np.abs(c2.scalar) / _k_scale(c2, sg.hessian(th)))
        ctx.tick(r)
    return w.value, 1e-9


def check_geo_sphere_gate(rows, *, xp, device, rng, progress):
    """GEO-SPHERE-GATE: ``Gated(ungated_simplex(I_3), SphereCapGate(c))`` with ``Sigma =
    sigma^2 I`` at random simplex points: K equals ``sphere_cap_curvature(c, sigma) =
    sigma^2/c^2`` and S = 2K (relative error; tolerance 1e-8)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import curvature
    from ..geometry.gating import sphere_cap_curvature
    from ..geometry.maps import Gated, SphereCapGate, ungated_simplex

    for r in _batches(rows, 32):
        c, sig = float(ctx.rng.uniform(0.05, 0.57)), float(ctx.rng.uniform(0.2, 3.0))
        cv = curvature(Gated(ungated_simplex(np.eye(3)), SphereCapGate(c)),
                       _simplex_points(ctx.rng, r), cov=sig**2)
        k = float(sphere_cap_curvature(c, sig))
        w.add(np.abs(cv.gaussian / k - 1.0))
        w.add(np.abs(cv.scalar / (2 * k) - 1.0))
        ctx.tick(r)
    return w.value, 1e-8


def check_geo_sigmoid_gate(rows, *, xp, device, rng, progress):
    """GEO-SIGMOID-GATE: the Gauss-route K(0) of ``sigmoid_gate_map(t, b)`` equals
    ``sigmoid_gate_curvature_at_zero(t, b)`` for random t in (-1, 1), b in (-3, 3)
    (relative, floor 1e-9), and its sign is that of ``t - 1/6`` (else 1).  Tolerance 1e-8."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import gaussian_curvature
    from ..geometry.gating import sigmoid_gate_curvature_at_zero, sigmoid_gate_map

    for r in _steps(rows, 1 << 14):
        for _ in range(r):
            t, b = float(ctx.rng.uniform(-1, 1)), float(ctx.rng.uniform(-3, 3))
            k = float(gaussian_curvature(sigmoid_gate_map(t, b), np.zeros(2)))
            kc = float(sigmoid_gate_curvature_at_zero(t, b))
            w.add(abs(k - kc) / (abs(kc) + 1e-9))
            if abs(t - 1 / 6) > 1e-6 and t != 0:
                w.flag((k > 0) != (t > 1 / 6))
        ctx.tick(r)
    return w.value, 1e-8


def check_geo_depth(rows, *, xp, device, rng, progress):
    """GEO-DEPTH: ``structured_depth_map(U, [A] * L, beta)`` at the barycentre has
    ``K_L = L^2 K_1 = depth_curvature(U, [A] * L, beta)``, and with offsets c on every
    layer ``K_L / K_1 = L^2 e^{2 beta (L-1) c}`` (relative errors; random U, SPD A,
    L = 2..4, beta in (0.2, 2)).  Tolerance 1e-8."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import gaussian_curvature
    from ..geometry.gating import depth_curvature
    from ..geometry.maps import structured_depth_map

    t0 = np.full(2, 1.0 / 3.0)
    for _ in range(rows):
        u = ctx.rng.standard_normal((3, 3))
        a = ctx.rng.standard_normal((2, 2))
        a = a @ a.T + 0.1 * np.eye(2)
        big_l, beta = int(ctx.rng.integers(2, 5)), float(ctx.rng.uniform(0.2, 2.0))
        k1 = float(gaussian_curvature(structured_depth_map(u, [a], beta), t0))
        kl = float(gaussian_curvature(structured_depth_map(u, [a] * big_l, beta), t0))
        w.add(abs(kl / (big_l**2 * k1) - 1.0))
        w.add(abs(kl / depth_curvature(u, [a] * big_l, beta) - 1.0))
        c = float(ctx.rng.uniform(-0.5, 0.5))
        k1c = float(gaussian_curvature(structured_depth_map(u, [a], beta, offsets=[c]), t0))
        klc = float(gaussian_curvature(
            structured_depth_map(u, [a] * big_l, beta, offsets=[c] * big_l), t0))
        w.add(abs((klc / k1c) / (big_l**2 * math.exp(2 * beta * (big_l - 1) * c)) - 1.0))
        ctx.tick(1)
    return w.value, 1e-8


def check_geo_proxy(rows, *, xp, device, rng, progress):
    """GEO-PROXY: on the flat ungated ``softmax(q1, q2, 0)`` head (K = 0 there, checked)
    ``nonlinearity_proxy`` with h = 1e-3 is positive (else 1) and matches its small-h limit
    ``h |D^2 f[u,u]| / (2 |Df u|)`` (relative error, tolerance 1e-4: ``O(h^2)`` terms)."""
    ctx, w = _ctx(xp, device, rng, progress), Worst()
    from ..geometry.curvature import curvature
    from ..geometry.maps import softmax_chart_attention
    from ..geometry.proxy import nonlinearity_proxy

    h = 1e-3
    for r in _batches(rows, 64):
        head = softmax_chart_attention(ctx.rng.standard_normal((3, 3)))
        q = ctx.rng.standard_normal((r, 2))
        u = ctx.rng.standard_normal((r, 2))
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        prox = nonlinearity_proxy(head, q, u, h)
        d2 = np.einsum("raij,ri,rj->ra", head.hessian(q), u, u)
        d1 = np.einsum("rai,ri->ra", head.jacobian(q), u)
        lim = h * np.linalg.norm(d2, axis=-1) / (2 * np.linalg.norm(d1, axis=-1))
        w.flag(~(prox > 0))
        w.add(np.abs(prox / lim - 1.0))
        cv = curvature(head, q)
        w.add(np.abs(cv.scalar) / _k_scale(cv, head.hessian(q)) * 1e5)  # flat: <= 1e-9 of scale
        ctx.tick(r)
    return w.value, 1e-4
