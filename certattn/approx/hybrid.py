r"""Hybrid linear + sliding-window attention (LoLCATs eq. 7) with Hedgehog feature maps.

The hybrid (LoLCATs, ``HazyResearch/lolcats``, ``linear_window_attention_sw.py``; the
seed paper on component imbalance, arXiv 2510.05901, studies it). For query ``i`` at
position :math:`t_i = i + L_k - L_q` with visible keys :math:`V_i` (mask and causal
structure),

.. math::
    W_i &= \{ j \in V_i : t_i - w < j \le t_i \} \quad\text{(the last } w \text{ keys)},
    \qquad \Lambda_i = V_i \setminus W_i, \\
    c_i &= \max_{j \in W_i} s_{ij}, \qquad s_{ij} = \sigma\, q_i \cdot k_j + b_{ij}, \\
    y_i &= \frac{\sum_{j\in W_i} \gamma\, e^{s_{ij} - c_i} v_j
                + \sum_{j \in \Lambda_i} \phi_q(q_i)^\top \phi_k(k_j)\, v_j}
               {\sum_{j\in W_i} \gamma\, e^{s_{ij} - c_i}
                + \sum_{j \in \Lambda_i} \phi_q(q_i)^\top \phi_k(k_j)},
    \qquad \gamma = \mathrm{sigmoid}(\text{window\_factor}).

With ``causal=True`` :math:`\Lambda_i = \{j \le t_i - w\}`, the keys strictly before the
window (``j < n - w + 1`` in the paper's 1-based notation); without it, visible keys after
the query also go to the linear branch. LoLCATs initialises ``window_factor`` at
:math:`-2.1972 = \mathrm{logit}(0.1)`, so :math:`\gamma = 0.1` (the default here; an array
gives one factor per head). The linear branch is not rescaled by :math:`e^{-c_i}`, exactly
as in eq. 7, so :math:`\gamma` and :math:`c_i` set the balance of the two branches.

Hedgehog feature map (per head, separate for queries and keys, applied after RoPE):

.. math:: \phi(x) = \max\big([\mathrm{softmax}(xW) \oplus \mathrm{softmax}(-xW)],\,
          10^{-12}\big) \in \mathbb R^{2f},

softmax over the feature axis, :math:`W \in \mathbb R^{d \times f}`. The default maps are
the identity (:math:`W = I`, our choice for untrained maps); :func:`fit_hedgehog` fits them
by Hedgehog's attention-weight transfer (cross-entropy of the linear attention weights
to the true softmax weights), in numpy with analytic gradients and Adam.

:func:`hybrid_usage` measures what the seed paper reports: the exact softmax mass outside
the window (what the linear branch must carry; by TV-TAIL it is exactly the total variation
of window-only attention), the hybrid's own window share, and the total variation and
output error to exact attention of the hybrid, window-only and linear-only attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validate import InputError, check_count, check_finite, check_number
from ._prep import Prepared, prepare, softmax_attention
from ._result import ApproxResult

__all__ = [
    "FEATURE_EPS",
    "WINDOW",
    "WINDOW_FACTOR",
    "FeatureMaps",
    "HybridUsage",
    "fit_hedgehog",
    "hedgehog_features",
    "hybrid_linear",
    "hybrid_usage",
    "identity_maps",
    "transfer_loss",
]

WINDOW = 64
"""LoLCATs' sliding-window size."""

WINDOW_FACTOR = math.log(0.1 / 0.9)
"""LoLCATs' ``init_window_factor`` (-2.1972...): ``sigmoid`` of it is 0.1."""

FEATURE_EPS = 1e-12
"""Clamp of the Hedgehog features (values below are raised to it)."""


