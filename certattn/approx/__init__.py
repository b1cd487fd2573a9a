r"""Attention approximations of the seed papers, with certificates where the theory gives one.

Every method takes queries, keys and values batched over leading axes (like
:func:`certattn.certify_attention`: ``mask``, ``causal``, ``scale``, grouped-query heads via
``kv_heads``) and returns one :class:`ApproxResult` (output, weights, kept set, cost in
key-equivalents, sound tail and output-error bounds where the theory gives them).

* :func:`window_sinks` (StreamingLLM) and :func:`quest` (Quest pages): kept sets, certified
  by Theorems TV-TAIL (:math:`\mathrm{TV} = 1 - P(H)`) and OUT-HEAD-TAIL / OUT-BEST;
  ``fallback="certified"`` certifies them from page boxes without scoring the dropped keys
  (:mod:`certattn.approx.fallback`, BLOCK-BOUNDS + BLOCK-SCORE).
* :func:`delta_correct` (Delta Attention): sparse base + anchor-row corrections, with the
  sound per-row bound of Theorem DELTA-ERROR.
* :mod:`certattn.approx.audit`: every registered method (:data:`~certattn.approx.audit.METHODS`,
  other engineers' methods imported lazily by name) on real attention, ``certattn audit``.
"""

from __future__ import annotations

from ._result import ApproxResult
from .delta import delta_correct
from .fallback import CertifiedFallback, box_tail_upper
from .selection import quest, window_sinks

__all__ = [
    "ApproxResult",
    "CertifiedFallback",
    "box_tail_upper",
    "delta_correct",
    "quest",
    "window_sinks",
]
