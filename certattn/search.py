"""Certified search: attend over few keys, scoring few keys (Theorem SEARCH-SOUND).

Keys are partitioned once into cells (:mod:`certattn.cells`); each cell ``j`` carries a
sound upper bound ``U_j`` on every score in it (Theorem BLOCK-SCORE).  A search reveals
cells best-first; with scored keys ``S``, unrevealed cells ``R`` (the frontier), any kept
set ``A`` of scored keys and ``X = sum_{j in R} n_j e^{U_j}``, Theorem SEARCH-SOUND
(Algorithm 2 "MC-Search" and Thm 7.2 of Tzachristas et al.; the form below is derived,
THEORY section 6) says

    tau(A) = 1 - P(A) <= (sum_{S \\ A} e^{s_i} + X) / (sum_S e^{s_i} + X),

because ``tau(A) = (a + x)/(b + x)`` with ``a = sum_{S\\A} e^{s_i} <= b = sum_S e^{s_i}``,
``x = sum_{i in R} e^{s_i} <= X``, and ``(a + x)/(b + x)`` is non-decreasing in ``x`` when
``a <= b`` (``proofs/search.py``).  By the any-set identity ``TV(P, P(.|A)) = 1 - P(A)``
(Theorem TV-TAIL) the truncation to ``A`` is then certified to total variation ``tau(A)``.

Four searches share one engine:

* ``method="mc"`` -- the paper's MC-Search: k-means with ``ceil(sqrt(n))`` ball cells
  (fixed seed), all cells bounded first, cells scored in decreasing ball bound ``U_j``,
  ``X = sum_{j in R} n_j e^{U_j}``.
* ``method="ours"`` (default) -- the same cells, the same order, the same cells bounded,
  but a tighter sound ``X``: per cell the smaller of ``n_j e^{U_j}`` with ``U_j`` the
  intersection (minimum) of the ball and the box bound (BLOCK-SCORE), and the Bennett
  mass bound from the cell's mean score and score variance (BLOCK-MASS; the mean score
  ``scale q.c_j`` and ``|q|`` are by-products of the ball bound, the variance factor is
  precomputed per cell).  *By design it never costs more than MC-Search, query by query*:
  both reveal cells in the same order and pay the same bounds, ours' ``X`` is never larger
  at any step, and the certificate is non-decreasing in ``X``, so ours certifies at
  MC-Search's stopping step or earlier (the tests check it).
* ``method="tree"`` -- hierarchical and adaptive: MC-Search's cells split further by
  k-means (branching 4, leaves of at most 8 keys, no one-key sub-cells, and a cell is split
  only where the split removes at least 40% of its k-means scatter), bounds clamped by
  the parent's (a sub-cell's keys are its parent's), revealed best-first; expanding a cell
  bounds its sub-cells and scores its direct keys, unless a cost rule scores it whole (small cells,
  cells predicted to be in the head, hopelessly loose sub-cells).  Measured
  (``benchmarks/search_cost.py``): 0.78x MC-Search's cost on average, down to 0.31x on
  clustered keys, and no costlier than MC-Search on average on any configuration
  measured (synthetic, MiniLM, SmolLM2); but not guaranteed query by query (single
  SmolLM2 queries cost up to about 5% more, where no cell bound certifies anything).
* ``method="gap"`` -- MC-Search's cells and schedule, stopping on the logit-only single
  cut with the exact head sum (Theorem GAP-EXACT-HEAD, the sharper form of GAP-SINGLE):
  every unscored key has score at most ``u = max_{j in R} U_j``, so ``X`` is replaced by
  ``|R| e^u``; it never stops before MC-Search.
* ``method="quant"`` -- no cells: every key gets its own sound upper bound ``U_i`` from a
  ``b``-bit estimate of it (Theorem QUANT-SCORE, :mod:`certattn.quant`: KIVI-style
  per-channel quantization in groups of 32 keys, ``bits`` 2, 4 or 8), keys are scored
  exactly in decreasing ``U_i`` and the certificate above holds with one-key cells
  (``X = sum_{i unscored} e^{U_i}``).  The estimates are far tighter than cell bounds on
  real heads: measured (``benchmarks/search_cost.py``) within 1.1-1.3x of the floor
  ``k_eps`` at 4 bits and 1.0-1.02x at 8 bits on MiniLM and SmolLM2, where every cell
  search scores nearly every key.
* ``method="paged"`` -- the same, with Quest-style page bounds first: each quantization
  group is a page with a box bound from its metadata alone; pages are opened best-first
  (their estimates read) in one schedule with the keys.  It saves bytes only where page
  bounds settle pages (measured: not on MiniLM or SmolLM2, where it equals "quant").

Cost of a search = keys scored + cells bounded (per query); ``bytes_read`` counts what
a search reads to decide (keys scored at 2 d bytes as float16, cell metadata, estimates),
``read_fraction`` relates it to dense attention over float16 keys.  The stopping rule is checked
after every expansion and the search stops at the first certified step; since ``X`` only
decreases and ``sum_S e^{s_i}`` only increases along a best-first schedule, the first
certified step is found by bisection over the schedule.  Then ``A`` is the smallest set of
top scored keys whose bound is <= eps.

Implementation note.  For speed the NumPy engine evaluates all scores with one batched
matrix product and then *charges* only the scores the search reveals: every decision
(schedule, stop, kept set) depends only on cell bounds and on revealed scores.

Floating point.  Scores are computed in float64 and known to within
``delta = (2 d + 8) u |q| max_i |k_i| scale`` (``u`` = :data:`certattn._fp.U`); sums of
exponentials are
accumulated in float64 and widened by the relative factor ``gamma = (2 n + 2 N + 2000) u``
(N = number of cells; the 2000 covers the rounding of exponent arguments up to 745 in
magnitude) plus ``1e-300`` per term (underflow); the final ratio is multiplied by
``1 + 4u``.  So ``tail_upper`` bounds the exact tail of ``kept`` under the exact softmax of
the exact logits ``scale * q.k``.

Additive masks.  With a finite bias ``b`` (a Hugging Face additive mask: BERT's -10000 on
padding, any per-query, per-key term) the logits are ``scale * q.k + b``: a cell's score
bound adds the largest bias of the cell's visible keys (per query), its mass bound the
same, a key's bound (methods "quant", "paged") its own bias, each sum rounded up
(:func:`certattn._fp.add_up`); scored keys' scores include ``b`` and ``delta`` adds
``2 u max_i |s_i|`` for the rounding of adding it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import from_numpy, namespace, to_numpy
from ._backends import refuse_lazy
from ._fp import U as _U
from ._fp import (
    add_up,
    ratio_up,
    scaled_norm,
    score_abs_margin,
    score_margin,
    score_slack,
    slack_error,
)
from ._validate import InputError, check_eps, check_int_option, check_scale
from .cells import CellTree, cell_tree, kmeans_cells
from .kept import shift_rows
from .masks import hidden_error, hidden_mass, hidden_tail, kv_head_map, normalize_mask
from .output import sound_output_bounds
from .quant import BITS, QuantKeys, quantize_keys

__all__ = ["METHODS", "SearchResult", "build_cells", "certified_search", "search_cells"]

Array = Any
_PER_TERM = 1e-300

# Searches: partition ("flat" = MC-Search's k-means cells, "nested" = those cells split
# further by k-means), bound kind, mass bound, order, stopping rule, score-directly rules.
METHODS: dict[str, dict[str, Any]] = {
    "mc": {"cells": "flat", "kind": "ball", "mass": "count", "order": "upper", "stop": "sum"},
    "gap": {"cells": "flat", "kind": "ball", "mass": "count", "order": "upper", "stop": "gap"},
    "ours": {"cells": "flat", "kind": "both", "mass": "bennett", "order": "ball", "stop": "sum"},
    "tree": {
        "cells": "nested",
        "kind": "both",
        "mass": "bennett",
        "order": "ball",
        "stop": "sum",
        "branching": 4,
        "leaf_size": 8,
        "direct_size": 16,
        "direct_heavy": -2.0,
        "direct_loose": 4.0,
        "max_scatter": 0.6,
    },
    # per-key bounds from b-bit estimates (Theorem QUANT-SCORE), KIVI-style groups of keys
    "quant": {"cells": "quant", "bits": 4, "group": 32, "residual": True, "stage": "keys"},
    # the same, Quest-style: page (group) box bounds from the metadata first, estimates
    # read only for the pages the search opens
    "paged": {"cells": "quant", "bits": 4, "group": 32, "residual": True, "stage": "pages"},
}


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Outcome of :func:`certified_search` (Theorem SEARCH-SOUND).

    Batch shape ``B`` = the queries' leading shape (``(m,)`` or ``(H, m)``).

    Attributes
    ----------
    kept : array
        ``B + (n,)`` bool: the certified kept set ``A`` (a subset of the scored keys).
    scored : array
        ``B`` int64: keys scored (``|S|`` at the stop).
    bounded : array
        ``B`` int64: cells bounded.
    tail_upper : array
        ``B`` float64: sound upper bound on the exact tail ``1 - P(A)`` (<= eps, plus the
        bound on keys hidden by a finite fill, :mod:`certattn.masks`).
    output : array
        ``B + (dv,)``: attention restricted to ``A``, ``sum_A p_hat_i v_i``.
    error_bound : array
        ``B`` float64: sound bound on ``|Attn - output|`` (Euclidean), from the head-tail
        identity ``Attn - Attn_A = tau (mu_tail - mu_head)`` (Theorem OUT-HEAD-TAIL), plus
        the distance between attention under the exact and the computed logits
        (:func:`certattn._fp.slack_error`: ``Attn`` is about the exact ``scale q.k + b``).
    n_valid : array
        ``B`` int64: unmasked keys.
    eps : float
        The budget.
    method : str
        ``"ours"``, ``"mc"``, ``"tree"``, ``"gap"`` or ``"quant"``.
    bytes_read : array or None
        ``B`` float64: bytes the search reads to decide (keys scored exactly at ``2 d``
        bytes each, as float16; cell metadata; for "quant" every visible key's ``b``-bit
        estimate, the group metadata and residual norms).
    bytes_dense : array or None
        ``B`` float64: bytes dense attention reads, ``2 d`` per visible key (float16 keys);
        :attr:`read_fraction` is the ratio.
    """

    kept: Array
    scored: Array
    bounded: Array
    tail_upper: Array
    output: Array
    error_bound: Array
    n_valid: Array
    eps: float
    method: str
    bytes_read: Array | None = None
    bytes_dense: Array | None = None

    @property
    def read_fraction(self) -> Array:
        """Bytes read relative to dense attention over float16 keys (``bytes_read /
        bytes_dense``)."""
        if self.bytes_read is None or self.bytes_dense is None:
            raise AttributeError("this result carries no byte counts")
        return self.bytes_read / self.bytes_dense

    @property
    def tail_bound(self) -> Array:
        """Deprecated (0.1): the sound bound is :attr:`tail_upper`."""
        warnings.warn(
            "SearchResult.tail_bound is deprecated; use tail_upper", DeprecationWarning,
            stacklevel=2,
        )
        return self.tail_upper

    def kept_mask(self) -> Array:
        """The certified kept set (the same protocol as every certificate)."""
        return self.kept

    @property
    def cost(self) -> Array:
        """Keys scored plus cells bounded, per query."""
        return self.scored + self.bounded


