"""The array layer: namespace and device resolution, special functions, fast paths.

Everything in certattn that touches arrays goes through this module, so that the
rest of the library is written once against the Python array API standard
(via :mod:`array_api_compat`) and runs unchanged on NumPy, CuPy, PyTorch and
``array-api-strict``.  Three jobs live here and nowhere else:

* resolving ``xp`` and the device of the inputs (:func:`namespace`),
* routing the few special functions of the normal distribution
  (:func:`ndtr`, :func:`ndtri`, :func:`log_ndtr`, :func:`ndtri_exp`) to
  ``scipy.special``, ``cupyx.scipy.special`` or ``torch.special``, with a NumPy
  round trip (via DLPack) for namespaces that have none,
* the native fast paths (:func:`partition`, :func:`argpartition`), delegated to
  :mod:`array_api_extra`, which uses ``numpy``/``cupy`` ``(arg)partition`` natively
  and falls back to sorting elsewhere.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat as compat
import array_api_extra as xpx
import numpy as np

from .errors import InputError

__all__ = [
    "argpartition",
    "as_float_array",
    "asarray_on",
    "device_of",
    "from_numpy",
    "is_numpy",
    "log_ndtr",
    "namespace",
    "ndtr",
    "ndtri",
    "ndtri_exp",
    "partition",
    "to_numpy",
]

Array = Any


def namespace(*arrays: Any) -> tuple[ModuleType, Any]:
    """Return ``(xp, device)`` shared by ``arrays``.

    Python scalars, lists and ``None`` are ignored when finding the namespace;
    if nothing is an array, NumPy on the CPU is used.

    Raises
    ------
    ValueError
        If the arrays come from different namespaces or live on different devices.
    """
    arrs = [a for a in arrays if a is not None and compat.is_array_api_obj(a)]
    if not arrs:
        return compat.array_namespace(np.empty(0)), "cpu"
    try:
        xp = compat.array_namespace(*arrs)
    except TypeError as exc:
        raise InputError(f"inputs mix array libraries: {exc}") from None
    dev = compat.device(arrs[0])
    for a in arrs[1:]:
        if compat.device(a) != dev:
            raise InputError(f"inputs live on different devices: {dev} and {compat.device(a)}")
    return xp, dev


def device_of(x: Array) -> Any:
    """The device of ``x`` (``"cpu"`` for NumPy)."""
    return compat.device(x)


def is_numpy(xp: ModuleType) -> bool:
    """True when ``xp`` is (the compat wrapper of) NumPy."""
    return compat.is_numpy_namespace(xp)


def as_float_array(x: Any, *, name: str = "input") -> tuple[Array, ModuleType, Any]:
    """Turn ``x`` into a real floating array of its own namespace.

    Array-likes (lists, scalars) become NumPy arrays.  Integer and boolean arrays
    are rejected: logits are real numbers, and silently casting would hide a mistake.

    Returns
    -------
    (array, xp, device)
    """
    if not compat.is_array_api_obj(x):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} is not an array of numbers: {exc}") from None
    xp, dev = namespace(x)
    dtype = x.dtype
    if is_numpy(xp):
        kind = np.dtype(dtype).kind
        # ml_dtypes' bfloat16 and friends report kind 'V'; accept them by name.
        if kind != "f" and "float" not in np.dtype(dtype).name:
            raise InputError(f"{name} must hold real floating-point numbers, got dtype {dtype}")
        if kind == "f" and np.dtype(dtype).itemsize > 8:
            x = _longdouble_to_float64(np.asarray(x), name)
    elif not xp.isdtype(dtype, "real floating"):
        raise InputError(f"{name} must hold real floating-point numbers, got dtype {dtype}")
    return x, xp, dev


def _longdouble_to_float64(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` (numpy longdouble) as float64, only where that is exact.

    certattn certifies float64 arithmetic on the given numbers: a longdouble value that
    float64 cannot hold exactly (beyond its range, or with more digits) would silently
    change the softmax the certificate speaks of, so it is refused.
    """
    with np.errstate(over="ignore"):
        y = x.astype(np.float64)
    bad = (y.astype(x.dtype) != x) & ~np.isnan(x)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        big = bool(np.isinf(y[pos]) and np.isfinite(x[pos]))
        why = "is beyond the float64 range (it would become +-inf)" if big else (
            "is not exactly representable in float64")
        raise InputError(
            f"{name} in {x.dtype} at index {pos} {why}: certattn certifies float64 "
            "arithmetic; cast to float64 first"
        )
    return y


