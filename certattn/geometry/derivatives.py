"""Finite-difference Jacobians and Hessians, batched over leading axes.

Used where a map does not provide analytic derivatives.  All functions accept a
callable ``f`` that broadcasts over leading axes of its argument: for ``theta`` of
shape ``(..., p)`` it returns an array of shape ``(..., *out)``.

Step choice (documented once, used everywhere)
---------------------------------------------
Central differences have truncation error ``O(h^2)`` and rounding error
``O(eps / h^k)`` for the ``k``-th derivative, so the balanced steps are

* first derivatives (``jacobian_fd``): ``h = eps**(1/3) * max(1, |theta_i|)``
  (about ``6e-6``; relative error about ``1e-10`` for smooth ``O(1)`` maps);
* second derivatives from values (``hessian_fd``): ``h = eps**(1/4) * max(1, |theta_i|)``
  (about ``1.2e-4``; relative error about ``1e-8``);
* second derivatives from an analytic Jacobian (``hessian_from_jacobian_fd``): the
  first-derivative step ``eps**(1/3)``;
* fourth-order first derivatives (``jacobian_fd(..., order=4)``, the 5-point stencil
  ``(-f(x+2h) + 8f(x+h) - 8f(x-h) + f(x-2h)) / 12h``): ``h = eps**(1/5) * max(1, |theta_i|)``
  (about ``7e-4``; error ``O(h^4) + O(eps/h)``, about ``1e-13``).  The metric-only
  curvature route uses it to differentiate an analytic ``dg``: curvature contracts
  ``d^2 g`` with ``g^{-1}`` twice, so it needs the extra digits when ``g`` is
  ill-conditioned.

The step actually used is ``(theta + h) - theta`` so that it is exactly representable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import callable_arg, positive, real_array

__all__ = [
    "STEP_FIRST",
    "STEP_FIRST4",
    "STEP_SECOND",
    "hessian_fd",
    "hessian_from_jacobian_fd",
    "jacobian_fd",
]

_EPS = float(np.finfo(np.float64).eps)
#: Relative step for first derivatives by central differences, ``eps**(1/3)``.
STEP_FIRST = _EPS ** (1.0 / 3.0)
#: Relative step for fourth-order first derivatives (5-point stencil), ``eps**(1/5)``.
STEP_FIRST4 = _EPS ** (1.0 / 5.0)
#: Relative step for second derivatives by central differences, ``eps**(1/4)``.
STEP_SECOND = _EPS ** (1.0 / 4.0)

Func = Callable[[NDArray[np.float64]], ArrayLike]


def _steps(theta: NDArray[np.float64], h: float) -> NDArray[np.float64]:
    """Exactly representable steps ``(theta + h*max(1,|theta|)) - theta``."""
    raw = h * np.maximum(1.0, np.abs(theta))
    return (theta + raw) - theta


def _args(f: Any, theta: ArrayLike, h: Any) -> tuple[NDArray[np.float64], float | None]:
    """Checked ``theta`` (finite, at least one axis) and ``h`` (None or > 0); ``f`` callable."""
    callable_arg(f, "f")
    t = real_array(theta, "theta", min_ndim=1)
    return t, None if h is None else positive(h, "h")


def jacobian_fd(
    f: Func, theta: ArrayLike, h: float | None = None, order: int = 2
) -> NDArray[np.float64]:
    r"""Central-difference Jacobian ``J[..., *out, k] = d f[..., *out] / d theta_k``.

    .. math:: \partial_k f(\theta) \approx \frac{f(\theta + h_k e_k) - f(\theta - h_k e_k)}{2 h_k}

    (``order=4``: the 5-point stencil, step :data:`STEP_FIRST4`).

    Parameters
    ----------
    f : callable
        Broadcasting map ``(..., p) -> (..., *out)``.
    theta : array_like, shape (..., p)
        Points.
    h : float, optional
        Relative step; default :data:`STEP_FIRST` (``eps**(1/3)``) for ``order=2`` and
        :data:`STEP_FIRST4` (``eps**(1/5)``) for ``order=4``.
    order : {2, 4}
        Order of the central difference.

    Returns
    -------
    ndarray, shape (..., *out, p)
    """
    if isinstance(order, bool) or order not in (2, 4):
        raise InputError(f"order must be 2 or 4, got {order!r}")
    theta, h = _args(f, theta, h)
    p = theta.shape[-1]
    nb = theta.ndim - 1
    hs = _steps(theta, (STEP_FIRST if order == 2 else STEP_FIRST4) if h is None else h)
    step = hs[..., :, None] * np.eye(p)  # (..., p, p), row k = h_k e_k
    x = theta[..., None, :]
    fp = np.asarray(f(x + step), dtype=np.float64)  # (..., p, *out)
    fm = np.asarray(f(x - step), dtype=np.float64)
    extra = fp.ndim - nb - 1
    if order == 2:
        num, den = fp - fm, 2.0 * hs
    else:
        fpp = np.asarray(f(x + 2 * step), dtype=np.float64)
        fmm = np.asarray(f(x - 2 * step), dtype=np.float64)
        num, den = 8.0 * (fp - fm) - (fpp - fmm), 12.0 * hs
    return np.moveaxis(num / den.reshape(hs.shape + (1,) * extra), nb, -1)


def hessian_fd(f: Func, theta: ArrayLike, h: float | None = None) -> NDArray[np.float64]:
    r"""Central-difference Hessian ``H[..., *out, i, j] = d^2 f / d theta_i d theta_j``.

    .. math:: \partial_i\partial_j f \approx \frac{f(\theta+h_ie_i+h_je_j) - f(\theta+h_ie_i-h_je_j)
              - f(\theta-h_ie_i+h_je_j) + f(\theta-h_ie_i-h_je_j)}{4h_ih_j}

    Parameters
    ----------
    f : callable
        Broadcasting map ``(..., p) -> (..., *out)``.
    theta : array_like, shape (..., p)
    h : float, optional
        Relative step; default :data:`STEP_SECOND` (``eps**(1/4)``).

    Returns
    -------
    ndarray, shape (..., *out, p, p), symmetric in the last two axes.
    """
    theta, h = _args(f, theta, h)
    p = theta.shape[-1]
    nb = theta.ndim - 1
    hs = _steps(theta, STEP_SECOND if h is None else h)
    step = hs[..., :, None] * np.eye(p)  # (..., p, p)
    si = step[..., :, None, :]  # (..., p, 1, p)
    sj = step[..., None, :, :]  # (..., 1, p, p)
    x = theta[..., None, None, :]
    vals = [np.asarray(f(x + a * si + b * sj), dtype=np.float64) for a, b in
            ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    num = vals[0] - vals[1] - vals[2] + vals[3]  # (..., p, p, *out)
    extra = num.ndim - nb - 2
    denom = (4.0 * hs[..., :, None] * hs[..., None, :]).reshape(
        hs.shape[:-1] + (p, p) + (1,) * extra
    )
    out = np.moveaxis(num / denom, (nb, nb + 1), (-2, -1))
    return 0.5 * (out + np.swapaxes(out, -1, -2))


def hessian_from_jacobian_fd(
    jac: Func, theta: ArrayLike, h: float | None = None
) -> NDArray[np.float64]:
    """Hessian by central differences of an analytic Jacobian, symmetrised.

    Parameters
    ----------
    jac : callable
        Broadcasting Jacobian ``(..., p) -> (..., *out, p)``.
    theta : array_like, shape (..., p)
    h : float, optional
        Relative step; default :data:`STEP_FIRST`.

    Returns
    -------
    ndarray, shape (..., *out, p, p)
    """
    out = jacobian_fd(jac, theta, h)
    return 0.5 * (out + np.swapaxes(out, -1, -2))
