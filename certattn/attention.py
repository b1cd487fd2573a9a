r"""Certified Top-k attention end to end: scores, certificate, sparse output, error bound.

:func:`certify_attention` computes, per query, the scores
:math:`s = \mathrm{scale}\; q k^\top` (+ an additive mask) in float64, certifies the
smallest Top-k whose discarded mass is at most eps (:func:`certattn.certify_topk`,
Theorems TV-TAIL and TV-KL), attends over the kept keys only
(:math:`\mathrm{Attn}_k`), and bounds :math:`|\mathrm{Attn} - \mathrm{Attn}_k|` by the best
of Theorems OUT-BOUNDED, OUT-DIAMETER (tail-to-head form) and OUT-BEST, evaluated at the
certificate's sound tail bound.  Queries are processed in chunks, so the full
:math:`L_q \times L_k` score matrix is never held at once.

What is certified: the exact softmax of the float64 scores computed from the given
``q``, ``k`` and mask (float32 or bfloat16 attention kernels compute slightly different
scores; the certificate is not about their rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._array import as_float_array, asarray_on, device_of, namespace
from ._validate import check_eps
from .output import _CHUNK_ELEMS, BOUND_NAMES, _sound_bounds

__all__ = ["AttentionCertificate", "certify_attention", "normalize_mask"]

Array = Any


@dataclass(frozen=True)
class AttentionCertificate:
    r"""Per-query result of :func:`certify_attention`.

    Attributes
    ----------
    output : float64 array (..., Lq, dv)
        :math:`\mathrm{Attn}_k`, attention over the certified Top-k keys.
    k : int64 array (..., Lq)
        Certified Top-k per query (never below the exact minimal :math:`k_\varepsilon`).
    tail_mass : float64 array (..., Lq)
        Sound upper bound on the discarded mass (at most ``eps``).
    error_bound : float64 array (..., Lq)
        Sound upper bound on :math:`|\mathrm{Attn} - \mathrm{output}|` (Euclidean), the
        rounding of the returned output included.
    bound : int64 array (..., Lq)
        Index into :attr:`names` of the bound that gave ``error_bound``.
    n_valid : int64 array (..., Lq)
        Visible keys per query.
    eps : float
    """

    output: Array
    k: Array
    tail_mass: Array
    error_bound: Array
    bound: Array
    n_valid: Array
    eps: float
    names: tuple[str, ...] = BOUND_NAMES


def normalize_mask(mask: Any, *, xp: Any = None, device: Any = None) -> tuple[Array, Array | None]:
    """A boolean or additive attention mask as ``(visible, bias)``.

    * boolean: True = visible; ``bias`` is None;
    * floating (additive, as Hugging Face models use): an entry at or below half the
      dtype's most negative finite number is masked; the other entries are added to the
      scores (``bias``, float64, 0 where masked).

    Raises
    ------
    ValueError
        Integer masks, NaN or ``+inf`` entries.
    """
    if xp is None:
        xp, device = namespace(mask)
    m = asarray_on(mask, xp=xp, device=device)
    if m.dtype == xp.bool:
        return m, None
    if not xp.isdtype(m.dtype, "real floating"):
        raise ValueError(
            f"mask must be boolean (True = visible) or additive floating, got dtype {m.dtype}"
        )
    if bool(xp.any(xp.isnan(m))) or bool(xp.any(m == xp.inf)):
        raise ValueError("additive mask contains NaN or +inf")
    visible = m > float(xp.finfo(m.dtype).min) / 2
    bias = xp.where(
        visible, xp.astype(m, xp.float64), xp.zeros(m.shape, dtype=xp.float64, device=device)
    )
    return visible, bias


def _rows_of(a: Array | None, sl: slice) -> Array | None:
    """Query slice of a mask broadcastable to (..., Lq, Lk)."""
    if a is None or a.ndim < 2 or a.shape[-2] == 1:
        return a
    return a[..., sl, :]


def certify_attention(
    q: Any,
    k: Any,
    v: Any,
    eps: float,
    *,
    scale: float | None = None,
    mask: Any = None,
    causal: bool = False,
    chunk_elems: int = _CHUNK_ELEMS,
) -> AttentionCertificate:
    r"""Certified Top-k attention with a sound output-error bound, per query.

    Parameters
    ----------
    q : array (..., Lq, d)
    k : array (..., Lk, d)
    v : array (..., Lk, dv)
        Leading (batch, head) axes broadcast.  Any real floating dtype.
    eps : float
        Tail (TV) budget in [0, 1).
    scale : float, optional
        Score scale, default :math:`1/\sqrt{d}`.
    mask : array, optional
        Broadcastable to (..., Lq, Lk): boolean (True = visible) or additive (see
        :func:`normalize_mask`).
    causal : bool
        Query ``i`` sees keys ``j <= i + Lk - Lq`` (aligned at the end, as with a cache).
    chunk_elems : int
        Float64 temporaries per query chunk.

    Returns
    -------
    AttentionCertificate

    Raises
    ------
    ValueError
        Mismatched shapes, NaN/inf inputs, a query with no visible key, eps outside [0, 1).
    """
    from . import certify_topk

    eps = check_eps(eps)
    qa, xp, dev = as_float_array(q, name="q")
    ka, _, _ = as_float_array(asarray_on(k, xp=xp, device=dev), name="k")
    va, _, _ = as_float_array(asarray_on(v, xp=xp, device=dev), name="v")
    if qa.ndim < 2 or ka.ndim < 2 or va.ndim < 2:
        raise ValueError("q, k, v must have at least two axes: (..., L, d)")
    lq, d = int(qa.shape[-2]), int(qa.shape[-1])
    lk = int(ka.shape[-2])
    if int(ka.shape[-1]) != d:
        raise ValueError(f"q has d = {d} but k has d = {ka.shape[-1]}")
    if int(va.shape[-2]) != lk:
        raise ValueError(f"k has {lk} keys but v has {va.shape[-2]}")
    for name, a in (("q", qa), ("k", ka), ("v", va)):
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"{name} contains NaN or inf")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    q64, k64, v64 = (xp.astype(a, xp.float64) for a in (qa, ka, va))
    kt = xp.matrix_transpose(k64)
    visible, bias = normalize_mask(mask, xp=xp, device=dev) if mask is not None else (None, None)
    lead = math.prod(int(s) for s in xp.broadcast_shapes(qa.shape[:-2], ka.shape[:-2]))
    step = max(1, chunk_elems // max(1, lead * lk * 4))
    offset = lk - lq
    cols = xp.arange(lk, device=device_of(q64))
    fields: dict[str, list[Array]] = {f: [] for f in ("out", "k", "tail", "err", "idx", "nv")}
    for i0 in range(0, lq, step):
        sl = slice(i0, min(lq, i0 + step))
        s = xp.matmul(q64[..., sl, :], kt) * scale
        b = _rows_of(bias, sl)
        if b is not None:
            s = s + b
        vis = _rows_of(visible, sl)
        if causal:
            rows = xp.arange(i0, sl.stop, device=device_of(q64))
            cm = cols[None, :] <= rows[:, None] + offset
            vis = cm if vis is None else (vis & cm)
        if vis is not None:
            s = xp.where(vis, s, xp.full_like(s, -xp.inf))
        cert = certify_topk(s, eps)
        kept = cert.kept_mask()
        valid = s > -xp.inf
        res = _sound_bounds(
            s, v64, valid, kept, cert.tail_mass, xp, diameters=False, chunk=chunk_elems
        )
        fields["out"].append(res["attn_k"])
        fields["k"].append(cert.k)
        fields["tail"].append(cert.tail_mass)
        fields["err"].append(res["best"] + res["mu_err"])
        fields["idx"].append(res["tightest"])
        fields["nv"].append(cert.n_valid)

    def cat(parts: list[Array], axis: int) -> Array:
        return xp.concat(parts, axis=axis) if len(parts) > 1 else parts[0]

    return AttentionCertificate(
        output=cat(fields["out"], -2),
        k=cat(fields["k"], -1),
        tail_mass=cat(fields["tail"], -1),
        error_bound=cat(fields["err"], -1),
        bound=cat(fields["idx"], -1),
        n_valid=cat(fields["nv"], -1),
        eps=eps,
    )
