"""The one result type of every attention approximation in :mod:`certattn.approx`.

Every method of the subpackage (selection methods such as ``window_sinks`` and
``quest``, the Delta correction, kernel and hybrid approximations) takes queries,
keys and values batched over leading axes, like
:func:`certattn.attention.certify_attention`, and returns an :class:`ApproxResult`.
The audit (:mod:`certattn.approx.audit`) compares any of them to exact attention
through this type only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Array = Any

__all__ = ["ApproxResult"]


@dataclass(frozen=True)
class ApproxResult:
    """The output of an attention approximation, its cost and its certificates.

    Attributes
    ----------
    output : Array
        ``(..., Lq, dv)`` float64 approximate attention output.
    weights : Array or None
        ``(..., Lq, Lk)`` the attention distribution of the method when it defines one
        (a selection method renormalises softmax on its kept set,
        ``w_j = e^{s_j} / sum_{i in H} e^{s_i}`` on ``H``, 0 elsewhere); ``None`` otherwise.
    kept : Array or None
        ``(..., Lq, Lk)`` bool, the kept set ``H`` of each query (selection methods);
        ``None`` otherwise.
    cost : Array
        ``(..., Lq)`` float64, the keys scored exactly per query plus whatever else the
        method reads (metadata, landmarks, ...), counted in key-equivalents.
    tail_upper : Array or None
        ``(..., Lq)`` a sound upper bound on the exact dropped softmax mass
        ``tau = 1 - P(H)``, which equals the total variation to exact attention
        (TV-TAIL); selection methods only.
    error_bound : Array or None
        ``(..., Lq)`` a sound bound on the Euclidean output error
        ``|Attn(q) - output|`` where the theory gives one (OUT-HEAD-TAIL, DELTA-ERROR).
    method : str
        The method's name (the key of :data:`certattn.approx.audit.METHODS`).
    params : dict
        The parameters used, for reports.
    """

    output: Array
    weights: Array | None
    kept: Array | None
    cost: Array
    tail_upper: Array | None
    error_bound: Array | None
    method: str
    params: dict
