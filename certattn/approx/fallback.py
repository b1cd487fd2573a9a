r"""Certified selection without scoring the rest: a box bound and a serving fallback.

The house certifies a kept set from every score (:func:`certattn.certify_kept`).  A sparse
kernel that never reads the dropped keys needs a bound from what it does read: the kept
keys' exact scores and, for the keys it does not score, page metadata.  With pages of
``page_size`` consecutive keys carrying their channel-wise min and max key (Quest's boxes),
:math:`U_b` the box score bound of page :math:`b` (Theorem BLOCK-SCORE) and :math:`c_b` the
visible unkept keys of page :math:`b`, Theorem BLOCK-BOUNDS with an exact head (the form of
SEARCH-SOUND) gives

.. math::
    \tau(H) = \frac{\sum_{j\notin H} e^{s_j}}{\sum_j e^{s_j}} \le
    \frac{\sum_b c_b e^{U_b}}{\sum_{j\in H} e^{s_j} + \sum_b c_b e^{U_b}}

(:math:`T/(H+T)` increases in :math:`T` and each unkept score is at most its page's
:math:`U_b`), evaluated in log space with the margin of :mod:`certattn._fp` (factor 8:
log-sums of bounds) and rounded up (:func:`box_tail_upper`).

:class:`CertifiedFallback` is the serving policy ``fallback="certified"`` of
:func:`certattn.approx.selection.window_sinks` and :func:`certattn.approx.selection.quest`:
the base kept set is served where the bound is at most ``eps``; the other queries score
every visible key and get the certified Top-k (Theorem TV-TAIL, ``tail_upper <= eps``) or
dense attention.  Every served query is therefore certified within ``eps`` (plus, with an
additive mask filled with its dtype's minimum, the bound on the filled keys' exact mass
that :func:`certattn.certify_attention` adds, :mod:`certattn.masks`).

Cost (key-equivalents): a certified query reads its kept keys plus
:data:`METADATA_PER_PAGE` per page box it bounds; a query that falls back reads every
visible key plus the boxes already read.  With an additive mask bias (``ctx.bias``) a
page's bound adds the largest bias of its visible unkept keys (rounded up), so the bound
holds for any mask; the wrappers still take boolean masks only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._fp import add_down, add_up
from .._validate import InputError, check_eps, check_int_option, check_int_tiers
from ..blocks import block_tail_bounds
from ..policies import Pages, Selection, TopK, _block_visible, page_upper_bounds, slack_budget
from ..quant import BITS, QuantKeys, quantize_keys

__all__ = [
    "METADATA_PER_PAGE",
    "SEARCH_REST_SHARE",
    "TIER_REST_SHARE",
    "CertifiedFallback",
    "box_tail_upper",
    "key_tail_upper",
    "pages_visible",
    "quant_score_upper",
]

Array = Any

TIER_REST_SHARE = 0.1
"""Tiered estimates (``bits=(4, 8)``): on a query whose base set the coarse midpoints put
within the budget, the finer tier is read for the unkept keys of best coarse bound until
the coarse bounds of the others fit in this share of the budget (before nested grids,
``benchmarks/fallback_cost.py --layers 15 --tiers 4,8``, window + sinks, eps 0.01:
fallback 70.6% at 0.730x dense with 0.3, 68.4% at 0.739x with 0.1, 67.4% at 0.776x
with 0, against 66.3% of queries that truly need it)."""

SEARCH_REST_SHARE = 0.25
"""Tiered estimates with ``to="search"``: on a query that will grow its set, the finer tier
is read for the keys a search on the coarse bounds would score until the others' bounds
fit in this share of the budget, less the keys it would still score on the finer bounds
(both predicted with the bounds' midpoints as scores).  Window + sinks, ``bits=(4, 8)``,
SmolLM2 layer 15, eps 0.01, groups of 64 (the benchmark's setting with this constant
varied): 0.695x dense with 0.1, 0.686x with 0.25, 0.690x with 0.5, 0.716x without this
refinement (the search then scored about twice the keys that the exact scores show
suffice)."""

METADATA_PER_PAGE = 2.0
"""Key-equivalents read per page box: its ``kmin`` and ``kmax`` corners (two dot products)."""


def pages_visible(valid: Array, page_size: int) -> Array:
    """Pages holding at least one visible key, per query: ``(..., m)`` float64."""
    per_page = _page_sums(valid.astype(np.float64), page_size)
    return np.sum(per_page > 0, axis=-1).astype(np.float64)


def _page_sums(x: Array, page_size: int) -> Array:
    """Sums of ``x`` (``(..., m, n)``) over contiguous pages: ``(..., m, ceil(n / size))``."""
    n = x.shape[-1]
    n_pages = -(-n // page_size)
    pad = n_pages * page_size - n
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), dtype=x.dtype)], axis=-1)
    return np.sum(x.reshape(*x.shape[:-1], n_pages, page_size), axis=-1)


# --------------------------------------------------------------------------
# The box bound and the certified fallback policy
# --------------------------------------------------------------------------


def box_tail_upper(
    scores: Array, valid: Array, kept: Array, ctx: Any, page_size: int
) -> tuple[Array, Array]:
    r"""Sound bound on the dropped mass of ``kept`` without scoring the dropped keys.

    Theorem BLOCK-BOUNDS with an exact head (as in SEARCH-SOUND): the kept keys enter with
    their computed float64 scores (blocks of one key, :math:`l = u = s_j`), the visible unkept
    keys page by page with the page's box bound :math:`U_b` (Theorem BLOCK-SCORE), counted
    :math:`c_b` times:

    .. math::
        \bar\tau = \frac{\sum_b c_b e^{U_b}}{\sum_{j\in H} e^{s_j} + \sum_b c_b e^{U_b}}
        \ge \tau(H),

    evaluated by :func:`certattn.blocks.block_tail_bounds` (log space, margin
    :math:`u(8(|a|+|b|) + 4 n_{blocks} + 2^{14})`, rounded up).  Only the kept scores are
    read; ``scores`` of unkept keys are ignored.  The head's scores are the computed ones,
    so the bound is about them: :func:`certattn.certify_attention` widens it to the exact
    scores by the rows' score slack (:func:`certattn._fp.widen_tail`).

    Parameters
    ----------
    scores : float64 array (..., m, n)
        The chunk's scores (``-inf`` = masked; with an additive bias, ``scale q.k + b``).
    valid, kept : bool arrays (..., m, n)
        Visible keys and the kept set.
    ctx : certattn.policies.Context
        The chunk's queries and keys (for the page boxes).
    page_size : int
        Keys per page.

    Returns
    -------
    (tail_upper, pages_read) : float64 arrays (..., m)
        The bound (1 where the kept set is empty) and the pages whose box it read.
    """
    kept = kept & valid
    unscored = valid & ~kept
    upper, _ = page_upper_bounds(ctx, page_size)  # (..., m, P)
    # the visible unkept keys of each page, and the largest bias among them (a score of
    # such a key is at most the page's box bound plus that bias, rounded up)
    counts, _, bmax = _block_visible(unscored, getattr(ctx, "bias", None), page_size, np)
    counts = counts.astype(np.float64)
    upper = np.broadcast_to(np.asarray(upper, dtype=np.float64), counts.shape)
    if bmax is not None:
        upper = add_up(upper, np.asarray(bmax, dtype=np.float64), np)
    head = np.where(kept, scores, -np.inf)
    lower_all = np.concatenate([head, np.full_like(upper, -np.inf)], axis=-1)
    upper_all = np.concatenate([head, upper], axis=-1)
    sizes = np.concatenate([kept.astype(np.float64), counts], axis=-1)
    kept_blocks = np.concatenate([kept, np.zeros(counts.shape, dtype=bool)], axis=-1)
    has_tail = np.any(unscored, axis=-1)
    if not np.any(has_tail):
        return np.zeros(kept.shape[:-1]), np.zeros(kept.shape[:-1])
    _, hi = block_tail_bounds(lower_all, upper_all, sizes, kept_blocks)
    hi = np.where(has_tail, hi, 0.0)
    hi = np.where(np.any(kept, axis=-1), hi, 1.0)
    pages_read = np.sum(counts > 0, axis=-1).astype(np.float64)
    return hi, pages_read


def _quant_keys(ctx: Any, bits: int, group: int, grid_bits: int | None = None,
                residual: bool = True) -> tuple[list[QuantKeys], tuple[int, ...]]:
    """The chunk's keys quantized once per call (:func:`certattn.quant.quantize_keys`,
    per leading index of ``ctx.keys``, on a ``grid_bits``-bit grid, with or without
    residual norms), cached in ``ctx.cache``."""
    keys = np.asarray(ctx.keys, dtype=np.float64)
    lead = keys.shape[:-2]
    grid = bits if grid_bits is None else grid_bits
    key = f"quant:{bits}:{grid}:{group}:{residual}"
    hit = ctx.cache.get(key)
    if hit is None or hit[1] != keys.shape:
        flat = keys.reshape(-1, *keys.shape[-2:])
        hit = ([quantize_keys(k, bits, group=group, grid_bits=grid, residual=residual)
                for k in flat], keys.shape)
        ctx.cache[key] = hit
    return hit[0], lead


def quant_score_upper(ctx: Any, bits: int = 4, group: int = 32) -> tuple[Array, QuantKeys]:
    r"""Upper bounds on every exact score of the chunk from ``bits``-bit key estimates.

    Theorem QUANT-SCORE (:meth:`certattn.quant.QuantKeys.score_bounds`): the keys are
    quantized per channel in groups of ``group`` consecutive keys, and every exact score
    :math:`\mathrm{scale}\,q\cdot k_i` is at most the estimate's bound :math:`U_i`; with an
    additive mask bias (``ctx.bias``) the bound adds the key's bias, rounded up
    (:func:`certattn._fp.add_up`), so it bounds the exact logit ``scale q.k + b``.

    Parameters
    ----------
    ctx : certattn.policies.Context
        The chunk (queries ``(..., m, d)``, keys ``(..., n, d)``, scale, bias).
    bits, group : int
        Code width (2, 4 or 8) and keys per quantization group.

    Returns
    -------
    (upper, quantized) : float64 array ``(..., m, n)``, QuantKeys
        The bounds (``+inf`` where a bound overflows: fails closed) and the quantized keys
        of the key head whose metadata are widest (their ``key_bytes`` and ``meta_bytes``
        price the reads).
    """
    _, upper, qk = quant_score_bounds(ctx, bits, group)
    return upper, qk


def _head_pairs(ctx: Any, bits: int, group: int, grid_bits: int | None, residual: bool
                ) -> tuple[list[QuantKeys], tuple[int, ...], list[tuple]]:
    """``(quantized keys, score shape, pairs)``: the chunk's keys quantized per key head
    (:func:`_quant_keys`), the broadcast ``(..., m, n)`` shape of the chunk's scores, and
    per leading index ``(index, that head's QuantKeys, its (m, d) queries)``."""
    qks, lead = _quant_keys(ctx, bits, group, grid_bits, residual)
    queries = np.asarray(ctx.queries, dtype=np.float64)
    shape = np.broadcast_shapes(queries.shape[:-2], lead)
    qb = np.broadcast_to(queries, (*shape, *queries.shape[-2:]))
    kidx = np.broadcast_to(np.arange(len(qks)).reshape(lead), shape)
    pairs = [(idx, qks[int(kidx[idx])], qb[idx]) for idx in np.ndindex(*shape)]
    return qks, (*shape, queries.shape[-2], qks[0].n_keys), pairs


def quant_score_bounds(ctx: Any, bits: int = 4, group: int = 32,
                       grid_bits: int | None = None, residual: bool = True
                       ) -> tuple[Array, Array, QuantKeys]:
    """Lower and upper bounds on every exact logit of the chunk (Theorem QUANT-SCORE, bias
    added rounded down and up): ``(lower, upper, quantized)``, as :func:`quant_score_upper`
    (``-inf`` / ``+inf`` where a bound overflows), from the top ``bits`` bits of a
    ``grid_bits``-bit grid (nested grids, :func:`certattn.quant.quantize_keys`); without
    ``residual`` no residual norm is stored or read (the bound is the per-channel one)."""
    qks, shape, pairs = _head_pairs(ctx, bits, group, grid_bits, residual)
    lower, upper = np.empty(shape), np.empty(shape)
    for idx, qk, q in pairs:
        lower[idx], upper[idx] = qk.score_bounds(q, scale=ctx.scale)
    bias = getattr(ctx, "bias", None)
    if bias is not None:
        b = np.broadcast_to(np.asarray(bias, dtype=np.float64), upper.shape)
        upper, lower = add_up(upper, b, np), add_down(lower, b, np)
    lower = np.where(np.isnan(lower), -np.inf, lower)
    # price every head's reads at the widest metadata (float32 where one head needs it)
    return lower, upper, max(qks, key=lambda qk: qk.meta_bytes)


def key_tail_upper(scores: Array, valid: Array, kept: Array, upper: Array) -> Array:
    r"""Sound bound on the dropped mass of ``kept`` from one score bound per unkept key.

    Theorem BLOCK-BOUNDS with an exact head and one-key blocks (the form of SEARCH-SOUND):
    the kept keys enter with their computed scores, every visible unkept key :math:`i` with
    its bound :math:`U_i \ge s_i`,

    .. math::
        \bar\tau = \frac{\sum_{i \notin H} e^{U_i}}{\sum_{j\in H} e^{s_j}
        + \sum_{i\notin H} e^{U_i}} \ge \tau(H),

    evaluated by :func:`certattn.blocks.block_tail_bounds` (log space, rounded up).  The
    unkept keys' ``scores`` are not read.  As for :func:`box_tail_upper`, the bound is
    about the computed head scores (the house widens it by the score slack).

    Returns
    -------
    float64 array (..., m)
        The bound; 0 where no visible key is dropped, 1 where nothing is kept.
    """
    kept = kept & valid
    unscored = valid & ~kept
    has_tail = np.any(unscored, axis=-1)
    if not np.any(has_tail):
        return np.zeros(kept.shape[:-1])
    head = np.where(kept, scores, -np.inf)
    hi_all = np.where(kept, scores, np.where(unscored, upper, -np.inf))
    _, hi = block_tail_bounds(head, hi_all, valid.astype(np.float64), kept)
    hi = np.where(has_tail, hi, 0.0)
    return np.where(np.any(kept, axis=-1), hi, 1.0)


def _extend_by_bounds(scores: Array, valid: Array, kept: Array, upper: Array,
                      budget: float, scored: bool = True) -> Array:
    """Keys to add to ``kept`` (best bound first) until the estimated tail is within
    ``budget`` (a choice, not a certificate: the caller certifies the result).

    With ``scored`` the added keys join the head with their scores (the search scores
    them); without, the head stays ``kept`` and the added keys are the ones whose bounds
    the rest cannot afford (the keys a tier of finer estimates refines)."""
    rest = valid & ~kept
    with np.errstate(over="ignore", invalid="ignore"):
        ub = np.where(rest, upper, -np.inf)
        order = np.argsort(-ub, axis=-1, kind="stable")
        top = np.max(np.where(kept, scores, -np.inf), axis=-1, keepdims=True)
        shift = np.maximum(top, np.max(ub, axis=-1, keepdims=True))
        shift = np.where(np.isfinite(shift), shift, 0.0)
        e_h = np.sum(np.where(kept, np.exp(scores - shift), 0.0), axis=-1, keepdims=True)
        e_u = np.take_along_axis(np.where(rest, np.exp(ub - shift), 0.0), order, axis=-1)
        e_s = np.take_along_axis(np.where(rest & scored, np.exp(scores - shift), 0.0), order,
                                 axis=-1)
        n = rest.shape[-1]
        x = np.zeros((*rest.shape[:-1], n + 1))
        x[..., :-1] = np.cumsum(e_u[..., ::-1], axis=-1)[..., ::-1]
        z = np.concatenate([e_h, e_h + np.cumsum(e_s, axis=-1)], axis=-1)
        ok = x <= budget * (1.0 - 1e-6) * (z + x)
    ok[..., -1] = True  # every key scored
    t = np.argmax(ok, axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n), axis=-1)
    return rest & (rank < t[..., None])


