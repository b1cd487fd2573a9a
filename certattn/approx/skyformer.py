r"""Skyformer (Chen, Zeng, Ji, Yang, NeurIPS 2021): Gaussian-kernel attention by modified Nyström.

Definitions, as in the authors' code (``pkuzengqi/Skyformer``,
``code/models/attention_skyformer.py``, class ``Skyformer`` with ``kernel_RS_RBF``).
Per head, with :math:`x_i = q_i\,\sigma^{1/2}` and :math:`y_j = k_j\,\sigma^{1/2}`
(:math:`\sigma` = ``scale`` = :math:`1/\sqrt p` by default, i.e. the code's division by
:math:`p^{1/4}`), the kernel is the Gaussian

.. math:: \kappa(x, y) = \exp(x\cdot y - |x|^2/2 - |y|^2/2) = e^{-|x - y|^2/2},
          \qquad C_{ij} = \kappa(x_i, y_j) = e^{-\sigma |q_i - k_j|^2 / 2}.

Modified Nyström: the non-PSD block :math:`C` is completed to the PSD kernel matrix of
:math:`Z = [X; Y]` (``Lq + Lk`` rows); ``m`` landmark rows :math:`Z_S` are drawn
uniformly **with replacement** among non-padding positions, the first ``m // 2`` among the
query rows and the rest among the key rows (the code scales one vector of uniforms by
the number of non-padding positions, so the draw is shared by every head of a batch
element). With :math:`A = \kappa(Z_S, Z_S) + 0.1 I`, :math:`D = \mathrm{diag}(A\mathbf 1)`
and :math:`M = D^{-1/2} A D^{-1/2}`, the inverse of :math:`M` is approximated by 6
iterations of the Schulz-type (Nyströmformer) update

.. math:: V_0 = M^\top / \max_c \textstyle\sum_r M_{rc}, \qquad
          V \leftarrow \tfrac14 V\,(13 I - MV(15 I - MV(7 I - MV))),

and the output is

.. math:: \hat O = \kappa(X, Z_S)\,
          \big(\kappa(Y, Z_S) D^{-1/2} V D^{-1/2}\big)^\top V_{\mathrm{val}}
          \;\approx\; C\, V_{\mathrm{val}}.

**What is normalised** (``normalize``):

* ``"none"`` (default, the published code): no row normalisation at all; Skyformer
  *replaces* softmax attention by the un-normalised kernel attention :math:`C V` (its models
  are trained from scratch with it), so :math:`\hat O` approximates :math:`CV`, not softmax
  attention; ``weights`` is None.
* ``"rows"``: :math:`\hat O_i / (\hat C \mathbf 1)_i`, the Nyström kernel attention with
  its rows normalised (an approximation of :math:`D_C^{-1} C V`).
* ``"softmax"``: the identity :math:`e^{\sigma q\cdot k} = e^{|x|^2/2} C_{qk} e^{|y|^2/2}`;
  the query factor cancels in each row, so
  :math:`\mathrm{softmax}(\sigma QK^\top)V = (C\,\mathrm{diag}(w) V) / (C w)` with
  :math:`w_j = e^{|y_j|^2/2}` (shifted by its maximum, which cancels). Replacing :math:`C`
  by its Nyström approximation gives an approximation of exact softmax attention. This
  mode is ours (not in the code), for comparing with pretrained softmax heads.

For ``"rows"`` and ``"softmax"`` the query kernels :math:`\kappa(x_i, Z_S)` are formed up to
a factor per query (the exponent :math:`x_i\cdot z - |z|^2/2` shifted by its row maximum):
the normalisation cancels it, and a query far from every landmark keeps finite weights
instead of 0 / 0. ``weights`` is the dense ``(Lq, Lk)`` matrix of the
approximation, :math:`\hat C_{ij} w_j / \sum_l \hat C_{il} w_l` (it can have negative
entries). Deviation from the code: the start :math:`V_0` divides by the maximum column sum
of each head's own matrix (the code's default takes one maximum over the whole batch and
all heads, which couples unrelated heads).

Masks: Skyformer handles key padding only (the code multiplies padded rows by 0). With a
mask that hides the same keys from every query, hidden keys are dropped from the key sum
and never drawn as landmarks (the factorised form above). Any other mask (``causal=True``,
a causal boolean mask, per-query masks) has no factorised form; as our extension the
Nyström matrix :math:`\hat C = \kappa(X, Z_S) A^{-1} \kappa(Z_S, Y)` is then evaluated
densely and masked, :math:`\hat O = (\hat C \odot M) V` (``params["dense_masked"]``),
landmarks drawn among keys some query sees; this measures the approximation, it is not
an efficient algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._validate import InputError, check_count, check_number
from ._prep import Prepared, prepare
from ._result import ApproxResult

__all__ = [
    "RIDGE",
    "SCHULZ_ITERATIONS",
    "gaussian_kernel",
    "kernel_attention",
    "landmark_indices",
    "schulz_inverse",
    "skyformer",
]

RIDGE = 0.1
"""Ridge added to the landmark kernel matrix (the code's ``1e-1 * I``)."""

SCHULZ_ITERATIONS = 6
"""Iterations of the Schulz-type inverse (the code's ``iterative_inv(STAS, 6)``)."""

_NORMALIZE = ("none", "rows", "softmax")


def gaussian_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""Gaussian kernel :math:`\kappa(x_i, y_j) = \exp(x_i\cdot y_j - |x_i|^2/2 - |y_j|^2/2)`.

    Parameters
    ----------
    x : numpy.ndarray
        ``(..., n, p)``.
    y : numpy.ndarray
        ``(..., m, p)``.

    Returns
    -------
    numpy.ndarray
        ``(..., n, m)`` float64 in ``[0, 1]`` (the exponent :math:`-|x - y|^2/2` is clipped at
        0 against rounding).  Where the expansion overflows (points beyond about
        :math:`10^{154}`) the exponent is evaluated as :math:`-|x - y|^2/2` directly.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        e = (
            np.matmul(x, np.swapaxes(y, -1, -2))
            - 0.5 * np.sum(x * x, axis=-1)[..., :, None]
            - 0.5 * np.sum(y * y, axis=-1)[..., None, :]
        )
        if not np.isfinite(e).all():  # inf - inf: the direct form, -inf far away
            diff = x[..., :, None, :] - y[..., None, :, :]
            e = -0.5 * np.sum(diff * diff, axis=-1)
    return np.exp(np.minimum(e, 0.0))


def _row_kernel(x: np.ndarray, y: np.ndarray, log_w: np.ndarray | float = 0.0) -> np.ndarray:
    r""":math:`\kappa(x_i, y_j) w_j` up to a positive factor per row ``i``, stably.

    :math:`\log\kappa(x_i, y_j) + \log w_j = x_i\cdot y_j - |y_j|^2/2 + \log w_j -
    |x_i|^2/2`: the last term is dropped and each row shifted by its maximum before the
    exponential, so a row never underflows to all zeros (a query far from every point
    gave 0 / 0 in a row-normalised output).  Rows normalised afterwards are unchanged.
    ``log_w`` is ``(..., m)`` (``-inf`` = weight 0).

    Raises
    ------
    InputError
        Where the exponents overflow float64 (scores :math:`x\cdot y` beyond the range).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.matmul(x, np.swapaxes(y, -1, -2)) + (log_w - 0.5 * np.sum(y * y, axis=-1))[
            ..., None, :
        ]
        top = e.max(axis=-1, keepdims=True)
    if np.isnan(e).any() or np.isinf(top).any():
        raise InputError(
            "skyformer kernel exponents overflow float64 (x . z or |z|^2 beyond 1.8e308 "
            "for queries, keys or landmarks z scaled by sqrt(scale)); rescale the inputs"
        )
    return np.exp(e - top)


def schulz_inverse(mat: np.ndarray, n_iter: int = SCHULZ_ITERATIONS) -> np.ndarray:
    r"""Approximate inverse by the Schulz-type iteration of Nyströmformer / Skyformer.

    .. math:: V_0 = M^\top / \max_c \textstyle\sum_r M_{rc},\qquad
              V \leftarrow \tfrac14 V (13I - MV(15I - MV(7I - MV)))

    Parameters
    ----------
    mat : numpy.ndarray
        ``(..., m, m)``.
    n_iter : int
        Number of updates.

    Returns
    -------
    numpy.ndarray
        ``(..., m, m)``.
    """
    m = np.asarray(mat, dtype=np.float64)
    eye = np.eye(m.shape[-1])
    colmax = np.max(np.sum(m, axis=-2), axis=-1)[..., None, None]
    v = np.swapaxes(m, -1, -2) / colmax
    for _ in range(int(n_iter)):
        kv = np.matmul(m, v)
        v = np.matmul(0.25 * v, 13 * eye - np.matmul(kv, 15 * eye - np.matmul(kv, 7 * eye - kv)))
    return v


def _key_pool(pr: Prepared) -> tuple[np.ndarray, bool]:
    """Keys some query sees ``(*lead, Lk)``, and whether the mask is key padding only."""
    if pr.bias is not None and np.any(pr.bias[pr.visible] != 0):
        raise InputError("skyformer supports boolean / 0-or--inf masks only")
    vis = pr.visible
    pool = vis.any(axis=-2)
    return pool, bool(np.array_equal(vis, np.broadcast_to(pool[..., None, :], vis.shape)))


def landmark_indices(
    key_pool: np.ndarray, query_pool: np.ndarray, m: int, seed: Any = 0
) -> np.ndarray:
    """Landmark rows of ``[Q; K]`` drawn as the code draws them.

    One vector ``u`` of ``m`` uniforms in ``[0, 1)`` (from ``numpy.random.default_rng(seed)``);
    landmark ``t < m // 2`` is the ``floor(u_t * n_q)``-th valid query row, landmark
    ``t >= m // 2`` is ``Lq`` + the ``floor(u_t * n_k)``-th valid key row (``n_q``, ``n_k``
    the valid counts of each batch element): uniform, with replacement.

    Parameters
    ----------
    key_pool : numpy.ndarray
        ``(*lead, Lk)`` bool, keys that may be landmarks.
    query_pool : numpy.ndarray
        ``(*lead, Lq)`` bool, query rows that may be landmarks.
    m : int
        Number of landmarks (>= 2).
    seed : int or numpy.random.Generator
        Seed of the draw.

    Returns
    -------
    numpy.ndarray
        ``(*lead, m)`` int64 indices into the ``Lq + Lk`` rows of ``[Q; K]``.
    """
    m = int(m)
    if m < 2:
        raise InputError(f"skyformer needs at least 2 landmarks, got {m}")
    rng = np.random.default_rng(seed)
    u = rng.random(m)
    lq = query_pool.shape[-1]

    def pick(pool: np.ndarray, uu: np.ndarray) -> np.ndarray:
        order = np.argsort(~pool, axis=-1, kind="stable")  # valid positions first, in order
        count = pool.sum(axis=-1, keepdims=True)
        pos = np.minimum(np.floor(uu * count).astype(np.int64), count - 1)
        return np.take_along_axis(order, pos, axis=-1)

    lead = np.broadcast_shapes(key_pool.shape[:-1], query_pool.shape[:-1])
    kp = np.broadcast_to(key_pool, (*lead, key_pool.shape[-1]))
    qp = np.broadcast_to(query_pool, (*lead, lq))
    half = m // 2
    uq = np.broadcast_to(u[:half], (*lead, half))
    uk = np.broadcast_to(u[half:], (*lead, m - half))
    return np.concatenate([pick(qp, uq), lq + pick(kp, uk)], axis=-1)


def _factors(
    x: np.ndarray, y: np.ndarray, idx: np.ndarray, ridge: float, n_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """``kappa(X, Z_S)`` and ``kappa(Y, Z_S) D^-1/2 V D^-1/2`` (the code's ``Q`` and ``K``)."""
    z = np.concatenate([x, y], axis=-2)
    zs = np.take_along_axis(z, idx[..., None], axis=-2)
    a = gaussian_kernel(zs, zs) + ridge * np.eye(idx.shape[-1])
    dinv = 1.0 / np.sqrt(np.sum(a, axis=-1))
    mnorm = dinv[..., :, None] * a * dinv[..., None, :]
    inv = schulz_inverse(mnorm, n_iter)
    kq = gaussian_kernel(x, zs)
    kk = (gaussian_kernel(y, zs) * dinv[..., None, :]) @ inv * dinv[..., None, :]
    return kq, kk


def skyformer(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    landmarks: int = 128,
    seed: Any = 0,
    landmark_idx: Any = None,
    ridge: float = RIDGE,
    n_iter: int = SCHULZ_ITERATIONS,
    normalize: str = "none",
    dense_weights: bool = True,
) -> ApproxResult:
    r"""Skyformer attention (module docstring: kernel, Nyström, Schulz inverse, normalisation).

    Parameters
    ----------
    q, k, v : array_like
        Queries ``(..., [H,] Lq, d)``, keys ``(..., [H_kv,] Lk, d)``, values
        ``(..., [H_kv,] Lk, dv)``.
    mask : array_like, optional
        Boolean (True = visible) or additive 0 / ``-inf`` mask. A key padding mask (the same
        keys hidden from every query) keeps the factorised form; others are evaluated
        densely (module docstring).
    causal : bool
        Causal mask aligned at the end (dense masked evaluation; module docstring).
    scale : float, optional
        Logit scale :math:`\sigma`; default :math:`1/\sqrt d`. Points are scaled by
        :math:`\sqrt\sigma` (the code's :math:`p^{-1/4}`).
    kv_heads : int or sequence of int, optional
        Grouped-query mapping.
    landmarks : int
        Number ``m`` of landmark rows (default 128: 64 query rows + 64 key rows).
    seed : int or numpy.random.Generator
        Seed of the landmark draw (:func:`landmark_indices`).
    landmark_idx : array_like of int, optional
        Explicit landmark rows of ``[Q; K]`` (``0 .. Lq + Lk - 1``), shape ``(m,)`` or
        ``(*lead, m)``; overrides ``landmarks`` and ``seed``.
    ridge : float
        Added to the landmark kernel diagonal (default 0.1).
    n_iter : int
        Schulz iterations (default 6).
    normalize : {"none", "rows", "softmax"}
        What the output is normalised by (module docstring).
    dense_weights : bool
        Form the ``(Lq, Lk)`` ``weights`` for ``"rows"`` / ``"softmax"`` (an
        :math:`O(L_q L_k m)` product the method itself never needs); False leaves it None.

    Returns
    -------
    ApproxResult
        ``output`` :math:`\hat O`; ``weights`` for ``"rows"`` / ``"softmax"``; ``kept``,
        ``tail_upper``, ``error_bound`` None (the paper's bound is probabilistic);
        ``cost`` = kernel evaluations per query in key-equivalents,
        :math:`m + (m L_k + m^2)/L_q` (the query's ``m`` landmark kernels plus the keys' and
        landmarks' kernels amortised over the queries), plus :math:`n_i m / d` for the
        dense masked evaluation over the query's :math:`n_i` visible keys.

    Raises
    ------
    InputError
        Bad shapes, additive masks with finite non-zero entries, fewer than 2 landmarks,
        unknown ``normalize``, landmark indices out of range, a ``ridge`` that is not a
        finite number >= 0, a negative ``n_iter``; ``"rows"`` / ``"softmax"``
        with kernel exponents beyond the float64 range, or a query whose Nyström row sum
        is 0 in float64 (far from every landmark: the estimate is 0 / 0).
    """
    if normalize not in _NORMALIZE:
        raise InputError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    ridge = check_number(ridge, name="ridge", low=0.0, high=math.inf, closed_low=True,
                         closed_high=False)
    n_iter = check_count(n_iter, name="n_iter")
    pr = prepare(q, k, v, mask=mask, causal=causal, scale=scale, kv_heads=kv_heads)
    pool, padding_only = _key_pool(pr)
    lq, lk = pr.q.shape[-2], pr.k.shape[-2]
    lead = pr.visible.shape[:-2]
    if landmark_idx is None:
        qpool = pool if lq == lk else np.ones((*lead, lq), dtype=bool)
        idx = landmark_indices(pool, qpool, landmarks, seed)
    else:
        idx = np.asarray(landmark_idx)
        if idx.ndim < 1 or idx.dtype.kind not in "iu" or idx.shape[-1] < 1:
            raise InputError("landmark_idx must be a non-empty integer array (..., m)")
        if np.any(idx < 0) or np.any(idx >= lq + lk):
            raise InputError(f"landmark_idx must lie in 0 .. {lq + lk - 1}")
        idx = np.broadcast_to(idx.astype(np.int64), (*lead, idx.shape[-1]))
    m = int(idx.shape[-1])
    root = np.sqrt(pr.scale)
    x, y = pr.q * root, pr.k * root
    kq, kk = _factors(x, y, idx, float(ridge), int(n_iter))
    kk = kk * pool[..., :, None]  # hidden keys leave the key sum (the code's mask product)
    vals = pr.v
    weights = None
    w = None
    if normalize != "none":  # normalised rows: kq up to a factor per query, never all 0
        zs = np.take_along_axis(np.concatenate([x, y], axis=-2), idx[..., None], axis=-2)
        kq = _row_kernel(x, zs)
    if normalize == "rows":
        w = pool.astype(np.float64)
    elif normalize == "softmax":
        ly = np.where(pool, 0.5 * _squared_norms(y), -np.inf)
        w = np.exp(ly - ly.max(axis=-1, keepdims=True))
    cost = np.full((*lead, lq), m + (m * lk + m * m) / lq, dtype=np.float64)
    if not padding_only:  # dense masked evaluation of the Nystrom matrix (our extension)
        chat = np.where(pr.visible, kq @ np.swapaxes(kk, -1, -2), 0.0)
        cost = cost + pr.visible.sum(axis=-1) * m / pr.q.shape[-1]
        if w is None:
            out = chat @ vals
        else:
            cw = chat * w[..., None, :]
            den = _row_sums(cw.sum(axis=-1, keepdims=True))
            out = (cw @ vals) / den
            weights = cw / den if dense_weights else None
    elif w is None:
        out = kq @ (np.swapaxes(kk, -1, -2) @ vals)
    else:
        ctx = np.swapaxes(kk, -1, -2) @ (w[..., :, None] * vals)
        den = _row_sums(kq @ (np.swapaxes(kk, -1, -2) @ w[..., :, None]))
        out = (kq @ ctx) / den
        if dense_weights:
            weights = (kq @ np.swapaxes(kk, -1, -2)) * w[..., None, :] / den
    return ApproxResult(
        output=out,
        weights=weights,
        kept=None,
        cost=cost,
        tail_upper=None,
        error_bound=None,
        method="skyformer",
        params={"landmarks": m, "seed": seed if landmark_idx is None else None,
                "explicit_landmarks": landmark_idx is not None, "ridge": float(ridge),
                "n_iter": int(n_iter), "normalize": normalize, "scale": pr.scale,
                "dense_masked": not padding_only},
    )


def _row_sums(den: np.ndarray) -> np.ndarray:
    """The Nystrom row sums ``(..., Lq, 1)`` a normalised output divides by; InputError
    where one is 0 (or not finite) in float64."""
    bad = ~np.isfinite(den) | (den == 0)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0][:-1])
        raise InputError(
            f"skyformer: the Nystrom row sum of query {pos} is {float(den[pos][0])!r} in "
            "float64 (the query is far from the landmarks for the kernel width); use key "
            "landmarks (landmark_idx), more landmarks, a smaller scale or normalize='none'"
        )
    return den