def build_cells(
    method: str, keys: np.ndarray, seed: int, *, bits: int | None = None,
    group: int | None = None,
) -> CellTree | QuantKeys:
    """The partition ``method`` searches over, for one key head ``(n, d)`` (NumPy).

    For ``method="quant"`` the structure is the quantized keys
    (:func:`certattn.quant.quantize_keys` with ``bits`` and ``group``, defaults from
    :data:`METHODS`); ``seed`` is then unused.
    """
    cfg = METHODS[method]
    if cfg["cells"] == "quant":
        return quantize_keys(
            keys,
            cfg["bits"] if bits is None else bits,
            group=cfg["group"] if group is None else group,
            residual=cfg["residual"],
        )
    if cfg["cells"] == "flat":
        return kmeans_cells(keys, seed=seed)
    return cell_tree(
        keys,
        branching=cfg["branching"],
        leaf_size=cfg["leaf_size"],
        seed=seed,
        top_cells=math.ceil(math.sqrt(keys.shape[0])),
        max_scatter=cfg["max_scatter"],
    )


class _Schedule:
    """Per-query best-first schedule over one cell tree and its evaluation at a step."""

    def __init__(
        self,
        tree: CellTree,
        q: np.ndarray,
        logits: np.ndarray,
        visible: np.ndarray,
        *,
        scale: float,
        eps: float,
        cfg: dict[str, Any],
        bias: np.ndarray | None = None,
    ) -> None:
        kind, stop = cfg["kind"], cfg["stop"]
        m = q.shape[0]
        nn, n = tree.n_nodes, tree.n_keys
        self.tree, self.stop = tree, stop
        self.parent = np.where(tree.parent < 0, 0, tree.parent)
        upper = np.asarray(tree.score_upper(q, scale=scale, kind=kind), dtype=np.float64)
        # clamp by the parent's bound (sound: a sub-cell's keys are the parent's keys)
        for dep in range(2, int(tree.depth.max()) + 1):
            lev = np.flatnonzero(tree.depth == dep)
            upper[:, lev] = np.minimum(upper[:, lev], upper[:, tree.parent[lev]])
        # unmasked keys per node, via prefix sums over the permuted keys
        vis_perm = visible[:, tree.order]
        csum = np.zeros((m, n + 1), dtype=np.int64)
        np.cumsum(vis_perm, axis=1, out=csum[:, 1:])
        cnt = csum[:, tree.stop] - csum[:, tree.start]
        self.cnt = cnt
        live = cnt > 0
        # an additive bias: every score of a node is at most its bound of scale q.k plus
        # the largest bias of the node's visible keys (rounded up)
        bmax = None if bias is None else _node_bias_max(tree, bias, visible)
        upper_qk = upper
        if bmax is not None:
            upper = add_up(upper, bmax, np)
        # normalising shift (the largest visible score): every key exponential is <= 1 and
        # the largest is 1; a cell bound far above it overflows to inf, which only means
        # "not certified" (the ratios below map inf/inf to 1)
        self.shift = np.max(np.where(visible, logits, -np.inf), axis=1)[:, None]
        log_cnt = np.log(np.maximum(cnt, 1))
        logw = log_cnt + upper if bmax is None else add_up(log_cnt, upper, np)
        logw = np.where(live, logw, -np.inf)
        mean_low = None
        if cfg["mass"] == "bennett":  # Theorem BLOCK-MASS, valid for the whole cell (masked or not)
            mass = tree.log_mass_upper(q, upper_qk, scale=scale)
            logw = np.minimum(logw, mass if bmax is None else add_up(mass, bmax, np))
            mean_low = (q @ tree.centre.T) * scale - 1e-9 * (1 + np.abs(upper_qk))
        for dep in range(2, int(tree.depth.max()) + 1):  # a sub-cell's mass <= its parent's
            lev = np.flatnonzero(tree.depth == dep)
            logw[:, lev] = np.minimum(logw[:, lev], logw[:, tree.parent[lev]])
        # score-directly rules: a node is scored whole (its sub-cells are never bounded)
        # when it holds at most `direct_size` keys; or when its predicted mass (Jensen:
        # n_v e^{mean score} <= its true mass) exceeds the tail budget eps/(1-eps) Z by
        # `direct_heavy` nats, Z predicted likewise from the top-level cells (such a node
        # is almost surely in the head, so refining it would only add bounds); or, below
        # the top level, when its mass bound exceeds that prediction by `direct_loose`
        # nats (bounds that loose do not tighten enough by refining).  These rules use only
        # bounds, and change the cost, never the soundness.
        size = tree.size.astype(np.float64)
        direct = np.zeros((m, nn), dtype=bool)
        direct[:, 1:] = size[None, 1:] <= cfg.get("direct_size", 0)
        heavy = cfg.get("direct_heavy")
        if heavy is not None and mean_low is not None and eps > 0:
            jensen = np.log(size)[None, :] + mean_low
            top = np.flatnonzero(tree.parent == 0)
            zpred = np.logaddexp.reduce(np.where(live[:, top], jensen[:, top], -np.inf), axis=1)
            budget = zpred + math.log(eps / (1 - eps))
            direct[:, 1:] |= jensen[:, 1:] >= budget[:, None] + heavy
            loose = cfg.get("direct_loose")
            if loose is not None:  # sub-cells whose bound is far from their mean: hopeless
                deep = tree.depth[None, 1:] >= 2
                direct[:, 1:] |= deep & (logw[:, 1:] - jensen[:, 1:] > loose)
        covered = np.zeros((m, nn), dtype=bool)  # under a directly scored node
        scorer = np.broadcast_to(np.arange(nn)[None, :], (m, nn)).copy()
        for dep in range(2, int(tree.depth.max()) + 1):
            lev = np.flatnonzero(tree.depth == dep)
            par = tree.parent[lev]
            covered[:, lev] = covered[:, par] | direct[:, par]
            scorer[:, lev] = np.where(covered[:, lev], scorer[:, par], lev[None, :])
        live &= ~covered
        self.key_node = np.take_along_axis(
            scorer, np.broadcast_to(tree.key_parent[None, :], (m, n)), axis=1
        )
        upper[:, 0] = np.inf
        self.upper = upper
        logw[:, 0] = -np.inf  # the root is expanded first; its own bound is never used
        with np.errstate(over="ignore"):
            w = np.where(live, np.exp(logw - self.shift), 0.0)
        w[:, 0] = 0.0
        self.w = w
        # what expanding a node reveals: exponentials and count of the keys it scores
        e = np.where(visible, np.exp(logits - self.shift), 0.0)
        self.e = e
        self.dz = np.zeros((m, nn))
        self.dscore = np.zeros((m, nn), dtype=np.int64)
        rows = np.broadcast_to(np.arange(m)[:, None], (m, n))
        np.add.at(self.dz, (rows, self.key_node), e)
        np.add.at(self.dscore, (rows, self.key_node), visible.astype(np.int64))
        self.dbound = np.zeros((m, nn), dtype=np.int64)
        rows_n = np.broadcast_to(np.arange(m)[:, None], (m, nn - 1))
        np.add.at(
            self.dbound,
            (rows_n, np.broadcast_to(tree.parent[None, 1:], (m, nn - 1))),
            live[:, 1:].astype(np.int64),
        )
        # best-first order (monotone along the tree, parents first on ties): "upper" =
        # decreasing (clamped) score bound, MC-Search's order; "ball" = MC-Search's order of
        # the top-level cells (ball bounds), sub-cells by clamped bound below their parent
        if cfg["order"] == "ball":
            prio = np.asarray(tree.score_upper(q, scale=scale, kind="ball"), dtype=np.float64)
            if bmax is not None:
                prio = prio + bmax
            prio[:, 1:] = np.where(tree.depth[None, 1:] == 1, prio[:, 1:], upper[:, 1:])
            for dep in range(2, int(tree.depth.max()) + 1):
                lev = np.flatnonzero(tree.depth == dep)
                prio[:, lev] = np.minimum(prio[:, lev], prio[:, tree.parent[lev]])
        else:
            prio = upper.copy()
        prio = np.where(live, prio, -np.inf)
        prio[:, 0] = np.inf
        order = np.argsort(-prio, axis=1, kind="stable")
        self.rank = np.empty_like(order)
        np.put_along_axis(self.rank, order, np.arange(nn)[None, :], axis=1)
        self.gamma = (2 * n + 2 * nn + 2000) * _U
        self.live = live

    def state(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Expanded mask, sound frontier mass ``X`` (upper), scored mass (unwidened), #terms."""
        expanded = self.rank <= t[:, None]
        frontier = expanded[:, self.parent] & ~expanded & self.live
        frontier[:, 0] = False
        nterm = frontier.sum(axis=1)
        if self.stop == "gap":
            cnt = np.sum(np.where(frontier, self.cnt, 0), axis=1)
            umax = np.max(np.where(frontier, self.upper, -np.inf), axis=1, initial=-np.inf)
            with np.errstate(over="ignore"):
                x = np.where(cnt > 0, cnt * np.exp(umax - self.shift[:, 0]), 0.0)
        else:
            x = np.sum(np.where(frontier, self.w, 0.0), axis=1)
        x = x * (1.0 + self.gamma) + _PER_TERM * nterm
        z = np.sum(np.where(expanded, self.dz, 0.0), axis=1)
        return expanded, x, z, nterm


def search_cells(
    tree: CellTree,
    queries: np.ndarray,
    keys: np.ndarray,
    visible: np.ndarray,
    eps: float,
    *,
    scale: float,
    method: str,
    bias: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Run one certified search on one key head (host float64; Theorem SEARCH-SOUND).

    Parameters
    ----------
    tree : CellTree or QuantKeys
        Partition of ``keys``; quantized keys run :func:`search_quant`.
    queries : numpy.ndarray
        ``(m, d)`` float64.
    keys : numpy.ndarray
        ``(n, d)`` float64.
    visible : numpy.ndarray
        ``(m, n)`` bool, True where the key is not masked; every row has a True.
    eps : float
        Tail budget in [0, 1).
    scale : float
        Positive logit scale.
    method : {"ours", "mc", "tree", "gap", "quant", "paged"}
        Schedule and stopping rule (see the module docstring).
    bias : numpy.ndarray, optional
        Additive mask bias broadcastable to ``(m, n)`` (finite): the scores are
        ``scale q.k + bias``.  Every score bound adds it exactly (a cell's bound the
        largest bias of its visible keys, a key's its own), rounded up.

    Returns
    -------
    dict
        ``kept`` (m, n) bool, ``scored``, ``bounded`` (m,) int64, ``tail_upper`` (m,) float64,
        ``bytes_read`` (m,) float64: keys scored at ``2 d`` bytes (float16) plus cells bounded
        at their metadata (centre and radius, plus box, moment and mean error for "ours"
        and "tree", all float16).
    """
    if isinstance(tree, QuantKeys):
        stage = METHODS[method]["stage"]
        return search_quant(tree, queries, keys, visible, eps, scale=scale, stage=stage,
                            bias=bias)
    cfg = METHODS[method]
    m, n = visible.shape
    bias = _visible_bias(bias, visible)
    logits = _logits(queries, keys, scale, bias, visible)
    sch = _Schedule(tree, queries, logits, visible, scale=scale, eps=eps, cfg=cfg, bias=bias)
    up, down = _score_factors(queries, keys, scale, sch.gamma, logits if bias is not None else None)

    def certified(t: np.ndarray) -> np.ndarray:
        _, x, z, _ = sch.state(t)
        # z is summed in another order than the prefix sums used below for the kept set;
        # shrinking it by 4 (n + N) u makes this test imply the kept set's (at A = S)
        return ratio_up(x, z * down * (1.0 - 4 * (n + tree.n_nodes) * _U), np) <= eps

    # bisection for the first certified step (the predicate is monotone in exact arithmetic;
    # the certificate is re-checked at the returned step, so rounding cannot make it unsound)
    nn = tree.n_nodes
    lo = np.zeros(m, dtype=np.int64)
    hi = np.full(m, nn - 1, dtype=np.int64)
    # Rows not certified even with every cell scored (score margins so large that the
    # bound is trivial) fail closed below: they keep every visible key (exact tail 0).
    hi = np.where(certified(lo), lo, hi)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = certified(mid)
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    t_stop = hi
    expanded, x, _, _ = sch.state(t_stop)
    scored_mask = visible & np.take_along_axis(expanded, sch.key_node, axis=1)
    bounded = np.sum(np.where(expanded, sch.dbound, 0), axis=1)
    kept, tail, scored = _certified_head(logits, sch.e, scored_mask, x, up, down, visible, eps)
    d = keys.shape[1]
    cell_bytes = 2.0 * ((d + 1) if cfg["kind"] == "ball" else (3 * d + 3))
    return {
        "kept": kept,
        "scored": scored.astype(np.int64),
        "bounded": bounded.astype(np.int64),
        "tail_upper": tail,
        "bytes_read": scored * (2.0 * d) + bounded * cell_bytes,
    }


def _visible_bias(bias: np.ndarray | None, visible: np.ndarray) -> np.ndarray | None:
    """The bias as float64 ``(m, n)``, 0 on hidden keys; None when it is absent or all 0."""
    if bias is None:
        return None
    try:
        b = np.broadcast_to(np.asarray(bias, dtype=np.float64), visible.shape)
    except ValueError:
        raise InputError(f"bias of shape {np.shape(bias)} does not broadcast to "
                         f"{visible.shape}") from None
    b = np.where(visible, b, 0.0)
    if not np.all(np.isfinite(b)):
        raise InputError("the additive bias of a visible key must be finite")
    return b if np.any(b != 0) else None


def _logits(
    queries: np.ndarray, keys: np.ndarray, scale: float, bias: np.ndarray | None,
    visible: np.ndarray,
) -> np.ndarray:
    """Float64 scores ``scale q.k (+ bias)``, ``-inf`` on hidden keys; overflow is an error."""
    with np.errstate(over="ignore", invalid="ignore"):
        logits = (queries @ keys.T) * scale
        if bias is not None:
            logits = logits + bias
    if not np.all(np.isfinite(logits)):
        raise InputError("scores scale * q.k (+ bias) overflow float64")
    return np.where(visible, logits, -np.inf)


def _node_bias_max(tree: CellTree, bias: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """``(m, N)``: the largest bias over each node's visible keys (0 where it has none)."""
    out = _group_max(np.where(visible, bias, -np.inf), tree.key_parent, tree.n_nodes)
    for dep in range(int(tree.depth.max()), 0, -1):  # sub-cells into their parents
        lev = np.flatnonzero(tree.depth == dep)
        np.maximum.at(out.T, tree.parent[lev], out[:, lev].T)
    return np.where(out > -np.inf, out, 0.0)


def _group_max(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """``(m, n_groups)``: the maximum of ``values`` (m, n) over each group of columns
    (``-inf`` for a group with no column)."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    out = np.full((values.shape[0], n_groups), -np.inf)
    out[:, g[starts]] = np.maximum.reduceat(values[:, order], starts, axis=1)
    return out


def _score_factors(
    queries: np.ndarray, keys: np.ndarray, scale: float, gamma: float,
    logits: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row factors ``up = e^delta (1 + gamma)``, ``down = e^-delta (1 - gamma)``:
    every computed ``exp(s_i - shift)`` times ``down`` (``up``) is below (above) the exact
    one, ``delta = (2 d + 8) u |q| max_i |k_i| scale`` the score rounding, ``gamma`` the
    relative error of the float64 sums; overflow gives the trivial bound (fails closed).
    With biased ``logits`` (``scale q.k + b``, ``-inf`` on hidden keys) ``delta`` also covers
    the rounding of adding ``b``: ``2 u max_i |s_i|`` over the visible keys."""
    with np.errstate(over="ignore", under="ignore"):  # inf norms: the trivial bound
        kmax = float(np.max(np.linalg.norm(keys, axis=1)))
        delta = score_margin(keys.shape[1]) * np.linalg.norm(queries, axis=1) * kmax * scale
        delta = delta + 1e-300
        if logits is not None:
            big = np.max(np.where(np.isfinite(logits), np.abs(logits), 0.0), axis=1)
            delta = delta + 2 * _U * big
        down = np.exp(-delta) * (1.0 - gamma)
        up = np.exp(delta) * (1.0 + gamma)
    return up, down


def search_quant(
    qk: QuantKeys,
    queries: np.ndarray,
    keys: np.ndarray,
    visible: np.ndarray,
    eps: float,
    *,
    scale: float,
    stage: str = "keys",
    bias: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    r"""Certified search with per-key bounds from low-bit estimates ("quant", "paged").

    Every visible key ``i`` gets the sound upper bound ``U_i`` of Theorem QUANT-SCORE from
    its quantized estimate (:meth:`certattn.quant.QuantKeys.score_bounds`), clamped by the
    box bound ``U_p`` of its page (quantization group;
    :meth:`certattn.quant.QuantKeys.page_upper`, from the metadata alone, BLOCK-SCORE).
    Keys are scored exactly in decreasing bound.
    With ``stage="pages"`` (method "paged", Quest-style pages first) a page's estimates are
    read only when the page is opened: pages and keys form one best-first schedule by
    bound (a page before its keys), and an unopened page counts ``n_p e^{U_p}``.  With
    scored keys ``S``, unopened pages ``P`` and unscored keys ``R`` of opened pages,
    Theorem SEARCH-SOUND (pages and single keys as cells) gives for any ``A`` in ``S``

    .. math:: \tau(A) \le \frac{\sum_{S \setminus A} e^{s_i} + X}{\sum_S e^{s_i} + X},
              \qquad X = \sum_{p \in P} n_p e^{U_p} + \sum_{i \in R} e^{U_i}.

    The search stops at the first step where this certifies ``eps`` for ``A = S``; every
    step is evaluated at once from prefix and suffix sums along the schedule (the keys of
    opened pages are "suffix of unscored keys minus suffix of keys in unopened pages",
    each sum widened the sound way); the kept set is then the smallest certified head of
    the scored keys.  Floating point as for the cell searches: sums are widened by
    ``(4 (n + G) + 2000) u`` relative plus ``1e-300`` per term, the scored mass shrunk by
    the score rounding; an overflowing bound is ``+inf`` (never certifies: fails closed).

    Parameters
    ----------
    qk : QuantKeys
        The quantized ``keys`` (:func:`certattn.quant.quantize_keys`).
    queries, keys, visible, eps, scale, bias
        As in :func:`search_cells` (a key's bound adds its bias, a page's the largest bias
        of its visible keys, both rounded up).
    stage : {"keys", "pages"}
        "keys": read every estimate first; "pages": open pages best-first (read the
        estimates of opened pages only).

    Returns
    -------
    dict
        ``kept``, ``scored``, ``bounded`` (pages opened), ``tail_upper`` as in
        :func:`search_cells`, and ``bytes_read`` (m,): the metadata of every page with a
        visible key, the estimates of the visible keys of opened pages (every page with
        ``stage="keys"``) and ``2 d`` bytes (float16) per key scored exactly.
    """
    m, n = visible.shape
    d = keys.shape[1]
    if qk.n_keys != n or qk.dim != d:
        raise InputError(f"quantized keys hold {qk.n_keys} x {qk.dim}, keys are {n} x {d}")
    bias = _visible_bias(bias, visible)
    logits = _logits(queries, keys, scale, bias, visible)
    rows = np.arange(m)[:, None]
    _, ku = qk.score_bounds(queries, scale=scale)
    pg = qk.page_upper(queries, scale=scale)  # (m, G) page box bounds, metadata only
    if bias is not None:  # + the key's bias, + the largest bias of the page's visible keys
        ku = add_up(ku, bias, np)
        pmax = _group_max(np.where(visible, bias, -np.inf), qk.group_of, pg.shape[1])
        pg = add_up(pg, np.where(pmax > -np.inf, pmax, 0.0), np)
    ku = np.minimum(ku, pg[:, qk.group_of])
    page, pu = qk.group_of, pg  # parents = the pages (quantization groups)
    npg = pu.shape[1]
    ku = np.where(visible, ku, -np.inf)
    cnt = np.zeros((m, npg), dtype=np.int64)
    np.add.at(cnt, (np.broadcast_to(rows, (m, n)), np.broadcast_to(page, (m, n))), visible)
    gamma = (4 * (n + npg) + 2000) * _U
    up, down = _score_factors(queries, keys, scale, gamma, logits if bias is not None else None)
    shift = np.max(logits, axis=1)[:, None]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # 0 inf: unused
        wk = np.where(visible, np.exp(ku - shift), 0.0)  # key bounds e^{U_i}
        wp = np.where(cnt > 0, cnt * np.exp(pu - shift), 0.0)  # page bounds n_p e^{U_p}
    wpk = np.zeros((m, npg))  # sum of the key bounds of each page
    np.add.at(wpk, (np.broadcast_to(rows, (m, n)), np.broadcast_to(page, (m, n))), wk)
    e = np.where(visible, np.exp(logits - shift), 0.0)
    # one schedule of G pages then n keys per row; a page precedes its keys (ties: pages
    # first, stable sort); without pages every page is opened before any key is scored
    live_p = cnt > 0
    prio_p = np.where(live_p, np.inf if stage == "keys" else pu, -np.inf)
    prio = np.concatenate([prio_p, ku], axis=1)
    is_key = np.concatenate([np.zeros(npg, bool), np.ones(n, bool)])
    order = np.argsort(-prio, axis=1, kind="stable")
    key_of = np.broadcast_to(is_key, (m, npg + n))
    k_sorted = np.take_along_axis(key_of, order, axis=1)
    nt = npg + n + 1

    def suffix(v: np.ndarray) -> np.ndarray:  # suffix sums from the small end, length nt
        out = np.zeros((m, nt))
        with np.errstate(invalid="ignore", over="ignore"):
            out[:, :-1] = np.cumsum(v[:, ::-1], axis=1)[:, ::-1]
        return out

    def prefix(v: np.ndarray) -> np.ndarray:
        out = np.zeros((m, nt))
        np.cumsum(v, axis=1, out=out[:, 1:])
        return out

    pad = np.zeros((m, npg))
    wk_s = np.take_along_axis(np.concatenate([pad, wk], axis=1), order, axis=1)
    wp_s = np.take_along_axis(np.concatenate([wp, np.zeros((m, n))], axis=1), order, axis=1)
    wpk_s = np.take_along_axis(np.concatenate([wpk, np.zeros((m, n))], axis=1), order, axis=1)
    e_s = np.take_along_axis(np.concatenate([pad, e], axis=1), order, axis=1)
    vk = np.concatenate([np.zeros((m, npg), bool), visible], axis=1)
    vk_s = np.take_along_axis(vk, order, axis=1)
    lp_s = np.take_along_axis(np.concatenate([live_p, np.zeros((m, n), bool)], axis=1),
                              order, axis=1)
    # X(t) = [unopened pages] + [unscored keys] - [keys of unopened pages], widened soundly
    x_pages = suffix(wp_s)
    x_keys = suffix(wk_s)
    x_sub = suffix(wpk_s)
    terms = suffix(vk_s.astype(np.float64)) + suffix(lp_s.astype(np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        xs = (x_pages + x_keys) * (1.0 + gamma) - x_sub * (1.0 - gamma)
        xs = np.maximum(xs, 0.0) * (1.0 + 4 * _U) + _PER_TERM * terms
    xs = np.where(np.isnan(xs), np.inf, xs)
    zs = prefix(e_s)
    nsc = prefix((vk_s & k_sorted).astype(np.float64))  # keys scored after t steps
    nvis = visible.sum(axis=1)
    done = nsc >= nvis[:, None]
    xs = np.where(done, 0.0, xs)  # every visible key scored: X = 0
    # zs is summed in another order than the head's prefix sums: shrink it by 4 (n + G) u
    ok = ratio_up(xs, zs * down[:, None] * (1.0 - 4 * (n + npg) * _U), np) <= eps
    ok |= done
    t_stop = np.argmax(ok, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(npg + n)[None, :], axis=1)
    scored_mask = visible & (rank[:, npg:] < t_stop[:, None])
    opened = live_p & (rank[:, :npg] < t_stop[:, None])
    x = xs[np.arange(m), t_stop]
    kept, tail, scored = _certified_head(logits, e, scored_mask, x, up, down, visible, eps)
    # bytes: metadata of every page with a visible key, estimates of the visible keys of
    # opened pages, 2 d bytes per key scored exactly
    est_keys = np.sum(np.where(opened, cnt, 0), axis=1)
    nbytes = live_p.sum(axis=1) * qk.meta_bytes + est_keys * qk.key_bytes + scored * (2.0 * d)
    return {
        "kept": kept,
        "scored": scored.astype(np.int64),
        "bounded": (np.zeros(m) if stage == "keys" else opened.sum(axis=1)).astype(np.int64),
        "tail_upper": tail,
        "bytes_read": nbytes.astype(np.float64),
    }


def _certified_head(
    logits: np.ndarray,
    e: np.ndarray,
    scored_mask: np.ndarray,
    x: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    visible: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest head ``A`` of the scored keys whose SEARCH-SOUND bound is ``<= eps``.

    ``tau(A) <= (sum_{S\\A} e^{s_i} + X) / (sum_S e^{s_i} + X)`` over the prefixes ``A`` of
    the scored keys sorted by score; ``e = exp(logits - shift)`` of the visible keys, ``x``
    the sound (widened) unscored mass ``X``, ``up``/``down`` the per-row factors that cover
    the score rounding.  Fails closed: where no prefix certifies (rounding margins swamp the
    bound) every visible key is kept and counted as scored (exact tail 0).

    Returns
    -------
    (kept, tail_upper, scored)
        ``(m, n)`` bool, ``(m,)`` float64, ``(m,)`` int64.
    """
    m, n = scored_mask.shape
    scored = scored_mask.sum(axis=1)
    key = np.where(scored_mask, logits, -np.inf)
    idx = np.argsort(-key, axis=1, kind="stable")
    es = np.take_along_axis(np.where(scored_mask, e, 0.0), idx, axis=1)
    prefix = np.zeros((m, n + 1))
    np.cumsum(es, axis=1, out=prefix[:, 1:])
    suffix = np.zeros((m, n + 1))
    suffix[:, :-1] = np.cumsum(es[:, ::-1], axis=1)[:, ::-1]  # from the small end
    kk = np.arange(n + 1)[None, :]
    dropped = np.maximum(scored[:, None] - kk, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        num = suffix * up[:, None] + x[:, None] + _PER_TERM * dropped
    bound = ratio_up(num, prefix * down[:, None], np)
    bound = np.where(kk <= scored[:, None], bound, np.inf)
    good = bound <= eps
    k = np.argmax(good, axis=1)
    tail = bound[np.arange(m), k]
    kept_sorted = kk[:, :n] < k[:, None]
    kept = np.zeros((m, n), dtype=bool)
    np.put_along_axis(kept, idx, kept_sorted, axis=1)
    # Fail closed: no certified head among the scored keys (only where rounding margins
    # swamp the bound): score and keep every visible key, whose exact tail is 0.
    closed = ~good[np.arange(m), scored]
    if np.any(closed):
        kept[closed] = visible[closed]
        tail = np.where(closed, 0.0, tail)
        scored = np.where(closed, visible.sum(axis=1), scored)
    return kept, tail, scored


def certified_search(
    queries: Array,
    keys: Array,
    values: Array,
    eps: float,
    *,
    scale: float | None = None,
    mask: Array | None = None,
    causal: bool = False,
    kv_heads: int | list[int] | None = None,
    cells: CellTree | list[CellTree] | None = None,
    seed: int = 0,
    method: str = "ours",
    bits: int | None = None,
    group: int | None = None,
) -> SearchResult:
    """Certified sparse attention that scores few keys (Theorem SEARCH-SOUND).

    Implements Algorithm 2 ("MC-Search") and Thm 7.2 of Tzachristas et al. (THEORY
    section 6; details derived): cells of keys are bounded, revealed best-first, and the
    search stops as soon as the tail bound
    ``(sum_{S\\A} e^{s_i} + sum_{j in R} n_j e^{U_j}) / (sum_S e^{s_i} + sum_{j in R} n_j e^{U_j})``
    certifies ``eps`` for the kept set ``A``; sound for any kept set by the any-set identity
    ``TV(P, P(.|A)) = 1 - P(A)`` (Theorem TV-TAIL).  See the module docstring for the three
    methods and the floating-point margins.

    Parameters
    ----------
    queries : array
        ``(m, d)`` or ``(H, m, d)``.
    keys : array
        ``(n, d)`` or ``(H_kv, n, d)``; with grouped-query attention (``H`` a multiple of
        ``H_kv``) query head ``h`` reads key head ``h // (H / H_kv)``; each head is searched
        on its own.
    values : array
        ``(n, dv)`` or ``(H_kv, n, dv)``.
    eps : float
        Total-variation budget in [0, 1).
    scale : float, optional
        Logit scale, ``1/sqrt(d)`` by default; must be positive.
    mask : array, optional
        Boolean (True = visible) or additive (Hugging Face style: 0, -10000, -inf, any
        finite bias), broadcastable to ``(m, n)`` or ``(H, m, n)``
        (:func:`certattn.masks.normalize_mask`).  A finite bias ``b`` is part of the scores
        ``scale q.k + b``, and every cell and key bound adds it (the largest bias of a
        cell's visible keys).  Masked keys (``False``, ``-inf``, or a finite fill at or
        below half the dtype's most negative number, such as ``finfo(float32).min``) are
        never scored or kept; a ``-inf`` one has probability 0, a filled one keeps its
        exact (positive) mass, which ``tail_upper`` and ``error_bound`` cover from a
        Cauchy-Schwarz bound on its score (the key is not scored).
    causal : bool
        Query ``i`` sees keys ``j <= i + n - m`` (as in :func:`certattn.certify_attention`).
    kv_heads : int or list of int, optional
        Grouped-query attention: key heads count or query-to-key head map (as in
        :func:`certattn.certify_attention`); inferred when the head counts differ.
    cells : CellTree or QuantKeys, or a list of them, optional
        Precomputed partition (one per key head) to reuse; built from ``keys`` otherwise
        (``kmeans_cells`` for "mc", "gap" and "ours", ``cell_tree`` with MC-Search's cells
        on top for "tree", :func:`certattn.quant.quantize_keys` for "quant" and "paged").
    seed : int
        Seed of the k-means partition (the result is deterministic given the seed).
    method : {"ours", "mc", "tree", "gap", "quant", "paged"}
        Ours (MC-Search's schedule with tighter bounds: never costlier than MC-Search),
        the paper's MC-Search, ours hierarchical, the gap-stopped search, per-key
        bounds from low-bit key estimates (Theorem QUANT-SCORE; :func:`search_quant`),
        or those with Quest-style page bounds first.
    bits : {2, 4, 8}, optional
        Code width of the estimates for "quant" and "paged" (default 4).
    group : int, optional
        Keys per quantization group (page) for "quant" and "paged" (default 32; the
        metadata are per channel and group).

    Returns
    -------
    SearchResult
        In the namespace and on the device of ``queries``.
    """
    refuse_lazy("certified_search", queries, keys, values, mask)
    if method not in METHODS:
        raise InputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    quant = METHODS[method]["cells"] == "quant"
    if (bits is not None or group is not None) and not quant:
        raise InputError("bits and group apply to methods 'quant' and 'paged' only")
    bits = check_int_option(bits, name="bits", choices=BITS)
    group = check_int_option(group, name="group")
    eps = check_eps(eps)
    xp, dev = namespace(queries, keys, values, mask)
    q_all = np.asarray(to_numpy(queries), dtype=np.float64)
    v_np = to_numpy(values)
    out_dtype = v_np.dtype if np.dtype(v_np.dtype).kind == "f" else np.float64
    single = q_all.ndim == 2
    if q_all.ndim not in (2, 3):
        raise InputError(f"queries must be (m, d) or (H, m, d), got shape {q_all.shape}")
    k_all = np.asarray(to_numpy(keys), dtype=np.float64)
    v_all = np.asarray(v_np, dtype=np.float64)
    if k_all.ndim not in (2, 3) or v_all.ndim != k_all.ndim:
        raise InputError(
            f"keys and values must both be (n, d) or (H_kv, n, d), got {k_all.shape} "
            f"and {v_all.shape}"
        )
    if k_all.ndim == 2:
        k_all, v_all = k_all[None], v_all[None]
    if single:
        q_all = q_all[None]
    nh, m, d = q_all.shape
    nkv, n, dk = k_all.shape
    if dk != d:
        raise InputError(f"queries have dimension {d} but keys have {dk}")
    if v_all.shape[:2] != (nkv, n):
        raise InputError(f"values must be ({nkv}, {n}, dv) to match keys, got {v_all.shape}")
    if m == 0 or n == 0:
        raise InputError(f"need at least one query and one key, got {m} and {n}")
    mapping = kv_head_map(kv_heads, nh, nkv) or list(range(nh))
    for name, arr in (("queries", q_all), ("keys", k_all), ("values", v_all)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} contain NaN or inf")
    scale = check_scale(scale, d)
    vis_all = np.ones((nh, m, n), dtype=bool)
    bias_all = fill_all = None
    if mask is not None:
        visible, bias, fill = normalize_mask(mask, xp=xp, device=dev, hidden=True)
        mk = to_numpy(visible)
        try:
            vis_all = np.broadcast_to(mk, (m, n) if single else (nh, m, n))
        except ValueError:
            raise InputError(f"mask of shape {mk.shape} does not broadcast to the logits") from None
        vis_all = np.broadcast_to(vis_all, (nh, m, n))
        if bias is not None:
            bias_all = np.broadcast_to(np.asarray(to_numpy(bias), dtype=np.float64), mk.shape)
            bias_all = np.broadcast_to(bias_all, vis_all.shape)
        if fill is not None:
            fill_all = np.broadcast_to(to_numpy(fill), (nh, m, n))
    hid_all = fill_all > -np.inf if fill_all is not None else None
    if causal:
        rows, cols = np.arange(m)[:, None], np.arange(n)[None, :]
        vis_all = vis_all & (cols <= rows + (n - m))[None]
        if hid_all is not None:
            hid_all = hid_all & (cols <= rows + (n - m))[None]
    empty = ~vis_all.any(axis=-1)
    if np.any(empty):
        pos = tuple(int(i) for i in np.argwhere(empty)[0])
        raise InputError(f"query {pos if not single else pos[1]} has every key masked")
    if cells is None:
        trees = [build_cells(method, k_all[j], seed, bits=bits, group=group)
                 for j in range(nkv)]
    else:
        trees = [cells] if isinstance(cells, (CellTree, QuantKeys)) else list(cells)
        want = QuantKeys if quant else CellTree
        if len(trees) != nkv or any(t.n_keys != n or not isinstance(t, want) for t in trees):
            raise InputError(f"cells must hold {nkv} partition(s) of {n} keys "
                             f"({want.__name__} for method {method!r})")
    res: dict[str, list[np.ndarray]] = {
        key: [] for key in ("kept", "scored", "bounded", "tail_upper", "output", "error",
                            "bytes_read")
    }
    for h in range(nh):
        j = mapping[h]
        b = None if bias_all is None else bias_all[h]
        r = search_cells(trees[j], q_all[h], k_all[j], vis_all[h], eps, scale=scale, method=method,
                         bias=b)
        bv = _visible_bias(b, vis_all[h])
        logits = _logits(q_all[h], k_all[j], scale, bv, vis_all[h])
        out, err = _output_and_error(logits, vis_all[h], r["kept"], r["tail_upper"], v_all[j],
                                     out_dtype)
        # the output is attention under the computed logits: add its distance to the exact
        err = _exact_score_error(err, q_all[h], k_all[j], scale, logits, vis_all[h], bv,
                                 v_all[j])
        if hid_all is not None:  # keys hidden by a finite fill keep their exact mass
            r["tail_upper"], err = _add_hidden(
                fill_all[h], hid_all[h], vis_all[h], np.where(r["kept"], logits, -np.inf),
                q_all[h], k_all[j], v_all[j], scale, r["tail_upper"], err)
        for key in ("kept", "scored", "bounded", "tail_upper", "bytes_read"):
            res[key].append(r[key])
        res["output"].append(out)
        res["error"].append(err)
    arrays = {key: np.stack(val) for key, val in res.items()}
    arrays["n_valid"] = vis_all.sum(axis=-1).astype(np.int64)
    arrays["bytes_dense"] = arrays["n_valid"] * (2.0 * d)
    if single:
        arrays = {key: val[0] for key, val in arrays.items()}
    conv = {
        key: from_numpy(np.ascontiguousarray(val), xp=xp, device=dev) for key, val in arrays.items()
    }
    return SearchResult(
        kept=conv["kept"],
        scored=conv["scored"],
        bounded=conv["bounded"],
        tail_upper=conv["tail_upper"],
        output=conv["output"],
        error_bound=conv["error"],
        n_valid=conv["n_valid"],
        eps=eps,
        method=method,
        bytes_read=conv["bytes_read"],
        bytes_dense=conv["bytes_dense"],
    )


def _add_hidden(
    fill: np.ndarray, hidden: np.ndarray, visible: np.ndarray, kept_logits: np.ndarray,
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
    tail: np.ndarray, err: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Tail and error bounds widened by the exact mass of the keys a finite fill hides
    (:func:`certattn.masks.hidden_mass`), reading no unscored key: the largest *kept*
    logit stands for ``M`` (``Z >= e^M`` still holds) and a hidden key's score is bounded
    by Cauchy-Schwarz, ``scale q.k_j <= scale |q| |k_j|`` (computed within
    ``(2 d + 10) u scale |q| max_j |k_j|``: inside twice the margin
    :func:`certattn._fp.score_abs_margin`, which :func:`certattn.masks.hidden_mass` allows)."""
    import array_api_compat.numpy as xnp

    kn = scaled_norm(keys, xnp)
    with np.errstate(over="ignore"):
        cs = scale * scaled_norm(queries, xnp)[:, None] * kn[None]
    margin = score_abs_margin(queries, keys, scale, xnp, key_norms=kn)
    h = hidden_mass(cs, fill, hidden, kept_logits, margin, xnp)
    return hidden_tail(tail, h, xnp), hidden_error(err, h, hidden, visible, values, xnp)


def _exact_score_error(
    err: np.ndarray, queries: np.ndarray, keys: np.ndarray, scale: float, logits: np.ndarray,
    visible: np.ndarray, bias: np.ndarray | None, values: np.ndarray,
) -> np.ndarray:
    """``err`` plus the distance between attention under the exact and the computed logits
    (:func:`certattn._fp.slack_error` of the rows' :func:`certattn._fp.score_slack`)."""
    import array_api_compat.numpy as xnp

    margin = score_abs_margin(queries, keys, scale, xnp)
    return slack_error(err, score_slack(margin, logits, visible, bias, xnp), values, visible, xnp)


def _output_and_error(
    logits: np.ndarray,
    visible: np.ndarray,
    kept: np.ndarray,
    tail: np.ndarray,
    values: np.ndarray,
    out_dtype: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Truncated attention over the kept keys and a sound bound on its error.

    The library's output-error engine (:func:`certattn.output.sound_output_bounds`) with
    ``full_softmax=False``: it reads the logits of the kept (scored) keys only and the
    values, never an unscored score (Theorems OUT-HEAD-TAIL, OUT-BOUNDED, OUT-DIAMETER).
    The rounding of the cast to the output dtype is added.
    """
    import array_api_compat.numpy as xnp

    x = shift_rows(np.where(kept, logits, -np.inf), xnp)
    r = sound_output_bounds(x, values, visible, kept, tail, xnp, full_softmax=False)
    stack = np.stack([r["bounded"], r["tail_head"]], axis=-1)
    out = r["attn_k"]
    out_cast = out.astype(out_dtype)
    cast = np.linalg.norm(out_cast.astype(np.float64) - out, axis=1)
    err = np.min(stack, axis=-1) + r["mu_err"] + cast
    return out_cast, err * (1 + 8 * _U)
