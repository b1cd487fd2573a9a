"""Intrinsic curvature: the Gauss-equation route and the metric-only route.

Sign and index convention (the only one used in :mod:`certattn.geometry`)
-------------------------------------------------------------------------
* ``R(X, Y) Z = nabla_X nabla_Y Z - nabla_Y nabla_X Z - nabla_[X,Y] Z``;
  components ``R(d_i, d_j) d_k = R^l_{ijk} d_l`` stored as ``riemann[..., l, i, j, k]``:

  .. math:: R^l_{ijk} = \\partial_i\\Gamma^l_{jk} - \\partial_j\\Gamma^l_{ik}
            + \\Gamma^l_{im}\\Gamma^m_{jk} - \\Gamma^l_{jm}\\Gamma^m_{ik}.

* Christoffel symbols ``christoffel[..., k, i, j] = Gamma^k_{ij}``.
* Sectional curvature of the plane spanned by ``u, v``:
  ``K(u, v) = g(R(u, v) v, u) / (g(u,u) g(v,v) - g(u,v)^2)``; the round sphere is
  POSITIVE, the hyperbolic plane negative.  For ``p = 2`` the Gaussian curvature is
  ``K(e_0, e_1)``.
* Ricci ``Ric_{jk} = R^i_{ijk}`` (sphere: ``(p-1) K g``), scalar ``S = g^{jk} Ric_{jk}``
  (``S = 2K`` in 2-D).
* Mean-curvature vector ``H = g^{ij} II_ij`` (trace, not divided by ``p``).

Gauss-equation route (Theorem GEO-GAUSS-EQ, [derived])
------------------------------------------------------
For a mean map ``mu`` into ``(R^n, <a, b> = a^T Sigma^{-1} b)`` with Jacobian ``J`` and
Hessian ``d_i d_j mu``: tangent projector ``P = J g^{-1} J^T Sigma^{-1}``, second
fundamental form ``II_ij = (I - P) d_i d_j mu`` and

.. math:: g(R(d_i,d_j)d_k, d_l) = \\langle II_{jk}, II_{il}\\rangle
          - \\langle II_{ik}, II_{jl}\\rangle,

so ``K(d_i, d_j) = (<II_ii, II_jj> - |II_ij|^2) / (g_ii g_jj - g_ij^2)`` and
``S = <H, H> - g^{ik} g^{jl} <II_ij, II_kl>``.  It agrees with the metric-only route
for the pull-back metric (tested; the route needs only ``J`` and the Hessian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import real_array, spd
from .metric import Metric, PullbackMetric, precision

if TYPE_CHECKING:
    from .maps import MeanMap

__all__ = [
    "Curvature",
    "brioschi",
    "christoffel",
    "christoffel_pullback",
    "curvature",
    "gauss_route",
    "gaussian_curvature",
    "metric_route",
    "ricci_from_riemann",
    "riemann_from_metric",
    "scalar_from_ricci",
    "second_fundamental_form",
    "sectional_from_riemann",
]

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Curvature:
    """Curvature at a batch of points (arrays batched over leading axes).

    Attributes
    ----------
    metric : (..., p, p)
    riemann : (..., p, p, p, p)
        ``R^l_{ijk}`` at ``[..., l, i, j, k]``.
    ricci : (..., p, p)
    scalar : (...)
    second_fundamental_form : (..., n, p, p) or None
        ``II_ij`` (Gauss route only).
    mean_curvature : (..., n) or None
        ``H = g^{ij} II_ij`` (Gauss route only).
    """

    metric: Array
    riemann: Array
    ricci: Array
    scalar: Array
    second_fundamental_form: Array | None = None
    mean_curvature: Array | None = None

    def sectional(self, u: ArrayLike | None = None, v: ArrayLike | None = None) -> Array:
        """Sectional curvature ``K(u, v)``; default the plane of ``e_0, e_1``."""
        return sectional_from_riemann(self.metric, self.riemann, u, v)

    @property
    def gaussian(self) -> Array:
        """``K(e_0, e_1)``: the Gaussian curvature when ``p = 2``."""
        return self.sectional()


def _deriv(a: ArrayLike, name: str, p: int, axes: int) -> Array:
    """A finite derivative array whose last ``axes`` axes all have length ``p``."""
    arr = real_array(a, name, min_ndim=axes)
    if arr.shape[-axes:] != (p,) * axes:
        raise InputError(f"{name} must end in {axes} axes of length {p}, got shape {arr.shape}")
    return arr


def _jac_hess(jac: ArrayLike, hess: ArrayLike) -> tuple[Array, Array]:
    """Finite Jacobian ``(..., n, p)`` and Hessian ``(..., n, p, p)`` of matching sizes."""
    J = real_array(jac, "jac", min_ndim=2)
    H = real_array(hess, "hess", min_ndim=3)
    n, p = J.shape[-2:]
    if H.shape[-3:] != (n, p, p):
        raise InputError(f"hess must end in ({n}, {p}, {p}) for jac of shape {J.shape}, "
                         f"got {H.shape}")
    return J, H


def _full_rank(g: Array) -> Array:
    """The pulled-back metric, refused when the Jacobian is rank-deficient."""
    try:
        np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        raise InputError("jac must have full column rank (the pulled-back metric is "
                         "singular)") from None
    return g


def christoffel(g: ArrayLike, dg: ArrayLike) -> Array:
    """``Gamma^k_ij = 1/2 g^{kl} (d_i g_lj + d_j g_li - d_l g_ij)`` at ``[..., k, i, j]``."""
    g = spd(g, "g")
    dg = _deriv(dg, "dg", g.shape[-1], 3)
    gi = np.linalg.inv(g)
    T = np.einsum("...ilj->...lij", dg) + np.einsum("...jli->...lij", dg) - dg
    return 0.5 * np.einsum("...kl,...lij->...kij", gi, T)


def christoffel_pullback(jac: ArrayLike, hess: ArrayLike, cov: ArrayLike | None = None) -> Array:
    """Christoffels of a pull-back: ``Gamma^k_ij = g^{kl} d_l mu^T Sigma^{-1} d_i d_j mu``."""
    J, H = _jac_hess(jac, hess)
    P = precision(cov, J.shape[-2])
    g = _full_rank(np.einsum("...ai,...ab,...bj->...ij", J, P, J))
    t = np.einsum("...al,...ab,...bij->...lij", J, P, H)
    return np.einsum("...kl,...lij->...kij", np.linalg.inv(g), t)


def riemann_from_metric(g: ArrayLike, dg: ArrayLike, d2g: ArrayLike) -> Array:
    """Riemann tensor ``R^l_{ijk}`` (``[..., l, i, j, k]``) from ``g``, ``dg``, ``d2g``.

    ``d_m Gamma^k_ij`` is assembled analytically from ``dg`` and ``d2g`` using
    ``d_m g^{-1} = -g^{-1} (d_m g) g^{-1}``.
    """
    g = spd(g, "g")
    dg = _deriv(dg, "dg", g.shape[-1], 3)
    d2g = _deriv(d2g, "d2g", g.shape[-1], 4)
    gi = np.linalg.inv(g)
    T = np.einsum("...ilj->...lij", dg) + np.einsum("...jli->...lij", dg) - dg
    dT = (
        np.einsum("...milj->...mlij", d2g)
        + np.einsum("...mjli->...mlij", d2g)
        - d2g
    )
    dgi = -np.einsum("...ka,...mab,...bl->...mkl", gi, dg, gi)
    G = 0.5 * np.einsum("...kl,...lij->...kij", gi, T)
    dG = 0.5 * (
        np.einsum("...mkl,...lij->...mkij", dgi, T)
        + np.einsum("...kl,...mlij->...mkij", gi, dT)
    )  # [..., m, k, i, j] = d_m Gamma^k_ij
    R = (
        np.einsum("...iljk->...lijk", dG)
        - np.einsum("...jlik->...lijk", dG)
        + np.einsum("...lim,...mjk->...lijk", G, G)
        - np.einsum("...ljm,...mik->...lijk", G, G)
    )
    return R


def ricci_from_riemann(riemann: ArrayLike) -> Array:
    """``Ric_jk = R^i_{ijk}``."""
    R = real_array(riemann, "riemann", min_ndim=4)
    if len(set(R.shape[-4:])) != 1:
        raise InputError(f"riemann must be (..., p, p, p, p), got shape {R.shape}")
    return np.einsum("...iijk->...jk", R)


def scalar_from_ricci(g: ArrayLike, ricci: ArrayLike) -> Array:
    """``S = g^{jk} Ric_jk``."""
    g = spd(g, "g")
    ric = real_array(ricci, "ricci", min_ndim=2)
    if ric.shape[-2:] != g.shape[-2:]:
        raise InputError(f"ricci must be (..., {g.shape[-1]}, {g.shape[-1]}), got {ric.shape}")
    return np.einsum("...jk,...jk->...", np.linalg.inv(g), ric)


def sectional_from_riemann(
    g: ArrayLike, riemann: ArrayLike, u: ArrayLike | None = None, v: ArrayLike | None = None
) -> Array:
    """``K(u, v) = g(R(u,v)v, u) / (g(u,u) g(v,v) - g(u,v)^2)``; default ``u=e_0, v=e_1``."""
    g = spd(g, "g")
    p = g.shape[-1]
    if p < 2:
        raise InputError(f"sectional curvature needs dimension >= 2, got p = {p}")
    R = _deriv(riemann, "riemann", p, 4)
    u = np.eye(p)[0] if u is None else real_array(u, "u", min_ndim=1)
    v = np.eye(p)[1] if v is None else real_array(v, "v", min_ndim=1)
    try:
        u = np.broadcast_to(u, g.shape[:-1])
        v = np.broadcast_to(v, g.shape[:-1])
    except ValueError:
        raise InputError(f"u and v must be vectors of length {p}") from None
    num = np.einsum("...aijk,...al,...i,...j,...k,...l->...", R, g, u, v, v, u)
    guu = np.einsum("...i,...ij,...j->...", u, g, u)
    gvv = np.einsum("...i,...ij,...j->...", v, g, v)
    guv = np.einsum("...i,...ij,...j->...", u, g, v)
    area = guu * gvv - guv**2
    if bool(np.any(area <= 1e-14 * guu * gvv)):
        raise InputError("u and v must span a plane (they are parallel or zero)")
    return num / area


def brioschi(g: ArrayLike, dg: ArrayLike, d2g: ArrayLike) -> Array:
    """Gaussian curvature of a 2-D metric by Brioschi's formula (metric only).

    With ``E, F, G = g_00, g_01, g_11`` and subscripts ``u, v`` for ``d_0, d_1``:

    .. math:: K = \\frac{\\det M_1 - \\det M_2}{(EG - F^2)^2},\\quad
       M_1 = \\begin{pmatrix} -\\tfrac12E_{vv} + F_{uv} - \\tfrac12G_{uu} & \\tfrac12E_u &
       F_u - \\tfrac12E_v\\\\ F_v - \\tfrac12G_u & E & F\\\\ \\tfrac12G_v & F & G\\end{pmatrix},
       M_2 = \\begin{pmatrix} 0 & \\tfrac12E_v & \\tfrac12G_u\\\\ \\tfrac12E_v & E & F\\\\
       \\tfrac12G_u & F & G\\end{pmatrix}.
    """
    g = spd(g, "g")
    if g.shape[-1] != 2:
        raise InputError(f"g: Brioschi's formula is for 2-D metrics, got p = {g.shape[-1]}")
    dg = _deriv(dg, "dg", 2, 3)
    d2g = _deriv(d2g, "d2g", 2, 4)
    E, F, G = g[..., 0, 0], g[..., 0, 1], g[..., 1, 1]
    Eu, Ev = dg[..., 0, 0, 0], dg[..., 1, 0, 0]
    Fu, Fv = dg[..., 0, 0, 1], dg[..., 1, 0, 1]
    Gu, Gv = dg[..., 0, 1, 1], dg[..., 1, 1, 1]
    Evv, Fuv, Guu = d2g[..., 1, 1, 0, 0], d2g[..., 0, 1, 0, 1], d2g[..., 0, 0, 1, 1]
    M1 = np.stack(
        [
            np.stack([-0.5 * Evv + Fuv - 0.5 * Guu, 0.5 * Eu, Fu - 0.5 * Ev], -1),
            np.stack([Fv - 0.5 * Gu, E, F], -1),
            np.stack([0.5 * Gv, F, G], -1),
        ],
        -2,
    )
    z = np.zeros_like(E)
    M2 = np.stack(
        [
            np.stack([z, 0.5 * Ev, 0.5 * Gu], -1),
            np.stack([0.5 * Ev, E, F], -1),
            np.stack([0.5 * Gu, F, G], -1),
        ],
        -2,
    )
    return (np.linalg.det(M1) - np.linalg.det(M2)) / (E * G - F**2) ** 2


def second_fundamental_form(
    jac: ArrayLike, hess: ArrayLike, cov: ArrayLike | None = None
) -> tuple[Array, Array]:
    """``(g, II)`` with ``II_ij = (I - P) d_i d_j mu``, ``P = J g^{-1} J^T Sigma^{-1}``.

    Parameters
    ----------
    jac : (..., n, p)
    hess : (..., n, p, p)
    cov : None, scalar or (n, n)

    Returns
    -------
    g : (..., p, p)
    II : (..., n, p, p)
    """
    J, H = _jac_hess(jac, hess)
    Pm = precision(cov, J.shape[-2])
    g = _full_rank(np.einsum("...ai,...ab,...bj->...ij", J, Pm, J))
    coef = np.einsum("...kl,...al,...ab,...bij->...kij", np.linalg.inv(g), J, Pm, H)
    II = H - np.einsum("...ak,...kij->...aij", J, coef)
    return g, II


def gauss_route(jac: ArrayLike, hess: ArrayLike, cov: ArrayLike | None = None) -> Curvature:
    """Theorem GEO-GAUSS-EQ: all curvatures from the Jacobian and Hessian of ``mu``.

    ``g(R(d_i,d_j)d_k, d_l) = <II_jk, II_il> - <II_ik, II_jl>``.
    """
    J, H = _jac_hess(jac, hess)
    Pm = precision(cov, J.shape[-2])
    g, II = second_fundamental_form(J, H, cov)
    ip = np.einsum("...aij,...ab,...bkl->...ijkl", II, Pm, II)  # <II_ij, II_kl>
    Rlow = np.einsum("...jkil->...ijkl", ip) - np.einsum("...ikjl->...ijkl", ip)
    gi = np.linalg.inv(g)
    R = np.einsum("...al,...ijkl->...aijk", gi, Rlow)
    ric = ricci_from_riemann(R)
    Hvec = np.einsum("...ij,...aij->...a", gi, II)
    return Curvature(g, R, ric, scalar_from_ricci(g, ric), II, Hvec)


def metric_route(g: ArrayLike, dg: ArrayLike, d2g: ArrayLike) -> Curvature:
    """Curvature of any metric from ``g`` and its first two derivatives."""
    R = riemann_from_metric(g, dg, d2g)
    ric = ricci_from_riemann(R)
    g = np.asarray(g, dtype=np.float64)
    return Curvature(g, R, ric, scalar_from_ricci(g, ric))


def curvature(
    obj: MeanMap | Metric,
    theta: ArrayLike,
    cov: ArrayLike | None = None,
    route: Literal["gauss", "metric"] = "gauss",
) -> Curvature:
    """Curvature of a mean map (Fisher metric with covariance ``cov``) or of a metric.

    Parameters
    ----------
    obj : MeanMap or Metric
        A :class:`~certattn.geometry.maps.MeanMap` (pull-back Fisher metric) or a
        :class:`~certattn.geometry.metric.Metric` (metric-only route is forced).
    theta : array_like, shape (..., p)
    cov : None, scalar or (n, n)
        Fixed covariance of the Gaussian (maps only).
    route : {"gauss", "metric"}
        ``"gauss"``: from ``J`` and the Hessian (analytic where the map has them);
        ``"metric"``: Christoffel/Riemann of the pull-back metric.
    """
    theta = real_array(theta, "theta", min_ndim=1)
    if route not in ("gauss", "metric"):
        raise InputError(f"route must be 'gauss' or 'metric', got {route!r}")
    if isinstance(obj, Metric):
        return metric_route(*obj.derivatives(theta))
    if not all(hasattr(obj, a) for a in ("jacobian", "hessian", "dim_in", "dim_out")):
        raise InputError(f"obj must be a MeanMap or a Metric, got {type(obj).__name__}")
    if theta.shape[-1] != obj.dim_in:
        raise InputError(f"theta must end in {obj.dim_in} parameters, got shape {theta.shape}")
    if route == "gauss":
        return gauss_route(obj.jacobian(theta), obj.hessian(theta), cov)
    if route == "metric":
        return metric_route(*PullbackMetric(obj, cov).derivatives(theta))
    raise ValueError(f"unknown route {route!r}")


def gaussian_curvature(
    obj: MeanMap | Metric,
    theta: ArrayLike,
    cov: ArrayLike | None = None,
    route: Literal["gauss", "metric"] = "gauss",
) -> Array:
    """Gaussian curvature ``K`` of a 2-parameter family (see :func:`curvature`)."""
    return curvature(obj, theta, cov, route).gaussian
