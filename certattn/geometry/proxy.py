"""Empirical curvature measures (Theorem GEO-PROXY, [derived]).

The finite-difference "representation curvature" proxy

.. math:: \\rho(x, u) = \\frac{|f(x + hu) - 2 f(x) + f(x - hu)|}{|f(x + hu) - f(x - hu)|}

measures how NONLINEAR the parametrisation ``f`` is along ``u``; it is NOT intrinsic
curvature: it is positive on the flat ungated manifold (the softmax chart bends the
straight lines of the simplex) and changes under reparametrisation.  Use it only for
empirical correlations, never to test flatness.  The normal curvature
``kappa_n(u) = |II(u, u)|_Sigma / g(u, u)`` is extrinsic (a cylinder has
``kappa_n > 0`` and ``K = 0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import callable_arg, integer, positive, real_array
from .curvature import second_fundamental_form
from .metric import precision

if TYPE_CHECKING:
    from .maps import MeanMap

__all__ = ["mean_proxy", "nonlinearity_proxy", "normal_curvature"]

Array = NDArray[np.float64]


def nonlinearity_proxy(
    f: Callable[[Array], ArrayLike], x: ArrayLike, u: ArrayLike, h: float = 1e-2
) -> Array:
    """Theorem GEO-PROXY: ``|f(x+hu) - 2f(x) + f(x-hu)| / |f(x+hu) - f(x-hu)|``.

    Parameters
    ----------
    f : callable
        Broadcasting ``(..., p) -> (..., n)``.
    x, u : array_like, shape (..., p)
        Points and directions (``u`` is used as given, not normalised).
    h : float
        Step; the proxy is ``~ h |D^2 f[u,u]| / (2 |Df u|)`` for small ``h``.
    """
    callable_arg(f, "f")
    x = real_array(x, "x", min_ndim=1)
    u = real_array(u, "u", min_ndim=1)
    h = positive(h, "h")
    fp = np.asarray(f(x + h * u), dtype=np.float64)
    f0 = np.asarray(f(x), dtype=np.float64)
    fm = np.asarray(f(x - h * u), dtype=np.float64)
    return np.linalg.norm(fp - 2 * f0 + fm, axis=-1) / np.linalg.norm(fp - fm, axis=-1)


def mean_proxy(
    f: Callable[[Array], ArrayLike],
    x: ArrayLike,
    h: float = 1e-2,
    n_dirs: int = 8,
    seed: int = 0,
) -> float:
    """Average :func:`nonlinearity_proxy` over points ``x (N, p)`` and random unit directions."""
    callable_arg(f, "f")
    x = real_array(x, "x", min_ndim=1)
    h = positive(h, "h")
    n_dirs = integer(n_dirs, "n_dirs")
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_dirs, *x.shape))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    return float(np.mean(nonlinearity_proxy(f, x[None], u, h)))


def normal_curvature(
    mean_map: MeanMap, theta: ArrayLike, u: ArrayLike, cov: ArrayLike | None = None
) -> Array:
    """Normal curvature ``|II(u, u)|_Sigma / g(u, u)`` (extrinsic; not intrinsic ``K``).

    Parameters
    ----------
    mean_map : MeanMap
    theta, u : array_like, shape (..., p)
    cov : None, scalar or (n, n)
    """
    theta = real_array(theta, "theta", min_ndim=1)
    u = real_array(u, "u", min_ndim=1)
    try:
        u = np.broadcast_to(u, theta.shape)
    except ValueError:
        raise InputError(f"u of shape {u.shape} does not fit theta of shape "
                         f"{theta.shape}") from None
    if bool(np.any(np.all(u == 0, axis=-1))):
        raise InputError("u must be a non-zero direction")
    g, II = second_fundamental_form(mean_map.jacobian(theta), mean_map.hessian(theta), cov)
    v = np.einsum("...aij,...i,...j->...a", II, u, u)
    P = precision(cov, v.shape[-1])
    return np.sqrt(np.einsum("...a,ab,...b->...", v, P, v)) / np.einsum(
        "...i,...ij,...j->...", u, g, u
    )
