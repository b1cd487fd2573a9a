"""Key cells and sound bounds on every score inside a cell (Theorem BLOCK-SCORE).

A *cell* is a set of keys summarised by a ball (centre ``c``, radius ``r`` with
``|k - c| <= r`` for every key ``k`` of the cell) and a box (per-channel minimum
``kmin`` and maximum ``kmax``).  For a query ``q`` and a scale ``scale > 0`` every score
``s = scale * q.k`` of a key of the cell satisfies

* ball (Cauchy-Schwarz):  ``s <= scale * (q.c + |q| r)``, ``s >= scale * (q.c - |q| r)``,
  attained by ``k = c +- r q/|q|``;
* box (as in Quest):      ``s <= scale * sum_j max(q_j kmin_j, q_j kmax_j)``,
  ``s >= scale * sum_j min(q_j kmin_j, q_j kmax_j)``, attained at a corner;
* intersection: the minimum (maximum) of the two upper (lower) bounds, since every key
  lies in both the ball and the box.

These are the per-block bounds ``u_b`` and ``l_b`` of the blockwise tail bound
(THEORY section 3) and the cell bounds ``U_j`` of certified search (THEORY section 6,
Algorithm 2 "MC-Search" of Tzachristas et al.).

Floating point.  Every bound here is a claim about the exact real number
``scale * q.k`` of the given (binary floating-point) ``q`` and ``k``.  The bounds are
computed in float64 and moved outward by the margin

``delta = (2 d + 8) u * scale * (|q| |c| + |q| r)``    (ball),
``delta = (2 d + 8) u * scale * sum_j |q_j| max(|kmin_j|, |kmax_j|)``   (box),

plus the smallest normal float64, ``u`` the unit roundoff (:data:`certattn._fp.U`).
A float64 dot product of length ``d``
errs by at most ``gamma_d sum_j |q_j c_j| <= gamma_d |q||c|`` (``gamma_d = d u / (1 - d u)``);
the norms, the product by ``r`` and by ``scale`` add a few ``u`` relative each, so the
factor ``2 d + 8`` leaves a factor two of slack.  Radii are computed from the keys in
float64 and enlarged by ``(2 d + 8) u`` relative for the same reason, so that
``|k - c| <= r`` holds exactly.

The partition itself (k-means, flat or hierarchical) only affects how tight the bounds
are, never their soundness: every cell's ball and box are recomputed from the keys that
were actually assigned to it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import namespace, to_numpy
from ._fp import NORMAL_MIN, scaled_norm, score_margin
from ._fp import U as _U
from ._validate import InputError
from ._validate import check_scale as _check_scale

__all__ = [
    "CellTree",
    "ball_box_score_upper",
    "ball_score_lower",
    "ball_score_upper",
    "bennett_log_mass",
    "box_score_lower",
    "box_score_upper",
    "cell_tree",
    "kmeans_cells",
    "score_bound_margin",
]

Array = Any

_TINY = NORMAL_MIN
score_bound_margin = score_margin  # the error model's (2 d + 8) u, under its public name here


def _quiet() -> Any:
    """Overflow in a score bound is expected at the float range's edges (see _closed)."""
    return np.errstate(over="ignore", invalid="ignore")


def _closed(xp: Any, bound: Array, *, upper: bool) -> Array:
    """Fail closed: a bound that became NaN (``inf - inf``) is the trivial ``+-inf``;
    an overflow already gives ``+inf`` (upper) or ``-inf`` (lower), which are sound."""
    trivial = xp.full_like(bound, xp.inf if upper else -xp.inf)
    return xp.where(xp.isnan(bound), trivial, bound)


def _f64(x: Array, xp: Any, dev: Any) -> Array:
    return xp.asarray(x, dtype=xp.float64, device=dev)


