"""Which array libraries certattn runs on, and how each public function runs on them.

One table, used everywhere a backend decision is made: the test fixture
(``tests/conftest.py``), ``certattn verify --backend`` and the README's table
(:func:`capability_markdown`, checked by ``tests/test_readme.py``).  Modelled on scipy's
``xp_capabilities``.

How a function runs on a non-NumPy array (``Capability.kind``):

``native``
    Written once against the array API: computed in the input's namespace, on its
    device, with no host copy (CuPy on the GPU, PyTorch, array-api-strict).
``host``
    Computed with NumPy on the host and returned in the input's namespace and device
    (one round trip; the algorithm is inherently sequential or tree-shaped).
``numpy``
    NumPy only (takes and returns NumPy arrays).

Adding a backend: add a :class:`Backend` row (how to import it, which device to test
on), run the test suite (the fixture picks it up), and mark in :data:`CAPABILITIES`
anything that does not run natively on it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADAPTERS",
    "BACKENDS",
    "CAPABILITIES",
    "Backend",
    "Capability",
    "adapter",
    "backend_of",
    "capability_markdown",
    "device_kernel",
    "nan_propagates_through_max",
    "verify_backends",
]


@dataclass(frozen=True)
class Backend:
    """An array library certattn supports.

    Attributes
    ----------
    name : str
        Short name (``--backend`` value, test id).
    module : str
        Module to import (the namespace).
    devices : callable
        ``devices(module) -> list of (label, device)`` to test on; an empty list means
        "not usable here" (e.g. CuPy without a GPU).
    verify : bool
        Offered by ``certattn verify --backend``.
    nan_max : bool
        ``max`` propagates NaN (lets input checks use one reduction).
    """

    name: str
    module: str
    devices: Callable[[Any], list[tuple[str, Any]]]
    verify: bool = True
    nan_max: bool = False


def _cpu(_: Any) -> list[tuple[str, Any]]:
    return [("", "cpu")]


def _strict(xs: Any) -> list[tuple[str, Any]]:
    # the second device catches arrays created without ``device=`` of the input
    return [("", xs.Device("CPU_DEVICE")), ("-dev1", xs.Device("device1"))]


def _cupy(cupy: Any) -> list[tuple[str, Any]]:
    try:
        return [("", None)] if cupy.cuda.runtime.getDeviceCount() > 0 else []
    except Exception:  # no driver, no device: CUDARuntimeError (a RuntimeError)
        return []


def _torch(torch: Any) -> list[tuple[str, Any]]:
    # the CPU always; a CUDA device where torch was built for CUDA and sees a GPU
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:  # a driver error: no CUDA here
        cuda = False
    return [("", "cpu")] + ([("-cuda", "cuda")] if cuda else [])


BACKENDS: tuple[Backend, ...] = (
    Backend("numpy", "numpy", _cpu, nan_max=True),
    Backend("strict", "array_api_strict", _strict),
    Backend("torch", "torch", _torch, verify=False, nan_max=True),
    Backend("cupy", "cupy", _cupy, nan_max=True),
)
"""Every supported array library, NumPy first."""


def backend_of(xp: Any) -> Backend | None:
    """The table's row for namespace ``xp`` (a compat wrapper counts as its library)."""
    import array_api_compat as compat

    checks = {
        "numpy": compat.is_numpy_namespace,
        "strict": compat.is_array_api_strict_namespace,
        "torch": compat.is_torch_namespace,
        "cupy": compat.is_cupy_namespace,
    }
    for b in BACKENDS:
        if checks.get(b.name, lambda _: False)(xp):
            return b
    return None


def nan_propagates_through_max(xp: Any) -> bool:
    """Whether ``xp.max`` returns NaN for an array holding NaN (from the table)."""
    b = backend_of(xp)
    return b is not None and b.nan_max


def verify_backends() -> list[str]:
    """``certattn verify --backend`` choices."""
    return [b.name for b in BACKENDS if b.verify]


KERNELS = ("auto", "numba", "numpy", "array", "triton")
"""``CERTATTN_KERNEL`` values of :func:`certattn.certify_topk` (README, "Which path runs")."""


def triton_installed() -> bool:
    """Whether ``triton`` (the ``[triton]`` extra) can be imported (not imported here)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def triton_runs_on(x: Any) -> bool:
    """Whether the Triton kernel can take array ``x``: a torch tensor on a CUDA device, or
    on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    import os

    import array_api_compat as compat

    if not compat.is_torch_array(x):
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"


