r"""Selection methods: StreamingLLM's window + sinks, Quest pages, and a certified fallback.

Both methods keep a set :math:`H_i` of keys per query and attend over it only,

.. math::
    \mathrm{Attn}_{H}(q) = \sum_{j \in H} \frac{e^{s_j}}{\sum_{i\in H} e^{s_i}}\, v_j,

so they are certified by the house (:func:`certattn.certify_attention` with the
:class:`certattn.policies.WindowSinks` / :class:`certattn.policies.Pages` policy): their total
variation to exact attention is exactly the dropped mass :math:`\tau = 1 - P(H)` (Theorem
TV-TAIL) and :math:`\mathrm{Attn} - \mathrm{Attn}_H = \tau(\mu_T - \mu_H)` (Theorem
OUT-HEAD-TAIL), whence the output bounds of OUT-BOUNDED / OUT-DIAMETER / OUT-BEST.

Definitions (``docs/APPROXIMATIONS.md`` sections 1 and 2)
---------------------------------------------------------
``window_sinks``
    keep the first ``sinks`` and the last ``window`` *visible* keys of each query
    (Delta Attention's base: 1024 sinks + 2048 window at 131k tokens; StreamingLLM: 4
    sinks).  Defaults scaled to the context length ``n`` (visible keys of the widest
    query): ``sinks = clip(n // 64, 4, 64)``, ``window = clip(n // 8, 16, 1024)``.
``quest``
    pages of ``page_size = 16`` consecutive keys, each with its channel-wise min and max
    key; a query's page score bound is :math:`\sum_j \max(q_j k^{min}_j, q_j k^{max}_j)`
    (Theorem BLOCK-SCORE, box); the pages with the largest bounds are kept up to
    ``budget`` keys (``ceil(budget / page_size)`` pages).  Default ``budget`` = the
    default window + sinks (the same key budget as ``window_sinks``).

Cost (key-equivalents per query, :attr:`ApproxResult.cost`)
-----------------------------------------------------------
One key-equivalent is one ``d``-vector read and dotted with the query.  ``window_sinks``
scores its kept keys only: cost = keys kept.  ``quest`` reads, for every page that holds a
visible key, its two box corners (``kmin``, ``kmax``: two ``d``-vectors, two dot products
``q+ . kmax + q- . kmin``) and then scores its kept keys: cost = keys kept +
:data:`METADATA_PER_PAGE` x visible pages, i.e. ``2 / page_size`` key-equivalents per
visible key on top of the kept keys (``n / 8`` for pages of 16).

Certified selection without scoring the rest (``fallback="certified"``)
-----------------------------------------------------------------------
The house's certificate of a kept set needs every score.
:func:`certattn.approx.fallback.box_tail_upper` bounds
the dropped mass from the kept keys' exact scores and the page boxes of the keys it does
*not* score (Theorems BLOCK-SCORE and BLOCK-BOUNDS with an exact head, as in SEARCH-SOUND):
with :math:`c_b` the visible unkept keys of page :math:`b` and :math:`U_b` its box score
bound,

.. math::
    \tau(H) \le \frac{\sum_b c_b e^{U_b}}{\sum_{j\in H} e^{s_j} + \sum_b c_b e^{U_b}},

rounded up with the log-space margin of :mod:`certattn._fp` (factor 8, the BLOCK-BOUNDS
evaluation of :func:`certattn.blocks.block_tail_bounds`).
:class:`certattn.approx.fallback.CertifiedFallback` serves the base kept set where this
bound is at most ``eps`` and, on the other queries,
scores every visible key and serves the certified Top-k (``to="topk"``, Theorem TV-TAIL,
``tail_upper <= eps``) or dense attention (``to="dense"``).  Cost of a certified query:
keys kept + 2 per page whose box it reads; of a query that falls back: every visible key
+ the box reads already spent.  The box bound is sound for boolean masks (a causal mask
included); the wrappers refuse additive masks with finite biases (the box bounds
``scale q.k``, not the bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._validate import InputError
from ..attention import CHUNK_ELEMS, _chunks, _prepare, certify_attention
from ..kept import shift_rows
from ..masks import normalize_mask
from ..policies import Pages, Selection, WindowSinks
from ._result import ApproxResult
from .fallback import METADATA_PER_PAGE, CertifiedFallback, box_tail_upper, pages_visible

__all__ = [
    "METADATA_PER_PAGE",
    "CertifiedFallback",
    "box_tail_upper",
    "default_budget",
    "default_sinks",
    "default_window",
    "policy_cost",
    "quest",
    "run_policy",
    "window_sinks",
]

Array = Any

def default_sinks(n: int) -> int:
    """``clip(n // 64, 4, 64)`` sink keys for a context of ``n`` keys."""
    return int(min(64, max(4, n // 64)))


def default_window(n: int) -> int:
    """``clip(n // 8, 16, 1024)`` window keys for a context of ``n`` keys."""
    return int(min(1024, max(16, n // 8)))


def default_budget(n: int, page_size: int = 16) -> int:
    """Quest's default token budget: the default window + sinks, whole pages."""
    b = default_window(n) + default_sinks(n)
    return int(page_size * math.ceil(b / page_size))


# --------------------------------------------------------------------------
# Cost accounting and the recording policy wrapper
# --------------------------------------------------------------------------


def policy_cost(policy: Any, sel: Selection, valid: Array) -> Array:
    """Key-equivalents read per query by a selection policy (module docstring).

    ``WindowSinks``: keys kept.  ``Pages``: keys kept + :data:`METADATA_PER_PAGE` per visible
    page.  A policy reporting ``scored``: those keys.  Any other policy (Top-k, top-p,
    fixed k): every visible key (it ranks all scores).
    """
    kept = np.asarray(sel.kept) & valid
    n_kept = np.sum(kept, axis=-1).astype(np.float64)
    if isinstance(policy, WindowSinks):
        return n_kept
    if isinstance(policy, Pages):
        return n_kept + METADATA_PER_PAGE * pages_visible(valid, policy.page_size)
    if sel.scored is not None:
        return np.asarray(sel.scored, dtype=np.float64)
    return np.sum(valid, axis=-1).astype(np.float64)


class _Recorder:
    """Wraps a policy for :func:`certattn.certify_attention` and records per-chunk facts.

    A policy with ``select_with_info(scores, valid, ctx) -> (Selection, dict)`` reports its
    own ``cost`` (and e.g. ``fell_back``); any other gets :func:`policy_cost`.  Chunks come
    in query order, so concatenating along the last axis rebuilds ``(..., Lq)`` arrays.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.eps = getattr(inner, "eps", None)
        self.parts: dict[str, list[Array]] = {}

    def select(self, scores: Array, valid: Array, ctx: Any) -> Selection:
        if hasattr(self.inner, "select_with_info"):
            sel, info = self.inner.select_with_info(scores, valid, ctx)
        else:
            sel = self.inner.select(scores, valid, ctx)
            info = {"cost": policy_cost(self.inner, sel, np.asarray(valid))}
        for key, val in info.items():
            self.parts.setdefault(key, []).append(np.asarray(val))
        return sel

    def get(self, key: str) -> Array | None:
        parts = self.parts.get(key)
        if not parts:
            return None
        return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------
# Running a policy into an ApproxResult
# --------------------------------------------------------------------------


def _kept_weights(pr: Any, kept: Array, chunk_elems: int) -> Array:
    """Renormalised softmax on the kept set, ``(..., Lq, Lk)`` (0 off the kept set)."""
    from .._fp import masked_weights

    xp = _np_ns()
    parts = []
    for sl, s, valid, *_ in _chunks(pr, chunk_elems):
        xs = shift_rows(np.asarray(s), xp)
        w, _ = masked_weights(xs, np.asarray(kept)[..., sl, :] & np.asarray(valid), xp)
        parts.append(w)
    return np.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0]


def _np_ns() -> Any:
    import array_api_compat.numpy as xnp

    return xnp


def run_policy(
    q: Any,
    k: Any,
    v: Any,
    policy: Any,
    *,
    method: str,
    params: dict,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    return_weights: bool = True,
    return_kept: bool = True,
) -> ApproxResult:
    """Run any selection policy through :func:`certattn.certify_attention` as an ApproxResult.

    ``output``, ``kept``, ``tail_upper`` (TV-TAIL) and ``error_bound`` (OUT-BEST engine) come
    from the house; ``cost`` from :func:`policy_cost` (or the policy's own report);
    ``weights`` is the renormalised softmax on the kept set (``return_weights``).
    ``return_kept=False`` (with ``return_weights=False``) leaves ``kept`` None and never
    holds the ``(..., Lq, Lk)`` kept set, only one query chunk's.  A policy
    that reports ``fell_back`` (:class:`CertifiedFallback`) adds ``params["fell_back"]``
    (bool ``(..., Lq)``) and ``params["fallback_rate"]``.
    """
    if return_weights and not return_kept:
        raise InputError("return_weights needs the kept set (return_kept=True)")
    rec = _Recorder(policy)
    cert = certify_attention(
        q, k, v, policy=rec, scale=scale, mask=mask, causal=causal, kv_heads=kv_heads,
        chunk_elems=chunk_elems, return_kept=return_kept,
    )
    kept = np.asarray(cert.kept) if return_kept else None
    params = dict(params)
    fell = rec.get("fell_back")
    if fell is not None:
        params["fell_back"] = fell
        params["fallback_rate"] = float(np.mean(fell))
    weights = None
    if return_weights:
        pr = _prepare(q, k, v, scale=scale, mask=mask, causal=causal, kv_heads=kv_heads)
        weights = _kept_weights(pr, kept, chunk_elems)
    return ApproxResult(
        output=np.asarray(cert.output),
        weights=weights,
        kept=kept,
        cost=np.asarray(rec.get("cost"), dtype=np.float64),
        tail_upper=np.asarray(cert.tail_upper),
        error_bound=np.asarray(cert.error_bound),
        method=method,
        params=params,
    )


def _context_length(k: Any) -> int:
    return int(np.shape(k)[-2])


def _fallback_policy(base: Any, fallback: str | None, eps: float | None, page_size: int,
                     mask: Any, to: str | None, bits: Any, rank: str = "box") -> Any:
    if rank != "box" and fallback != "quant":
        raise InputError(f"rank={rank!r} ranks pages by the key estimates of "
                         "fallback='quant': give fallback='quant'")
    if fallback is None:
        return base
    if fallback not in ("certified", "quant"):
        raise InputError(f"fallback must be None, 'certified' or 'quant', got {fallback!r}")
    if eps is None:
        raise InputError(f"fallback={fallback!r} needs eps (the TV budget)")
    if fallback == "quant":
        return CertifiedFallback(base, eps, page_size=page_size, to=to or "search",
                                 bound="quant", bits=bits, page_rank=rank)
    if mask is not None:
        _, bias = normalize_mask(np.asarray(mask))
        if bias is not None and np.any(bias != 0):
            raise InputError(
                "fallback='certified' bounds scale q.k from page boxes: give a boolean mask "
                "(an additive mask with finite biases is not covered)"
            )
    return CertifiedFallback(base, eps, page_size=page_size, to=to or "topk")


def window_sinks(
    q: Any,
    k: Any,
    v: Any,
    *,
    window: int | None = None,
    sinks: int | None = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    fallback: str | None = None,
    eps: float | None = None,
    fallback_to: str | None = None,
    bits: int | tuple[int, ...] = 4,
    page_size: int = 16,
    return_weights: bool = True,
    chunk_elems: int = CHUNK_ELEMS,
) -> ApproxResult:
    r"""StreamingLLM: attend over the first ``sinks`` and the last ``window`` visible keys.

    A thin wrapper over ``certify_attention(q, k, v, policy=WindowSinks(window, sinks))``:
    ``tail_upper`` bounds :math:`\mathrm{TV} = \tau = 1 - P(H)` (Theorem TV-TAIL) and
    ``error_bound`` bounds :math:`|\mathrm{Attn} - \mathrm{Attn}_H| = \tau|\mu_T - \mu_H|`
    (Theorems OUT-HEAD-TAIL, OUT-BEST).  With ``window >= n`` it is exact attention.

    Parameters
    ----------
    q : array (..., [H,] Lq, d)
    k, v : arrays (..., [H_kv,] Lk, d) and (..., [H_kv,] Lk, dv)
    window, sinks : int, optional
        Defaults :func:`default_window`, :func:`default_sinks` of ``Lk``.
    mask, causal, scale, kv_heads
        As in :func:`certattn.certify_attention`.
    fallback : {None, "certified", "quant"}
        ``"certified"``: certify each query's window from page boxes of the keys it does not
        score (:func:`box_tail_upper`); queries whose bound exceeds ``eps`` get the certified
        Top-k (``fallback_to="topk"``, the default) or dense attention (``"dense"``).
        ``"quant"``: certify it from one bound per unscored key, read off ``bits``-bit key
        estimates (Theorem QUANT-SCORE, :func:`key_tail_upper`); queries whose bound
        exceeds ``eps`` grow their kept set by a quantized certified search
        (``fallback_to="search"``, the default) or get Top-k or dense attention.
    eps : float, optional
        TV budget of the fallback.
    fallback_to : {None, "topk", "dense", "search"}
        What a query whose bound exceeds ``eps`` gets (None: the fallback's default).
    bits : {2, 4, 8} or tuple of them
        Code width of the key estimates of ``fallback="quant"`` (groups of 128 keys); a
        strictly increasing tuple such as ``(2, 4, 8)`` (what ``certattn audit`` runs) tiers
        the bound on one nested grid: the finer widths' extra bits are read only for the
        keys of the queries the coarser ones do not certify
        (:class:`~certattn.approx.fallback.CertifiedFallback`).
    page_size : int
        Page size of the fallback's boxes.
    return_weights : bool
        Also return the ``(..., Lq, Lk)`` kept-set softmax.

    Returns
    -------
    ApproxResult
        ``cost`` = keys kept (+ 2 per page box read and every visible key on queries that
        fall back; with ``fallback="quant"``, + the estimates read, in float16 keys, and
        the keys the search scores); ``params`` has ``window``, ``sinks`` (and ``eps``,
        ``fell_back``, ``fallback_rate`` with the fallback).
    """
    n = _context_length(k)
    window = default_window(n) if window is None else window
    sinks = default_sinks(n) if sinks is None else sinks
    base = WindowSinks(window=window, sinks=sinks)
    pol = _fallback_policy(base, fallback, eps, page_size, mask, fallback_to, bits)
    params: dict[str, Any] = {"window": base.window, "sinks": base.sinks}
    if fallback is not None:
        params.update(eps=pol.eps, fallback=fallback, fallback_to=pol.to,
                      page_size=page_size)
        if fallback == "quant":
            params.update(bits=pol.bits)
    return run_policy(
        q, k, v, pol, method="window_sinks", params=params, mask=mask, causal=causal,
        scale=scale, kv_heads=kv_heads, chunk_elems=chunk_elems, return_weights=return_weights,
    )


def quest(
    q: Any,
    k: Any,
    v: Any,
    *,
    budget: int | None = None,
    page_size: int = 16,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    fallback: str | None = None,
    eps: float | None = None,
    fallback_to: str | None = None,
    bits: int | tuple[int, ...] = 4,
    rank: str = "box",
    return_weights: bool = True,
    chunk_elems: int = CHUNK_ELEMS,
) -> ApproxResult:
    r"""Quest: the top pages by box score bound, up to ``budget`` keys.

    A thin wrapper over ``certify_attention(q, k, v, policy=Pages(budget, page_size))``
    (page bound: Theorem BLOCK-SCORE, box; certificates TV-TAIL and OUT-*, as in
    :func:`window_sinks`).  ``cost`` = keys kept + :data:`METADATA_PER_PAGE` per visible
    page (every visible page's box is read to rank the pages).

    Parameters
    ----------
    q, k, v, mask, causal, scale, kv_heads, fallback, eps, fallback_to, return_weights
        As in :func:`window_sinks` (the fallback reuses Quest's own page boxes: no extra
        reads).
    budget : int, optional
        Token budget (default :func:`default_budget` of ``Lk``).
    page_size : int
        Keys per page (Quest: 16).
    rank : {"box", "estimates"}
        How pages are ranked: by their box score bound (Quest) or, with
        ``fallback="quant"``, by their mass estimated from the first tier's key estimates
        over the quarter of the channels where the query is largest (``page_rank=
        "estimates"`` of :class:`~certattn.approx.fallback.CertifiedFallback`): those
        channels of every visible key's code are read and no page box is.

    Returns
    -------
    ApproxResult
    """
    n = _context_length(k)
    budget = default_budget(n, page_size if isinstance(page_size, int) else 16) \
        if budget is None else budget
    base = Pages(budget=budget, page_size=page_size)
    pol = _fallback_policy(base, fallback, eps, base.page_size, mask, fallback_to, bits,
                           rank)
    params: dict[str, Any] = {"budget": base.budget, "page_size": base.page_size}
    if fallback is not None:
        params.update(eps=pol.eps, fallback=fallback, fallback_to=pol.to)
        if fallback == "quant":
            params.update(bits=pol.bits, rank=pol.page_rank)
    return run_policy(
        q, k, v, pol, method="quest", params=params, mask=mask, causal=causal, scale=scale,
        kv_heads=kv_heads, chunk_elems=chunk_elems, return_weights=return_weights,
    )