@dataclass(frozen=True)
class FeatureMaps:
    """Hedgehog feature maps of a set of heads.

    Attributes
    ----------
    w_q, w_k : numpy.ndarray
        ``(H, d, f)`` (one map per query head) or ``(d, f)`` (shared), float64.
    eps : float
        Feature clamp.
    fit : dict
        Provenance of a fit (seed, data, steps, losses); empty for untrained maps.
    """

    w_q: np.ndarray
    w_k: np.ndarray
    eps: float = FEATURE_EPS
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Feature dimension ``2 f`` of :math:`\\phi`."""
        return 2 * int(self.w_q.shape[-1])


def identity_maps(d: int, heads: int | None = None, f: int | None = None) -> FeatureMaps:
    """Untrained maps ``W = I`` (``(d, f)``, ones on the diagonal).

    Parameters
    ----------
    d : int
        Head dimension.
    heads : int, optional
        Number of query heads (maps ``(H, d, f)``); None: one shared map.
    f : int, optional
        Features per half (default ``d``).

    Returns
    -------
    FeatureMaps
    """
    w = np.eye(d, d if f is None else int(f))
    if heads is not None:
        w = np.repeat(w[None], int(heads), axis=0)
    return FeatureMaps(w.copy(), w.copy())


def _softmax(u: np.ndarray) -> np.ndarray:
    e = np.exp(u - u.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hedgehog_features(x: Any, w: Any, eps: float = FEATURE_EPS) -> np.ndarray:
    r"""Hedgehog features :math:`\max([\mathrm{softmax}(xW)\oplus\mathrm{softmax}(-xW)],\epsilon)`.

    Parameters
    ----------
    x : array_like
        ``(..., n, d)``.
    w : array_like
        ``(..., d, f)`` broadcasting with ``x``'s leading axes.
    eps : float
        Clamp.

    Returns
    -------
    numpy.ndarray
        ``(..., n, 2f)`` float64.
    """
    u = np.matmul(np.asarray(x, np.float64), np.asarray(w, np.float64))
    return np.maximum(np.concatenate([_softmax(u), _softmax(-u)], axis=-1), eps)


def _window_factor(window_factor: Any) -> np.ndarray:
    """``window_factor`` as finite float64 (a logit: NaN and +-inf refused)."""
    wf = np.asarray(window_factor)
    if wf.ndim == 0:
        return np.float64(check_number(window_factor, name="window_factor", low=-math.inf,
                                       high=math.inf, closed_low=False, closed_high=False))
    if wf.dtype.kind not in "iuf":
        raise InputError(f"window_factor must be real numbers, got dtype {wf.dtype}")
    wf = wf.astype(np.float64)
    check_finite(wf, np, "window_factor")
    return wf


def _gamma(window_factor: Any, lead: tuple[int, ...]) -> np.ndarray:
    g = 1.0 / (1.0 + np.exp(-_window_factor(window_factor)))
    try:
        return np.broadcast_to(g, lead)[..., None, None]
    except ValueError:
        raise InputError(f"window_factor of shape {g.shape} does not broadcast to the "
                         f"(batch, head) axes {lead}") from None


def _window_sets(pr: Prepared, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W, Lambda)`` boolean ``(*lead, Lq, Lk)``: window keys and linear-branch keys."""
    if int(window) < 0:
        raise InputError(f"window must be >= 0, got {window}")
    lq, lk = pr.visible.shape[-2:]
    pos = np.arange(lq)[:, None] + (lk - lq)
    j = np.arange(lk)[None, :]
    win = (j <= pos) & (j > pos - int(window))
    w = pr.visible & win
    return w, pr.visible & ~w


def _maps_for(maps: FeatureMaps | None, pr: Prepared) -> FeatureMaps:
    d = pr.q.shape[-1]
    if maps is None:
        return identity_maps(d)
    if maps.w_q.shape[-2] != d or maps.w_k.shape[-2] != d:
        raise InputError(f"feature maps are for d = {maps.w_q.shape[-2]}, inputs have d = {d}")
    return maps