def device_kernel(xp: Any, x: Any, want: str) -> str | None:
    """The device kernel of :func:`certattn.certify_topk` for ``x`` (namespace ``xp``).

    ``"triton"`` (:mod:`certattn._topk_triton`), ``"array"`` (the sort-free kernel of
    :mod:`certattn._topk_array`) or None (the host paths: NumPy, numba, or the generic
    sort kernel).  ``want`` is ``CERTATTN_KERNEL``: ``array`` takes the array kernel on
    every backend; ``triton`` the Triton kernel where it runs (:func:`triton_runs_on`),
    else the array kernel; ``auto`` the Triton kernel for torch tensors on CUDA when
    Triton is installed, the array kernel on CuPy and on other torch CUDA tensors.

    Raises
    ------
    ImportError
        ``want`` is ``triton`` and Triton is not installed.
    """
    import array_api_compat as compat

    if want == "triton":
        if not triton_installed():
            raise ImportError(
                'CERTATTN_KERNEL=triton but triton is not installed: pip install "certattn[triton]"'
            )
        return "triton" if triton_runs_on(x) else "array"
    if want == "array":
        return "array"
    if want != "auto":
        return None
    if compat.is_cupy_namespace(xp):
        return "array"
    if compat.is_torch_array(x) and x.device.type == "cuda":
        return "triton" if triton_installed() else "array"
    return None


ADAPTERS = {"dask": "certattn._dask"}
"""Lazy backends: the module holding ``<function>_dask`` adapters, imported by name on
first use (the core never imports it, so the import graph stays a DAG)."""


def adapter(function: str, *arrays: Any) -> Callable[..., Any] | None:
    """The lazy-backend adapter of ``function`` for ``arrays``, or None (compute eagerly).

    Today: dask arrays go to ``certattn._dask.<function>_dask`` (blockwise, lazy).
    """
    import array_api_compat as compat

    if any(compat.is_dask_array(a) for a in arrays):
        module = importlib.import_module(ADAPTERS["dask"])
        return getattr(module, f"{function}_dask")
    return None


def refuse_lazy(function: str, *arrays: Any) -> None:
    """Refuse dask arrays, in one line, where ``function`` has no lazy path.

    Raises
    ------
    InputError
        Some of ``arrays`` is a dask array: it names the functions that run lazily and
        the way out (compute the inputs first).
    """
    import array_api_compat as compat

    from .errors import InputError

    if any(a is not None and compat.is_dask_array(a) for a in arrays):
        lazy = ", ".join(fn for fn, cap in CAPABILITIES.items() if cap.dask)
        raise InputError(
            f"{function} does not run on dask arrays (lazy, blockwise: {lazy}); compute "
            "the inputs first (x.compute() or numpy.asarray(x))"
        )


def load(backend: Backend) -> Any | None:
    """The backend's module, or None when it is not installed (or fails to import)."""
    try:
        return importlib.import_module(backend.module)
    except Exception:  # ImportError, or a CUDA driver error at import time
        return None


@dataclass(frozen=True)
class Capability:
    """How one public function runs on non-NumPy arrays (module docstring)."""

    kind: str
    note: str = ""
    dask: bool = False


_N = Capability("native")
_H = Capability("host")
CAPABILITIES: dict[str, Capability] = {
    # certificates
    "certify_topk": Capability(
        "native", "NumPy: threaded bracket kernel; CuPy, torch CUDA: sort-free kernel (Triton "
        "where installed); others: sort", True
    ),
    "certify_topp": Capability("native", "as certify_topk", True),
    "certify_kept": Capability("native", "", True),
    "certify_scores": Capability("native", "the Search policy runs on the host"),
    "certify_attention": Capability("native", "the Search policy runs on the host"),
    "certified_search": Capability("host", "cell trees and schedules in NumPy"),
    # distribution
    "tail_mass": _N,
    "log_partition": _N,
    "topk_mask": _N,
    "truncation_divergences": _N,
    "kl_from_tail": _N,
    "tv_from_kl": _N,
    # logit-only bounds
    "tail_bound": _N,
    "gap_bound": _N,
    "gap_exact_head_bound": _N,
    "multigap_bound": _N,
    "uniform_gap_bound": _N,
    "bound_k": _N,
    "gap_threshold": _N,
    # blocks and cells
    "block_tail_bounds": _N,
    "greedy_block_set": _N,
    "smallest_block_count": _N,
    "key_block_bounds": _N,
    "ball_score_upper": _N,
    "box_score_upper": _N,
    "ball_box_score_upper": _N,
    "kmeans_cells": Capability("numpy", "k-means partition (host)"),
    "cell_tree": Capability("numpy", "k-means tree (host)"),
    # output
    "output_bounds": _N,
    "head_tail_terms": _N,
    "variance_decomposition": _N,
    "smallest_k_for_output": _N,
}
"""Capability of every root function of :mod:`certattn` (a test checks completeness)."""


def capability_markdown() -> str:
    """The README table: one row per function, one column per backend."""
    names = [b.name for b in BACKENDS if b.name != "numpy"]
    head = "| function | " + " | ".join(names) + " | dask | note |"
    rule = "|---|" + "---|" * (len(names) + 1) + "---|"
    word = {"native": "native", "host": "host round trip", "numpy": "NumPy only"}
    rows = [
        f"| `{fn}` | " + " | ".join(word[cap.kind] for _ in names)
        + f" | {'lazy, blockwise' if cap.dask else '-'} | {cap.note} |"
        for fn, cap in CAPABILITIES.items()
    ]
    return "\n".join([head, rule, *rows])


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity set on Linux, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)
