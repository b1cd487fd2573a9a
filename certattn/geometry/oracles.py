"""Reference manifolds with known curvature (Theorem GEO-ORACLES, [derived]).

* sphere of radius ``r`` (as an embedding and as the metric ``r^2 (du^2 + sin^2 u dv^2)``):
  ``K = 1/r^2``;
* univariate normal ``N(m, s^2)``, Fisher metric ``diag(1, 2)/s^2``: ``K = -1/2``;
* ``N(mu, s^2 I_d)`` with parameters ``(mu, s)``: constant sectional curvature ``-1/(2d)``;
* Poincare half-plane ``(dx^2 + dy^2)/y^2``: ``K = -1``;
* cylinder of radius ``r``: ``K = 0`` (extrinsically bent, intrinsically flat);
* scaling ``g -> lambda g``: ``K -> K / lambda``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import integer, positive
from .maps import FunctionMap
from .metric import ExplicitMetric, GaussianFamilyMetric

__all__ = [
    "cylinder_map",
    "half_plane_metric",
    "normal_family_metric",
    "sphere_map",
    "sphere_metric",
]

Array = NDArray[np.float64]


def sphere_map(r: float = 1.0) -> FunctionMap:
    """Sphere of radius ``r`` in ``R^3``: ``(u, v) -> r (sin u cos v, sin u sin v, cos u)``."""
    r = positive(r, "r")

    def f(t: Array) -> Array:
        u, v = t[..., 0], t[..., 1]
        return r * np.stack([np.sin(u) * np.cos(v), np.sin(u) * np.sin(v), np.cos(u)], -1)

    def jac(t: Array) -> Array:
        u, v = t[..., 0], t[..., 1]
        du = np.stack([np.cos(u) * np.cos(v), np.cos(u) * np.sin(v), -np.sin(u)], -1)
        dv = np.stack([-np.sin(u) * np.sin(v), np.sin(u) * np.cos(v), np.zeros_like(u)], -1)
        return r * np.stack([du, dv], -1)

    def hess(t: Array) -> Array:
        u, v = t[..., 0], t[..., 1]
        z = np.zeros_like(u)
        uu = np.stack([-np.sin(u) * np.cos(v), -np.sin(u) * np.sin(v), -np.cos(u)], -1)
        uv = np.stack([-np.cos(u) * np.sin(v), np.cos(u) * np.cos(v), z], -1)
        vv = np.stack([-np.sin(u) * np.cos(v), -np.sin(u) * np.sin(v), z], -1)
        return r * np.stack([np.stack([uu, uv], -1), np.stack([uv, vv], -1)], -1)

    return FunctionMap(f, 2, 3, jac, hess)


def sphere_metric(r: float = 1.0, analytic: bool = True) -> ExplicitMetric:
    """``g = r^2 diag(1, sin^2 u)`` on ``(u, v)``; ``analytic=False`` uses differences."""
    r = positive(r, "r")
    if not isinstance(analytic, bool | np.bool_):
        raise InputError(f"analytic must be True or False, got {analytic!r}")

    def g(t: Array) -> Array:
        s2 = np.sin(t[..., 0]) ** 2
        z = np.zeros_like(s2)
        return r**2 * np.stack([np.stack([np.ones_like(s2), z], -1), np.stack([z, s2], -1)], -2)

    def dg(t: Array) -> Array:
        u = t[..., 0]
        out = np.zeros((*u.shape, 2, 2, 2))
        out[..., 0, 1, 1] = r**2 * np.sin(2 * u)
        return out

    def d2g(t: Array) -> Array:
        u = t[..., 0]
        out = np.zeros((*u.shape, 2, 2, 2, 2))
        out[..., 0, 0, 1, 1] = 2 * r**2 * np.cos(2 * u)
        return out

    if analytic:
        return ExplicitMetric(g, 2, dg, d2g)
    return ExplicitMetric(g, 2)


def half_plane_metric(scale: float = 1.0) -> ExplicitMetric:
    """Poincare half-plane ``scale * (dx^2 + dy^2) / y^2`` (``K = -1/scale``)."""
    scale = positive(scale, "scale")

    def g(t: Array) -> Array:
        y = t[..., 1]
        return scale * np.eye(2) / (y**2)[..., None, None]

    def dg(t: Array) -> Array:
        y = t[..., 1]
        out = np.zeros((*y.shape, 2, 2, 2))
        out[..., 1, :, :] = scale * np.eye(2) * (-2 / y**3)[..., None, None]
        return out

    def d2g(t: Array) -> Array:
        y = t[..., 1]
        out = np.zeros((*y.shape, 2, 2, 2, 2))
        out[..., 1, 1, :, :] = scale * np.eye(2) * (6 / y**4)[..., None, None]
        return out

    return ExplicitMetric(g, 2, dg, d2g)


def normal_family_metric(d: int = 1) -> GaussianFamilyMetric:
    """Fisher metric of ``N(mu, s^2 I_d)`` in ``theta = (mu_1..mu_d, s)``, ``s > 0``.

    ``g = diag(I_d, 2d) / s^2``; sectional curvature ``-1/(2d)`` (``-1/2`` for ``d = 1``).
    """
    d = integer(d, "d")

    def mean(t: Array) -> Array:
        return t[..., :d]

    def mean_jac(t: Array) -> Array:
        return np.broadcast_to(np.eye(d, d + 1), (*t.shape[:-1], d, d + 1)).copy()

    def cov(t: Array) -> Array:
        return (t[..., d] ** 2)[..., None, None] * np.eye(d)

    def dcov(t: Array) -> Array:
        out = np.zeros((*t.shape[:-1], d + 1, d, d))
        out[..., d, :, :] = (2 * t[..., d])[..., None, None] * np.eye(d)
        return out

    return GaussianFamilyMetric(mean, cov, d + 1, mean_jac, dcov)


def cylinder_map(r: float = 1.0) -> FunctionMap:
    """Cylinder ``(u, z) -> (r cos u, r sin u, z)``: extrinsically curved, ``K = 0``."""
    r = positive(r, "r")

    def f(t: ArrayLike) -> Array:
        t = np.asarray(t, dtype=np.float64)
        u, z = t[..., 0], t[..., 1]
        return np.stack([r * np.cos(u), r * np.sin(u), z], -1)

    return FunctionMap(f, 2, 3)
