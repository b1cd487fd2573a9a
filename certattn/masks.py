r"""Attention masks and head groupings, the same for every attention-level function.

* :func:`normalize_mask`: a boolean (True = visible) or additive (Hugging Face style) mask
  as ``(visible, bias)``;
* :func:`kv_head_map`: grouped-query attention, the key/value head each query head reads.

Causal masks are aligned at the end (query ``i`` of ``Lq`` sees keys
``j <= i + Lk - Lq``, as with a key/value cache).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

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
    if _index(kv_heads) is not None:
        if _index(kv_heads) != n_kv:
            raise InputError(f"kv_heads = {kv_heads} but keys have {n_kv} heads (axis -3)")
        return kv_head_map(None, n_q, n_kv)
    mapping = _index_list(kv_heads)
    if mapping is None:
        raise InputError(
            "kv_heads must be the number of key/value heads (an int) or a sequence of "
            f"key-head indices, one per query head, got {_short_repr(kv_heads)}"
        )
    if len(mapping) != n_q or any(not 0 <= h < n_kv for h in mapping):
        raise InputError(
            f"kv_heads must map each of the {n_q} query heads to one of {n_kv} key heads"
        )
    return mapping


def _index(x: Any) -> int | None:
    """``x`` as an exact integer (Python, NumPy, a 0-d integer tensor), or None; bools
    and floats are not integers here."""
    if isinstance(x, (bool, np.bool_)):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _index_list(x: Any) -> list[int] | None:
    """A sequence of exact integers as a list, else None (strings are not sequences here)."""
    if isinstance(x, (str, bytes)):
        return None
    try:
        items = [_index(h) for h in x]
    except TypeError:  # not iterable
        return None
    return None if any(h is None for h in items) else items  # type: ignore[return-value]


def _short_repr(x: Any) -> str:
    """``repr(x)`` if it is one short line, else its type (error messages stay one line)."""
    r = repr(x)
    return r if len(r) <= 80 and "\n" not in r else f"a value of type {type(x).__name__}"
