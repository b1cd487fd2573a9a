r"""Selection policies: what to keep, per query.  The certificate is the same for all.

A policy looks at one chunk of queries and yields a kept set per query (a
:class:`Selection`).  By Theorem TV-TAIL in its any-set form (:mod:`certattn.kept`), every
kept set has :math:`\mathrm{TV}(P, P(\cdot\mid A)) = 1 - P(A)`, so
:func:`certattn.certify_attention` certifies any policy the same way: the policy's own
sound tail bound when it has one (Top-k's exact kernel, BLOCK-BOUNDS for certified
blocks, SEARCH-SOUND for search), otherwise :func:`certattn.certify_kept` on the scores;
then the output-error engine (:func:`certattn.output.sound_output_bounds`).

Policies
--------
:class:`TopK`          smallest certified Top-k for a TV budget ``eps`` (the exact kernel)
:class:`TopP`          top-p (nucleus) = Top-k with ``eps = 1 - p``
:class:`FixedK`        the ``k`` largest scores, whatever they lose (measured, then certified)
:class:`WindowSinks`   StreamingLLM: the first ``sinks`` and the last ``window`` visible keys
:class:`Pages`         Quest: pages of keys ranked by their box score bound, up to a budget
:class:`CertifiedBlocks` blocks chosen from score bounds alone so that BLOCK-BOUNDS <= eps
:class:`Search`        certified search (SEARCH-SOUND): scores few keys, certifies eps

Writing a policy
----------------
A policy is any object with a ``name`` and a ``select(scores, valid, ctx)`` method that
returns a :class:`Selection`; ``scores`` are the float64 scores of the chunk
(``-inf`` = masked, shape ``(..., m, n)``), ``valid`` their visible keys, ``ctx`` a
:class:`Context` (queries, keys, scale, the additive mask bias, first query row, a
per-call cache, the rows' score slack).  Return the kept mask, and a ``tail_upper`` only
if the policy has its own *sound* bound.  The certificate is about the exact
``scale q.k + b`` (:mod:`certattn.attention`): a bound about the computed ``scores`` is
widened by ``ctx.score_slack`` (so a policy that promises ``tail_upper <= eps`` certifies
:func:`slack_budget` instead); ``Selection(exact=True)`` marks a bound that already holds
for the exact scores (built from queries and keys with rounding margins).  The scores
are ``scale q.k + b``: a policy that bounds scores from
queries and keys (boxes, balls, quantized keys) must add ``ctx.bias`` (``b``, per query and
key; None = no bias) to every bound, rounded outward (:func:`certattn._fp.add_up`), and
count only the keys each query sees (``valid``).  Add tests that check the kept set
against a direct definition and the certificate against exact arithmetic
(``tests/test_policies.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._array import to_numpy
from ._validate import InputError, check_count, check_eps, check_int_option, check_number
from .distribution import topk_mask
from .topk import certify_topk, topp_budget

__all__ = [
    "CertifiedBlocks",
    "Context",
    "FixedK",
    "Pages",
    "Policy",
    "Search",
    "Selection",
    "TopK",
    "TopP",
    "WindowSinks",
    "as_policy",
    "slack_budget",
]

Array = Any


@dataclass(frozen=True)
class Selection:
    """What a policy keeps for one chunk of queries.

    Attributes
    ----------
    kept : bool array (..., m, n) or None
        The kept keys (the house removes masked keys from it).  May be None only when
        ``ctx.need_kept`` is False and the policy gives ``n_kept`` and ``tail_upper``
        (Top-k skips building the mask when only counts are wanted).
    tail_upper : float64 array (..., m), optional
        The policy's own sound upper bound on the exact tail of ``kept``; None lets the
        house certify ``kept`` with :func:`certattn.certify_kept`.
    scored : int64 array (..., m), optional
        Keys whose scores the policy computed exactly (None: every visible key).
    n_kept : int64 array (..., m), optional
        Valid keys kept, when ``kept`` is None.
    exact : bool
        True when ``tail_upper`` already bounds the tail under the *exact* scores
        ``scale q.k + b`` (bounds built from queries and keys with rounding margins:
        certified blocks, search).  False (the default): it bounds the tail under the
        computed float64 ``scores``, and the house widens it by the rows' score slack
        ``ctx.score_slack`` (:func:`certattn._fp.widen_tail`).
    """

    kept: Array | None
    tail_upper: Array | None = None
    scored: Array | None = None
    n_kept: Array | None = None
    exact: bool = False


@dataclass
class Context:
    """What a policy may look at besides the scores of the chunk.

    Attributes
    ----------
    queries : float64 array (..., m, d)
        The chunk's queries (leading axes broadcast with the keys').
    keys : float64 array (..., n, d)
    scale : float
        Score scale.
    start : int
        Index of the chunk's first query row.
    xp : namespace
    cache : dict
        Lives for one call of the house (e.g. page boxes, cell trees per key head).
    need_kept : bool
        Whether the caller needs the kept mask (False: counts and bounds suffice).
    bias : float64 array or None
        The chunk's additive mask bias, broadcastable to the scores ``(..., m, n)`` (0 where
        masked), or None: the scores are ``scale q.k + bias``.
    score_slack : float64 array (..., m) or None
        Per query row, a bound on ``|computed score - exact score|`` over the row's visible
        keys (:func:`certattn._fp.score_abs_margin` plus the rounding of adding the bias);
        None: the scores are exact.  A budget policy whose bound is about the computed
        scores certifies :func:`slack_budget` instead of its ``eps``.
    """

    queries: Array
    keys: Array
    scale: float
    start: int
    xp: Any
    cache: dict[str, Any] = field(default_factory=dict)
    need_kept: bool = True
    bias: Array | None = None
    score_slack: Array | None = None


def slack_budget(eps: float, ctx: Context) -> float:
    """The budget to certify on the computed scores so that the house's widened bound
    (:func:`certattn._fp.widen_tail` by ``ctx.score_slack``) stays at most ``eps``.

    ``eps`` itself without a slack; :func:`certattn._fp.budget_under_slack` of the
    chunk's largest slack otherwise."""
    from ._fp import budget_under_slack

    if ctx.score_slack is None:
        return float(eps)
    xp = ctx.xp
    slack = ctx.score_slack
    if int(math.prod(int(d) for d in slack.shape)) == 0:
        return float(eps)
    if bool(xp.any(xp.isnan(slack))):
        return 0.0
    return budget_under_slack(eps, float(xp.max(slack)))


