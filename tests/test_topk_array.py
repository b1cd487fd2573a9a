"""The sort-free array kernel of certify_topk (CERTATTN_KERNEL=array): the native path of
CuPy and torch CUDA, run here through NumPy and torch on the CPU (and on CUDA / CuPy where
a GPU is present): the contract against exact arithmetic, and k equal to the NumPy path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import certattn
import certattn._topk_array as ak
from certattn._array import to_numpy
from certattn._backends import device_kernel

from .test_topk import DTYPE_CASES, EPS, _check_contract, _long_rows, dtype_case, logit_rows


def _devices() -> list:
    """NumPy, torch on the CPU and on CUDA, CuPy: those usable here (the rest skip)."""
    out = [pytest.param(("numpy", None), id="numpy")]
    try:
        import torch
    except ImportError:
        torch = None
    skip_cuda = pytest.mark.skip(reason="torch with a CUDA GPU not available")
    out.append(pytest.param(("torch", "cpu"), id="torch", marks=[] if torch else [skip_cuda]))
    cuda = torch is not None and torch.cuda.is_available()
    out.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=[] if cuda else [skip_cuda]))
    out.append(pytest.param(("cupy", None), id="cupy", marks=[] if _cupy_works() else [
        pytest.mark.skip(reason="CuPy with a CUDA GPU not available")]))
    return out


def _cupy_works() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError (no driver, no device)
        return False


@pytest.fixture(params=_devices())
def where(request):
    return request.param


def _on(where, x):
    lib, dev = where
    if lib == "numpy":
        return x
    if lib == "cupy":
        import cupy

        return cupy.asarray(x)
    import torch

    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(dev, torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x)).to(dev)


def _certify(x, eps, kernel, monkeypatch, **kw):
    monkeypatch.setenv("CERTATTN_KERNEL", kernel)
    return certattn.certify_topk(x, eps, **kw)


def _agree_and_exact(where, x, eps, monkeypatch, **kw):
    """The array kernel on ``where``: the contract per row and the NumPy path's k."""
    a = _certify(_on(where, x), eps, "array", monkeypatch, **kw)
    b = _certify(x, eps, "numpy", monkeypatch, **kw)
    ka, ta = to_numpy(a.k), to_numpy(a.tail_upper)
    np.testing.assert_array_equal(ka, b.k)
    np.testing.assert_array_equal(to_numpy(a.n_valid), b.n_valid)
    np.testing.assert_allclose(ta, b.tail_upper, rtol=1e-12, atol=1e-300)
    rows = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
    masked = to_numpy(a.masked).ravel()
    for i in range(rows.shape[0]):
        if not masked[i]:
            _check_contract(rows[i].astype(np.float64), eps, int(ka.ravel()[i]),
                            float(ta.ravel()[i]))
    return a


@given(row=logit_rows(), eps=EPS)
def test_sound_minimal_and_equal_to_numpy_on_short_rows(row, eps):
    with pytest.MonkeyPatch.context() as mp:
        _agree_and_exact(("numpy", None), row, eps, mp)