def _ball_parts(q: Array, centre: Array, radius: Array) -> tuple[Any, Array, Array, Array]:
    xp, dev = namespace(q, centre, radius)
    q = _f64(q, xp, dev)
    c = _f64(centre, xp, dev)
    r = _f64(radius, xp, dev)
    dot = xp.matmul(q, xp.matrix_transpose(c))
    qn = scaled_norm(q, xp)[..., None]  # |q| < 1e-154 must not underflow to 0
    cn = scaled_norm(c, xp)
    spread = qn * r
    margin = score_bound_margin(q.shape[-1]) * (qn * cn + spread)
    return xp, dot, spread, margin


def ball_score_upper(
    q: Array, centre: Array, radius: Array, *, scale: float | None = None
) -> Array:
    r"""Sound upper bound on the scores of a ball of keys (Theorem BLOCK-SCORE, ball).

    :math:`U = \mathrm{scale}\,(q\cdot c + |q|\,r) + \delta \ge \mathrm{scale}\, q\cdot k`
    for every ``k`` with ``|k - c| <= r`` (Cauchy-Schwarz; equality at
    ``k = c + r q/|q|``); ``delta`` is the rounding margin of the module docstring.

    Parameters
    ----------
    q : array
        ``(..., m, d)`` queries.
    centre : array
        ``(C, d)`` cell centres.
    radius : array
        ``(C,)`` cell radii (sound: ``|k - c| <= r`` exactly).
    scale : float
        Positive logit scale (usually ``1/sqrt(d)``).

    Returns
    -------
    array
        ``(..., m, C)`` float64 upper bounds, in the namespace and on the device of ``q``.
    """
    scale = _check_scale(scale, q.shape[-1])
    with _quiet():
        xp, dot, spread, margin = _ball_parts(q, centre, radius)
        return _closed(xp, (dot + spread) * scale + (margin * scale + _TINY), upper=True)


def ball_score_lower(
    q: Array, centre: Array, radius: Array, *, scale: float | None = None
) -> Array:
    r"""Sound lower bound :math:`\mathrm{scale}\,(q\cdot c - |q|\,r) - \delta` (BLOCK-SCORE).

    Same parameters and shapes as :func:`ball_score_upper`.
    """
    scale = _check_scale(scale, q.shape[-1])
    with _quiet():
        xp, dot, spread, margin = _ball_parts(q, centre, radius)
        return _closed(xp, (dot - spread) * scale - (margin * scale + _TINY), upper=False)


def _box_parts(q: Array, kmin: Array, kmax: Array) -> tuple[Any, Array, Array, Array]:
    xp, dev = namespace(q, kmin, kmax)
    q = _f64(q, xp, dev)
    lo = xp.matrix_transpose(_f64(kmin, xp, dev))
    hi = xp.matrix_transpose(_f64(kmax, xp, dev))
    zero = xp.zeros((), dtype=xp.float64, device=dev)
    qp = xp.maximum(q, zero)
    qm = xp.minimum(q, zero)
    upper = xp.matmul(qp, hi) + xp.matmul(qm, lo)
    lower = xp.matmul(qp, lo) + xp.matmul(qm, hi)
    big = xp.maximum(xp.abs(lo), xp.abs(hi))
    margin = score_bound_margin(q.shape[-1]) * xp.matmul(xp.abs(q), big)
    return xp, upper, lower, margin


def box_score_upper(
    q: Array, kmin: Array, kmax: Array, *, scale: float | None = None
) -> Array:
    r"""Sound upper bound on the scores of a box of keys (Theorem BLOCK-SCORE, box).

    :math:`U = \mathrm{scale}\sum_j \max(q_j k^{min}_j, q_j k^{max}_j) + \delta`
    (as in Quest), attained at a corner of the box; computed as
    ``q+ . kmax + q- . kmin`` with ``q+ = max(q, 0)``, ``q- = min(q, 0)``.

    Parameters
    ----------
    q : array
        ``(..., m, d)`` queries.
    kmin, kmax : array
        ``(C, d)`` per-channel minimum and maximum of each cell's keys.
    scale : float, optional
        Positive logit scale, default ``1/sqrt(d)`` (as everywhere in certattn).

    Returns
    -------
    array
        ``(..., m, C)`` float64 upper bounds.
    """
    scale = _check_scale(scale, q.shape[-1])
    with _quiet():
        xp, upper, _, margin = _box_parts(q, kmin, kmax)
        return _closed(xp, upper * scale + (margin * scale + _TINY), upper=True)