def _partial_estimates(ctx: Any, bits: int, group: int, grid_bits: int, residual: bool,
                       r: int) -> Array:
    r"""Scores estimated from ``r`` channels of the ``bits``-bit codes (a choice, not a
    bound): per query, the ``r`` channels of largest :math:`|q_j|` (ties to the lower
    index, as in SparQ Attention), :math:`\hat s_i = \mathrm{scale} \sum_{j \in J}
    q_j \hat k_{ij}` plus the key's additive bias (``+inf`` where that sum is NaN; keys of
    groups whose metadata are not finite have ``khat = 0``: the caller ranks them by their
    bounds).  ``(..., m, n)`` float64."""
    _, shape, pairs = _head_pairs(ctx, bits, group, grid_bits, residual)
    est = np.empty(shape)
    for idx, qk, q in pairs:
        top = np.argsort(-np.abs(q), axis=-1, kind="stable")[:, :r]
        qr = np.zeros_like(q)
        np.put_along_axis(qr, top, np.take_along_axis(q, top, axis=-1), axis=-1)
        with np.errstate(over="ignore", invalid="ignore"):
            e = (qr @ qk.reconstruct().T) * ctx.scale
        est[idx] = np.where(np.isnan(e), np.inf, e)
    bias = getattr(ctx, "bias", None)
    if bias is not None:
        with np.errstate(invalid="ignore"):
            est = est + np.broadcast_to(np.asarray(bias, dtype=np.float64), est.shape)
        est = np.where(np.isnan(est), np.inf, est)
    return est


