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
    t = np.asarray(t, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    u = (1 + np.exp(b)) ** 2
    return 27 * t**2 * (6 * t - 1) * u**2 * np.exp(-2 * b) / (u + 18 * t**2) ** 2


def sigmoid_gate_map(t: float, b: float) -> Gated:
    """The map of Theorem GEO-SIGMOID-GATE: ``softmax(q1,q2,0) * sigmoid(t(q1+q2)+b)``."""
    return Gated(softmax_chart_attention(np.eye(3)), SigmoidGate([t, t], b))


def sphere_cap_curvature(c: ArrayLike, sigma: ArrayLike = 1.0) -> Array:
    """Theorem GEO-SPHERE-GATE: ``K = sigma^2 / c^2``."""
    return np.asarray(sigma, dtype=np.float64) ** 2 / np.asarray(c, dtype=np.float64) ** 2


def headwise_second_fundamental_form(
    m: ArrayLike, normal: ArrayLike, s: ArrayLike, hess_inv_s: ArrayLike
) -> Array:
    """Theorem GEO-HEADWISE: ``<II_ij, nu> = -(nu . m) s^2 d_i d_j (1/s)``.

    Parameters
    ----------
    m : (..., n) value of the affine map; normal : (..., n) unit normal;
    s : (...) gate value; hess_inv_s : (..., p, p) Hessian of ``1/s``.
    """
    nm = np.sum(np.asarray(m, float) * np.asarray(normal, float), -1)
    s = np.asarray(s, dtype=np.float64)
    return -(nm * s**2)[..., None, None] * np.asarray(hess_inv_s, dtype=np.float64)


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
    U = np.asarray(values, dtype=np.float64)
    if U.shape != (3, 3):
        raise ValueError("closed form stated for 3 keys with values in R^3")
    base = ungated_simplex(U)
    t0 = np.full(2, 1.0 / 3.0) if theta0 is None else np.asarray(theta0, dtype=np.float64)
    m = base(t0)
    nu = np.cross(base.D[:, 0], base.D[:, 1])
    nu = nu / np.linalg.norm(nu)
    g0 = base.D.T @ base.D
    A = np.sum([np.asarray(a, dtype=np.float64) for a in hessians], axis=0)
    return float((nu @ m) ** 2 * beta**2 * np.linalg.det(A) / np.linalg.det(g0))
