r"""Attention approximations of the seed papers, with certificates where the theory gives one.

Every method takes queries, keys and values batched over leading axes (like
:func:`certattn.certify_attention`: ``mask``, ``causal``, ``scale``, grouped-query heads via
``kv_heads``) and returns one :class:`ApproxResult` (output, weights, kept set, cost in
key-equivalents, sound tail and output-error bounds where the theory gives them).

* :func:`window_sinks` (StreamingLLM) and :func:`quest` (Quest pages): kept sets, certified
  by Theorems TV-TAIL (:math:`\mathrm{TV} = 1 - P(H)`) and OUT-HEAD-TAIL / OUT-BEST;
  ``fallback="certified"`` certifies them from page boxes without scoring the dropped keys
  (:mod:`certattn.approx.fallback`, BLOCK-BOUNDS + BLOCK-SCORE), ``fallback="quant"``
  from one bound per dropped key read off low-bit key estimates (QUANT-SCORE), with a
  quantized certified search for the queries whose kept set it does not certify.
* :func:`delta_correct` (Delta Attention): sparse base + anchor-row corrections, with the
  sound per-row bound of Theorem DELTA-ERROR.
* :func:`skyformer` (Nystrom kernel attention, as published) and :func:`kernel_attention`;
  :func:`hybrid_linear` (LoLCATs sliding window + linear attention, Hedgehog feature maps
  fitted by :func:`fit_hedgehog`) and :func:`hybrid_usage` (component usage); the FAL
  premise measures (:func:`linear_cka`, :func:`mean_cosine`, :func:`fal_profile`).  These
  are measured against exact attention, not certified.
* :mod:`certattn.approx.audit`: every registered method (:data:`~certattn.approx.audit.METHODS`,
  other engineers' methods imported lazily by name) on real attention, ``certattn audit``.

Each method's definition as implemented here, its paper (authors, title, arXiv id) and the
authors' public code are in ``docs/APPROXIMATIONS.md``.
"""

from __future__ import annotations

from ._result import ApproxResult
from .delta import delta_correct
from .fal import LayerSignals, fal_profile, layer_signals, linear_cka, mean_cosine
from .fallback import CertifiedFallback, box_tail_upper, key_tail_upper
from .hybrid import (
    FeatureMaps,
    HybridUsage,
    fit_hedgehog,
    hedgehog_features,
    hybrid_linear,
    hybrid_usage,
    identity_maps,
    transfer_loss,
)
from .selection import quest, window_sinks
from .skyformer import kernel_attention, skyformer

__all__ = [
    "ApproxResult",
    "CertifiedFallback",
    "FeatureMaps",
    "HybridUsage",
    "LayerSignals",
    "box_tail_upper",
    "delta_correct",
    "fal_profile",
    "fit_hedgehog",
    "hedgehog_features",
    "hybrid_linear",
    "hybrid_usage",
    "identity_maps",
    "kernel_attention",
    "key_tail_upper",
    "layer_signals",
    "linear_cka",
    "mean_cosine",
    "quest",
    "skyformer",
    "transfer_loss",
    "window_sinks",
]