class Policy(Protocol):
    """The selection-policy protocol (see the module docstring)."""

    name: str

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        """Kept set (and optionally a sound tail bound) for one chunk of queries."""
        ...


@dataclass(frozen=True)
class TopK:
    """Smallest certified Top-k with :math:`\\tau \\le` ``eps`` (Theorems TV-TAIL, TV-KL).

    Uses :func:`certattn.certify_topk`'s exact kernel on the computed scores, with the
    budget :func:`slack_budget` (``eps`` shrunk by the chunk's score slack), so that the
    house's bound for the exact scores stays at most ``eps``.
    """

    eps: float
    name: str = "topk"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        cert = certify_topk(scores, slack_budget(self.eps, ctx))
        kept = topk_mask(scores, cert.k) if ctx.need_kept else None
        return Selection(kept=kept, tail_upper=cert.tail_upper, n_kept=cert.k)


@dataclass(frozen=True)
class TopP:
    """Certified top-p: the kept keys carry at least mass ``p`` (Theorem BUDGET-EQUIV)."""

    p: float
    name: str = "topp"

    def __post_init__(self) -> None:
        v = check_number(self.p, name="p", low=0.0, high=1.0, closed_low=False, closed_high=True)
        object.__setattr__(self, "p", v)

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        cert = certify_topk(scores, slack_budget(topp_budget(self.p), ctx))
        kept = topk_mask(scores, cert.k) if ctx.need_kept else None
        return Selection(kept=kept, tail_upper=cert.tail_upper, n_kept=cert.k)


@dataclass(frozen=True)
class FixedK:
    """The ``k`` largest scores per query (ties by position), certified afterwards."""

    k: int
    name: str = "fixed_k"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_count(self.k, name="k", low=1))

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        return Selection(kept=topk_mask(scores, self.k))


