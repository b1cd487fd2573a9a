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

# The Triton kernel's tests run in Triton's interpreter on CPU tensors unless told
# otherwise (TRITON_INTERPRET=0, as benchmarks/gpu_check.sh does on a GPU).  Triton reads
# it when it decorates its own functions, at import: set it before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")


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
    """One param per (backend, device) of certattn's backend table; absent libraries are
    left out, CuPy without a GPU is skipped (so the report says so)."""
    from certattn._backends import BACKENDS, load

    out = []
    for b in BACKENDS:
        mod = load(b)
        if mod is None:
            if b.name == "cupy":
                reason = "CuPy with a CUDA GPU not available"
                out.append(pytest.param(None, id="cupy", marks=pytest.mark.skip(reason=reason)))
            continue
        devices = b.devices(mod)
        if not devices:
            reason = f"{b.name}: no device available (CuPy with a CUDA GPU not available)"
            out.append(pytest.param(None, id=b.name, marks=pytest.mark.skip(reason=reason)))
        for label, dev in devices:
            name = b.name + label
            out.append(pytest.param(Backend(name, mod, dev), id=name))
    return out


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every array backend available here (CuPy skipped without a GPU)."""
    return request.param


SLOW_FILES = {
    "test_models.py", "test_budget.py", "test_notebooks.py", "test_proofs.py",
    "test_verify.py", "test_reproduce.py", "test_geometry_empirical.py", "test_model_files.py",
    "test_audit.py", "test_dask.py", "test_cli_fuzz.py", "test_approx_fal.py",
    "test_approx_hybrid.py", "test_approx_skyformer.py", "test_approx_delta.py",
    "test_approx_selection.py", "test_readme_names.py", "test_geometry_attention.py",
    "test_geometry_curvature.py", "test_geometry_domain.py", "test_readme.py",
    "test_topk_numba.py",
}
"""Artefacts and applications; ``pytest -m "not slow"`` runs the certificate core alone."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