def box_score_lower(
    q: Array, kmin: Array, kmax: Array, *, scale: float | None = None
) -> Array:
    r"""Sound lower bound :math:`\mathrm{scale}\sum_j \min(q_j k^{min}_j, q_j k^{max}_j) - \delta`.

    Same parameters and shapes as :func:`box_score_upper` (Theorem BLOCK-SCORE).
    """
    scale = _check_scale(scale, q.shape[-1])
    with _quiet():
        xp, _, lower, margin = _box_parts(q, kmin, kmax)
        return _closed(xp, lower * scale - (margin * scale + _TINY), upper=False)


def ball_box_score_upper(
    q: Array, centre: Array, radius: Array, kmin: Array, kmax: Array, *,
    scale: float | None = None,
) -> Array:
    """Upper bound over the intersection of the ball and the box (Theorem BLOCK-SCORE).

    Every key of the cell lies in both, so ``min(ball, box)`` bounds its score; it is
    never looser than either bound alone.

    Returns
    -------
    array
        ``(..., m, C)`` float64.
    """
    xp, _ = namespace(q, centre, radius, kmin, kmax)
    return xp.minimum(
        ball_score_upper(q, centre, radius, scale=scale),
        box_score_upper(q, kmin, kmax, scale=scale),
    )


# --------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CellTree:
    """A hierarchy of key cells (a flat partition is a tree of depth one).

    Keys are permuted by ``order`` so that every node covers a contiguous range
    ``order[start[v]:stop[v]]``.  Node 0 is the root (all keys).  The *children* of a
    node are its sub-cells (nodes with ``parent == v``) and its *direct keys*
    (``key_parent == v``): expanding a node bounds the former and scores the latter.
    Nodes are stored parents-first (breadth-first order).

    Attributes
    ----------
    order : numpy.ndarray
        ``(n,)`` permutation of the key indices.
    start, stop : numpy.ndarray
        ``(N,)`` range of each node in ``order``.
    parent : numpy.ndarray
        ``(N,)`` parent node (-1 for the root).
    depth : numpy.ndarray
        ``(N,)`` depth (0 for the root).
    key_parent : numpy.ndarray
        ``(n,)`` the node each key is a direct child of.
    centre : numpy.ndarray
        ``(N, d)`` float64 ball centres (the mean of the cell's keys).
    radius : numpy.ndarray
        ``(N,)`` float64 radii, ``|k - centre| <= radius`` exactly for every key of the node.
    kmin, kmax : numpy.ndarray
        ``(N, d)`` float64 per-channel minimum and maximum of the node's keys (exact).
    moment : numpy.ndarray
        ``(N,)`` float64, a sound upper bound on the largest eigenvalue of the node's
        second-moment matrix about its centre, ``(1/n_v) sum (k - c)(k - c)^T``.
    mean_err : numpy.ndarray
        ``(N,)`` float64, a sound bound on ``|mean of the node's keys - centre|`` (rounding).
    """

    order: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    key_parent: np.ndarray
    centre: np.ndarray
    radius: np.ndarray
    kmin: np.ndarray
    kmax: np.ndarray
    moment: np.ndarray
    mean_err: np.ndarray

    @property
    def n_keys(self) -> int:
        """Number of keys ``n``."""
        return int(self.order.shape[0])

    @property
    def n_nodes(self) -> int:
        """Number of nodes ``N`` (root included)."""
        return int(self.start.shape[0])

    @property
    def size(self) -> np.ndarray:
        """``(N,)`` number of keys under each node."""
        return self.stop - self.start

    def score_upper(self, q: Array, *, scale: float | None = None, kind: str = "ball") -> Array:
        """Upper bounds ``(..., m, N)`` on every score in every node (BLOCK-SCORE).

        Parameters
        ----------
        q : array
            ``(..., m, d)`` queries.
        scale : float
            Positive logit scale.
        kind : {"ball", "box", "both"}
            Ball (MC-Search), box (Quest) or their intersection.
        """
        xp, dev = namespace(q)
        c = _host_to(self.centre, xp, dev)
        if kind == "ball":
            return ball_score_upper(q, c, _host_to(self.radius, xp, dev), scale=scale)
        lo, hi = _host_to(self.kmin, xp, dev), _host_to(self.kmax, xp, dev)
        if kind == "box":
            return box_score_upper(q, lo, hi, scale=scale)
        if kind == "both":
            r = _host_to(self.radius, xp, dev)
            return ball_box_score_upper(q, c, r, lo, hi, scale=scale)
        raise InputError(f"kind must be 'ball', 'box' or 'both', got {kind!r}")

    def log_mass_upper(self, q: Array, upper: Array, *, scale: float | None = None) -> np.ndarray:
        """Log of a sound upper bound on ``sum_{k in node} exp(scale q.k)`` (BLOCK-MASS).

        Uses the node's mean score (``scale q.c``, up to ``mean_err``), its score variance
        (at most ``scale^2 |q|^2 moment``) and a score upper bound ``upper`` (e.g. the
        clamped ball-and-box bound) in :func:`bennett_log_mass`.

        Parameters
        ----------
        q : array
            ``(m, d)`` queries (host; converted to float64 NumPy).
        upper : array
            ``(m, N)`` sound upper bounds on every score of every node.
        scale : float
            Positive logit scale.

        Returns
        -------
        numpy.ndarray
            ``(m, N)`` float64.
        """
        scale = _check_scale(scale, q.shape[-1])
        q = np.asarray(to_numpy(q), dtype=np.float64)
        d = q.shape[-1]
        qn = np.linalg.norm(q, axis=-1)[:, None]
        cn = np.linalg.norm(self.centre, axis=-1)[None, :]
        mean = (q @ self.centre.T) * scale
        err = (score_bound_margin(d) * qn * cn + qn * self.mean_err[None, :]) * scale + _TINY
        var = (scale * qn) ** 2 * self.moment[None, :] * (1.0 + score_bound_margin(d))
        return bennett_log_mass(
            mean - err,
            mean + err,
            np.asarray(to_numpy(upper), dtype=np.float64),
            var,
            self.size[None, :],
        )


