r"""Attention masks and head groupings, the same for every attention-level function.

* :func:`normalize_mask`: a boolean (True = visible) or additive (Hugging Face style) mask
  as ``(visible, bias)``;
* :func:`kv_head_map`: grouped-query attention, the key/value head each query head reads.

Causal masks are aligned at the end (query ``i`` of ``Lq`` sees keys
``j <= i + Lk - Lq``, as with a key/value cache).
"""

from __future__ import annotations

from typing import Any

from ._array import asarray_on, namespace
from ._validate import InputError

__all__ = ["kv_head_map", "normalize_mask"]

Array = Any


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
        raise InputError(
            f"mask must be boolean (True = visible) or additive floating, got dtype {m.dtype}"
        )
    if bool(xp.any(xp.isnan(m))) or bool(xp.any(m == xp.inf)):
        raise InputError("additive mask contains NaN or +inf")
    visible = m > float(xp.finfo(m.dtype).min) / 2
    bias = xp.where(
        visible, xp.astype(m, xp.float64), xp.zeros(m.shape, dtype=xp.float64, device=device)
    )
    return visible, bias


def kv_head_map(kv_heads: Any, n_q: int, n_kv: int) -> list[int] | None:
    """Key head of every query head, or None when no mapping is needed."""
    if kv_heads is None:
        if n_q == n_kv:
            return None
        if n_kv < 1 or n_q % n_kv:
            raise InputError(
                f"{n_q} query heads cannot share {n_kv} key/value heads evenly (axis -3)"
            )
        return [h // (n_q // n_kv) for h in range(n_q)]
    if isinstance(kv_heads, int) and not isinstance(kv_heads, bool):
        if kv_heads != n_kv:
            raise InputError(f"kv_heads = {kv_heads} but keys have {n_kv} heads (axis -3)")
        return kv_head_map(None, n_q, n_kv)
    mapping = [int(h) for h in kv_heads]
    if len(mapping) != n_q or any(not 0 <= h < n_kv for h in mapping):
        raise InputError(
            f"kv_heads must map each of the {n_q} query heads to one of {n_kv} key heads"
        )
    return mapping