def _row_max(x: Array, valid: Array) -> Array:
    """Largest finite ``x`` over each row's visible entries, ``(..., m, 1)`` (0 if none)."""
    top = np.max(np.where(valid & np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    return np.where(np.isfinite(top), top, 0.0)


def _tail_estimate(scores: Array, valid: Array, kept: Array, est: Array) -> Array:
    r"""The dropped mass of ``kept`` were the visible unkept logits ``est`` (a choice, not
    a bound): :math:`T / (H + T)`, :math:`T` the sum of ``e^est`` over them; 0 where it
    is not finite."""
    rest = valid & ~kept
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        e = np.where(rest, est, -np.inf)
        shift = np.maximum(np.max(np.where(kept & valid, scores, -np.inf), axis=-1),
                           np.max(e, axis=-1))[..., None]
        shift = np.where(np.isfinite(shift), shift, 0.0)
        t = np.sum(np.exp(e - shift), axis=-1)
        h = np.sum(np.where(kept & valid, np.exp(scores - shift), 0.0), axis=-1)
        out = t / (h + t)
    return np.where(np.isfinite(out), out, 0.0)


def _estimate_reads(read: Array, qk: QuantKeys, d: int) -> Array:
    """Key-equivalents (``2 d`` bytes) of reading the estimates of the keys ``read``
    (``(..., m, n)`` bool): their codes and residual norms plus the metadata of every
    quantization group holding one."""
    groups = np.sum(_page_sums(read.astype(np.float64), qk.group) > 0, axis=-1)
    return (np.sum(read, axis=-1) * qk.key_bytes + groups * qk.meta_bytes) / (2.0 * d)


def _refine_reads(refine: Array, have: Array, qk: QuantKeys, d: int) -> Array:
    """Key-equivalents of refining the keys ``refine`` from the ``have`` bits of their
    nested-grid codes already read to ``qk.bits``: the extra code bits and the finer
    residual norm (the group metadata are the coarser tier's, already read)."""
    extra = qk.key_bytes - d * qk.bits / 8.0  # the residual norm's bytes
    per_key = np.where(refine, d * (qk.bits - have) / 8.0 + extra, 0.0)
    return np.sum(per_key, axis=-1) / (2.0 * d)


@dataclass(frozen=True)
class CertifiedFallback:
    r"""Serve a base kept set where a bound certifies ``eps``; else extend it, Top-k or dense.

    Per query: the base policy's kept set :math:`H` and a bound on its dropped mass that
    scores no unkept key: from page boxes (``bound="box"``, :func:`box_tail_upper`) or
    from one bound per unkept key, read off ``bits``-bit key estimates (``bound="quant"``,
    Theorem QUANT-SCORE, :func:`quant_score_upper` and :func:`key_tail_upper`).  With
    ``bits`` a tuple of increasing widths, e.g. ``(4, 8)``, the bound is tiered on one
    nested grid (the last width's; each width's codes are the top bits of its codes,
    :func:`certattn.quant.quantize_keys` with ``grid_bits``): every unkept key's bound
    comes from the first width; on the queries it does not certify, some keys also get the
    next width's bound (:meth:`_to_refine`: to certify the base set, or to shorten the
    search that follows), each such key's bound is the smaller of the two (both bound the
    exact logit, bias included), and so on.  Which keys and queries are refined is a
    choice; the bound that certifies is always :func:`key_tail_upper` of sound per-key
    bounds.  If the bound is
    at most ``eps`` the base set is served (``tail_upper`` = that bound); otherwise the
    query falls back to

    * ``to="search"`` (``bound="quant"`` only): a quantized certified search seeded with
      :math:`H`: the unkept keys are scored in decreasing estimate bound until the bound
      of the grown set certifies ``eps`` (Theorem SEARCH-SOUND with one-key cells, as in
      ``certified_search(method="quant")``; the estimates are already read);
    * ``to="topk"``: every visible key scored, the certified Top-k (Theorem TV-TAIL);
    * ``to="dense"``: dense attention (:math:`\tau = 0`).

    With a :class:`certattn.policies.Pages` base and ``page_rank="estimates"``
    (``bound="quant"`` only), the base pages are ranked by their estimated mass, the sum
    over the page's visible keys of :math:`e^{\hat s_i}`, instead of by page boxes;
    :math:`\hat s_i` is the first tier's estimate over the ``rank_channels`` channels of
    largest :math:`|q_j|` (default a quarter of the head dimension, SparQ Attention's
    choice; all channels: ``rank_channels=d``).  Those channels of every visible key's
    code are read, the other channels only for the unkept keys (whose bounds need them),
    and no page box is (a choice of the kept set; what certifies it is unchanged).
    SmolLM2, 30 layers, 1024 tokens, eps 0.01, ``bits=(2, 4, 8)``: 0.718x dense ranking on
    all 64 channels, 0.696x on 16 (``certattn audit``).

    All certify the budget :func:`certattn.policies.slack_budget` on the computed scores, so
    every query's ``tail_upper`` (the house's bound for the exact scores) is at most
    ``eps``; a grown set whose sound bound misses it (rounding) is served dense.  Every
    bound adds the additive mask bias (``ctx.bias``) when there is one.

    The estimates are quantized per channel in groups of ``group`` keys (default 128) and,
    with ``residual``, each key also stores a float16 bound on its residual norm (the
    Cauchy-Schwarz term of QUANT-SCORE).  Both defaults are measured
    (``benchmarks/fallback_cost.py``, SmolLM2, 1024 tokens, layers 0, 7, 15, 23, 29, eps
    0.01, ``bits=(2, 4, 8)``): window + sinks costs 0.804x dense with groups of 64 and
    norms, 0.797x with groups of 128 (groups of 256 raise the fallback rate), 0.780x
    without norms at the same fallback rate, because the per-channel term is the smaller
    one on most keys and the norm costs 2 bytes per key and tier.

    Cost, in key-equivalents (``2 d`` bytes, one float16 key): keys scored, plus the
    bound's reads: :data:`METADATA_PER_PAGE` per page box, or each unkept key's estimate
    (``d bits / 8`` bytes of codes, and 2 of residual norm with ``residual``) and ``4 d``
    bytes of metadata per quantization group holding one (8 d where a key head needs
    float32 metadata); with tiers, each refined key's extra ``d (b' - b) / 8`` code bytes,
    and 2 of residual norm with ``residual`` (its group's metadata are the first tier's);
    with ``page_rank="estimates"``, the first tier's ``rank_channels`` code channels of
    every kept key as well, and the metadata of every group holding a visible key, instead
    of the page boxes.  Values are not counted (nor for dense
    attention, the unit: counting them would lower every ratio).
    """

    base: Any
    eps: float
    page_size: int = 16
    to: str = "topk"
    name: str = "certified_fallback"
    bound: str = "box"
    bits: int | tuple[int, ...] = 4
    group: int = 128
    page_rank: str = "box"
    residual: bool = False
    rank_channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))
        if self.to not in ("topk", "dense", "search"):
            raise InputError(f"fallback target must be 'topk', 'dense' or 'search', got "
                             f"{self.to!r}")
        if self.bound not in ("box", "quant"):
            raise InputError(f"fallback bound must be 'box' or 'quant', got {self.bound!r}")
        if self.to == "search" and self.bound != "quant":
            raise InputError("fallback target 'search' needs bound='quant' (per-key bounds)")
        check_int_option(self.rank_channels, name="rank_channels")
        if not isinstance(self.residual, bool):
            raise InputError(f"residual must be True or False, got {self.residual!r}")
        if self.page_rank not in ("box", "estimates"):
            raise InputError(f"page_rank must be 'box' or 'estimates', got {self.page_rank!r}")
        if self.page_rank == "estimates" and not (
                self.bound == "quant" and isinstance(self.base, Pages)):
            raise InputError("page_rank='estimates' ranks a Pages base by its key estimates: "
                             "it needs bound='quant' and a Pages base")
        object.__setattr__(self, "bits", check_int_tiers(self.bits, name="bits", choices=BITS))
        check_int_option(self.group, name="group", optional=False)
        if isinstance(self.page_size, bool) or int(self.page_size) != self.page_size or \
                self.page_size < 1:
            raise InputError(f"page_size must be an integer >= 1, got {self.page_size!r}")

    def select(self, scores: Array, valid: Array, ctx: Any) -> Selection:
        return self.select_with_info(scores, valid, ctx)[0]

    def _tiers(self) -> tuple[int, ...]:
        return self.bits if isinstance(self.bits, tuple) else (self.bits,)

    def base_kept(self, scores: Array, valid: Array, ctx: Any
                   ) -> tuple[Array, tuple[Array, Array, QuantKeys] | None]:
        """The base kept set and, with ``page_rank="estimates"``, the first tier's bounds it
        was ranked from (:meth:`_bound` reuses them)."""
        if self.page_rank == "box":
            return np.asarray(self.base.select(scores, valid, ctx).kept) & valid, None
        tiers = self._tiers()
        first = quant_score_bounds(ctx, tiers[0], self.group, tiers[-1], self.residual)
        est = _partial_estimates(ctx, tiers[0], self.group, tiers[-1], self.residual,
                                 self._rank_channels(ctx))
        # a key whose bound is +inf (metadata not finite, or overflow) ranks its page first
        est = np.where(first[1] == np.inf, np.inf, est)
        with np.errstate(over="ignore", invalid="ignore"):
            mass = _page_sums(np.where(valid, np.exp(est - _row_max(est, valid)), 0.0),
                              self.base.page_size)
        # a page whose estimated mass is not finite ranks first (fails toward keeping it)
        mass = np.where(np.isnan(mass), np.inf, mass)
        return np.asarray(self.base.keep_top(mass, valid, ctx.xp)), first

    def _rank_channels(self, ctx: Any) -> int:
        d = int(np.shape(ctx.keys)[-1])
        r = max(1, d // 4) if self.rank_channels is None else self.rank_channels
        return min(r, d)

    def _bound(self, scores: Array, valid: Array, kept: Array, ctx: Any,
               first: tuple[Array, Array, QuantKeys] | None = None
               ) -> tuple[Array, Array, Array | None]:
        """``(bound, reads, upper)``: the base set's bound, the key-equivalents its reads
        cost, and the per-key bounds (``bound="quant"``; None for boxes).  ``first``: the
        first tier's bounds, already computed (``page_rank="estimates"``)."""
        d = int(np.shape(ctx.keys)[-1])
        if self.bound == "box":
            box, pages_read = box_tail_upper(scores, valid, kept, ctx, self.page_size)
            if isinstance(self.base, Pages) and self.base.page_size == self.page_size:
                meta = METADATA_PER_PAGE * pages_visible(valid, self.page_size)
            else:
                meta = METADATA_PER_PAGE * pages_read
            return box, meta, None
        tiers = self._tiers()
        # tiers are nested: each width reads the top bits of the finest width's grid
        if first is None:
            first = quant_score_bounds(ctx, tiers[0], self.group, tiers[-1],
                                       self.residual)
        lower, upper, qk = first
        if self.page_rank == "estimates":
            # the ranking read r channels of every visible key's first-tier code; the
            # bound reads the others for the unkept keys (all metadata counted)
            r = self._rank_channels(ctx)
            n_kept = np.sum(kept & valid, axis=-1)
            reads = _estimate_reads(valid, qk, d) - n_kept * (d - r) * qk.bits / 8.0 / (2 * d)
        else:
            reads = _estimate_reads(valid & ~kept, qk, d)
            if isinstance(self.base, Pages):
                reads = reads + METADATA_PER_PAGE * pages_visible(valid, self.base.page_size)
        bound = key_tail_upper(scores, valid, kept, upper)
        budget = slack_budget(self.eps, ctx)
        have = np.full(upper.shape, float(tiers[0]))  # code bits read per key
        for b in tiers[1:]:
            todo = bound > budget
            if not np.any(todo):
                break
            refine = self._to_refine(scores, valid, kept, lower, upper, budget,
                                     2.0 ** (b - have)) & todo[..., None]
            # the minimum (maximum) of two sound upper (lower) bounds is one
            finer_lo, finer, qk_b = quant_score_bounds(ctx, b, self.group, tiers[-1],
                                                       self.residual)
            upper = np.where(refine, np.minimum(upper, finer), upper)
            lower = np.where(refine, np.maximum(lower, finer_lo), lower)
            reads = reads + _refine_reads(refine, have, qk_b, d)
            have = np.where(refine, float(b), have)
            bound = np.where(todo, key_tail_upper(scores, valid, kept, upper), bound)
        return bound, reads, upper

    def _to_refine(self, scores: Array, valid: Array, kept: Array, lower: Array,
                   upper: Array, budget: float, shrink: Array) -> Array:
        """The keys whose finer estimates a query not yet certified reads (a choice: the
        bound that certifies is :func:`key_tail_upper` of sound per-key bounds).

        A query whose dropped mass the midpoints of the current bounds put within the
        budget refines its keys of largest bound until the others' bounds fit in
        :data:`TIER_REST_SHARE` of it (to certify its base set).  Any other query will grow
        its set: with ``to="search"`` it refines the keys a search on the current bounds
        would score until the others' fit in :data:`SEARCH_REST_SHARE` of the budget,
        except those a search on the finer bounds would still score (midpoints taken for
        scores, finer bounds predicted as the midpoint plus the current half-width over
        ``shrink``), so that the search scores fewer keys; otherwise none."""
        finite = np.isfinite(lower) & np.isfinite(upper)
        with np.errstate(over="ignore"):
            mid = np.where(finite, 0.5 * lower + 0.5 * upper, upper)
        hopeless = _tail_estimate(scores, valid, kept, mid) > budget
        refine = _extend_by_bounds(scores, valid, kept, upper, TIER_REST_SHARE * budget,
                                   scored=False) & ~hopeless[..., None]
        if self.to == "search" and np.any(hopeless):
            guess = np.where(kept, scores, mid)
            pred = np.where(finite, mid + (upper - mid) / shrink, upper)
            grow = _extend_by_bounds(guess, valid, kept, upper, SEARCH_REST_SHARE * budget)
            still = _extend_by_bounds(guess, valid, kept, pred, budget)
            refine |= grow & ~still & hopeless[..., None]
        return refine

    def select_with_info(self, scores: Array, valid: Array, ctx: Any) -> tuple[Selection, dict]:
        scores, valid = np.asarray(scores), np.asarray(valid)
        kept, first = self.base_kept(scores, valid, ctx)
        bound, reads, upper = self._bound(scores, valid, kept, ctx, first)
        # the house widens the bound by the score slack (the head's scores are computed
        # ones): certify the shrunk budget so the widened bound stays within eps
        budget = slack_budget(self.eps, ctx)
        ok = bound <= budget
        n_kept = np.sum(kept, axis=-1).astype(np.float64)
        n_valid = np.sum(valid, axis=-1).astype(np.float64)
        if self.to == "search":
            grown = kept | _extend_by_bounds(scores, valid, kept, upper, budget)
            g_tail = key_tail_upper(scores, valid, grown, upper)
            sound = g_tail <= budget  # else (rounding): dense, whose tail is 0
            fb_kept = np.where(sound[..., None], grown, valid)
            fb_tail = np.where(sound, g_tail, 0.0)
        elif self.to == "topk":
            fb = TopK(self.eps).select(scores, valid, ctx)
            fb_kept, fb_tail = np.asarray(fb.kept) & valid, np.asarray(fb.tail_upper)
        else:
            fb_kept, fb_tail = valid, np.zeros_like(bound)
        if self.to != "search":  # the fallback scores every visible key
            n_fb = np.broadcast_to(n_valid, bound.shape)
        else:
            n_fb = np.sum(fb_kept, axis=-1).astype(np.float64)
        out_kept = np.where(ok[..., None], kept, fb_kept)
        tail = np.where(ok, bound, fb_tail)
        scored = np.where(ok, n_kept, n_fb)
        info = {"cost": scored + reads, "fell_back": ~ok}
        return Selection(kept=out_kept, tail_upper=tail, scored=scored.astype(np.int64)), info