@pytest.mark.parametrize("eps", [1e-12, 0.01, 0.999999])
def test_long_rows_against_exact_arithmetic(where, eps, monkeypatch):
    _agree_and_exact(where, _long_rows(0), eps, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_every_dtype_against_exact_arithmetic(where, dtype, monkeypatch):
    x, eps = dtype_case(dtype)
    _agree_and_exact(where, x, eps, monkeypatch)


@pytest.mark.parametrize("eps", [1e-9, 0.0625, 0.3, 0.5])
def test_ties_are_resolved_exactly(where, eps, monkeypatch):
    """Runs of equal keys (the cut inside a run: part of it joins the tail), all-equal
    rows, causal rows and keys below the exp floor."""
    n = 1000
    grid = -(np.arange(n) % 37) / 8.0
    rows = np.stack([
        grid, np.sort(grid), np.zeros(n), np.where(grid < -3, -np.inf, grid),
        np.where(np.arange(n) < 3, 0.0, -800.0),
    ])
    _agree_and_exact(where, rows, eps, monkeypatch)


@pytest.mark.parametrize(
    ("row", "eps"),
    [
        (np.array([-1.7e308, -1.6e308, -np.inf]), 0.4),
        (np.array([0.0, -1.0, -2.0, -700.5, -800.0]), 5e-324),
        (np.array([0.0, -1.0, -2.0, -np.inf]), 0.0),
        (np.array([0.0, 0.0, 0.0]), 2.0 / 3.0),
        (np.array([5.0, 1e4, 1e4 - 1.0]), 1e-300),
    ],
)
def test_extreme_rows_against_exact_arithmetic(where, row, eps, monkeypatch):
    _agree_and_exact(where, np.tile(row, (3, 1)), eps, monkeypatch)


def test_a_rows_certificate_depends_on_that_row_alone(monkeypatch):
    monkeypatch.setenv("CERTATTN_KERNEL", "array")
    rng = np.random.default_rng(12)
    x = rng.normal(0, 3, (5, 300))
    x[1, :] = -np.inf
    x[2, 100:] = -np.inf
    x[3] = rng.normal(0, 3, 300) * 1e3 + 5e3
    x[4, :5] = -800.0
    cert = certattn.certify_topk(x, 0.01, masked_rows="skip")
    for i in range(5):
        one = certattn.certify_topk(x[i : i + 1], 0.01, masked_rows="skip")
        assert (int(one.k[0]), float(one.tail_upper[0])) == (int(cert.k[i]),
                                                              float(cert.tail_upper[i]))


def test_nan_and_inf_still_raise(where, monkeypatch):
    x = np.zeros((2, 40))
    for bad in (np.nan, np.inf):
        x[1, 7] = bad
        with pytest.raises(ValueError):
            _certify(_on(where, x), 0.1, "array", monkeypatch)


def test_cut_search_is_the_sorted_cut():
    """On random terms and budgets (ties included), the same t and a tail sum that
    differs from the sorted kernel's only by the summation order."""
    import array_api_compat.numpy as xnp

    from certattn._topk_generic import cut_sorted

    rng = np.random.default_rng(3)
    e = np.exp(rng.normal(0, 4, (300, 257)))
    e[::7, ::3] = 1.0  # ties
    budget = e.sum(axis=1) * rng.choice([1e-12, 1e-3, 0.3, 0.99], 300)
    budget[:3] = [-1.0, 0.0, e[2].sum() * 2]  # nothing fits, nothing but ties, all fit
    t, th = ak.cut_search(e, budget, xnp)
    ts, hs = cut_sorted(e, budget, xnp)
    np.testing.assert_array_equal(t, ts)
    np.testing.assert_allclose(th, hs, rtol=1e-13)
    assert np.all(th <= np.maximum(budget, 0.0))
    assert (t[0], t[2]) == (0, 257)


def test_a_prefix_that_does_not_fit_fails_over_to_the_sorted_cut(monkeypatch):
    """Should a library's sums not be reproducible, the rows go to the sorted kernel
    (simulated: every row flagged) and the answer is the sorted kernel's."""
    import array_api_compat.numpy as xnp

    from certattn._topk_generic import cut_sorted

    real = ak._resolve_ties

    def flagged(e, v, budget, xp):
        t, th, _ = real(e, v, budget, xp)
        return t + 1, th * 3.0, np.ones_like(t, dtype=bool)

    monkeypatch.setattr(ak, "_resolve_ties", flagged)
    e = np.exp(np.random.default_rng(4).normal(0, 3, (6, 50)))
    budget = e.sum(axis=1) * 0.1
    t, th = ak.cut_search(e, budget, xnp)
    ts, hs = cut_sorted(e, budget, xnp)
    np.testing.assert_array_equal(t, ts)
    np.testing.assert_array_equal(th, hs)


def test_routing(monkeypatch):
    """``auto`` keeps NumPy and torch CPU on their paths; ``array`` takes the array
    kernel everywhere; ``triton`` takes it where Triton cannot run."""
    import array_api_compat.numpy as xnp

    x = np.zeros((2, 3))
    assert device_kernel(xnp, x, "auto") is None
    assert device_kernel(xnp, x, "numpy") is None
    assert device_kernel(xnp, x, "array") == "array"
    monkeypatch.setattr("certattn._backends.triton_installed", lambda: True)
    assert device_kernel(xnp, x, "triton") == "array"
    monkeypatch.setattr("certattn._backends.triton_installed", lambda: False)
    with pytest.raises(ImportError, match="certattn\\[triton\\]"):
        device_kernel(xnp, x, "triton")
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    t = torch.zeros((2, 3))
    assert device_kernel(xt, t, "auto") is None
    monkeypatch.setenv("CERTATTN_KERNEL", "bogus")
    with pytest.raises(ValueError, match="array, triton"):
        certattn.certify_topk(x, 0.1)
