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

from .._fp import add_up
from .._validate import InputError, check_eps
from ..blocks import block_tail_bounds
from ..policies import Pages, Selection, TopK, _block_visible, page_upper_bounds, slack_budget

__all__ = ["METADATA_PER_PAGE", "CertifiedFallback", "box_tail_upper", "pages_visible"]

Array = Any

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


@dataclass(frozen=True)
class CertifiedFallback:
    r"""Serve a base kept set where its box bound certifies ``eps``; else Top-k or dense.

    Per query: the base policy's kept set :math:`H`, its bound :func:`box_tail_upper`
    (no unkept key scored).  If the bound is at most ``eps`` the base set is served
    (``tail_upper`` = that bound); otherwise every visible key is scored and the query gets
    the certified Top-k for ``eps`` (``to="topk"``; Theorem TV-TAIL, :math:`\bar\tau \le`
    ``eps``) or dense attention (``to="dense"``, :math:`\tau = 0`).  Both certify the
    budget :func:`certattn.policies.slack_budget` on the computed scores, so every query's
    ``tail_upper`` (the house's bound for the exact scores) is at most ``eps``.

    The box bound adds the additive mask bias (``ctx.bias``) when there is one.
    """

    base: Any
    eps: float
    page_size: int = 16
    to: str = "topk"
    name: str = "certified_fallback"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))
        if self.to not in ("topk", "dense"):
            raise InputError(f"fallback target must be 'topk' or 'dense', got {self.to!r}")
        if isinstance(self.page_size, bool) or int(self.page_size) != self.page_size or \
                self.page_size < 1:
            raise InputError(f"page_size must be an integer >= 1, got {self.page_size!r}")

    def select(self, scores: Array, valid: Array, ctx: Any) -> Selection:
        return self.select_with_info(scores, valid, ctx)[0]

    def select_with_info(self, scores: Array, valid: Array, ctx: Any) -> tuple[Selection, dict]:
        scores, valid = np.asarray(scores), np.asarray(valid)
        sel = self.base.select(scores, valid, ctx)
        kept = np.asarray(sel.kept) & valid
        box, pages_read = box_tail_upper(scores, valid, kept, ctx, self.page_size)
        # the house widens the bound by the score slack (the head's scores are computed
        # ones): certify the shrunk budget so the widened bound stays within eps
        ok = box <= slack_budget(self.eps, ctx)
        n_kept = np.sum(kept, axis=-1).astype(np.float64)
        n_valid = np.sum(valid, axis=-1).astype(np.float64)
        if isinstance(self.base, Pages) and self.base.page_size == self.page_size:
            meta = METADATA_PER_PAGE * pages_visible(valid, self.page_size)
        else:
            meta = METADATA_PER_PAGE * pages_read
        if self.to == "topk":
            fb = TopK(self.eps).select(scores, valid, ctx)
            fb_kept, fb_tail = np.asarray(fb.kept) & valid, np.asarray(fb.tail_upper)
        else:
            fb_kept, fb_tail = valid, np.zeros_like(box)
        out_kept = np.where(ok[..., None], kept, fb_kept)
        tail = np.where(ok, box, fb_tail)
        scored = np.where(ok, n_kept, n_valid).astype(np.int64)
        cost = np.where(ok, n_kept, n_valid) + meta
        info = {"cost": cost, "fell_back": ~ok}
        return Selection(kept=out_kept, tail_upper=tail, scored=scored), info
