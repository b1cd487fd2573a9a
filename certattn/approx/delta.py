r"""Delta Attention (Willette, Lee, Hwang, NeurIPS 2025) with a sound per-row error bound.

Definition (``delta_attention/llama.py`` of the authors' code; ``docs/APPROXIMATIONS.md``
section 4, with the paper and code references).
Per head, prompt length :math:`s` (the query rows), :math:`S` = the sparse base output of
every row, :math:`D` = exact attention of selected rows:

.. math::
    \mathrm{cut} = (s \bmod \gamma) + \max(128, \gamma),\qquad s_p = s - \mathrm{cut},

dense rows :math:`0, \gamma, 2\gamma, \dots < s_p` (the anchors) and every row
:math:`\ge s_p`; for :math:`i < s_p`, :math:`a = \gamma\lfloor i/\gamma\rfloor`,

.. math:: O_i = S_i + (D_a - S_a),

the correction added unchanged to the :math:`\gamma` rows of its block; :math:`O_i = D_i` on
dense rows.  ``min_tail`` generalises the constant 128 (published value 128).

Error (Theorem DELTA-ERROR).  With :math:`H_i` the kept set of row :math:`i`, :math:`T_i` the
rest, :math:`\tau_i = P_i(T_i)` and :math:`\mu_{H,i}, \mu_{T,i}` the head and tail means,
Theorem OUT-HEAD-TAIL gives :math:`S_i = \mathrm{Attn}(q_i) - \tau_i(\mu_{T,i} - \mu_{H,i})`,
so with :math:`D_a = \mathrm{Attn}(q_a)`

.. math::
    O_i - \mathrm{Attn}(q_i) = \tau_a(\mu_{T,a} - \mu_{H,a}) - \tau_i(\mu_{T,i} - \mu_{H,i}),
    \qquad |O_i - \mathrm{Attn}(q_i)| \le \tau_a \max_{j\in T_a}|v_j - \mu_{H,a}|
    + \tau_i \max_{j\in T_i}|v_j - \mu_{H,i}| \le \tau_a\,\mathrm{diam}_a + \tau_i\,\mathrm{diam}_i.

Sound version (what :attr:`ApproxResult.error_bound` holds).  For the *computed* arrays,
:math:`O_i - \mathrm{Attn}_i = (S_i - \mathrm{Attn}_i) - (S_a - \mathrm{Attn}_a)
+ (D_a - \mathrm{Attn}_a) + r_i` exactly, where :math:`r_i` is the rounding of forming
:math:`O_i`.  Each :math:`|S_j - \mathrm{Attn}_j|` is bounded by the house's output-error
engine (:func:`certattn.output.sound_output_bounds`: the minimum of the tail-to-head bound
:math:`\bar\tau_j(\max_{T_j}|v - S_j| + \delta_j)`, :math:`2C\bar\tau_j` and the variance
bound, plus the rounding :math:`\delta_j` of the computed :math:`S_j`), the dense row's
:math:`|D_a - \mathrm{Attn}_a|` by its rounding :math:`\delta_a` (kept set = every visible
key, :math:`\tau = 0`), and two float64 operations per coordinate give
:math:`|r_i| \le 2u(|D_a - S_a| + |O_i|)` (norms rounded up by :math:`(d_v + 8)u`).  The sum
is rounded up.

Certificate-triggered variant (``budget``): rows whose bound exceeds ``budget`` are made
dense as well (:math:`O_i = D_i`, error = its rounding), so every row's bound is at most
``budget`` wherever the dense rounding is.

Cost (key-equivalents per row): the base's cost on every row that uses :math:`S`
(rows :math:`< s_p`), plus every visible key on each dense row (anchors pay for their
:math:`D_a` once; rows :math:`\ge s_p` pay only the dense row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._fp import SMALLEST, U, add_up, scaled_norm, score_abs_margin, score_slack, slack_error
from .._validate import InputError, first_bad_position
from ..attention import CHUNK_ELEMS, _hidden_part, _prepare
from ..kept import shift_rows
from ..masks import hidden_error
from ..output import sound_output_bounds
from ..policies import WindowSinks
from ._result import ApproxResult
from .selection import default_sinks, default_window, run_policy

__all__ = ["delta_correct", "delta_rows", "dense_rows"]

Array = Any


def delta_rows(s: int, gamma: int = 64, min_tail: int = 128) -> tuple[int, np.ndarray, np.ndarray]:
    r"""Delta's row plan: ``(s_p, anchor, dense)`` for a prompt of ``s`` rows.

    ``cut = (s mod gamma) + max(min_tail, gamma)``, ``s_p = max(s - cut, 0)``;
    ``anchor[i] = gamma floor(i / gamma)`` for ``i < s_p`` and ``i`` otherwise; ``dense`` is
    the sorted row indices computed exactly: the anchors below ``s_p`` and every row
    ``>= s_p``.
    """
    for name, val, low in (("s", s, 1), ("gamma", gamma, 1), ("min_tail", min_tail, 0)):
        if isinstance(val, bool) or int(val) != val or val < low:
            raise InputError(f"{name} must be an integer >= {low}, got {val!r}")
    s, gamma, min_tail = int(s), int(gamma), int(min_tail)
    cut = (s % gamma) + max(min_tail, gamma)
    s_p = max(s - cut, 0)
    rows = np.arange(s)
    anchor = np.where(rows < s_p, gamma * (rows // gamma), rows)
    dense = np.flatnonzero((rows >= s_p) | (rows % gamma == 0))
    return s_p, anchor, dense


def dense_rows(
    pr: Any, rows: Array, chunk_elems: int = CHUNK_ELEMS
) -> tuple[Array, Array, Array]:
    """Exact attention of the query ``rows`` (float64), its rounding bound, visible keys.

    ``pr`` is the house's prepared input (:func:`certattn.attention._prepare`): the causal
    alignment and the masks follow the *original* row indices.  Returns ``(D, delta, nv)``
    with shapes ``(..., r, dv)``, ``(..., r)``, ``(..., r)``: the kept set is every visible
    key (:math:`\\tau = 0`), so the engine's bound is its rounding ``mu_err`` alone, plus
    the mass of keys hidden by a finite fill (:func:`certattn.masks.hidden_error`) and the
    score slack.  The rows are computed in chunks of about ``chunk_elems`` scores (the row
    sizing of :func:`certattn.attention._chunks`); every row's result is independent of the
    chunking.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lead = math.prod(np.broadcast_shapes(pr.q.shape[:-2], pr.k.shape[:-2]))
    step = max(1, int(chunk_elems) // max(1, lead * int(pr.k.shape[-2]) * 4))
    parts = [_dense_chunk(pr, rows[i:i + step]) for i in range(0, max(rows.size, 1), step)]
    if len(parts) == 1:
        return parts[0]
    d, err, nv = zip(*parts, strict=True)
    return np.concatenate(d, axis=-2), np.concatenate(err, axis=-1), np.concatenate(nv, axis=-1)


def _dense_chunk(pr: Any, rows: Array) -> tuple[Array, Array, Array]:
    """:func:`dense_rows` of one chunk of row indices."""
    import array_api_compat.numpy as xp

    q, k, v = np.asarray(pr.q), np.asarray(pr.k), np.asarray(pr.v)
    lq, lk = q.shape[-2], k.shape[-2]

    def at_rows(a: Any) -> Any:
        a = np.asarray(a)
        return a[..., rows, :] if a.ndim >= 2 and a.shape[-2] != 1 else a

    raw = np.matmul(q[..., rows, :], np.swapaxes(k, -1, -2)) * pr.scale
    s = raw + at_rows(pr.bias) if pr.bias is not None else raw
    vis = np.ones(s.shape, dtype=bool)
    if pr.visible is not None:
        vis = vis & at_rows(pr.visible)
    cm = None
    if pr.causal:
        cm = np.arange(lk)[None, :] <= rows[:, None] + (lk - lq)
        vis = vis & cm
    s = np.where(vis, s, -np.inf)
    if not np.all(s < np.inf):
        raise InputError("scores scale * q.k (+ mask) overflow float64")
    valid = s > -np.inf
    empty = ~np.any(valid, axis=-1)
    if np.any(empty):
        raise InputError(f"query {first_bad_position(empty)} is fully masked: it sees no key")
    xs = shift_rows(s, xp)
    res = sound_output_bounds(xs, v, valid, valid, np.zeros(s.shape[:-1]), xp,
                              full_softmax=False)
    err = add_up(np.asarray(res["best"]), np.asarray(res["mu_err"]), xp)
    margin = score_abs_margin(q[..., rows, :], k, pr.scale, xp)
    # the dense rows' scores are computed ones: add their distance to the exact scores'
    bias = at_rows(pr.bias) if pr.bias is not None else None
    err = slack_error(err, score_slack(margin, s, valid, bias, xp), v, valid, xp)
    fill = at_rows(pr.fill) if pr.fill is not None else None
    hid = _hidden_part(raw, fill, cm, s, margin, xp)
    if hid is not None:  # keys hidden by a finite fill keep their exact mass
        err = hidden_error(err, hid[0], hid[1], valid, v, xp)
    return np.asarray(res["attn_k"]), err, np.sum(valid, axis=-1).astype(np.float64)


def _round_up_sum(*terms: Array) -> Array:
    """A float64 sum of non-negative terms, rounded up (relative ``(n + 2) u``)."""
    total = terms[0]
    with np.errstate(over="ignore"):  # a sum beyond the float range is inf (fails closed)
        for t in terms[1:]:
            total = total + t
        return total * (1.0 + (len(terms) + 2) * U)


def delta_correct(
    q: Any,
    k: Any,
    v: Any,
    *,
    gamma: int = 64,
    min_tail: int = 128,
    base: Any = None,
    budget: float | None = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    kv_heads: int | Sequence[int] | None = None,
    chunk_elems: int = CHUNK_ELEMS,
) -> ApproxResult:
    r"""Delta Attention's correction of a sparse base, with a sound bound (DELTA-ERROR).

    Parameters
    ----------
    q : array (..., [H,] s, d)
        The prompt's queries (row ``i`` is token ``i`` of the prefill).
    k, v : arrays (..., [H_kv,] Lk, d), (..., [H_kv,] Lk, dv)
    gamma : int
        Delta stride (published default 64).
    min_tail : int
        The dense tail's constant: ``cut = (s mod gamma) + max(min_tail, gamma)``
        (published 128).
    base : selection policy, optional
        The sparse base :math:`S` (any policy of :mod:`certattn.policies`); default
        ``WindowSinks(default_window(Lk), default_sinks(Lk))``, StreamingLLM scaled to
        the length (Delta's paper: 2048 + 1024 sinks at 131k).
    budget : float, optional
        Certificate-triggered variant: extra dense rows exactly where the sound bound
        exceeds this output-error budget (Euclidean).
    mask, causal, scale, kv_heads
        As in :func:`certattn.certify_attention`.

    Returns
    -------
    ApproxResult
        ``output`` = :math:`O`; ``error_bound`` = the sound bound of the module docstring;
        ``weights``, ``kept``, ``tail_upper`` None (a corrected row is not one softmax
        over a kept set); ``cost`` as in the module docstring; ``params`` holds
        ``gamma``, ``min_tail``, ``s_p``, ``base`` (its name and fields), ``budget``,
        ``dense_rows`` (bool ``(s,)`` of the planned rows) and ``extra_dense``
        (bool ``(..., s)``, rows added by the budget).
    """
    pr = _prepare(q, k, v, scale=scale, mask=mask, causal=causal, kv_heads=kv_heads)
    s, lk = int(pr.q.shape[-2]), int(pr.k.shape[-2])
    s_p, anchor, dense = delta_rows(s, gamma, min_tail)
    if base is None:
        base = WindowSinks(window=default_window(lk), sinks=default_sinks(lk))
    if budget is not None:
        budget = float(budget)
        if not (np.isfinite(budget) and budget >= 0):
            raise InputError(f"budget must be a finite number >= 0, got {budget!r}")

    S = run_policy(q, k, v, base, method=getattr(base, "name", "base"), params={},
                   mask=mask, causal=causal, scale=scale, kv_heads=kv_heads,
                   chunk_elems=chunk_elems, return_weights=False, return_kept=False)
    s_out, e_s, c_s = S.output, S.error_bound, S.cost
    d_out, e_d, nv = dense_rows(pr, dense, chunk_elems)
    pos = np.full(s, -1)
    pos[dense] = np.arange(dense.size)

    lead = s_out.shape[:-2]
    out = np.array(s_out, dtype=np.float64, copy=True)
    err = np.zeros((*lead, s))
    cost = np.zeros((*lead, s))
    is_dense = np.zeros(s, dtype=bool)
    is_dense[dense] = True
    sparse_rows = np.flatnonzero(~is_dense)
    if sparse_rows.size:
        a = anchor[sparse_rows]
        d_a = d_out[..., pos[a], :]
        with np.errstate(over="ignore", invalid="ignore"):  # huge values: inf, fails closed
            corr = d_a - s_out[..., a, :]
            o = s_out[..., sparse_rows, :] + corr
            dv = o.shape[-1]
            norm_up = 1.0 + (dv + 8) * U
            r = 2 * U * (scaled_norm(corr, np) + scaled_norm(o, np)) * norm_up + dv * SMALLEST
        r = np.where(np.isnan(r), np.inf, r)
        out[..., sparse_rows, :] = o
        err[..., sparse_rows] = _round_up_sum(
            e_s[..., sparse_rows], e_s[..., a], e_d[..., pos[a]], r
        )
        cost[..., sparse_rows] = c_s[..., sparse_rows]
    out[..., dense, :] = d_out
    err[..., dense] = e_d
    # anchors below s_p also computed S_a (their block's correction needs it)
    cost[..., dense] = nv + np.where(dense < s_p, c_s[..., dense], 0.0)

    extra = np.zeros((*lead, s), dtype=bool)
    if budget is not None and sparse_rows.size:
        extra[..., sparse_rows] = err[..., sparse_rows] > budget
        rows = np.flatnonzero(np.any(extra.reshape(-1, s), axis=0))
        if rows.size:
            d_x, e_x, nv_x = dense_rows(pr, rows, chunk_elems)
            sel = extra[..., rows]
            out[..., rows, :] = np.where(sel[..., None], d_x, out[..., rows, :])
            err[..., rows] = np.where(sel, e_x, err[..., rows])
            cost[..., rows] = np.where(sel, cost[..., rows] + nv_x, cost[..., rows])

    params = {
        "gamma": int(gamma), "min_tail": int(min_tail), "s_p": int(s_p),
        "base": {"name": getattr(base, "name", type(base).__name__),
                 **{f: getattr(base, f) for f in getattr(base, "__dataclass_fields__", {})
                    if f != "name"}},
        "budget": budget, "dense_rows": is_dense, "extra_dense": extra,
    }
    return ApproxResult(output=out, weights=None, kept=None, cost=cost, tail_upper=None,
                        error_bound=err, method="delta", params=params)