@dataclass(frozen=True)
class WindowSinks:
    """StreamingLLM's sliding window with attention sinks.

    Keeps, per query, the first ``sinks`` visible keys and the last ``window`` visible
    keys (by key position).  With a causal mask these are the sink tokens and the
    ``window`` most recent tokens.  Delta Attention's base used 1024 sinks and a
    2048-key window at 131k tokens; StreamingLLM used 4 sinks.
    """

    window: int
    sinks: int = 0
    name: str = "window_sinks"

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", check_count(self.window, name="window"))
        object.__setattr__(self, "sinks", check_count(self.sinks, name="sinks"))
        if self.window + self.sinks == 0:
            raise InputError("window + sinks must keep at least one key")

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        return Selection(kept=window_sinks_mask(valid, self.window, self.sinks, ctx.xp))


def window_sinks_mask(valid: Array, window: int, sinks: int, xp: Any) -> Array:
    """The first ``sinks`` and last ``window`` True entries of ``valid`` along the last axis."""
    v = xp.astype(valid, xp.int64)
    before = xp.cumulative_sum(v, axis=-1) - v  # visible keys strictly before this one
    total = xp.sum(v, axis=-1, keepdims=True)
    after = total - before - v  # visible keys strictly after
    return valid & ((before < sinks) | (after < window))


@dataclass(frozen=True)
class Pages:
    """Quest page selection: pages of ``page_size`` keys, top pages by box bound.

    Each page carries the channel-wise min and max of its keys; a query's page upper
    bound is Theorem BLOCK-SCORE's box bound (Quest's criterion).  The pages with the
    largest bounds are kept up to ``budget`` keys (``ceil(budget / page_size)`` pages);
    pages whose keys are all masked are never kept.
    """

    budget: int
    page_size: int = 16
    name: str = "pages"

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", check_count(self.budget, name="budget", low=1))
        page_size = check_count(self.page_size, name="page_size", low=1)
        object.__setattr__(self, "page_size", page_size)

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        upper, _ = page_upper_bounds(ctx, self.page_size)
        return Selection(kept=self.keep_top(upper, valid, ctx.xp))

    def keep_top(self, page_scores: Array, valid: Array, xp: Any) -> Array:
        """The kept set ``(..., m, n)``: the ``ceil(budget / page_size)`` visible pages of
        largest ``page_scores`` (``(..., m, n_pages)``, ties to the earlier page), their
        visible keys."""
        vis_pages = _block_visible(valid, None, self.page_size, xp)[0] > 0
        page_scores = xp.where(vis_pages, page_scores, xp.full_like(page_scores, -xp.inf))
        n_pages = max(1, math.ceil(self.budget / self.page_size))
        order = xp.argsort(page_scores, axis=-1, descending=True, stable=True)
        rank = xp.argsort(order, axis=-1, stable=True)
        keep_page = (rank < n_pages) & vis_pages
        dev = getattr(valid, "device", None)
        page_of = xp.arange(int(valid.shape[-1]), device=dev) // self.page_size
        return _expand_pages(keep_page, page_of, xp) & valid


