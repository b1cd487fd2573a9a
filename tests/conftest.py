"""Shared test fixtures: array namespaces under test and hypothesis profiles.

Profiles: ``ci`` (default, fast) and ``thorough`` (set ``CERTATTN_HYPOTHESIS=thorough``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("CERTATTN_HYPOTHESIS", "ci"))


@dataclass(frozen=True)
class Backend:
    """An array namespace and a device to put test inputs on."""

    name: str
    xp: ModuleType
    device: Any

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """``a`` (NumPy or nested lists) as an array of this backend, on its device."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if self.name == "numpy":
            return a
        if self.name.startswith("strict"):
            return self.xp.asarray(self.xp.asarray(a), device=self.device)
        return self.xp.asarray(a, device=self.device)


def _backends() -> list[Any]:
    out = [pytest.param(Backend("numpy", np, "cpu"), id="numpy")]
    try:
        import array_api_strict as xs

        out.append(pytest.param(Backend("strict", xs, xs.Device("CPU_DEVICE")), id="strict"))
        out.append(pytest.param(Backend("strict-dev1", xs, xs.Device("device1")), id="strict-dev1"))
    except ImportError:  # pragma: no cover - test extra always has it
        pass
    try:
        import torch

        out.append(pytest.param(Backend("torch", torch, "cpu"), id="torch"))
    except ImportError:
        pass
    gpu = pytest.mark.skipif(not _have_cupy_gpu(), reason="CuPy with a CUDA GPU not available")
    cupy = _import_cupy()
    out.append(pytest.param(Backend("cupy", cupy, None), id="cupy", marks=gpu))
    return out


def _import_cupy() -> Any:
    try:
        import cupy

        return cupy
    except Exception:  # ImportError, or a CUDA driver error at import time
        return None


def _have_cupy_gpu() -> bool:
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every array backend available here (CuPy skipped without a GPU)."""
    return request.param
