"""Attention outputs as mean maps ``mu(theta)`` with derivatives.

A :class:`MeanMap` broadcasts over leading axes: ``theta (..., p) -> mu (..., n)``,
``jacobian -> (..., n, p)``, ``hessian -> (..., n, p, p)``.  Maps override the
derivatives they know analytically; otherwise central differences are used (steps in
:mod:`.derivatives`).

Attention conventions (values as rows: ``values[i] = U_i``):

* ungated head, simplex chart: ``alpha = (theta, 1 - sum theta)``, ``mu = sum_i alpha_i U_i``;
* ungated head, query chart: ``alpha = softmax(scale * K q)``, ``scale = 1/sqrt(d_k)``; the
  chart ``alpha = softmax(q_1, q_2, 0)`` is ``keys = [[1,0],[0,1],[0,0]]``, ``scale = 1``;
* gated head (Qiu et al. 2025, gate after SDPA): ``Y' = Y * sigmoid(W_g q + b_g)``,
  one scalar per head (headwise, ``W_g`` of shape ``(d_q,)``) or one per channel
  (elementwise, ``(d_v, d_q)``);
* stacks: :class:`Compose` (chain rule ``D^2 F[u,u] = sum_l J_{>l} D^2 f_l[v, v]``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from ._check import callable_arg, integer, number, positive, real_array
from .derivatives import hessian_fd, hessian_from_jacobian_fd, jacobian_fd

__all__ = [
    "AffineMap",
    "Compose",
    "ExpQuadraticGate",
    "FunctionMap",
    "Gated",
    "MeanMap",
    "ReciprocalQuadraticGate",
    "SigmoidGate",
    "SoftmaxAttention",
    "SphereCapGate",
    "gated_attention",
    "sigmoid",
    "softmax_chart_attention",
    "structured_depth_map",
    "ungated_simplex",
]

Array = NDArray[np.float64]


def sigmoid(x: ArrayLike) -> Array:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class MeanMap:
    """Base class: a smooth map ``R^p -> R^n`` broadcasting over leading axes."""

    dim_in: int
    dim_out: int

    def __call__(self, theta: ArrayLike) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def jacobian(self, theta: ArrayLike) -> Array:
        """``d mu / d theta``, shape ``(..., n, p)`` (central differences by default)."""
        return jacobian_fd(self, theta)

    def hessian(self, theta: ArrayLike) -> Array:
        """``d^2 mu / d theta^2``, shape ``(..., n, p, p)``.

        Default: differences of the analytic Jacobian if the subclass has one
        (step ``eps**(1/3)``), else second differences of values (``eps**(1/4)``).
        """
        if type(self).jacobian is not MeanMap.jacobian:
            return hessian_from_jacobian_fd(self.jacobian, theta)
        return hessian_fd(self, theta)


class FunctionMap(MeanMap):
    """Wrap a broadcasting callable, with optional analytic derivatives."""

    def __init__(
        self,
        f: Callable[[Array], ArrayLike],
        dim_in: int,
        dim_out: int,
        jac: Callable[[Array], ArrayLike] | None = None,
        hess: Callable[[Array], ArrayLike] | None = None,
    ) -> None:
        callable_arg(f, "f")
        for g, name in ((jac, "jac"), (hess, "hess")):
            if g is not None:
                callable_arg(g, name)
        dim_in, dim_out = integer(dim_in, "dim_in"), integer(dim_out, "dim_out")
        self.f, self.jac, self.hess = f, jac, hess
        self.dim_in, self.dim_out = dim_in, dim_out

    def __call__(self, theta: ArrayLike) -> Array:
        return np.asarray(self.f(np.asarray(theta, dtype=np.float64)), dtype=np.float64)

    def jacobian(self, theta: ArrayLike) -> Array:
        if self.jac is None:
            return jacobian_fd(self, theta)
        return np.asarray(self.jac(np.asarray(theta, dtype=np.float64)), dtype=np.float64)

    def hessian(self, theta: ArrayLike) -> Array:
        if self.hess is not None:
            return np.asarray(self.hess(np.asarray(theta, dtype=np.float64)), dtype=np.float64)
        if self.jac is not None:
            return hessian_from_jacobian_fd(self.jacobian, theta)
        return hessian_fd(self, theta)


class AffineMap(MeanMap):
    """``mu(theta) = c + D theta`` (``D`` of shape ``(n, p)``); Hessian zero."""

    def __init__(self, D: ArrayLike, c: ArrayLike) -> None:
        self.D = real_array(D, "D")
        self.c = real_array(c, "c")
        if self.D.ndim != 2 or 0 in self.D.shape:
            raise InputError(f"D must be a non-empty (n, p) matrix, got shape {self.D.shape}")
        if self.c.shape not in ((), (self.D.shape[0],)):
            raise InputError(f"c must have shape ({self.D.shape[0]},), got {self.c.shape}")
        self.dim_out, self.dim_in = self.D.shape

    def __call__(self, theta: ArrayLike) -> Array:
        return self.c + np.asarray(theta, dtype=np.float64) @ self.D.T

    def jacobian(self, theta: ArrayLike) -> Array:
        t = np.asarray(theta, dtype=np.float64)
        return np.broadcast_to(self.D, t.shape[:-1] + self.D.shape).copy()

    def hessian(self, theta: ArrayLike) -> Array:
        t = np.asarray(theta, dtype=np.float64)
        return np.zeros((*t.shape[:-1], self.dim_out, self.dim_in, self.dim_in))


def ungated_simplex(values: ArrayLike) -> AffineMap:
    """Ungated head in the simplex chart (Theorem GEO-UNGATED-FLAT).

    ``alpha = (theta_1..theta_{n-1}, 1 - sum theta)``, ``mu = U_n + D theta`` with
    ``D = [U_1 - U_n, ..., U_{n-1} - U_n]``; ``g = D^T Sigma^{-1} D`` is constant, so R = 0.

    Parameters
    ----------
    values : array_like, shape (n, d)
        Rows ``U_i``.
    """
    U = real_array(values, "values")
    if U.ndim != 2 or U.shape[0] < 2 or U.shape[1] == 0:
        raise InputError(f"values must be an (n, d) array with n >= 2 keys, got shape {U.shape}")
    return AffineMap((U[:-1] - U[-1]).T, U[-1])


class SoftmaxAttention(MeanMap):
    """Ungated head as a function of the query: ``mu(q) = V^T softmax(scale * K q)``.

    Analytic Jacobian and Hessian: with ``A = diag(a) - a a^T`` (``a`` the weights),
    ``J = scale V^T A K`` and
    ``d^2 a_i/dz_j dz_k = a_i (d_ij - a_j)(d_ik - a_k) - a_i a_j (d_jk - a_k)``.

    Parameters
    ----------
    keys : array_like, shape (n, d_k)
    values : array_like, shape (n, d_v)
    scale : float, optional
        Default ``1/sqrt(d_k)``.

    Notes
    -----
    Scope of Theorem GEO-UNGATED-FLAT: with ``n = 3`` keys and a 2-D query (e.g.
    :func:`softmax_chart_attention`) the output is affine in ``alpha`` over a 2-D chart and
    the Fisher metric is flat.  With more keys than query dimensions plus one (``n = 4``,
    2-D query) the same ungated head is in general CURVED (Theorem GEO-SCOPE: logits
    ``(q1, q2, 0, q1+q2)``, ``U = I_4`` give ``K(0) = -4``).
    """

    def __init__(self, keys: ArrayLike, values: ArrayLike, scale: float | None = None) -> None:
        self.keys = real_array(keys, "keys")
        self.values = real_array(values, "values")
        for a, name in ((self.keys, "keys"), (self.values, "values")):
            if a.ndim != 2 or 0 in a.shape:
                raise InputError(f"{name} must be a non-empty 2-D array, got shape {a.shape}")
        if self.keys.shape[0] != self.values.shape[0]:
            raise InputError("keys and values need the same number of rows")
        self.scale = (1.0 / np.sqrt(self.keys.shape[1]) if scale is None
                      else positive(scale, "scale"))
        self.dim_in = self.keys.shape[1]
        self.dim_out = self.values.shape[1]

    def weights(self, q: ArrayLike) -> Array:
        """Attention weights ``softmax(scale * K q)``, shape ``(..., n)``."""
        z = self.scale * np.asarray(q, dtype=np.float64) @ self.keys.T
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def __call__(self, q: ArrayLike) -> Array:
        return self.weights(q) @ self.values

    def jacobian(self, q: ArrayLike) -> Array:
        a = self.weights(q)
        A = np.einsum("...i,ij->...ij", a, np.eye(a.shape[-1])) - a[..., :, None] * a[..., None, :]
        return self.scale * np.einsum("nc,...nm,mk->...ck", self.values, A, self.keys)

    def hessian(self, q: ArrayLike) -> Array:
        a = self.weights(q)
        n = a.shape[-1]
        eye = np.eye(n)
        B = eye - a[..., None, :]  # B[i, j] = d_ij - a_j
        T = a[..., :, None, None] * B[..., :, :, None] * B[..., :, None, :] - (
            a[..., :, None, None] * a[..., None, :, None] * B[..., None, :, :]
        )  # T[i, j, k] = d^2 a_i / dz_j dz_k
        return self.scale**2 * np.einsum(
            "ic,...ijk,jp,kr->...cpr", self.values, T, self.keys, self.keys
        )


def softmax_chart_attention(values: ArrayLike) -> SoftmaxAttention:
    """Ungated 3-token head in the chart ``alpha = softmax(q_1, q_2, 0)``."""
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    return SoftmaxAttention(keys, values, scale=1.0)


class SigmoidGate(MeanMap):
    """``s(theta) = sigmoid(W theta + b)``; headwise if ``W`` is a vector (output dim 1).

    Parameters
    ----------
    weight : array_like, shape (p,) or (m, p)
    bias : float or array_like (m,)
    """

    def __init__(self, weight: ArrayLike, bias: ArrayLike = 0.0) -> None:
        W = real_array(weight, "weight")
        if W.ndim not in (1, 2) or 0 in W.shape:
            raise InputError(f"weight must be a non-empty vector or matrix, got shape {W.shape}")
        self.W = W[None, :] if W.ndim == 1 else W
        try:
            self.b = np.broadcast_to(real_array(bias, "bias"), (self.W.shape[0],)).copy()
        except ValueError:
            raise InputError(f"bias must be a number or have shape ({self.W.shape[0]},)") from None
        self.dim_out, self.dim_in = self.W.shape

    def __call__(self, theta: ArrayLike) -> Array:
        return sigmoid(np.asarray(theta, dtype=np.float64) @ self.W.T + self.b)

    def jacobian(self, theta: ArrayLike) -> Array:
        s = self(theta)
        return (s * (1 - s))[..., :, None] * self.W

    def hessian(self, theta: ArrayLike) -> Array:
        s = self(theta)
        return (s * (1 - s) * (1 - 2 * s))[..., :, None, None] * (
            self.W[:, :, None] * self.W[:, None, :]
        )


class SphereCapGate(MeanMap):
    """Simplex-chart gate ``s(alpha) = c / |alpha|`` (Theorem GEO-SPHERE-GATE).

    With ``U = I_3`` the gated output ``c alpha/|alpha|`` lies on a sphere of radius ``c``
    and ``K = sigma^2 / c^2``.  ``0 < c < 1/sqrt(n)`` keeps ``s < 1`` (a valid gate).
    """

    def __init__(self, c: float, n: int = 3) -> None:
        self.c = positive(c, "c")
        n = integer(n, "n", minimum=2)
        self.dim_in, self.dim_out = n - 1, 1
        self.M = np.vstack([np.eye(n - 1), -np.ones((1, n - 1))])  # d alpha / d theta

    def _alpha(self, theta: ArrayLike) -> Array:
        t = np.asarray(theta, dtype=np.float64)
        return np.concatenate([t, 1 - t.sum(-1, keepdims=True)], -1)

    def __call__(self, theta: ArrayLike) -> Array:
        return self.c / np.linalg.norm(self._alpha(theta), axis=-1, keepdims=True)

    def jacobian(self, theta: ArrayLike) -> Array:
        a = self._alpha(theta)
        r = np.linalg.norm(a, axis=-1)
        return (-self.c / r**3)[..., None, None] * (a @ self.M)[..., None, :]

    def hessian(self, theta: ArrayLike) -> Array:
        a = self._alpha(theta)
        r = np.linalg.norm(a, axis=-1)[..., None, None]
        n = a.shape[-1]
        Ha = self.c * (3 * a[..., :, None] * a[..., None, :] / r**5 - np.eye(n) / r**3)
        return np.einsum("ai,...ab,bj->...ij", self.M, Ha, self.M)[..., None, :, :]


class ExpQuadraticGate(MeanMap):
    """``s = exp(-beta * phi)``, ``phi = 1/2 (theta-theta0)^T A (theta-theta0) + offset``.

    The structured depth regime (Theorem GEO-DEPTH) uses ``offset = 0`` so the gate is 1
    at ``theta0``.
    """

    def __init__(
        self, A: ArrayLike, theta0: ArrayLike, beta: float = 1.0, offset: float = 0.0
    ) -> None:
        self.A = real_array(A, "A")
        if self.A.ndim != 2 or self.A.shape[0] != self.A.shape[1] or self.A.shape[0] == 0:
            raise InputError(f"A must be a square matrix, got shape {self.A.shape}")
        self.theta0 = real_array(theta0, "theta0")
        if self.theta0.shape != (self.A.shape[0],):
            raise InputError(f"theta0 must have shape ({self.A.shape[0]},), got "
                             f"{self.theta0.shape}")
        self.beta, self.offset = number(beta, "beta"), number(offset, "offset")
        self.dim_in, self.dim_out = self.A.shape[0], 1

    def _phi(self, theta: ArrayLike) -> tuple[Array, Array]:
        d = np.asarray(theta, dtype=np.float64) - self.theta0
        Ad = d @ self.A.T
        return 0.5 * np.sum(d * Ad, -1) + self.offset, Ad

    def __call__(self, theta: ArrayLike) -> Array:
        phi, _ = self._phi(theta)
        return np.exp(-self.beta * phi)[..., None]

    def jacobian(self, theta: ArrayLike) -> Array:
        phi, Ad = self._phi(theta)
        s = np.exp(-self.beta * phi)
        return (-self.beta * s)[..., None, None] * Ad[..., None, :]

    def hessian(self, theta: ArrayLike) -> Array:
        phi, Ad = self._phi(theta)
        s = np.exp(-self.beta * phi)[..., None, None]
        H = s * (self.beta**2 * Ad[..., :, None] * Ad[..., None, :] - self.beta * self.A)
        return H[..., None, :, :]


class ReciprocalQuadraticGate(MeanMap):
    """``s = 1/f``, ``f = c0 + b.theta + 1/2 theta^T Q theta`` (criterion GEO-HEADWISE).

    ``Hess(1/s) = Q``, so ``sign K = sign det Q`` where ``f > 0``.
    """

    def __init__(self, Q: ArrayLike, b: ArrayLike, c0: float) -> None:
        self.Q = real_array(Q, "Q")
        if self.Q.ndim != 2 or self.Q.shape[0] != self.Q.shape[1] or self.Q.shape[0] == 0:
            raise InputError(f"Q must be a square matrix, got shape {self.Q.shape}")
        self.b = real_array(b, "b")
        if self.b.shape != (self.Q.shape[0],):
            raise InputError(f"b must have shape ({self.Q.shape[0]},), got {self.b.shape}")
        self.c0 = number(c0, "c0")
        self.dim_in, self.dim_out = self.Q.shape[0], 1

    def f(self, theta: ArrayLike) -> Array:
        """The reciprocal gate ``1/s``."""
        t = np.asarray(theta, dtype=np.float64)
        return self.c0 + t @ self.b + 0.5 * np.sum(t * (t @ self.Q.T), -1)

    def __call__(self, theta: ArrayLike) -> Array:
        return (1.0 / self.f(theta))[..., None]

    def jacobian(self, theta: ArrayLike) -> Array:
        t = np.asarray(theta, dtype=np.float64)
        f = self.f(t)
        df = self.b + t @ self.Q.T
        return (-df / f[..., None] ** 2)[..., None, :]

    def hessian(self, theta: ArrayLike) -> Array:
        t = np.asarray(theta, dtype=np.float64)
        f = self.f(t)[..., None, None]
        df = self.b + t @ self.Q.T
        H = 2 * df[..., :, None] * df[..., None, :] / f**3 - self.Q / f**2
        return H[..., None, :, :]


class Gated(MeanMap):
    """Multiplicative gate: ``mu(theta) = m(theta) * s(theta)``.

    ``s`` has output dimension 1 (headwise, broadcast) or ``dim_out`` of ``m``
    (elementwise).  Derivatives by the product rule from those of ``m`` and ``s``:
    ``d_ij mu = s d_ij m + m d_ij s + d_i m d_j s + d_j m d_i s``.
    """

    def __init__(self, base: MeanMap, gate: MeanMap) -> None:
        for m, name in ((base, "base"), (gate, "gate")):
            if not isinstance(m, MeanMap):
                raise InputError(f"{name} must be a MeanMap, got {type(m).__name__}")
        if base.dim_in != gate.dim_in:
            raise InputError("base and gate must take the same parameters")
        if gate.dim_out not in (1, base.dim_out):
            raise InputError("gate output must be 1 (headwise) or base.dim_out (elementwise)")
        self.base, self.gate = base, gate
        self.dim_in, self.dim_out = base.dim_in, base.dim_out

    def __call__(self, theta: ArrayLike) -> Array:
        return self.base(theta) * self.gate(theta)

    def jacobian(self, theta: ArrayLike) -> Array:
        m, s = self.base(theta), self.gate(theta)
        Jm, Js = self.base.jacobian(theta), self.gate.jacobian(theta)
        return s[..., :, None] * Jm + m[..., :, None] * Js

    def hessian(self, theta: ArrayLike) -> Array:
        m, s = self.base(theta), self.gate(theta)
        Jm, Js = self.base.jacobian(theta), self.gate.jacobian(theta)
        Hm, Hs = self.base.hessian(theta), self.gate.hessian(theta)
        cross = Jm[..., :, :, None] * Js[..., :, None, :]
        return (
            s[..., :, None, None] * Hm
            + m[..., :, None, None] * Hs
            + cross
            + np.swapaxes(cross, -1, -2)
        )


class Compose(MeanMap):
    """Stack of layers ``F = f_L o ... o f_1`` (``layers[0]`` applied first).

    Chain rule: ``J_F = J_L ... J_1``; for ``f o h``:
    ``H[a] = sum_b J_f[a, b] H_h[b] + J_h^T H_f[a] J_h``, i.e.
    ``D^2 F[u,u] = sum_l J_{>l} D^2 f_l[v_{l-1}, v_{l-1}]`` (Theorem GEO-DEPTH).
    """

    def __init__(self, layers: Sequence[MeanMap]) -> None:
        if isinstance(layers, MeanMap) or not layers:
            raise InputError("layers must be a non-empty sequence of MeanMaps")
        if not all(isinstance(m, MeanMap) for m in layers):
            raise InputError("layers must hold MeanMaps only")
        for a, b in itertools.pairwise(layers):
            if a.dim_out != b.dim_in:
                raise InputError("layers: dimensions do not chain")
        self.layers = list(layers)
        self.dim_in, self.dim_out = layers[0].dim_in, layers[-1].dim_out

    def __call__(self, theta: ArrayLike) -> Array:
        x = np.asarray(theta, dtype=np.float64)
        for f in self.layers:
            x = f(x)
        return x

    def _derivs(self, theta: ArrayLike) -> tuple[Array, Array]:
        x = np.asarray(theta, dtype=np.float64)
        J = self.layers[0].jacobian(x)
        H = self.layers[0].hessian(x)
        x = self.layers[0](x)
        for f in self.layers[1:]:
            Jf, Hf = f.jacobian(x), f.hessian(x)
            H = np.einsum("...ab,...bij->...aij", Jf, H) + np.einsum(
                "...bi,...abc,...cj->...aij", J, Hf, J
            )
            J = Jf @ J
            x = f(x)
        return J, H

    def jacobian(self, theta: ArrayLike) -> Array:
        return self._derivs(theta)[0]

    def hessian(self, theta: ArrayLike) -> Array:
        return self._derivs(theta)[1]


def gated_attention(
    keys: ArrayLike,
    values: ArrayLike,
    gate_weight: ArrayLike,
    gate_bias: ArrayLike = 0.0,
    scale: float | None = None,
) -> Gated:
    """Query-driven gated head (Qiu et al. 2025): ``SDPA(q) * sigmoid(W_g q + b_g)``.

    ``gate_weight`` of shape ``(d_q,)`` gives a headwise gate, ``(d_v, d_q)`` an
    elementwise gate.
    """
    return Gated(SoftmaxAttention(keys, values, scale), SigmoidGate(gate_weight, gate_bias))


def structured_depth_map(
    values: ArrayLike,
    hessians: Sequence[ArrayLike],
    beta: float = 1.0,
    theta0: ArrayLike | None = None,
    offsets: Sequence[float] | None = None,
) -> MeanMap:
    """Structured depth regime: ``mu_L = (prod_l s_l) m``, ``s_l = exp(-beta phi_l)``.

    ``m`` is the ungated simplex-chart head with rows ``values``; ``phi_l`` is quadratic
    with Hessian ``hessians[l]``, stationary at ``theta0`` (default the barycentre) and
    ``phi_l(theta0) = offsets[l]`` (default 0, the normalisation Theorem GEO-DEPTH needs).
    """
    base: MeanMap = ungated_simplex(values)
    p = base.dim_in
    t0 = np.full(p, 1.0 / (p + 1)) if theta0 is None else real_array(theta0, "theta0")
    if isinstance(hessians, str | bytes) or len(hessians) == 0:
        raise InputError("hessians must be a non-empty sequence of matrices")
    offs = [0.0] * len(hessians) if offsets is None else list(offsets)
    if len(offs) != len(hessians):
        raise InputError(f"offsets must have one entry per Hessian ({len(hessians)}), got "
                         f"{len(offs)}")
    out = base
    for A, c in zip(hessians, offs, strict=True):
        out = Gated(out, ExpQuadraticGate(A, t0, beta, c))
    return out
