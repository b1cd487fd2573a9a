"""Closed forms for the curvature of gated heads (all [derived], see THEORY section 8).

Theorem GEO-HEADWISE: for ``mu = s(theta) m(theta)`` with ``m`` affine, scalar
``s > 0`` and ``Sigma = I`` the normal part of the Hessian is
``II_ij = -(nu . m) s^2 d_i d_j (1/s)`` (``nu`` the unit normal, codimension 1), so
``sign K = sign det Hess(1/s)``; ``s = sigmoid(affine)`` in the simplex chart gives
``K = 0``.

Theorem GEO-SPHERE-GATE: ``n = 3``, ``U = I_3``, ``s = c/|alpha|``: ``K = sigma^2/c^2``,
``S = 2K`` for ``Sigma = sigma^2 I``.

Theorem GEO-SIGMOID-GATE: ``alpha = softmax(q1, q2, 0)``, ``s = sigmoid(t (q1+q2) + b)``,
``U = I``, ``Sigma = I``:
``K(0) = 27 t^2 (6t - 1)(1 + e^b)^4 e^{-2b} / ((1 + e^b)^2 + 18 t^2)^2`` (positive iff
``t > 1/6``).

Theorem GEO-DEPTH: structured regime ``mu_L = (prod_l s_l) m``, ``s_l = exp(-beta phi_l)``
with ``grad phi_l(theta0) = 0`` and ``phi_l(theta0) = 0``:
``K_L(theta0) = (nu . m)^2 beta^2 det(sum_l Hess phi_l) / det g_0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import number, real_array
from .maps import Gated, SigmoidGate, softmax_chart_attention, ungated_simplex

__all__ = [
    "depth_curvature",
    "headwise_second_fundamental_form",
    "sigmoid_gate_curvature_at_zero",
    "sigmoid_gate_map",
    "sphere_cap_curvature",
]

Array = NDArray[np.float64]


def sigmoid_gate_curvature_at_zero(t: ArrayLike, b: ArrayLike) -> Array:
    """Theorem GEO-SIGMOID-GATE closed form ``K(0)``.

    .. math:: K(0) = \\frac{27 t^2 (6t - 1)(1 + e^b)^4 e^{-2b}}{((1 + e^b)^2 + 18 t^2)^2}
    """
    t = real_array(t, "t")
    b = real_array(b, "b")
    if bool(np.any(np.abs(b) > 300)):
        raise InputError("b must lie in [-300, 300] (e^b would overflow the closed form)")
    u = (1 + np.exp(b)) ** 2
    return 27 * t**2 * (6 * t - 1) * u**2 * np.exp(-2 * b) / (u + 18 * t**2) ** 2


def sigmoid_gate_map(t: float, b: float) -> Gated:
    """The map of Theorem GEO-SIGMOID-GATE: ``softmax(q1,q2,0) * sigmoid(t(q1+q2)+b)``."""
    t, b = number(t, "t"), number(b, "b")
    return Gated(softmax_chart_attention(np.eye(3)), SigmoidGate([t, t], b))


def sphere_cap_curvature(c: ArrayLike, sigma: ArrayLike = 1.0) -> Array:
    """Theorem GEO-SPHERE-GATE: ``K = sigma^2 / c^2``."""
    c_, s_ = real_array(c, "c"), real_array(sigma, "sigma")
    if bool(np.any(c_ <= 0)):
        raise InputError("c must be > 0")
    if bool(np.any(s_ <= 0)):
        raise InputError("sigma must be > 0")
    return s_**2 / c_**2


def headwise_second_fundamental_form(
    m: ArrayLike, normal: ArrayLike, s: ArrayLike, hess_inv_s: ArrayLike
) -> Array:
    """Theorem GEO-HEADWISE: ``<II_ij, nu> = -(nu . m) s^2 d_i d_j (1/s)``.

    Parameters
    ----------
    m : (..., n) value of the affine map; normal : (..., n) unit normal;
    s : (...) gate value; hess_inv_s : (..., p, p) Hessian of ``1/s``.
    """
    m_ = real_array(m, "m", min_ndim=1)
    nu = real_array(normal, "normal", min_ndim=1)
    s = real_array(s, "s")
    hs = real_array(hess_inv_s, "hess_inv_s", min_ndim=2)
    if m_.shape[-1] != nu.shape[-1]:
        raise InputError(f"m and normal must have the same last axis, got {m_.shape} and "
                         f"{nu.shape}")
    if bool(np.any(s <= 0)):
        raise InputError("s (the gate value) must be > 0")
    nm = np.sum(m_ * nu, -1)
    return -(nm * s**2)[..., None, None] * hs


def depth_curvature(
    values: ArrayLike,
    hessians: Sequence[ArrayLike],
    beta: float = 1.0,
    theta0: ArrayLike | None = None,
) -> float:
    """Theorem GEO-DEPTH closed form at ``theta0`` (``n = 3`` keys, values in ``R^3``).

    ``K_L = (nu . m)^2 beta^2 det(sum_l A_l) / det g_0`` with ``g_0 = D^T D`` the
    ungated metric, ``m = mu(theta0)`` and ``nu`` the unit normal of the value plane.
    Tied layers (``A_l = A``) give ``K_L = L^2 K_1``.
    """
    U = real_array(values, "values")
    if U.shape != (3, 3):
        raise InputError("values: the closed form is stated for 3 keys with values in R^3, "
                         f"got shape {U.shape}")
    if abs(np.linalg.det(U)) <= 1e-12 * max(1.0, float(np.abs(U).max())) ** 3:
        raise InputError("values must be linearly independent (the value plane is degenerate)")
    beta = number(beta, "beta")
    if isinstance(hessians, str | bytes) or len(hessians) == 0:
        raise InputError("hessians must be a non-empty sequence of (2, 2) matrices")
    hs = [real_array(a, f"hessians[{i}]") for i, a in enumerate(hessians)]
    if any(a.shape != (2, 2) for a in hs):
        raise InputError("hessians must be (2, 2) matrices")
    base = ungated_simplex(U)
    t0 = np.full(2, 1.0 / 3.0) if theta0 is None else real_array(theta0, "theta0")
    if t0.shape != (2,):
        raise InputError(f"theta0 must have shape (2,), got {t0.shape}")
    m = base(t0)
    nu = np.cross(base.D[:, 0], base.D[:, 1])
    nu = nu / np.linalg.norm(nu)
    g0 = base.D.T @ base.D
    A = np.sum(hs, axis=0)
    return float((nu @ m) ** 2 * beta**2 * np.linalg.det(A) / np.linalg.det(g0))