def kernel_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    normalize: str = "none",
) -> np.ndarray:
    r"""The dense target of :func:`skyformer`: kernel attention with the exact :math:`C`.

    ``"none"``: :math:`C V` (Skyformer's "Kernelized Attention"); ``"rows"``:
    :math:`D_C^{-1} C V`; ``"softmax"``: :math:`(C\,\mathrm{diag}(w) V)/(C w)`, which equals
    exact softmax attention. Hidden scores are 0 in :math:`C`.  The normalised forms are
    evaluated in the log domain with each row shifted by its maximum (the query factor
    :math:`e^{-|x|^2/2}` cancels), so a query far from every key still gets its exact
    (softmax of :math:`-|x - y_j|^2/2`, resp. of the scores) weights, never 0 / 0.

    Parameters
    ----------
    q, k, v, mask, causal, scale, kv_heads, normalize
        As :func:`skyformer`.

    Returns
    -------
    numpy.ndarray
        ``(..., Lq, dv)`` float64.

    Raises
    ------
    InputError
        As :func:`skyformer`.
    """
    if normalize not in _NORMALIZE:
        raise InputError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    pr = prepare(q, k, v, mask=mask, causal=causal, scale=scale, kv_heads=kv_heads)
    _key_pool(pr)
    root = np.sqrt(pr.scale)
    x, y = pr.q * root, pr.k * root
    if normalize == "none":
        return np.where(pr.visible, gaussian_kernel(x, y), 0.0) @ pr.v
    # C_ij w_j up to a factor per row: e^{x.y_j - |y_j|^2/2} (rows), e^{x.y_j} (softmax)
    log_w = 0.5 * _squared_norms(y) if normalize == "softmax" else 0.0
    cw = np.where(pr.visible, _row_kernel(x, y, log_w), 0.0)
    return (cw @ pr.v) / cw.sum(axis=-1, keepdims=True)


def _squared_norms(y: np.ndarray) -> np.ndarray:
    """``|y_j|^2`` per row; InputError where it overflows float64."""
    with np.errstate(over="ignore"):
        sq = np.sum(y * y, axis=-1)
    if np.isinf(sq).any():
        raise InputError("skyformer scores overflow float64 (|k|^2 scale beyond 1.8e308); "
                         "rescale the inputs")
    return sq
