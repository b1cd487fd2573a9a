r"""Validated float64 NumPy inputs for the kernel and hybrid approximations.

One helper, :func:`prepare`, shared by :mod:`certattn.approx.skyformer` and
:mod:`certattn.approx.hybrid`: it applies the library's argument conventions
(:func:`certattn.attention.certify_attention`) -- queries ``(..., [H,] Lq, d)``, keys and
values ``(..., [H_kv,] Lk, d)``, a boolean or additive ``mask``, ``causal`` aligned at the
end (query ``i`` sees keys ``j <= i + Lk - Lq``), ``scale=None`` meaning
:math:`1/\sqrt d`, grouped-query ``kv_heads`` -- and returns broadcast float64 arrays with
the full visibility of every score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._array import to_numpy
from .._validate import InputError

__all__ = ["Prepared", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """Inputs broadcast to one leading shape ``lead``.

    Attributes
    ----------
    q : numpy.ndarray
        ``(*lead, Lq, d)`` float64.
    k : numpy.ndarray
        ``(*lead, Lk, d)`` float64 (key/value heads already mapped to query heads).
    v : numpy.ndarray
        ``(*lead, Lk, dv)`` float64.
    visible : numpy.ndarray
        ``(*lead, Lq, Lk)`` bool: mask and causal structure together.
    bias : numpy.ndarray or None
        ``(*lead, Lq, Lk)`` float64 additive mask (0 where masked), or None.
    scale : float
        The logit scale.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    visible: np.ndarray
    bias: np.ndarray | None
    scale: float

    def scores(self) -> np.ndarray:
        r"""Scores :math:`s_{ij} = \mathrm{scale}\, q_i\cdot k_j + b_{ij}`, ``-inf`` where hidden.

        Returns
        -------
        numpy.ndarray
            ``(*lead, Lq, Lk)`` float64.
        """
        s = np.matmul(self.q, np.swapaxes(self.k, -1, -2)) * self.scale
        if self.bias is not None:
            s = s + self.bias
        return np.where(self.visible, s, -np.inf)


def prepare(
    q: Any, k: Any, v: Any, *, mask: Any, causal: bool, scale: Any, kv_heads: Any
) -> Prepared:
    """Validate and broadcast attention inputs (NumPy, float64).

    Parameters
    ----------
    q, k, v : array_like
        Queries ``(..., [H,] Lq, d)``, keys ``(..., [H_kv,] Lk, d)``, values
        ``(..., [H_kv,] Lk, dv)``.
    mask : array_like or None
        Boolean (True = visible) or additive, broadcastable to ``(..., Lq, Lk)``.
    causal : bool
        Hide keys ``j > i + Lk - Lq``.
    scale : float or None
        Logit scale; None is ``1 / sqrt(d)``.
    kv_heads : int, sequence of int or None
        Grouped-query mapping (see :func:`certattn.masks.kv_head_map`).

    Returns
    -------
    Prepared

    Raises
    ------
    InputError
        Bad shapes, non-finite inputs, a query that sees no key.
    """
    from ..attention import _prepare

    if v is None:
        raise InputError("values are required")
    pr = _prepare(q, k, v, scale=scale, mask=mask, causal=causal, kv_heads=kv_heads)
    qa, ka, va = (np.asarray(to_numpy(a), dtype=np.float64) for a in (pr.q, pr.k, pr.v))
    lq, lk = qa.shape[-2], ka.shape[-2]
    lead = np.broadcast_shapes(qa.shape[:-2], ka.shape[:-2], va.shape[:-2])
    vis = np.ones((lq, lk), dtype=bool)
    if causal:
        vis = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)
    bias = None
    if pr.visible is not None:
        m = np.asarray(to_numpy(pr.visible), dtype=bool)
        lead = np.broadcast_shapes(lead, m.shape[:-2])
        vis = vis & m
        if pr.bias is not None:
            bias = np.broadcast_to(np.asarray(to_numpy(pr.bias), np.float64), (*lead, lq, lk))
    vis = np.broadcast_to(vis, (*lead, lq, lk))
    if not vis.any(axis=-1).all():
        pos = np.argwhere(~vis.any(axis=-1))[0]
        raise InputError(f"query {tuple(int(i) for i in pos)} is fully masked: it sees no key")
    return Prepared(
        q=np.broadcast_to(qa, (*lead, lq, qa.shape[-1])),
        k=np.broadcast_to(ka, (*lead, lk, ka.shape[-1])),
        v=np.broadcast_to(va, (*lead, lk, va.shape[-1])),
        visible=vis,
        bias=bias,
        scale=float(pr.scale),
    )


def softmax_attention(pr: Prepared) -> tuple[np.ndarray, np.ndarray]:
    r"""Exact softmax attention of prepared inputs (the reference every method is measured by).

    .. math:: P_{ij} = e^{s_{ij} - \max_l s_{il}} / \sum_l e^{s_{il} - \max_l s_{il}},
              \quad \mathrm{Attn}(q_i) = \sum_j P_{ij} v_j

    Parameters
    ----------
    pr : Prepared

    Returns
    -------
    output : numpy.ndarray
        ``(*lead, Lq, dv)``.
    weights : numpy.ndarray
        ``(*lead, Lq, Lk)``.
    """
    s = pr.scores()
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return np.matmul(p, pr.v), p
