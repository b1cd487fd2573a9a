"""Domain checks of the geometry package: a clear :class:`~certattn.errors.InputError`
(a ``ValueError``) naming the argument, instead of NaN, ``-inf``, a ``LinAlgError`` or a
``TypeError`` from deep inside NumPy."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import InputError

Array = NDArray[np.float64]


def real_array(a: Any, name: str, *, min_ndim: int = 0, finite: bool = True) -> Array:
    """``a`` as a float64 array of real numbers (finite unless ``finite=False``)."""
    try:
        arr = np.asarray(a)
        if arr.dtype.kind not in "biuf":
            raise TypeError
        out = arr.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be an array of real numbers, got {_show(a)}") from None
    if out.ndim < min_ndim:
        raise InputError(f"{name} must have at least {min_ndim} axes, got shape {out.shape}")
    if finite and not bool(np.all(np.isfinite(out))):
        raise InputError(f"{name} must be finite (no NaN or infinity)")
    return out


def number(x: Any, name: str, *, low: float = -math.inf, low_open: bool = False,
           high: float = math.inf) -> float:
    """``x`` as a finite float with ``x >= low`` (``> low`` if ``low_open``), ``<= high``."""
    try:
        if isinstance(x, bool | str | bytes) or np.ndim(x) != 0:
            raise TypeError
        v = float(x)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a real number, got {_show(x)}") from None
    bad_low = v <= low if low_open else v < low
    if not math.isfinite(v) or bad_low or v > high:
        where = f"{'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
        if high < math.inf:
            where = f"{where} and <= {high:g}" if where else f"<= {high:g}"
        raise InputError(f"{name} must be a finite number{' ' + where if where else ''}, "
                         f"got {x!r}")
    return v


def positive(x: Any, name: str) -> float:
    """A finite number ``> 0``."""
    return number(x, name, low=0.0, low_open=True)


def integer(x: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``x`` as an int in ``[minimum, maximum]`` (bools and non-integral floats refused)."""
    try:
        if isinstance(x, bool):
            raise TypeError
        v = operator.index(x)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {_show(x)}") from None
    if v < minimum or (maximum is not None and v > maximum):
        top = f" and <= {maximum}" if maximum is not None else ""
        raise InputError(f"{name} must be an integer >= {minimum}{top}, got {v}")
    return v


def spd(a: Any, name: str, *, n: int | None = None) -> Array:
    """Finite, symmetric positive definite matrices on the last two axes."""
    m = real_array(a, name, min_ndim=2)
    if m.shape[-1] != m.shape[-2] or (n is not None and m.shape[-1] != n):
        want = f"({n}, {n})" if n is not None else "square"
        raise InputError(f"{name} must be {want} matrices, got shape {m.shape}")
    scale = np.max(np.abs(m), initial=0.0)
    if not np.allclose(m, np.swapaxes(m, -1, -2), rtol=1e-10, atol=1e-12 * scale):
        raise InputError(f"{name} must be symmetric")
    try:
        np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        raise InputError(f"{name} must be positive definite") from None
    return m


def callable_arg(f: Any, name: str) -> Any:
    """``f`` itself, if it can be called."""
    if not callable(f):
        raise InputError(f"{name} must be callable, got {_show(f)}")
    return f


def _show(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else f"a {type(x).__name__}"
