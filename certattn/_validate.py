"""Input checks shared by the whole library: bad input gets a clear ValueError.

Each check names what is wrong and where (the batch index of the offending row and
the key position), so that the CLI can print it as one line.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from ._array import as_float_array, to_numpy
from .errors import InputError

__all__ = [
    "InputError",
    "check_count",
    "check_eps",
    "check_finite",
    "check_int_option",
    "check_int_tiers",
    "check_kept",
    "check_logits",
    "check_number",
    "check_scale",
    "exact_int",
    "first_bad_position",
    "move_key_axis",
    "valid_rows",
]


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
        raise InputError(f"{name} must have a key axis, got a scalar")
    if x.shape[-1] == 0 and not allow_empty:
        raise InputError(f"{name} have an empty key axis (shape {tuple(x.shape)})")
    if x.size and _max_is_finite_or_neginf(x if row_max is None else row_max, xp):
        return  # one reduction (or the caller's row maxima), no temporaries
    nan = xp.isnan(x)
    if bool(xp.any(nan)):
        raise InputError(f"{name} contain NaN {_where(first_bad_position(nan))}")
    pinf = x == xp.inf
    if bool(xp.any(pinf)):
        raise InputError(f"{name} contain +inf {_where(first_bad_position(pinf))}")


def _max_is_finite_or_neginf(x: Any, xp: Any) -> bool:
    """True if ``max(x)`` is neither NaN nor ``+inf`` (NaN propagates through max).

    Only trusted where the backend table says NaN propagates through ``max``
    (:data:`certattn._backends.BACKENDS`); elsewhere answer False so that the explicit
    checks run.
    """
    from ._backends import nan_propagates_through_max

    if not nan_propagates_through_max(xp):
        return False
    top = float(xp.max(x))
    return not (math.isnan(top) or top == math.inf)


def check_number(
    value: Any, *, name: str, low: float, high: float, closed_low: bool, closed_high: bool
) -> float:
    """A real number (not a bool, not NaN) in the interval between ``low`` and ``high``."""
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number in {interval}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in {interval}, got {value!r}") from None
    above = v >= low if closed_low else v > low
    below = v <= high if closed_high else v < high
    if math.isnan(v) or not (above and below):
        raise InputError(f"{name} must be in {interval}, got {v!r}")
    return v + 0.0  # -0.0 becomes 0.0 (no "eps = -0" in a report)


def check_int_option(
    value: Any, *, name: str, choices: tuple[int, ...] | None = None, optional: bool = True
) -> int | None:
    """An integer option (``bits``, ``group``): an exact integer, or ``None`` if ``optional``.

    A bool, a float (even ``4.0``) or a string is refused, never coerced; with ``choices``
    the value must be one of them, otherwise it must be positive.  NumPy integers count.
    """
    if value is None and optional:
        return None
    v = exact_int(value)
    if choices is not None:
        if v is None or v not in choices:
            raise InputError(f"{name} must be one of {choices}, got {value!r}")
    elif v is None or v < 1:
        raise InputError(f"{name} must be a positive integer or None, got {value!r}")
    return v


def check_int_tiers(
    value: Any, *, name: str, choices: tuple[int, ...]
) -> int | tuple[int, ...]:
    """One of ``choices`` (as :func:`check_int_option`), or a tuple or list of them in
    strictly increasing order (tiers, returned as a tuple; one element: that int)."""
    if not isinstance(value, (tuple, list)):
        return check_int_option(value, name=name, choices=choices, optional=False)
    tiers = tuple(check_int_option(v, name=name, choices=choices, optional=False)
                  for v in value)
    if not tiers or list(tiers) != sorted(set(tiers)):
        raise InputError(f"{name} tiers must be strictly increasing values of {choices}, "
                         f"got {value!r}")
    return tiers if len(tiers) > 1 else tiers[0]


def exact_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer type (NumPy's included), else None.

    Bools, floats (even ``4.0``) and strings are not integers here: never coerced.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_count(value: Any, *, name: str, low: int = 0) -> int:
    """An integer (not a bool, not a float) ``>= low``."""
    v = exact_int(value)
    if v is None:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if v < low:
        raise InputError(f"{name} must be an integer >= {low}, got {v}")
    return v


def check_scale(scale: Any, d: int | None = None) -> float:
    """A score scale: a finite positive number; ``None`` means ``1/sqrt(d)``."""
    if scale is None:
        if d is None:
            raise InputError("scale must be a finite positive number, got None")
        if d < 1:
            raise InputError(f"queries and keys need a feature dimension d >= 1, got d = {d}")
        return 1.0 / math.sqrt(d)
    try:
        v = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"scale must be a finite positive number, got {scale!r}") from None
    if isinstance(scale, bool) or not (math.isfinite(v) and v > 0.0):
        raise InputError(f"scale must be a finite positive number, got {scale!r}")
    return v


def check_finite(a: Any, xp: Any, name: str) -> None:
    """Reject NaN and +-inf in ``a`` (queries, keys, values), naming the first position."""
    bad = ~xp.isfinite(a)
    if bool(xp.any(bad)):
        pos = first_bad_position(bad) if bad.ndim else ()
        raise InputError(f"{name} contain NaN or inf at index {pos}")


def move_key_axis(x: Any, axis: int, xp: Any) -> Any:
    """``x`` with its key axis ``axis`` moved last (validated)."""
    if x.ndim == 0:
        raise InputError("logits must have a key axis, got a scalar")
    if isinstance(axis, bool) or not -x.ndim <= int(axis) < x.ndim:
        raise InputError(f"axis {axis} is out of range for an array of shape {tuple(x.shape)}")
    return xp.moveaxis(x, axis, -1) if axis not in (-1, x.ndim - 1) else x


def check_kept(kept: Any, shape: tuple[int, ...], xp: Any, device: Any) -> Any:
    """A boolean kept set broadcast to ``shape`` (on ``device``)."""
    from ._array import asarray_on

    kept = asarray_on(kept, xp=xp, device=device)
    if kept.dtype != xp.bool:
        raise InputError(f"kept must be a boolean mask, got dtype {kept.dtype}")
    try:
        return xp.broadcast_to(kept, shape)
    except (ValueError, RuntimeError):
        raise InputError(
            f"kept mask of shape {tuple(kept.shape)} does not match logits of shape {shape}"
        ) from None


def check_eps(eps: Any, *, name: str = "eps") -> float:
    """A tail budget must be a real number in [0, 1)."""
    return check_number(eps, name=name, low=0.0, high=1.0, closed_low=True, closed_high=False)


def valid_rows(logits: Any, axis: int) -> tuple[Any, Any, Any, Any]:
    """Validated float64 logits with the key axis last, and the valid-key counts.

    Raises ``ValueError`` on NaN, ``+inf``, an empty key axis or a fully masked row.
    """
    x, xp, dev = as_float_array(logits, name="logits")
    if x.ndim == 0:
        raise InputError("logits must have a key axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise InputError(f"axis {axis} is out of range for logits of shape {tuple(x.shape)}")
    if axis not in (-1, x.ndim - 1):
        x = xp.moveaxis(x, axis, -1)
    check_logits(x, xp)
    x = xp.astype(x, xp.float64)
    n_valid = xp.sum(xp.astype(x > -xp.inf, xp.int64), axis=-1)
    empty = n_valid == 0
    if bool(xp.any(empty)):
        pos = first_bad_position(empty) if empty.ndim else ()
        raise InputError(f"logits are fully masked (all -inf) in row {pos}")
    return x, n_valid, xp, dev
