"""Input checks shared by the whole library: bad input gets a clear ValueError.

Each check names what is wrong and where (the batch index of the offending row and
the key position), so that the CLI can print it as one line.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._array import as_float_array, to_numpy

__all__ = ["check_eps", "check_logits", "check_number", "first_bad_position", "valid_rows"]


def first_bad_position(bad: Any) -> tuple[int, ...]:
    """Index (as a tuple of ints) of the first True entry of a boolean array."""
    hits = np.argwhere(to_numpy(bad))
    return tuple(int(i) for i in hits[0])


def _where(pos: tuple[int, ...]) -> str:
    if len(pos) == 1:
        return f"at key {pos[0]}"
    return f"in row {pos[:-1] if len(pos) > 2 else pos[0]} at key {pos[-1]}"


def check_logits(
    x: Any, xp: Any, *, name: str = "logits", allow_empty: bool = False, row_max: Any = None
) -> None:
    """Reject NaN, ``+inf`` and an empty key axis (last axis of ``x``).

    ``-inf`` is allowed: it marks a masked key.  Fully masked rows are checked by the
    callers that care (:func:`certattn.certify_topk` has a policy for them).
    ``row_max``, the maxima of ``x`` over its last axis (or any per-row values that are
    NaN or ``+inf`` exactly where the row holds NaN or ``+inf``), saves a pass when the
    caller has them anyway (NaN propagates through max on NumPy, CuPy and PyTorch).
    """
    if x.ndim == 0:
        raise ValueError(f"{name} must have a key axis, got a scalar")
    if x.shape[-1] == 0 and not allow_empty:
        raise ValueError(f"{name} have an empty key axis (shape {tuple(x.shape)})")
    if x.size and _max_is_finite_or_neginf(x if row_max is None else row_max, xp):
        return  # one reduction (or the caller's row maxima), no temporaries
    nan = xp.isnan(x)
    if bool(xp.any(nan)):
        raise ValueError(f"{name} contain NaN {_where(first_bad_position(nan))}")
    pinf = x == xp.inf
    if bool(xp.any(pinf)):
        raise ValueError(f"{name} contain +inf {_where(first_bad_position(pinf))}")


def _max_is_finite_or_neginf(x: Any, xp: Any) -> bool:
    """True if ``max(x)`` is neither NaN nor ``+inf`` (NaN propagates through max).

    Only trusted where NaN is known to propagate (NumPy, CuPy, PyTorch); elsewhere
    answer False so that the explicit checks run.
    """
    import array_api_compat as compat

    if not (
        compat.is_numpy_namespace(xp) or compat.is_cupy_namespace(xp)
        or compat.is_torch_namespace(xp)
    ):
        return False
    top = float(xp.max(x))
    return not (math.isnan(top) or top == math.inf)


def check_number(
    value: Any, *, name: str, low: float, high: float, closed_low: bool, closed_high: bool
) -> float:
    """A real number (not a bool, not NaN) in the interval between ``low`` and ``high``."""
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}") from None
    above = v >= low if closed_low else v > low
    below = v <= high if closed_high else v < high
    if math.isnan(v) or not (above and below):
        raise ValueError(f"{name} must be in {interval}, got {v!r}")
    return v


def check_eps(eps: Any, *, name: str = "eps") -> float:
    """A tail budget must be a real number in [0, 1)."""
    return check_number(eps, name=name, low=0.0, high=1.0, closed_low=True, closed_high=False)


def valid_rows(logits: Any, axis: int) -> tuple[Any, Any, Any, Any]:
    """Validated float64 logits with the key axis last, and the valid-key counts.

    Raises ``ValueError`` on NaN, ``+inf``, an empty key axis or a fully masked row.
    """
    x, xp, dev = as_float_array(logits, name="logits")
    if x.ndim == 0:
        raise ValueError("logits must have a key axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for logits of shape {tuple(x.shape)}")
    if axis not in (-1, x.ndim - 1):
        x = xp.moveaxis(x, axis, -1)
    check_logits(x, xp)
    x = xp.astype(x, xp.float64)
    n_valid = xp.sum(xp.astype(x > -xp.inf, xp.int64), axis=-1)
    empty = n_valid == 0
    if bool(xp.any(empty)):
        pos = first_bad_position(empty) if empty.ndim else ()
        raise ValueError(f"logits are fully masked (all -inf) in row {pos}")
    return x, n_valid, xp, dev