def page_boxes(keys: Array, page_size: int, xp: Any) -> tuple[Array, Array, Array]:
    """Per page ``(kmin, kmax, page_of_key)`` of contiguous pages of ``page_size`` keys."""
    n, d = int(keys.shape[-2]), int(keys.shape[-1])
    n_pages = -(-n // page_size)
    pad = n_pages * page_size - n
    k = keys
    if pad:  # repeat the last key: the last page's box is unchanged
        last = xp.broadcast_to(k[..., -1:, :], (*k.shape[:-2], pad, d))
        k = xp.concat([k, last], axis=-2)
    kb = xp.reshape(k, (*k.shape[:-2], n_pages, page_size, d))
    dev = getattr(keys, "device", None)
    page_of = xp.arange(n, device=dev) // page_size
    return xp.min(kb, axis=-2), xp.max(kb, axis=-2), page_of


def page_upper_bounds(ctx: Context, page_size: int) -> tuple[Array, Array]:
    """Box score upper bounds ``(..., m, n_pages)`` of the chunk's queries, and page ids."""
    from .cells import box_score_upper

    key = f"pages:{page_size}"
    if key not in ctx.cache:
        ctx.cache[key] = page_boxes(ctx.keys, page_size, ctx.xp)
    kmin, kmax, page_of = ctx.cache[key]
    return box_score_upper(ctx.queries, kmin, kmax, scale=ctx.scale), page_of


def _expand_pages(keep_page: Array, page_of: Array, xp: Any) -> Array:
    """Page-level mask ``(..., m, P)`` to key level ``(..., m, n)``."""
    return xp.take(keep_page, page_of, axis=-1)


@dataclass(frozen=True)
class CertifiedBlocks:
    """Blocks chosen from score bounds alone, certified by BLOCK-BOUNDS (no tail scored).

    Contiguous blocks of ``block_size`` keys get sound score bounds from their keys
    (Theorem BLOCK-SCORE: ``kind`` "box", "ball" or "both"); :func:`certattn.greedy_block_set`
    keeps the fewest keys whose BLOCK-BOUNDS tail bound is at most ``eps``.  The bound
    needs no score of a dropped block, so it certifies what a block-sparse kernel that
    never reads those blocks loses.  Per query, a block's size is the number of its keys
    the query sees (a mask or causality may hide some), and with an additive mask bias
    its score bounds add the smallest / largest bias of those keys (rounded outward).
    """

    eps: float
    block_size: int = 16
    kind: str = "box"
    name: str = "certified_blocks"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))
        block_size = check_count(self.block_size, name="block_size", low=1)
        object.__setattr__(self, "block_size", block_size)
        if self.kind not in ("box", "ball", "both"):
            raise InputError(f"kind must be 'box', 'ball' or 'both', got {self.kind!r}")

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        from ._fp import add_down, add_up
        from .blocks import greedy_block_set, key_block_bounds

        xp = ctx.xp
        bs = self.block_size
        n = int(scores.shape[-1])
        page_of = xp.arange(n, device=getattr(scores, "device", None)) // bs
        lead = tuple(int(s) for s in scores.shape[:-2])
        queries = xp.broadcast_to(ctx.queries, (*lead, *ctx.queries.shape[-2:]))
        keys = xp.broadcast_to(ctx.keys, (*lead, *ctx.keys.shape[-2:]))
        lo_parts, up_parts = [], []
        for idx in _lead_indices(lead):
            at = (*idx, ...)  # array-api-strict wants the ellipsis spelled out
            b = key_block_bounds(queries[at], keys[at], bs, scale=ctx.scale, kind=self.kind)
            lo_parts.append(b[0])
            up_parts.append(b[1])
        lower = _stack_lead(lo_parts, lead, xp)
        upper = _stack_lead(up_parts, lead, xp)
        # a block holds, for a query, only the keys that query sees: the head mass of a
        # kept block and the tail mass of a dropped one count its visible keys alone, and
        # their scores are bounded by the block's bound plus the bias of those keys
        sizes, bmin, bmax = _block_visible(valid, ctx.bias, bs, xp)
        if ctx.bias is not None:
            lower, upper = add_down(lower, bmin, xp), add_up(upper, bmax, xp)
        sel = greedy_block_set(lower, upper, sizes, self.eps, cost="keys")
        kept = _expand_pages(sel.kept, page_of, xp) & valid
        # the block bounds enclose the exact scores (cells' margins): an exact bound
        return Selection(kept=kept, tail_upper=sel.tail_upper, exact=True)


