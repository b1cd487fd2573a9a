"""The approximations' entry points in the soundness matrix (:mod:`certattn._soundness`).

Registers every function of :mod:`certattn.approx` that returns a sound bound
(``window_sinks`` and ``quest``, each plain and with the certified fallback;
``delta_correct`` with every base policy) and the package's policy classes
(:class:`~certattn.approx.fallback.CertifiedFallback`).  Functions whose results carry no
bound are listed in :data:`UNCERTIFIED` (the matrix checks that they still return none).
"""

from __future__ import annotations

import importlib
from typing import Any

from .._soundness import Case, Claim, policy_variants, register, register_policy
from ..policies import Pages, WindowSinks
from .delta import delta_correct
from .fallback import CertifiedFallback
from .selection import quest, window_sinks

__all__ = ["COVERED_BY", "UNCERTIFIED"]

UNCERTIFIED = {
    "certattn.approx.skyformer": "Nystrom attention, measured against exact attention only",
    "certattn.approx.hybrid_linear": "linear + window attention, measured only",
}
"""Public functions returning an :class:`ApproxResult` with no bound (checked: they return
``tail_upper = error_bound = None``)."""

COVERED_BY = {
    "certattn.greedy_block_set": "the CertifiedBlocks policy",
    "certattn.approx.box_tail_upper": "the CertifiedFallback policy",
    "certattn.approx.key_tail_upper": "the CertifiedFallback policy (bound='quant')",
}
"""Bound-returning building blocks that take block bounds rather than an attention case;
the matrix reaches them through the named policy."""

register_policy(
    CertifiedFallback,
    lambda: [CertifiedFallback(WindowSinks(3, 1), 0.1, page_size=4),
             CertifiedFallback(Pages(4, page_size=4), 0.1, page_size=4, to="dense"),
             CertifiedFallback(WindowSinks(3, 1), 0.1, bound="quant", to="search", bits=2,
                               group=4),
             CertifiedFallback(Pages(4, page_size=4), 0.1, page_size=4, bound="quant",
                               to="search", bits=4, group=3),
             CertifiedFallback(WindowSinks(3, 1), 0.1, bound="quant", to="search",
                               bits=(2, 8), group=4),
             CertifiedFallback(WindowSinks(3, 1), 0.1, bound="quant", to="search",
                               bits=(2, 8), group=4, residual=True),
             CertifiedFallback(Pages(4, page_size=4), 0.1, page_size=4, bound="quant",
                               to="search", bits=(2, 4, 8), group=3),
             CertifiedFallback(Pages(4, page_size=4), 0.1, page_size=4, bound="quant",
                               to="search", bits=(2, 8), group=3, page_rank="estimates")],
    module=importlib.import_module(__package__),
)

_FALLBACK = [("plain", {}), ("fallback=certified", {"fallback": "certified", "eps": 0.1}),
             ("fallback=quant", {"fallback": "quant", "eps": 0.1, "bits": 2}),
             ("fallback=quant tiers", {"fallback": "quant", "eps": 0.1, "bits": (2, 8)})]


def _approx_claim(r: Any) -> Claim:
    return Claim(tail_upper=r.tail_upper, error_bound=r.error_bound, kept=r.kept,
                 output=r.output)


def _kwargs(case: Case) -> dict[str, Any]:
    return {"mask": case.mask, "causal": case.causal, "kv_heads": case.kv_heads,
            "scale": case.scale}


@register(window_sinks, name="certattn.approx.window_sinks", variants=lambda: _FALLBACK)
def _window_sinks(case: Case, extra: dict) -> Claim:
    return _approx_claim(window_sinks(case.queries, case.keys, case.values, window=3, sinks=1,
                                      page_size=4, return_weights=False, **extra,
                                      **_kwargs(case)))


@register(quest, name="certattn.approx.quest", variants=lambda: [
    *_FALLBACK, ("fallback=quant rank=estimates",
                 {"fallback": "quant", "eps": 0.1, "bits": (2, 8), "rank": "estimates"})])
def _quest(case: Case, extra: dict) -> Claim:
    return _approx_claim(quest(case.queries, case.keys, case.values, budget=4, page_size=4,
                               return_weights=False, **extra, **_kwargs(case)))


@register(delta_correct, name="certattn.approx.delta_correct", variants=policy_variants)
def _delta(case: Case, base: Any) -> Claim:
    # small stride and dense tail, so that short cases have corrected rows
    return _approx_claim(delta_correct(case.queries, case.keys, case.values, gamma=2,
                                       min_tail=2, base=base, **_kwargs(case)))