def _branches(
    pr: Prepared, maps: FeatureMaps, window: int, window_factor: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalised window weights, linear weights, and the two key sets."""
    win, lin = _window_sets(pr, window)
    s = pr.scores()
    sw = np.where(win, s, -np.inf)
    c = sw.max(axis=-1, keepdims=True)
    c = np.where(np.isfinite(c), c, 0.0)
    g = _gamma(window_factor, pr.visible.shape[:-2])
    a_win = np.where(win, g * np.exp(np.minimum(sw - c, 0.0)), 0.0)
    fq = hedgehog_features(pr.q, maps.w_q, maps.eps)
    fk = hedgehog_features(pr.k, maps.w_k, maps.eps)
    a_lin = np.where(lin, np.matmul(fq, np.swapaxes(fk, -1, -2)), 0.0)
    return a_win, a_lin, win, lin


def hybrid_linear(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    feature_maps: FeatureMaps | None = None,
    window: int = WINDOW,
    window_factor: Any = WINDOW_FACTOR,
) -> ApproxResult:
    r"""Hybrid sliding-window softmax + Hedgehog linear attention (LoLCATs eq. 7).

    Parameters
    ----------
    q, k, v : array_like
        Queries ``(..., [H,] Lq, d)`` (after RoPE), keys ``(..., [H_kv,] Lk, d)``, values
        ``(..., [H_kv,] Lk, dv)``.
    mask : array_like, optional
        Boolean (True = visible) or additive mask; hidden keys are in neither branch.
    causal : bool
        Causal mask aligned at the end.
    scale : float, optional
        Logit scale (default ``1/sqrt(d)``).
    kv_heads : int or sequence of int, optional
        Grouped-query mapping; feature maps are per query head.
    feature_maps : FeatureMaps, optional
        Hedgehog maps (default: :func:`identity_maps`).
    window : int
        Window size ``w`` (default 64).  The hybrid is exact softmax attention for query
        ``i`` when every key it sees lies in its window (:math:`\Lambda_i = \emptyset`;
        :math:`\gamma` cancels): for every query when ``w >= Lk`` and ``causal=True`` (or
        a mask hides every key after the query's position).  With ``causal=False`` and no
        such mask the keys after the query go to the linear branch whatever ``w``: only
        the rows that see no later key are then exact.
    window_factor : float or array_like
        :math:`\gamma = \mathrm{sigmoid}(\text{window\_factor})`, broadcast over the
        leading (batch, head) axes; default ``logit(0.1)``.  Finite.

    Returns
    -------
    ApproxResult
        ``output`` :math:`y`; ``weights`` the hybrid's distribution (window entries
        :math:`\gamma e^{s - c}/Z`, linear entries :math:`\phi_q\cdot\phi_k/Z`); ``kept`` the
        window :math:`W_i`; ``tail_upper`` None (the linear branch is not a truncation);
        ``cost`` = :math:`|W_i|` keys scored plus the linear state read,
        :math:`2f(d_v + 1)` numbers, in key-equivalents of :math:`d + d_v` numbers.

    Raises
    ------
    InputError
        Bad shapes or masks, a negative ``window``, a ``window_factor`` that is not finite
        or does not broadcast to the (batch, head) axes.
    """
    pr = prepare(q, k, v, mask=mask, causal=causal, scale=scale, kv_heads=kv_heads)
    maps = _maps_for(feature_maps, pr)
    a_win, a_lin, win, _ = _branches(pr, maps, window, window_factor)
    a = a_win + a_lin
    w = a / a.sum(axis=-1, keepdims=True)
    d, dv = pr.q.shape[-1], pr.v.shape[-1]
    state = maps.n_features * (dv + 1) / (d + dv)
    return ApproxResult(
        output=np.matmul(w, pr.v),
        weights=w,
        kept=win,
        cost=win.sum(axis=-1) + state,
        tail_upper=None,
        error_bound=None,
        method="hybrid_linear",
        params={"window": int(window),
                "gamma": np.asarray(1 / (1 + np.exp(-np.asarray(window_factor, float)))).tolist(),
                "features": maps.n_features, "fit": maps.fit, "causal": bool(causal)},
    )


@dataclass(frozen=True)
class HybridUsage:
    """Component usage of the hybrid against exact attention, per query ``(..., Lq)``.

    Attributes
    ----------
    exact_outside : numpy.ndarray
        :math:`1 - P(W_i)`, the exact softmax mass outside the window (what the linear
        branch must carry); equals ``tv_window`` (TV-TAIL).
    window_share : numpy.ndarray
        The hybrid's own mass on the window, :math:`\\sum_{W} a / Z`.
    tv_hybrid, tv_window, tv_linear : numpy.ndarray
        Total variation to exact attention of the hybrid, window-only softmax (renormalised
        on :math:`W_i`) and linear-only attention (:math:`\\phi` over all visible keys).
    err_hybrid, err_window, err_linear : numpy.ndarray
        Euclidean output errors to exact attention.
    """

    exact_outside: np.ndarray
    window_share: np.ndarray
    tv_hybrid: np.ndarray
    tv_window: np.ndarray
    tv_linear: np.ndarray
    err_hybrid: np.ndarray
    err_window: np.ndarray
    err_linear: np.ndarray


def hybrid_usage(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    feature_maps: FeatureMaps | None = None,
    window: int = WINDOW,
    window_factor: Any = WINDOW_FACTOR,
) -> HybridUsage:
    r"""Component usage of :func:`hybrid_linear` against exact softmax attention.

    Parameters
    ----------
    q, k, v, mask, causal, scale, kv_heads, feature_maps, window, window_factor
        As :func:`hybrid_linear`.

    Returns
    -------
    HybridUsage
        ``exact_outside`` from :func:`certattn.distribution.tail_mass` of the window set.
    """
    from ..distribution import tail_mass

    pr = prepare(q, k, v, mask=mask, causal=causal, scale=scale, kv_heads=kv_heads)
    maps = _maps_for(feature_maps, pr)
    exact_out, p = softmax_attention(pr)
    a_win, a_lin, win, _ = _branches(pr, maps, window, window_factor)
    z = (a_win + a_lin).sum(axis=-1, keepdims=True)
    hyb = (a_win + a_lin) / z
    sw = np.where(win, pr.scores(), -np.inf)
    has = win.any(axis=-1, keepdims=True)
    ew = np.exp(sw - np.where(has, sw.max(axis=-1, keepdims=True), 0.0))
    wonly = np.where(has, ew / np.where(has, ew.sum(axis=-1, keepdims=True), 1.0), 0.0)
    fq = hedgehog_features(pr.q, maps.w_q, maps.eps)
    fk = hedgehog_features(pr.k, maps.w_k, maps.eps)
    al = np.where(pr.visible, np.matmul(fq, np.swapaxes(fk, -1, -2)), 0.0)
    lonly = al / al.sum(axis=-1, keepdims=True)

    def tv(x: np.ndarray) -> np.ndarray:
        return 0.5 * np.abs(x - p).sum(axis=-1)

    def err(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(np.matmul(x, pr.v) - exact_out, axis=-1)

    return HybridUsage(
        exact_outside=np.asarray(tail_mass(pr.scores(), win), dtype=np.float64),
        window_share=a_win.sum(axis=-1) / z[..., 0],
        tv_hybrid=tv(hyb),
        tv_window=np.where(has[..., 0], tv(wonly), 1.0),
        tv_linear=tv(lonly),
        err_hybrid=err(hyb),
        err_window=err(wonly),
        err_linear=err(lonly),
    )


# ---------------------------------------------------------------- attention-weight transfer


def _phi_backward(u: np.ndarray, gphi: np.ndarray, eps: float) -> np.ndarray:
    """Gradient wrt ``u = x W`` of a loss with gradient ``gphi`` wrt ``phi(u)``."""
    f = u.shape[-1]
    s1, s2 = _softmax(u), _softmax(-u)
    g1 = np.where(s1 > eps, gphi[..., :f], 0.0)
    g2 = np.where(s2 > eps, gphi[..., f:], 0.0)
    d1 = s1 * (g1 - np.sum(g1 * s1, axis=-1, keepdims=True))
    d2 = s2 * (g2 - np.sum(g2 * s2, axis=-1, keepdims=True))
    return d1 - d2


def transfer_loss(
    q: np.ndarray,
    k: np.ndarray,
    p: np.ndarray,
    visible: np.ndarray,
    w_q: np.ndarray,
    w_k: np.ndarray,
    eps: float = FEATURE_EPS,
    *,
    grad: bool = True,
) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    r"""Hedgehog's attention-weight transfer loss and its analytic gradient.

    With :math:`F = \phi(Q W_q)`, :math:`G = \phi(K W_k)`, :math:`A = F G^\top`, the linear
    attention weights :math:`\hat p_{ij} = m_{ij} A_{ij} / \sum_l m_{il} A_{il}` and the
    softmax weights :math:`p_{ij}` (rows summing to 1 over visible keys),

    .. math:: \mathcal L = \frac1N \sum_{i} \sum_j m_{ij}\, p_{ij} \log \frac1{\hat p_{ij}},

    the mean over all ``N`` rows (heads and queries). Gradient:
    :math:`\partial\mathcal L/\partial A_{ij} = -\frac{m_{ij}}{N}(p_{ij}/A_{ij} - 1/Z_i)`,
    :math:`\partial\mathcal L/\partial F = R G`, :math:`\partial \mathcal L/\partial G =
    R^\top F`, then through the two feature-axis softmaxes (:math:`ds = s \odot (g -
    \langle g, s\rangle)`, the negative half with a minus sign, zero where clamped) and
    :math:`\partial\mathcal L/\partial W = X^\top \partial\mathcal L/\partial U`.

    Parameters
    ----------
    q, k : numpy.ndarray
        ``(..., n_q, d)``, ``(..., n_k, d)``.
    p : numpy.ndarray
        ``(..., n_q, n_k)`` target softmax weights.
    visible : numpy.ndarray
        ``(..., n_q, n_k)`` bool.
    w_q, w_k : numpy.ndarray
        ``(..., d, f)``.
    eps : float
        Feature clamp.
    grad : bool
        Also return the gradients.

    Returns
    -------
    loss : float
    g_q, g_k : numpy.ndarray or None
        Gradients, shaped as ``w_q`` and ``w_k`` (summed over broadcast axes).
    """
    uq, uk = np.matmul(q, w_q), np.matmul(k, w_k)
    fq = np.maximum(np.concatenate([_softmax(uq), _softmax(-uq)], axis=-1), eps)
    fk = np.maximum(np.concatenate([_softmax(uk), _softmax(-uk)], axis=-1), eps)
    a = np.matmul(fq, np.swapaxes(fk, -1, -2))
    a = np.where(visible, a, 1.0)
    z = np.sum(np.where(visible, a, 0.0), axis=-1, keepdims=True)
    n_rows = int(np.prod(a.shape[:-1]))
    loss = -float(np.sum(np.where(visible, p * (np.log(a) - np.log(z)), 0.0))) / n_rows
    if not grad:
        return loss, None, None
    r = -np.where(visible, p / a - 1.0 / z, 0.0) / n_rows
    gfq = np.matmul(r, fk)
    gfk = np.matmul(np.swapaxes(r, -1, -2), fq)
    gq = np.matmul(np.swapaxes(q, -1, -2), _phi_backward(uq, gfq, eps))
    gk = np.matmul(np.swapaxes(k, -1, -2), _phi_backward(uk, gfk, eps))
    gq = np.sum(gq, axis=tuple(range(gq.ndim - w_q.ndim))) if gq.ndim > w_q.ndim else gq
    gk = np.sum(gk, axis=tuple(range(gk.ndim - w_k.ndim))) if gk.ndim > w_k.ndim else gk
    return loss, gq, gk


def fit_hedgehog(
    q: Any,
    k: Any,
    *,
    causal: bool = True,
    mask: Any = None,
    scale: float | None = None,
    features: int | None = None,
    steps: int = 300,
    lr: float = 0.01,
    seed: int = 0,
    init_noise: float = 0.01,
    provenance: dict[str, Any] | None = None,
) -> FeatureMaps:
    r"""Fit Hedgehog feature maps by attention-weight transfer (Adam, numpy).

    Minimises :func:`transfer_loss` (cross-entropy of the linear attention weights to the
    exact softmax weights) over ``W_q`` and ``W_k`` of every head jointly, from
    :math:`W = I + \text{init\_noise}\cdot\mathcal N(0, 1)` (seeded), with Adam
    (:math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`).

    Parameters
    ----------
    q : array_like
        ``(H, n_q, d)`` or ``(n_q, d)`` queries (after RoPE).
    k : array_like
        ``(H, n_k, d)`` or ``(n_k, d)`` keys, already mapped to query heads.
    causal : bool
        Causal visibility (aligned at the end).
    mask : array_like, optional
        Extra boolean mask.
    scale : float, optional
        Logit scale of the target softmax (default ``1/sqrt(d)``).
    features : int, optional
        ``f`` (default ``d``): maps ``(d, f)``, features ``2f``.
    steps : int
        Adam steps.
    lr : float
        Learning rate.
    seed : int
        Seed of the initial noise.
    init_noise : float
        Scale of the initial noise.
    provenance : dict, optional
        Recorded in ``fit`` (model, layers, heads, text, ...).

    Returns
    -------
    FeatureMaps
        Maps ``(H, d, f)`` (or ``(d, f)``); ``fit`` records seed, steps, lr, data shape,
        the loss at the start and the end, its floor (the mean entropy of the target rows,
        reached when the linear weights equal them) and ``provenance``.

    Raises
    ------
    InputError
        Bad shapes or masks; ``lr`` not a finite number > 0, ``init_noise`` not a finite
        number >= 0, ``steps`` not an integer >= 0.
    """
    lr = check_number(lr, name="lr", low=0.0, high=math.inf, closed_low=False,
                      closed_high=False)
    init_noise = check_number(init_noise, name="init_noise", low=0.0, high=math.inf,
                              closed_low=True, closed_high=False)
    steps = check_count(steps, name="steps")
    pr = prepare(q, k, np.zeros((*np.shape(k)[:-1], 1)), mask=mask, causal=causal,
                 scale=scale, kv_heads=None)
    _, p = softmax_attention(pr)
    d = pr.q.shape[-1]
    f = d if features is None else int(features)
    rng = np.random.default_rng(seed)
    lead = pr.q.shape[:-2]
    eye = np.broadcast_to(np.eye(d, f), (*lead, d, f))
    params = [eye + init_noise * rng.normal(size=eye.shape) for _ in range(2)]
    mom = [np.zeros_like(w) for w in params]
    vel = [np.zeros_like(w) for w in params]
    b1, b2, ae = 0.9, 0.999, 1e-8
    losses = []
    for t in range(1, int(steps) + 1):
        loss, gq, gk = transfer_loss(pr.q, pr.k, p, pr.visible, params[0], params[1])
        losses.append(loss)
        for i, g in enumerate((gq, gk)):
            mom[i] = b1 * mom[i] + (1 - b1) * g
            vel[i] = b2 * vel[i] + (1 - b2) * g * g
            params[i] = params[i] - lr * (mom[i] / (1 - b1**t)) / (
                np.sqrt(vel[i] / (1 - b2**t)) + ae)
    final, _, _ = transfer_loss(pr.q, pr.k, p, pr.visible, params[0], params[1], grad=False)
    logp = np.log(np.where(p > 0, p, 1.0))
    entropy = -float(np.sum(p * logp)) / int(np.prod(p.shape[:-1]))
    fit = {"method": "attention-weight transfer (Hedgehog), Adam", "seed": int(seed),
           "steps": int(steps), "lr": float(lr), "init": f"I + {init_noise} N(0, 1)",
           "features": 2 * f, "data_shape": list(pr.q.shape), "causal": bool(causal),
           "loss_start": losses[0] if losses else final, "loss_end": final,
           "loss_floor": entropy,
           **(provenance or {})}
    return FeatureMaps(params[0], params[1], FEATURE_EPS, fit)
