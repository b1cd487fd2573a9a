r"""Certified sparse attention end to end: scores, any policy's kept set, certificate, output.

:func:`certify_attention` computes, per query, the scores
:math:`s = \mathrm{scale}\; q k^\top` (+ an additive mask) in float64, lets a selection
policy (:mod:`certattn.policies`: Top-k by default, top-p, window + sinks, Quest pages,
certified blocks, search) choose the kept keys, certifies their discarded mass (the
policy's own sound bound, or :func:`certattn.certify_kept`; Theorems TV-TAIL and TV-KL),
attends over the kept keys only (:math:`\mathrm{Attn}_A`), and bounds
:math:`|\mathrm{Attn} - \mathrm{Attn}_A|` by the best of Theorems OUT-BOUNDED,
OUT-DIAMETER (tail-to-head form) and OUT-BEST (the output-error engine
:func:`certattn.output.sound_output_bounds`).  :func:`certify_scores` is the same loop
without values: per-query certificates from queries and keys alone.  Queries are
processed in chunks, so the full :math:`L_q \times L_k` score matrix is never held at
once: peak extra memory is about ``chunk_elems`` float64 numbers.

What is certified: the exact softmax of :math:`\mathrm{scale}\; q k^\top` + mask computed
in exact arithmetic from the given ``q``, ``k`` and mask (not of the float64 scores, nor
of the scores a float32 or bfloat16 kernel would compute), over every key the mask does
not set to ``-inf``.  The float64 scores differ from the exact ones by at most a per-row
slack :math:`\delta_i` (:func:`certattn._fp.score_abs_margin` plus the rounding of adding
the bias, :func:`certattn._fp.score_slack`); a tail bound about the float64 scores is widened to
:math:`t / (t + (1 - t) e^{-2\delta_i})` (:func:`certattn._fp.widen_tail`; a policy
whose bound is already about the exact scores says so with ``Selection.exact``),
budget policies certify a budget shrunk by :math:`e^{-2\delta}` so that the widened
bound stays within ``eps``, and the output error adds
:math:`(e^{2\delta_i} - 1) \max_j |v_j|` (:func:`certattn._fp.slack_error`).  Keys
masked by a finite fill (``finfo(dtype).min``) are never kept, but their exact mass is
bounded and added (:mod:`certattn.masks`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _topk_numba
from ._array import as_float_array, asarray_on, device_of
from ._backends import refuse_lazy
from ._fp import add_up, scaled_norm, score_abs_margin, score_slack, slack_error, widen_tail
from ._validate import InputError, check_finite, check_scale, first_bad_position
from .kept import kl_upper_from_tail, require_nonempty, shift_rows, tail_upper_of
from .masks import hidden_error, hidden_mass, hidden_tail, normalize_mask
from .masks import kv_head_map as _kv_map
from .output import OUTPUT_BOUNDS, sound_output_bounds
from .policies import Context, as_policy

__all__ = [
    "AttentionCertificate",
    "ScoreCertificate",
    "certify_attention",
    "certify_scores",
    "normalize_mask",
]

CHUNK_ELEMS = 1 << 22
"""Default float64 temporaries per query chunk (32 MiB)."""

Array = Any


@dataclass(frozen=True)
class ScoreCertificate:
    r"""Per-query certificate of :func:`certify_scores` (no values, no output).

    Attributes
    ----------
    k : int64 array (..., Lq)
        Keys kept per query (a count).
    tail_upper : float64 array (..., Lq)
        Sound upper bound on the exact discarded mass of the kept set (= TV, Theorem
        TV-TAIL).
    kl_upper : float64 array (..., Lq)
        Sound upper bound on :math:`\mathrm{KL}(\hat P\Vert P)` (Theorem TV-KL).
    n_valid : int64 array (..., Lq)
        Visible keys per query.
    kept : bool array (..., Lq, Lk) or None
        The kept set, when asked for (``return_kept=True``).
    scored : int64 array (..., Lq) or None
        Keys scored exactly, for policies that score fewer than all (search).
    policy : str
        The policy's name.
    eps : float or None
        The policy's TV budget, when it has one.
    """

    k: Array
    tail_upper: Array
    kl_upper: Array
    n_valid: Array
    kept: Array | None
    scored: Array | None
    policy: str
    eps: float | None

    def kept_mask(self) -> Array:
        """The kept set (``return_kept=True`` must have been given)."""
        if self.kept is None:
            raise InputError("the kept set was not recorded: call with return_kept=True")
        return self.kept


@dataclass(frozen=True)
class AttentionCertificate:
    r"""Per-query result of :func:`certify_attention`.

    Attributes
    ----------
    output : float64 array (..., Lq, dv)
        :math:`\mathrm{Attn}_A`, attention over the kept keys only.
    k : int64 array (..., Lq)
        Keys kept per query (a count; for Top-k never below the exact minimal
        :math:`k_\varepsilon`).
    tail_upper : float64 array (..., Lq)
        Sound upper bound on the discarded mass (for budget policies at most ``eps``,
        plus the bound on keys hidden by a finite fill, :mod:`certattn.masks`).
    kl_upper : float64 array (..., Lq)
        Sound upper bound on :math:`\mathrm{KL}(\hat P\Vert P)`.
    error_bound : float64 array (..., Lq)
        Sound upper bound on :math:`|\mathrm{Attn} - \mathrm{output}|` (Euclidean), the
        rounding of the returned output included.
    tightest : int64 array (..., Lq)
        Index into :attr:`names` of the bound that gave ``error_bound``.
    n_valid : int64 array (..., Lq)
        Visible keys per query.
    kept : bool array (..., Lq, Lk) or None
        The kept set (None with ``return_kept=False``).
    eps : float or None
        The policy's budget, when it has one.
    policy : str
    names : tuple of str
        :data:`certattn.output.OUTPUT_BOUNDS`.
    """

    output: Array
    k: Array
    tail_upper: Array
    kl_upper: Array
    error_bound: Array
    tightest: Array
    n_valid: Array
    kept: Array | None = field(default=None, repr=False)
    eps: float | None = None
    policy: str = "topk"
    names: tuple[str, ...] = OUTPUT_BOUNDS

    def kept_mask(self) -> Array:
        """The kept set (``return_kept=True``, the default, must have been given)."""
        if self.kept is None:
            raise InputError("the kept set was not recorded: call with return_kept=True")
        return self.kept

    @property
    def tail_mass(self) -> Array:
        """Deprecated (0.1): the sound bound is :attr:`tail_upper`."""
        _deprecated("AttentionCertificate.tail_mass", "tail_upper")
        return self.tail_upper

    @property
    def bound(self) -> Array:
        """Deprecated (0.1): use :attr:`tightest`."""
        _deprecated("AttentionCertificate.bound", "tightest")
        return self.tightest


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _rows_of(a: Array | None, sl: slice) -> Array | None:
    """Query slice of a mask broadcastable to (..., Lq, Lk)."""
    if a is None or a.ndim < 2 or a.shape[-2] == 1:
        return a
    return a[..., sl, :]


@dataclass
class _Prepared:
    """Validated float64 inputs of the attention loop."""

    q: Array
    k: Array
    v: Array | None
    visible: Array | None
    bias: Array | None
    scale: float
    causal: bool
    xp: Any
    dev: Any
    fill: Array | None = None


def _prepare(
    queries: Any,
    keys: Any,
    values: Any,
    *,
    scale: Any,
    mask: Any,
    causal: bool,
    kv_heads: Any,
) -> _Prepared:
    qa, xp, dev = as_float_array(queries, name="queries")
    ka, _, _ = as_float_array(asarray_on(keys, xp=xp, device=dev), name="keys")
    va = None
    if values is not None:
        va, _, _ = as_float_array(asarray_on(values, xp=xp, device=dev), name="values")
    arrays = (("queries", qa), ("keys", ka)) + ((("values", va),) if va is not None else ())
    for name, a in arrays:
        if a.ndim < 2:
            raise InputError(f"{name} must have at least two axes (..., L, d), got {a.shape}")
    lq, d = int(qa.shape[-2]), int(qa.shape[-1])
    lk = int(ka.shape[-2])
    if int(ka.shape[-1]) != d:
        raise InputError(f"queries have d = {d} but keys have d = {ka.shape[-1]}")
    if va is not None and int(va.shape[-2]) != lk:
        raise InputError(f"keys have {lk} rows but values have {va.shape[-2]}")
    if lq == 0 or lk == 0:
        raise InputError(f"need at least one query and one key, got {lq} and {lk}")
    scale = check_scale(scale, d)
    for name, a in arrays:
        check_finite(a, xp, name)
    if kv_heads is not None or (qa.ndim >= 3 and ka.ndim >= 3 and qa.shape[-3] != ka.shape[-3]):
        if qa.ndim < 3 or ka.ndim < 3:
            raise InputError("kv_heads needs a head axis (-3) on queries and keys")
        mapping = _kv_map(kv_heads, int(qa.shape[-3]), int(ka.shape[-3]))
        if mapping is not None:
            idx = xp.asarray(mapping, dtype=xp.int64, device=dev)
            ka = xp.take(ka, idx, axis=ka.ndim - 3)
            if va is not None:
                va = xp.take(va, idx, axis=va.ndim - 3)
    try:
        xp.broadcast_shapes(qa.shape[:-2], ka.shape[:-2])
        if va is not None:
            xp.broadcast_shapes(ka.shape[:-2], va.shape[:-2])
    except (ValueError, RuntimeError):
        raise InputError(
            f"leading (batch, head) axes do not broadcast: queries {tuple(qa.shape)}, "
            f"keys {tuple(ka.shape)}" + (f", values {tuple(va.shape)}" if va is not None else "")
        ) from None
    visible, bias, fill = (normalize_mask(mask, xp=xp, device=dev, hidden=True)
                           if mask is not None else (None, None, None))
    if visible is not None:
        lead = xp.broadcast_shapes(qa.shape[:-2], ka.shape[:-2])
        try:
            xp.broadcast_shapes(visible.shape, (*lead, lq, lk))
        except (ValueError, RuntimeError):
            raise InputError(
                f"mask of shape {tuple(visible.shape)} does not broadcast to the scores "
                f"{(*lead, lq, lk)}"
            ) from None
    return _Prepared(
        q=xp.astype(qa, xp.float64),
        k=xp.astype(ka, xp.float64),
        v=xp.astype(va, xp.float64) if va is not None else None,
        visible=visible,
        bias=bias,
        scale=scale,
        causal=bool(causal),
        xp=xp,
        dev=dev,
        fill=fill,
    )


def _chunks(
    pr: _Prepared, chunk_elems: int
) -> Any:
    """Yield ``(slice, scores, valid, queries, hidden, slack)`` per query chunk (float64
    scores; ``hidden`` from :func:`_hidden_part`; ``slack`` from
    :func:`certattn._fp.score_slack`)."""
    xp = pr.xp
    lq, lk = int(pr.q.shape[-2]), int(pr.k.shape[-2])
    lead = math.prod(int(s) for s in xp.broadcast_shapes(pr.q.shape[:-2], pr.k.shape[:-2]))
    step = max(1, int(chunk_elems) // max(1, lead * lk * 4))
    offset = lk - lq
    kt = xp.matrix_transpose(pr.k)
    cols = xp.arange(lk, device=device_of(pr.q))
    key_norms = scaled_norm(pr.k, xp)  # once per call: every chunk's score slack reads it
    for i0 in range(0, lq, step):
        sl = slice(i0, min(lq, i0 + step))
        qs = pr.q[..., sl, :]
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            raw = xp.matmul(qs, kt) * pr.scale
            b = _rows_of(pr.bias, sl)
            s = raw + b if b is not None else raw
        vis = _rows_of(pr.visible, sl)
        cm = None
        if pr.causal:
            rows = xp.arange(i0, sl.stop, device=device_of(pr.q))
            cm = cols[None, :] <= rows[:, None] + offset
            vis = cm if vis is None else (vis & cm)
        if vis is not None:
            s = xp.where(vis, s, xp.full_like(s, -xp.inf))
        if not bool(xp.all((s < xp.inf) & ~xp.isnan(s))):  # overflow of scale * q.k (+ bias)
            raise InputError("scores scale * q.k (+ mask) overflow float64")
        valid = s > -xp.inf
        empty = ~xp.any(valid, axis=-1)
        if bool(xp.any(empty)):
            pos = first_bad_position(empty)
            pos = (*pos[:-1], pos[-1] + i0)
            where = pos if len(pos) > 1 else pos[0]
            raise InputError(f"query {where} is fully masked: it sees no key")
        margin = score_abs_margin(qs, pr.k, pr.scale, xp, key_norms=key_norms)
        hid = _hidden_part(raw, _rows_of(pr.fill, sl), cm, s, margin, xp)
        yield sl, s, valid, qs, hid, score_slack(margin, s, valid, b, xp)


def _hidden_part(
    raw: Array, fill: Array | None, cm: Array | None, s: Array, margin: Array, xp: Any,
) -> tuple[Array, Array] | None:
    """``(h, hidden)`` of a chunk of query rows: the keys a finite fill hides (and the
    causal mask ``cm`` does not) and :func:`certattn.masks.hidden_mass` of them, from the
    computed ``raw = scale q.k``, the visible scores ``s`` and the rounding bound
    ``margin`` of ``raw`` (:func:`certattn._fp.score_abs_margin`); None without any fill."""
    if fill is None:
        return None
    hidden = fill > -xp.inf
    if cm is not None:
        hidden = hidden & cm
    h = hidden_mass(raw, fill, hidden, s, margin, xp)
    return h, hidden


def _run(
    pr: _Prepared,
    policy: Any,
    *,
    chunk_elems: int,
    return_kept: bool,
    progress: Callable[[int, int], None] | None,
    with_output: bool,
    diameters: bool = False,
) -> dict[str, Any]:
    xp = pr.xp
    lq = int(pr.q.shape[-2])
    cache: dict[str, Any] = {}
    names = ["k", "tail", "nv", "kept", "scored", "out", "err", "idx"]
    fields: dict[str, list[Array]] = {f: [] for f in names}
    # the compiled path's `auto` choice: by the whole call's scores, not per chunk
    scores = math.prod(int(d) for d in pr.q.shape[:-1]) * int(pr.k.shape[-2])
    with _topk_numba.call_size(scores):
        for sl, s, valid, qs, hid, slack in _chunks(pr, chunk_elems):
            _one_chunk(pr, policy, sl, s, valid, qs, cache, fields, return_kept=return_kept,
                       with_output=with_output, diameters=diameters, chunk_elems=chunk_elems,
                       hid=hid, slack=slack)
            if progress is not None:
                progress(sl.stop, lq)

    def cat(parts: list[Array], axis: int) -> Array | None:
        if not parts:
            return None
        return xp.concat(parts, axis=axis) if len(parts) > 1 else parts[0]

    out = {f: cat(fields[f], -2 if f in ("kept", "out") else -1) for f in names}
    out["kl"] = kl_upper_from_tail(out["tail"], xp)
    return out


def _one_chunk(
    pr: _Prepared, policy: Any, sl: slice, s: Array, valid: Array, qs: Array,
    cache: dict[str, Any], fields: dict[str, list[Array]], *, return_kept: bool,
    with_output: bool, diameters: bool, chunk_elems: int, hid: tuple[Array, Array] | None,
    slack: Array,
) -> None:
    """Select and certify one query chunk ``s`` (its scores), appending to ``fields``.

    ``hid`` (:func:`_hidden_part`): the keys hidden by a finite fill; their exact mass is
    added to the tail and the output error (:mod:`certattn.masks`).  ``slack``
    (:func:`certattn._fp.score_slack`): a tail bound about the computed scores is widened to
    one about the exact scores, and the output error gains
    :func:`certattn._fp.slack_error`."""
    xp = pr.xp
    ctx = Context(queries=qs, keys=pr.k, scale=pr.scale, start=sl.start, xp=xp, cache=cache,
                  need_kept=return_kept or with_output, bias=_rows_of(pr.bias, sl),
                  score_slack=slack)
    sel = policy.select(s, valid, ctx)
    if sel.kept is None:  # counts and a sound bound only (allowed without need_kept)
        if ctx.need_kept or sel.tail_upper is None or sel.n_kept is None:
            raise TypeError(f"policy {policy.name!r} returned no kept set")
        n_kept, tail, kept, xs = sel.n_kept, sel.tail_upper, None, None
    else:
        kept = sel.kept & valid
        xs = shift_rows(s, xp)
        n_kept = xp.sum(xp.astype(kept, xp.int64), axis=-1)
        tail = sel.tail_upper
        if tail is None:
            tail = tail_upper_of(xs, valid, kept, xp)
    tail = xp.astype(tail, xp.float64)
    if sel.tail_upper is None or not sel.exact:
        tail = widen_tail(tail, slack, xp)
    fields["k"].append(xp.astype(n_kept, xp.int64))
    fields["tail"].append(tail if hid is None else hidden_tail(tail, hid[0], xp))
    fields["nv"].append(xp.sum(xp.astype(valid, xp.int64), axis=-1))
    if sel.scored is not None:
        fields["scored"].append(sel.scored)
    if return_kept:
        fields["kept"].append(kept)
    if with_output:
        require_nonempty(kept, valid, xp, f"policy {policy.name!r} kept set")
        v = pr.v
        res = sound_output_bounds(xs, v, valid, kept, tail, xp, diameters=diameters,
                                  chunk=chunk_elems)
        fields["out"].append(res["attn_k"])
        stack = xp.stack([res[b] for b in OUTPUT_BOUNDS], axis=-1)
        stack = xp.where(xp.isnan(stack), xp.full_like(stack, xp.inf), stack)
        # the bound plus the rounding of the returned output, the sum rounded up
        err = add_up(xp.min(stack, axis=-1), res["mu_err"], xp)
        if "house:value_norms" not in cache:
            cache["house:value_norms"] = scaled_norm(v, xp)
        vn = cache["house:value_norms"]
        err = slack_error(err, slack, v, valid, xp, value_norms=vn)
        if hid is not None:
            err = hidden_error(err, hid[0], hid[1], valid, v, xp, value_norms=vn)
        fields["err"].append(err)
        fields["idx"].append(xp.argmin(stack, axis=-1))


def certify_scores(
    queries: Any,
    keys: Any,
    eps: float | None = None,
    *,
    policy: Any = None,
    scale: float | None = None,
    mask: Any = None,
    causal: bool = False,
    kv_heads: int | Sequence[int] | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    return_kept: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreCertificate:
    r"""Per-query certificates from queries and keys, without materialising the scores.

    The scores :math:`\mathrm{scale}\, q k^\top` (+ mask) exist one query chunk at a time
    (about ``chunk_elems`` float64 numbers), so memory stays bounded at any context
    length.  With the default Top-k policy the result is
    :func:`certattn.certify_topk` on the materialised float64 scores, row by row
    (Theorems TV-TAIL, TV-KL), at the budget ``eps`` shrunk by the chunk's score slack
    and with ``tail_upper`` widened to the exact scores (module docstring: still at most
    ``eps``).

    Parameters
    ----------
    queries : array (..., [H,] Lq, d)
    keys : array (..., [H_kv,] Lk, d)
    eps : float, optional
        TV budget of the default Top-k policy.
    policy : policy object, optional
        A selection policy (:mod:`certattn.policies`); default ``TopK(eps)``.
    scale : float, optional
        Score scale, default :math:`1/\sqrt{d}`.
    mask : array, optional
        Boolean (True = visible) or additive, broadcastable to (..., Lq, Lk).  Masked:
        False, ``-inf``, or a finite entry at or below half the dtype's most negative
        number (the ``finfo(dtype).min`` fill of BERT and Hugging Face eager attention);
        other additive entries are added to the scores.  A masked key is never kept nor
        counted in ``n_valid``, and a query with no other key is refused; but a key
        masked by a finite fill keeps its exact (positive) mass in the softmax of the
        given logits, and ``tail_upper`` (and ``error_bound``) include a sound bound on
        it (:mod:`certattn.masks`): tiny for ``-3.4e38`` fills, everything when a
        float16 fill (``-65504``) meets scores that far apart.
    causal : bool
        Query ``i`` sees keys ``j <= i + Lk - Lq`` (aligned at the end, as with a cache).
    kv_heads : int or sequence of int, optional
        Grouped-query attention: the number of key/value heads (query head ``h`` reads
        ``h // (H / H_kv)``), or an explicit map from query head to key head.  Inferred
        when the head axes (-3) differ.
    chunk_elems : int
        Float64 temporaries per query chunk.
    return_kept : bool
        Record the kept set ((..., Lq, Lk) booleans: one byte per score).
    progress : callable, optional
        ``progress(queries_done, queries_total)`` after each chunk.

    Returns
    -------
    ScoreCertificate
    """
    refuse_lazy("certify_scores", queries, keys, mask)
    pol = as_policy(policy, eps)
    pr = _prepare(queries, keys, None, scale=scale, mask=mask, causal=causal, kv_heads=kv_heads)
    r = _run(pr, pol, chunk_elems=chunk_elems, return_kept=return_kept, progress=progress,
             with_output=False)
    return ScoreCertificate(
        k=r["k"], tail_upper=r["tail"], kl_upper=r["kl"], n_valid=r["nv"], kept=r["kept"],
        scored=r["scored"], policy=pol.name, eps=getattr(pol, "eps", None),
    )


def certify_attention(
    queries: Any,
    keys: Any,
    values: Any,
    eps: float | None = None,
    *,
    policy: Any = None,
    scale: float | None = None,
    mask: Any = None,
    causal: bool = False,
    kv_heads: int | Sequence[int] | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    return_kept: bool = True,
    diameters: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AttentionCertificate:
    r"""Certified sparse attention with a sound output-error bound, per query.

    Parameters
    ----------
    queries : array (..., [H,] Lq, d)
    keys : array (..., [H_kv,] Lk, d)
    values : array (..., [H_kv,] Lk, dv)
        Leading (batch, head) axes broadcast.  Any real floating dtype.
    eps : float, optional
        TV budget of the default policy, Top-k (``policy=None``).
    policy : policy object, optional
        Any selection policy of :mod:`certattn.policies` (``TopK(eps)``, ``TopP(p)``,
        ``WindowSinks(window, sinks)``, ``Pages(budget)``, ``CertifiedBlocks(eps)``,
        ``Search(eps)``, ``FixedK(k)``) or your own (module docstring there).
    scale, mask, causal, kv_heads, chunk_elems, progress
        As in :func:`certify_scores`.
    return_kept : bool
        Record the kept set in the result.
    diameters : bool
        Also evaluate the two diameter bounds (:math:`O(L_k^2 d_v)`; never tighter than
        the tail-to-head bound, which is always evaluated).

    Returns
    -------
    AttentionCertificate

    Raises
    ------
    ValueError
        Mismatched shapes, NaN/inf inputs, a query with no visible key, a kept set with
        no visible key, eps outside [0, 1).
    """
    refuse_lazy("certify_attention", queries, keys, values, mask)
    pol = as_policy(policy, eps)
    if values is None:
        raise InputError("values are required (use certify_scores for certificates alone)")
    pr = _prepare(queries, keys, values, scale=scale, mask=mask, causal=causal, kv_heads=kv_heads)
    r = _run(pr, pol, chunk_elems=chunk_elems, return_kept=return_kept, progress=progress,
             with_output=True, diameters=diameters)
    return AttentionCertificate(
        output=r["out"], k=r["k"], tail_upper=r["tail"], kl_upper=r["kl"],
        error_bound=r["err"], tightest=r["idx"], n_valid=r["nv"], kept=r["kept"],
        eps=getattr(pol, "eps", None), policy=pol.name,
    )