def bennett_log_mass(
    mean_low: np.ndarray,
    mean_up: np.ndarray,
    upper: np.ndarray,
    var: np.ndarray,
    size: np.ndarray,
) -> np.ndarray:
    r"""Log of a sound upper bound on ``sum_i exp(s_i)`` over a cell (Theorem BLOCK-MASS).

    If the ``n`` scores satisfy ``s_i <= U``, have mean ``mu`` in ``[mean_low, mean_up]``
    and variance at most ``v``, then with ``b = U - mean_low`` (Bennett's inequality for
    ``Y = s - mu <= b``, ``E Y = 0``, ``E Y^2 <= v``):

    .. math:: \sum_i e^{s_i} = n e^{\mu} E e^{Y}
              \le n\, e^{\text{mean\_up}}\, \frac{v e^{b} + b^2 e^{-v/b}}{v + b^2},

    attained by two-level scores (at ``mu + b`` and ``mu - v/b``).  The proof: the
    quadratic ``p`` through ``(a, e^a)`` tangent there and through ``(b, e^b)``,
    ``a = -v/b``, majorises ``e^y`` on ``(-inf, b]`` (``p - e^y`` has a double zero at
    ``a``, a zero at ``b`` and third derivative ``-e^y < 0``), has a non-negative
    ``y^2`` coefficient, and ``E p(Y) <= p``'s two-point average (``proofs/search.py``).
    The result is also capped by the trivial ``n e^U``.  A relative margin of
    ``16 u (|mean_up| + b + v/b + log n + 1)`` covers the rounding of the float64
    evaluation (done in the log domain).

    Parameters
    ----------
    mean_low, mean_up, upper, var, size : numpy.ndarray
        Broadcastable float64 arrays (``size`` = number of scores ``n >= 1``).

    Returns
    -------
    numpy.ndarray
        ``log`` of the bound.
    """
    b = np.maximum(upper - mean_low, 0.0)
    v = np.maximum(var, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        vb = np.where(b > 0, v / b, 0.0)
        log_b2 = 2.0 * np.log(b)
        num = np.logaddexp(np.log(v) + b, log_b2 - vb)
        log_ratio = num - np.logaddexp(np.log(v), log_b2)
    log_ratio = np.where((b > 0) & np.isfinite(log_ratio), log_ratio, np.where(b > 0, b, 0.0))
    log_n = np.log(np.maximum(size, 1))
    bound = log_n + mean_up + np.minimum(log_ratio, b)
    slack = 16.0 * _U * (np.abs(mean_up) + b + vb + log_n + 1.0)
    return np.minimum(bound + slack, log_n + upper + slack)


def _host_to(a: np.ndarray, xp: Any, dev: Any) -> Array:
    from ._array import from_numpy

    return from_numpy(a, xp=xp, device=dev)


def _check_keys(keys: Any) -> np.ndarray:
    k = np.asarray(to_numpy(keys), dtype=np.float64)
    if k.ndim != 2 or k.shape[0] == 0 or k.shape[1] == 0:
        raise InputError(f"keys must be a non-empty (n, d) array, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        bad = np.argwhere(~np.isfinite(k))[0]
        raise InputError(f"keys contain a non-finite value at key {bad[0]}, channel {bad[1]}")
    return k


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels (scipy ``kmeans2``, k-means++ start, fixed seed), empty clusters dropped.

    Keys are rescaled by their largest magnitude first so that squared distances
    cannot overflow; labels are renumbered ``0..C-1`` in order of first appearance.
    """
    n = x.shape[0]
    k = max(1, min(int(k), n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    amax = float(np.max(np.abs(x)))
    xs = x / amax if amax > 0 else x
    uniq = np.unique(xs, axis=0)
    if uniq.shape[0] <= k:  # few distinct keys: group equal keys exactly
        _, labels = np.unique(xs, axis=0, return_inverse=True)
        labels = labels.reshape(-1)
    else:
        from scipy.cluster.vq import kmeans2

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, labels = kmeans2(xs, k, minit="++", seed=np.random.default_rng(seed))
    _, first = np.unique(labels, return_index=True)
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    remap[labels[np.sort(first)]] = np.arange(first.size)
    return remap[labels]


def _cell_geometry(keys: np.ndarray) -> tuple[Any, ...]:
    """Centre (mean), sound radius, box, second-moment eigenvalue and mean error of a cell.

    Margins: the radius is enlarged by ``(2 d + 8) u`` relative; the largest eigenvalue of
    ``M = (1/n) sum (k - c)(k - c)^T`` (``eigvalsh`` of the smaller Gram matrix, backward
    stable) by ``1e-8`` relative plus ``4 (n + d + 10) u r^2`` absolute (every entry of
    ``M`` is at most ``r^2``), and capped by ``r^2 >= trace M >= lambda_max``; the centre
    (a float64 mean) is within ``2 (n + 4) u sqrt(d) max|k_ij|`` of the exact mean.
    """
    nk, d = keys.shape
    centre = keys.mean(axis=0)
    if not np.all(np.isfinite(centre)):
        centre = keys[0].copy()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        diff = keys - centre
        dist = np.sqrt(np.sum(diff**2, axis=1))
        radius = float(dist.max()) * (1.0 + score_bound_margin(d)) + _TINY
        if not math.isfinite(radius) or not math.isfinite(radius * radius):
            raise InputError("keys are too large: a cell radius overflows float64")
    if nk <= 1:
        lam = 0.0
    elif nk < d:  # largest eigenvalue of the smaller Gram matrix (same nonzero spectrum)
        lam = float(np.linalg.eigvalsh(diff @ diff.T)[-1]) / nk
    else:
        lam = float(np.linalg.eigvalsh(diff.T @ diff)[-1]) / nk
    r2 = radius * radius
    lam = min(lam * (1.0 + 1e-8) + 4.0 * (nk + d + 10) * _U * r2, r2 * (1.0 + 4 * _U))
    mean_err = 2.0 * (nk + 4) * _U * math.sqrt(d) * float(np.max(np.abs(keys))) + _TINY
    return centre, radius, keys.min(axis=0), keys.max(axis=0), lam, mean_err


def _build(keys: np.ndarray, groups: list[tuple[int, list[Any]]]) -> CellTree:
    """Assemble a :class:`CellTree` from a nested grouping (see :func:`cell_tree`)."""
    order: list[int] = []
    key_parent = np.zeros(keys.shape[0], dtype=np.int64)
    # Nodes are numbered breadth-first (parents first); keys are laid out depth-first so
    # that every node's keys are contiguous.
    nodes: list[dict[str, Any]] = []

    def collect(members: np.ndarray, sub: list[Any], par: int, dep: int) -> None:
        nodes.append({"members": members, "sub": sub, "parent": par, "depth": dep})

    collect(np.arange(keys.shape[0]), groups, -1, 0)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        for members, sub in node["sub"]:
            collect(np.asarray(members), sub, i, node["depth"] + 1)
        i += 1
    children: list[list[int]] = [[] for _ in nodes]
    for v, node in enumerate(nodes):
        if node["parent"] >= 0:
            children[node["parent"]].append(v)
    start = [0] * len(nodes)
    stop = [0] * len(nodes)

    # lay keys out depth-first (iteratively): a node's direct keys, then its sub-cells
    stack: list[tuple[int, bool]] = [(0, False)]
    while stack:
        v, done = stack.pop()
        if done:
            stop[v] = len(order)
            continue
        start[v] = len(order)
        covered: set[int] = set()
        for c in children[v]:
            covered.update(int(j) for j in nodes[c]["members"])
        direct = [int(j) for j in nodes[v]["members"] if int(j) not in covered]
        for j in direct:
            key_parent[j] = v
        order.extend(direct)
        stack.append((v, True))
        stack.extend((c, False) for c in reversed(children[v]))
    parent = [node["parent"] for node in nodes]
    depth = [node["depth"] for node in nodes]
    order_a = np.asarray(order, dtype=np.int64)
    geo = [_cell_geometry(keys[order_a[start[v] : stop[v]]]) for v in range(len(nodes))]
    return CellTree(
        order=order_a,
        start=np.asarray(start, dtype=np.int64),
        stop=np.asarray(stop, dtype=np.int64),
        parent=np.asarray(parent, dtype=np.int64),
        depth=np.asarray(depth, dtype=np.int64),
        key_parent=key_parent,
        centre=np.stack([g[0] for g in geo]),
        radius=np.asarray([g[1] for g in geo], dtype=np.float64),
        kmin=np.stack([g[2] for g in geo]),
        kmax=np.stack([g[3] for g in geo]),
        moment=np.asarray([g[4] for g in geo], dtype=np.float64),
        mean_err=np.asarray([g[5] for g in geo], dtype=np.float64),
    )


def _scatter(x: np.ndarray) -> float:
    """k-means scatter ``sum |x_i - mean|^2`` (``inf`` when it overflows float64)."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge keys are refused later
        return float(np.sum((x - x.mean(axis=0)) ** 2))


def kmeans_cells(keys: Array, n_cells: int | None = None, *, seed: int = 0) -> CellTree:
    """Flat k-means partition of the keys into ball/box cells (MC-Search's cells).

    This is the partition of Algorithm 2 ("MC-Search") of Tzachristas et al.: k-means
    (``scipy.cluster.vq.kmeans2``, k-means++ start, ``numpy.random.default_rng(seed)``)
    with ``ceil(sqrt(n))`` cells by default.  Every cell, including one-key cells, is a
    node (a child of the root); the keys are the cells' direct keys.

    Parameters
    ----------
    keys : array
        ``(n, d)`` keys (any namespace; the partition is computed on the host in float64).
    n_cells : int, optional
        Number of k-means clusters (empty clusters are dropped); ``ceil(sqrt(n))`` if None.
    seed : int
        Seed of the k-means start.

    Returns
    -------
    CellTree
    """
    k = _check_keys(keys)
    n = k.shape[0]
    c = math.ceil(math.sqrt(n)) if n_cells is None else int(n_cells)
    if c < 1:
        raise InputError(f"n_cells must be >= 1, got {c}")
    labels = _kmeans_labels(k, c, seed)
    groups = [(np.flatnonzero(labels == j), []) for j in range(int(labels.max()) + 1)]
    return _build(k, groups)


def cell_tree(
    keys: Array,
    *,
    branching: int = 4,
    leaf_size: int = 8,
    seed: int = 0,
    top_cells: int | None = None,
    max_scatter: float = 1.0,
) -> CellTree:
    """Hierarchical k-means partition: cells split recursively until they are small.

    The root's keys are clustered into ``branching`` k-means cells (or, with
    ``top_cells``, into exactly the cells of :func:`kmeans_cells` with that many clusters
    and the same seed, one-key cells included); every cell with more than ``leaf_size``
    keys is split again into ``branching`` cells.  Below the top level, one-key clusters
    are not made into cells (bounding one key costs as much as scoring it): they become
    direct keys of the parent.  Leaves' keys are their direct keys.

    Parameters
    ----------
    keys : array
        ``(n, d)`` keys.
    branching : int
        Clusters per split (>= 2).
    leaf_size : int
        Largest cell that is not split further (>= 1).
    seed : int
        Seed of every k-means start (each split derives its own stream from it).
    top_cells : int, optional
        Use MC-Search's flat partition (``kmeans_cells(keys, top_cells, seed=seed)``) as
        the top level.
    max_scatter : float
        Adaptive cells: a cell is split only if its sub-cells keep at most this fraction
        of its k-means scatter ``sum |k - mean|^2`` (one-key clusters count as zero);
        otherwise it stays a leaf.  Splitting diffuse cells only adds bounds that are no
        tighter.

    Returns
    -------
    CellTree
    """
    k = _check_keys(keys)
    if branching < 2 or leaf_size < 1:
        raise InputError("branching must be >= 2 and leaf_size >= 1")
    rng_counter = [0]

    def split(members: np.ndarray) -> list[tuple[np.ndarray, list[Any]]]:
        rng_counter[0] += 1
        labels = _kmeans_labels(k[members], branching, seed * 1_000_003 + rng_counter[0])
        if int(labels.max()) == 0:  # k-means could not split (equal keys): halve
            labels = (np.arange(members.size) >= members.size // 2).astype(np.int64)
        subs = [members[labels == j] for j in range(int(labels.max()) + 1)]
        subs = [sub for sub in subs if sub.size > 1]  # one-key clusters stay direct keys
        if max_scatter < 1.0 and _scatter(k[members]) > 0:
            kept = sum(_scatter(k[sub]) for sub in subs)
            if kept > max_scatter * _scatter(k[members]):
                return []
        return [(sub, split(sub) if sub.size > leaf_size else []) for sub in subs]

    allk = np.arange(k.shape[0])
    if top_cells is not None:
        labels = _kmeans_labels(k, int(top_cells), seed)
        groups = []
        for j in range(int(labels.max()) + 1):
            sub = allk[labels == j]
            groups.append((sub, split(sub) if sub.size > leaf_size else []))
        return _build(k, groups)
    return _build(k, split(allk) if k.shape[0] > leaf_size else [])