def to_numpy(x: Array) -> np.ndarray:
    """Copy (or view) ``x`` as a NumPy array on the host.

    Works for every namespace, including ``array-api-strict``'s non-default
    devices, which refuse ``np.asarray`` but accept DLPack.
    """
    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x)
    if compat.is_cupy_array(x):
        return x.get()
    if compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError, ValueError):
        if compat.is_array_api_strict_namespace(compat.array_namespace(x)):
            import array_api_strict as xs

            return np.asarray(xs.asarray(x, device=xs.Device("CPU_DEVICE")))
        return np.asarray(x)


def from_numpy(a: np.ndarray, *, xp: ModuleType, device: Any) -> Array:
    """Move a NumPy array into namespace ``xp`` on ``device``."""
    if is_numpy(xp):
        return np.asarray(a)
    if compat.is_array_api_strict_namespace(xp):
        return xp.asarray(xp.asarray(a), device=device)
    return xp.asarray(a, device=device)


def asarray_on(a: Any, *, xp: ModuleType, device: Any) -> Array:
    """``a`` (an array of any library, or an array-like) as an array of ``xp`` on ``device``.

    Arrays already in ``xp`` are returned as they are; others go through NumPy.
    """
    if compat.is_array_api_obj(a):
        if compat.array_namespace(a) is xp:
            return a
        a = to_numpy(a)
    return from_numpy(np.asarray(a), xp=xp, device=device)


# --------------------------------------------------------------------------
# Special functions of the standard normal distribution
# --------------------------------------------------------------------------


def _special(name: str, x: Array) -> Array:
    xp, dev = namespace(x)
    if is_numpy(xp):
        import scipy.special as sc

        return getattr(sc, name)(x)
    if compat.is_cupy_namespace(xp):
        import cupyx.scipy.special as csc

        if hasattr(csc, name):
            return getattr(csc, name)(x)
    if compat.is_torch_namespace(xp):
        import torch

        if hasattr(torch.special, name):
            return getattr(torch.special, name)(x)
    # No native routine: compute on the host in float64 and come back.
    import scipy.special as sc

    out = getattr(sc, name)(to_numpy(x).astype(np.float64))
    return xp.astype(from_numpy(np.asarray(out), xp=xp, device=dev), x.dtype)


def ndtr(x: Array) -> Array:
    r"""Standard normal CDF :math:`\Phi(x)`."""
    return _special("ndtr", x)


def ndtri(p: Array) -> Array:
    r"""Inverse standard normal CDF :math:`\Phi^{-1}(p)`."""
    return _special("ndtri", p)


def log_ndtr(x: Array) -> Array:
    r""":math:`\log \Phi(x)`, accurate deep in the lower tail."""
    return _special("log_ndtr", x)


def ndtri_exp(y: Array) -> Array:
    r""":math:`\Phi^{-1}(e^{y})`, the inverse of :func:`log_ndtr`."""
    return _special("ndtri_exp", y)


# --------------------------------------------------------------------------
# Native fast paths
# --------------------------------------------------------------------------


def partition(x: Array, kth: int, /, *, axis: int = -1, xp: ModuleType | None = None) -> Array:
    """``numpy.partition`` semantics on any namespace (native where available)."""
    return xpx.partition(x, kth, axis=axis, xp=xp)


def argpartition(x: Array, kth: int, /, *, axis: int = -1, xp: ModuleType | None = None) -> Array:
    """``numpy.argpartition`` semantics on any namespace (native where available)."""
    return xpx.argpartition(x, kth, axis=axis, xp=xp)