def _block_visible(
    valid: Array, bias: Array | None, block_size: int, xp: Any
) -> tuple[Array, Array | None, Array | None]:
    """Per query and block of ``block_size`` keys: visible keys, min and max bias over them.

    Returns int64 ``sizes`` ``(..., m, n_blocks)`` and, with a bias, its float64 minimum
    and maximum over each block's visible keys (0 for a block the query cannot see).
    """
    n = int(valid.shape[-1])
    nb = -(-n // block_size)
    pad = nb * block_size - n
    shape = (*valid.shape[:-1], nb, block_size)

    def blocked(a: Array, fill: Any) -> Array:
        if pad:
            a = xp.concat([a, xp.full((*a.shape[:-1], pad), fill, dtype=a.dtype,
                                      device=getattr(a, "device", None))], axis=-1)
        return xp.reshape(a, shape)

    vb = blocked(valid, False)
    sizes = xp.sum(xp.astype(vb, xp.int64), axis=-1)
    if bias is None:
        return sizes, None, None
    bb = blocked(xp.broadcast_to(bias, valid.shape), 0.0)
    seen = sizes > 0
    zero = xp.zeros(sizes.shape, dtype=bb.dtype, device=getattr(bb, "device", None))
    bmin = xp.min(xp.where(vb, bb, xp.full_like(bb, xp.inf)), axis=-1)
    bmax = xp.max(xp.where(vb, bb, xp.full_like(bb, -xp.inf)), axis=-1)
    return sizes, xp.where(seen, bmin, zero), xp.where(seen, bmax, zero)


@dataclass(frozen=True)
class Search:
    """Certified search (Theorem SEARCH-SOUND): score few keys, keep a certified head.

    ``method`` as in :func:`certattn.certified_search` ("ours", "mc", "tree", "gap",
    "quant", "paged"); ``bits`` and ``group`` set the key estimates of "quant" and "paged"
    (Theorem QUANT-SCORE).  Cells are built once per key head and call (NumPy, on the host).
    """

    eps: float
    method: str = "ours"
    seed: int = 0
    name: str = "search"
    bits: int | None = None
    group: int | None = None

    def __post_init__(self) -> None:
        from .quant import BITS
        from .search import METHODS

        object.__setattr__(self, "eps", check_eps(self.eps))
        object.__setattr__(self, "bits", check_int_option(self.bits, name="bits", choices=BITS))
        object.__setattr__(self, "group", check_int_option(self.group, name="group"))
        if self.method not in METHODS:
            raise InputError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if (self.bits is not None or self.group is not None) and (
            METHODS[self.method]["cells"] != "quant"
        ):
            raise InputError("bits and group apply to methods 'quant' and 'paged' only")

    def select(self, scores: Array, valid: Array, ctx: Context) -> Selection:
        import numpy as np

        from ._array import from_numpy
        from .search import build_cells, search_cells

        xp = ctx.xp
        dev = getattr(scores, "device", None)
        lead = tuple(int(s) for s in scores.shape[:-2])
        queries = xp.broadcast_to(ctx.queries, (*lead, *ctx.queries.shape[-2:]))
        keys = xp.broadcast_to(ctx.keys, (*lead, *ctx.keys.shape[-2:]))
        bias = None if ctx.bias is None else xp.broadcast_to(ctx.bias, scores.shape)

        def host(a: Array, idx: tuple[int, ...]) -> np.ndarray:
            return np.asarray(to_numpy(a[(*idx, ...)]))

        kept, tail, scored = [], [], []
        for idx in _lead_indices(lead):
            tkey = f"cells:{self.method}:{self.bits}:{self.group}:{idx}"
            k_np = host(keys, idx).astype(np.float64)
            if tkey not in ctx.cache:
                ctx.cache[tkey] = build_cells(self.method, k_np, self.seed, bits=self.bits,
                                              group=self.group)
            r = search_cells(
                ctx.cache[tkey],
                host(queries, idx).astype(np.float64),
                k_np,
                host(valid, idx),
                self.eps,
                scale=ctx.scale,
                method=self.method,
                bias=None if bias is None else host(bias, idx).astype(np.float64),
            )
            kept.append(r["kept"])
            tail.append(r["tail_upper"])
            scored.append(r["scored"])

        def back(parts: list[Any]) -> Array:
            arr = np.stack(parts).reshape(*lead, *parts[0].shape) if lead else parts[0]
            return from_numpy(np.ascontiguousarray(arr), xp=xp, device=dev)

        # SEARCH-SOUND widens every computed score by its rounding margin: an exact bound
        return Selection(kept=back(kept), tail_upper=back(tail), scored=back(scored),
                         exact=True)


def _lead_indices(lead: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every index tuple into the leading axes (``[()]`` when there are none)."""
    out: list[tuple[int, ...]] = [()]
    for size in lead:
        out = [(*i, j) for i in out for j in range(int(size))]
    return out


def _stack_lead(parts: list[Array], lead: tuple[int, ...], xp: Any) -> Array:
    if not lead:
        return parts[0]
    arr = xp.stack(parts, axis=0)
    return xp.reshape(arr, (*lead, *parts[0].shape))


def as_policy(policy: Any, eps: float | None) -> Any:
    """A policy object from ``policy`` (an object, a name, or None = Top-k at ``eps``)."""
    if policy is None or policy == "topk":
        if eps is None:
            raise InputError("give eps (the TV budget) or a selection policy")
        return TopK(eps)
    if isinstance(policy, str):
        raise InputError(
            f"unknown policy {policy!r}: give 'topk' or a policy object from certattn.policies"
        )
    if not callable(getattr(policy, "select", None)):
        raise InputError(f"policy must have a select(scores, valid, ctx) method, got {policy!r}")
    return policy
