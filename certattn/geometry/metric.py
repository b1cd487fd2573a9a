"""Fisher-Rao metric of a Gaussian family, pulled back to the parameters.

Theorem GEO-METRIC [derived].  For ``p(y | theta) = N(mu(theta), Sigma)`` with fixed
covariance the Fisher information metric on the parameters is the pull-back

.. math:: g_{ij}(\\theta) = \\partial_i\\mu^\\top \\Sigma^{-1} \\partial_j\\mu
          = (J^\\top \\Sigma^{-1} J)_{ij}, \\qquad J = \\partial\\mu/\\partial\\theta,

and when the covariance depends on the parameters too one adds the variance term

.. math:: \\tfrac12 \\operatorname{tr}(\\Sigma^{-1}\\partial_i\\Sigma\\,
          \\Sigma^{-1}\\partial_j\\Sigma).

Index conventions: ``g[..., i, j] = g_ij``; ``dg[..., k, i, j] = d_k g_ij``;
``d2g[..., k, l, i, j] = d_k d_l g_ij``.  Every routine batches over leading axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import callable_arg, integer, positive, real_array, spd
from .derivatives import hessian_fd, jacobian_fd

if TYPE_CHECKING:
    from .maps import MeanMap

__all__ = [
    "ExplicitMetric",
    "GaussianFamilyMetric",
    "Metric",
    "PullbackMetric",
    "gaussian_fisher_metric",
    "precision",
    "pullback_metric",
]

Array = NDArray[np.float64]


def precision(cov: ArrayLike | None, n: int) -> Array:
    """Inverse covariance ``Sigma^{-1}`` as an ``(n, n)`` (or batched) array.

    Parameters
    ----------
    cov : None, scalar or array_like (..., n, n)
        ``None`` means the identity; a scalar ``v`` means ``v * I``.
    n : int
        Output dimension.
    """
    n = integer(n, "n")
    if cov is None:
        return np.eye(n)
    c = real_array(cov, "cov")
    if c.ndim == 0:
        return np.eye(n) / positive(float(c), "cov")
    if c.shape[-2:] != (n, n):
        raise InputError(f"cov must have shape (..., {n}, {n}), got {c.shape}")
    return np.linalg.inv(spd(c, "cov"))


def pullback_metric(jac: ArrayLike, cov: ArrayLike | None = None) -> Array:
    """Theorem GEO-METRIC: ``g = J^T Sigma^{-1} J``.

    Parameters
    ----------
    jac : array_like, shape (..., n, p)
        Jacobian of the mean map.
    cov : None, scalar or array_like (n, n)
        Fixed covariance (identity by default).

    Returns
    -------
    ndarray, shape (..., p, p)
    """
    J = real_array(jac, "jac", min_ndim=2)
    P = precision(cov, J.shape[-2])
    return np.einsum("...ai,...ab,...bj->...ij", J, P, J)


def gaussian_fisher_metric(
    jac: ArrayLike, cov: ArrayLike, dcov: ArrayLike | None = None
) -> Array:
    """Theorem GEO-METRIC with variance term.

    .. math:: g_{ij} = \\partial_i\\mu^\\top\\Sigma^{-1}\\partial_j\\mu
              + \\tfrac12\\operatorname{tr}(\\Sigma^{-1}\\partial_i\\Sigma\\,
              \\Sigma^{-1}\\partial_j\\Sigma)

    Parameters
    ----------
    jac : array_like, shape (..., n, p)
    cov : array_like, shape (..., n, n)
    dcov : array_like, shape (..., p, n, n), optional
        ``dcov[..., k] = d Sigma / d theta_k``; omitted means fixed covariance.
    """
    J = real_array(jac, "jac", min_ndim=2)
    P = np.linalg.inv(spd(cov, "cov", n=J.shape[-2]))
    g = np.einsum("...ai,...ab,...bj->...ij", J, P, J)
    if dcov is not None:
        dS = real_array(dcov, "dcov", min_ndim=3)
        if dS.shape[-3:] != (J.shape[-1], J.shape[-2], J.shape[-2]):
            raise InputError(f"dcov must have shape (..., {J.shape[-1]}, {J.shape[-2]}, "
                             f"{J.shape[-2]}), got {dS.shape}")
        A = P[..., None, :, :] @ dS  # (..., p, n, n): Sigma^{-1} d_k Sigma
        g = g + 0.5 * np.einsum("...iab,...jba->...ij", A, A)
    return g


class Metric:
    """A Riemannian metric on a parameter domain (base class).

    Subclasses implement :meth:`__call__`; :meth:`derivatives` defaults to finite
    differences (see :mod:`.derivatives` for the steps).
    """

    dim: int

    def __call__(self, theta: ArrayLike) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def derivatives(self, theta: ArrayLike) -> tuple[Array, Array, Array]:
        """Return ``(g, dg, d2g)`` with ``dg[...,k,i,j] = d_k g_ij``, ``d2g[...,k,l,i,j]``."""
        theta = np.asarray(theta, dtype=np.float64)
        g = self(theta)
        dg = np.moveaxis(jacobian_fd(self, theta), -1, -3)
        d2g = np.moveaxis(hessian_fd(self, theta), (-2, -1), (-4, -3))
        return g, dg, d2g


class ExplicitMetric(Metric):
    """Metric given by a function ``theta -> g`` and optional analytic derivatives.

    Parameters
    ----------
    g : callable
        Broadcasting ``(..., p) -> (..., p, p)``.
    dim : int
    dg, d2g : callable, optional
        Analytic ``d_k g_ij`` (``(..., p, p, p)``) and ``d_k d_l g_ij``
        (``(..., p, p, p, p)``).  Missing ones are finite differences; a missing
        ``d2g`` with an analytic ``dg`` uses central differences of ``dg``.
    """

    def __init__(
        self,
        g: Callable[[Array], ArrayLike],
        dim: int,
        dg: Callable[[Array], ArrayLike] | None = None,
        d2g: Callable[[Array], ArrayLike] | None = None,
    ) -> None:
        callable_arg(g, "g")
        for f, name in ((dg, "dg"), (d2g, "d2g")):
            if f is not None:
                callable_arg(f, name)
        self._g, self._dg, self._d2g, self.dim = g, dg, d2g, integer(dim, "dim")

    def __call__(self, theta: ArrayLike) -> Array:
        return np.asarray(self._g(np.asarray(theta, dtype=np.float64)), dtype=np.float64)

    def derivatives(self, theta: ArrayLike) -> tuple[Array, Array, Array]:
        theta = np.asarray(theta, dtype=np.float64)
        if self._dg is None:
            return super().derivatives(theta)
        dg_fn = self._dg
        dg = np.asarray(dg_fn(theta), dtype=np.float64)
        if self._d2g is not None:
            d2g = np.asarray(self._d2g(theta), dtype=np.float64)
        else:
            d2g = np.moveaxis(
                jacobian_fd(lambda t: np.asarray(dg_fn(t)), theta, order=4), -1, -4)
            d2g = 0.5 * (d2g + np.swapaxes(d2g, -4, -3))
        return self(theta), dg, d2g


class PullbackMetric(Metric):
    """Theorem GEO-METRIC: the Fisher metric ``J^T Sigma^{-1} J`` of a mean map.

    ``dg`` is analytic from the map's Jacobian and Hessian,
    ``d_k g_ij = <d_k d_i mu, d_j mu> + <d_i mu, d_k d_j mu>``; ``d2g`` is fourth-order
    central differences of ``dg`` (step ``eps**(1/5)``).

    Parameters
    ----------
    mean_map : MeanMap
    cov : None, scalar or array_like (n, n)
    """

    def __init__(self, mean_map: MeanMap, cov: ArrayLike | None = None) -> None:
        if not all(hasattr(mean_map, a) for a in ("jacobian", "hessian", "dim_in", "dim_out")):
            raise InputError(f"mean_map must be a MeanMap, got {type(mean_map).__name__}")
        self.map = mean_map
        self.dim = mean_map.dim_in
        self.P = precision(cov, mean_map.dim_out)

    def __call__(self, theta: ArrayLike) -> Array:
        J = self.map.jacobian(theta)
        return np.einsum("...ai,ab,...bj->...ij", J, self.P, J)

    def _dg(self, theta: Array) -> Array:
        J = self.map.jacobian(theta)
        H = self.map.hessian(theta)
        t = np.einsum("...aki,ab,...bj->...kij", H, self.P, J)
        return t + np.swapaxes(t, -1, -2)

    def derivatives(self, theta: ArrayLike) -> tuple[Array, Array, Array]:
        theta = np.asarray(theta, dtype=np.float64)
        dg = self._dg(theta)
        d2g = np.moveaxis(jacobian_fd(self._dg, theta, order=4), -1, -4)
        d2g = 0.5 * (d2g + np.swapaxes(d2g, -4, -3))
        return self(theta), dg, d2g


class GaussianFamilyMetric(Metric):
    """Theorem GEO-METRIC with variance parameters: ``N(mu(theta), Sigma(theta))``.

    Parameters
    ----------
    mean : callable
        Broadcasting ``(..., p) -> (..., n)``.
    cov : callable
        Broadcasting ``(..., p) -> (..., n, n)``.
    dim : int
        Number of parameters ``p``.
    mean_jac : callable, optional
        Analytic ``(..., p) -> (..., n, p)``; default central differences.
    dcov : callable, optional
        Analytic ``(..., p) -> (..., p, n, n)`` with ``[..., k] = d_k Sigma``; default
        central differences.

    Notes
    -----
    ``dg`` and ``d2g`` are central differences of ``g`` (:meth:`Metric.derivatives`,
    step ``eps**(1/4)`` for ``d2g``).  Give analytic ``mean_jac`` and ``dcov`` when you
    need curvature: differencing a differenced metric twice loses about 8 digits.
    """

    def __init__(
        self,
        mean: Callable[[Array], ArrayLike],
        cov: Callable[[Array], ArrayLike],
        dim: int,
        mean_jac: Callable[[Array], ArrayLike] | None = None,
        dcov: Callable[[Array], ArrayLike] | None = None,
    ) -> None:
        callable_arg(mean, "mean")
        callable_arg(cov, "cov")
        for f, name in ((mean_jac, "mean_jac"), (dcov, "dcov")):
            if f is not None:
                callable_arg(f, name)
        self.mean, self.cov, self.dim = mean, cov, integer(dim, "dim")
        self.mean_jac, self.dcov = mean_jac, dcov

    def __call__(self, theta: ArrayLike) -> Array:
        theta = np.asarray(theta, dtype=np.float64)
        if self.mean_jac is not None:
            J = np.asarray(self.mean_jac(theta), dtype=np.float64)
        else:
            J = jacobian_fd(self.mean, theta)
        if self.dcov is not None:
            dS = np.asarray(self.dcov(theta), dtype=np.float64)
        else:
            dS = np.moveaxis(jacobian_fd(self.cov, theta), -1, -3)
        return gaussian_fisher_metric(J, np.asarray(self.cov(theta)), dS)
