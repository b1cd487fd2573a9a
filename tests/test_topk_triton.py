"""The Triton kernel of certify_topk without a GPU: in Triton's interpreter on CPU torch
tensors (``TRITON_INTERPRET=1``, set by conftest; with ``TRITON_INTERPRET=0`` the same
tests run compiled on a CUDA GPU, or skip without one): k equal to the NumPy path, tails
within its agreement band, the contract against exact arithmetic, the polynomial exp bit
for bit; and compiled for sm_90 and sm_80 with the PTX read (float64 only: no
ex2.approx, no fused multiply-add, no float32 scalar parameter).  Skipped where triton
or torch is absent."""

from __future__ import annotations

import os

import numpy as np
import pytest

import certattn

from .test_topk import _check_contract

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

import certattn._topk_triton as tt  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture
def dev(monkeypatch):
    """Where the kernel runs: the CPU in Triton's interpreter, else a CUDA GPU."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA GPU: nothing runs Triton kernels here")
    monkeypatch.setenv("CERTATTN_KERNEL", "triton")
    return "cpu" if INTERPRET else "cuda"


def _rows(n: int = 384) -> np.ndarray:
    rng = np.random.default_rng(7)
    grid = -(np.arange(n) % 29) / 8.0
    return np.stack([
        rng.normal(0, 1, n), rng.normal(0, 4, n), grid,  # ties on a grid
        np.where(rng.random(n) < 0.5, -np.inf, rng.normal(0, 2, n)),  # half masked
        np.where(np.arange(n) < 5, 0.0, -800.0),  # keys below the exp floor
        np.r_[rng.normal(0, 1, n - 2), [30.0, 29.0]],  # two dominant keys
    ])


def _torch(x: np.ndarray, dev: str):
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(dev, torch.bfloat16)
    return torch.from_numpy(x).to(dev)


def _agree(x: np.ndarray, eps: float, dev: str, monkeypatch, *, exact: bool = True):
    """The Triton path against the NumPy path: same k, tails in the band, the contract."""
    a = certattn.certify_topk(_torch(x, dev), eps, masked_rows="skip")
    monkeypatch.setenv("CERTATTN_KERNEL", "numpy")
    b = certattn.certify_topk(x, eps, masked_rows="skip")
    monkeypatch.setenv("CERTATTN_KERNEL", "triton")
    assert a.k.device.type == dev
    ka, ta = a.k.cpu().numpy(), a.tail_upper.cpu().numpy()
    np.testing.assert_array_equal(ka, b.k)
    np.testing.assert_array_equal(a.n_valid.cpu().numpy(), b.n_valid)
    np.testing.assert_allclose(ta, b.tail_upper, rtol=1e-12, atol=1e-300)
    if exact:
        for i in range(x.shape[0]):
            _check_contract(x[i].astype(np.float64), eps, int(ka[i]), float(ta[i]))


@pytest.mark.parametrize("eps", [1e-9, 0.01, 0.3])
def test_agrees_with_numpy_and_exact_arithmetic(dev, eps, monkeypatch):
    _agree(_rows(), eps, dev, monkeypatch)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_dtype(dev, dtype, monkeypatch):
    x = _rows(200)
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        x = x.astype(ml_dtypes.bfloat16)
    else:
        x = x.astype(dtype)
    _agree(x, 0.01, dev, monkeypatch, exact=False)


def test_the_kernel_settles_ordinary_rows_and_hands_over_the_rest(dev):
    """Rows that need shifted terms (row sum past e^700) or hold NaN go to the array
    kernel; every other row is settled in the kernel."""
    x = _rows(256)
    x[1] += 800.0  # the shifted terms
    x[2, 3] = np.nan
    handed: list[int] = []

    def fallback(sub, eps, gamma):
        handed.append(int(sub.shape[0]))
        import array_api_compat.torch as xt

        from certattn._topk_array import cut_search
        from certattn.topk import _chunk

        return _chunk(sub, eps, gamma, xt, cut_search)

    _k, _tail, _nv, top = tt.certify_chunk(_torch(x, dev), 0.01, 1e-12, fallback)
    top = top.cpu().numpy()
    assert handed == [2]
    assert np.isnan(top[2]) and np.isfinite(top[[0, 1, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="NaN"):
        certattn.certify_topk(_torch(x, dev), 0.01)


def test_shifted_rows_and_masked_rows(dev, monkeypatch):
    x = _rows(256)
    x[1] += 800.0
    x[3, :] = -np.inf  # fully masked (skipped)
    _agree(x, 0.01, dev, monkeypatch, exact=False)


def _exp_reference(a: np.ndarray) -> np.ndarray:
    """The polynomial exp one float64 operation at a time (NumPy rounds each)."""
    import certattn._topk_triton_kernels as kk

    c = {name: getattr(kk, name).value for name in (
        "LOG2E", "ROUNDER", "LN2_HI", "LN2_LO", "ROUNDER_BITS",
        "P11", "P10", "P9", "P8", "P7", "P6", "P5", "P4", "P3")}
    t = a * c["LOG2E"] + c["ROUNDER"]
    kf = t - c["ROUNDER"]
    r = (a - kf * c["LN2_HI"]) - kf * c["LN2_LO"]
    p = np.full_like(a, c["P11"])
    for name in ("P10", "P9", "P8", "P7", "P6", "P5", "P4", "P3"):
        p = p * r + c[name]
    for coef in (0.5, 1.0, 1.0):
        p = p * r + coef
    n = t.view(np.int64) - c["ROUNDER_BITS"]
    return (p * ((n + 1022) << 52).view(np.float64)) * 2.0


def test_polynomial_exp_is_bit_identical_to_the_reference(dev):
    """The kernel's exp in the interpreter against the one-operation-at-a-time NumPy
    reference, bit for bit, on the reduction's worst arguments (next to half-integer
    multiples of log 2) and a spread over [-700, 709]."""
    rng = np.random.default_rng(0)
    half = (np.arange(-2020, 2046) + 0.5) * np.log(2.0)
    half = half[(half > -700) & (half < 709)]
    a = np.concatenate([
        rng.uniform(-700, 709, 6000), half, np.nextafter(half, np.inf),
        np.nextafter(half, -np.inf), [-700.0, 0.0, 1.0, 709.0],
    ])
    out = tt.exp_poly(torch.from_numpy(a).to(dev)).cpu().numpy()
    ref = _exp_reference(a)
    np.testing.assert_array_equal(out.view(np.int64), ref.view(np.int64))
    rel = np.abs(ref / np.exp(a) - 1.0)
    assert rel.max() < 200 * 2.0**-53  # EXP_POLY_ERR = 192u (NumPy's exp: 1-4 ulps)


def test_constants_are_the_numba_kernels():
    """The polynomial exp's digits are those of certattn._topk_numba_kernels (whose
    error bound certattn._fp.EXP_POLY_ERR covers)."""
    import certattn._topk_triton_kernels as kk
    from certattn._topk_numba import _kernel_constants

    nb = _kernel_constants()
    for name in ("LOG2E", "ROUNDER", "LN2_HI", "LN2_LO", "EXP_TOP"):
        assert getattr(kk, name).value == nb[name], name
    for i in range(3, 12):
        assert getattr(kk, f"P{i}").value == 1.0 / float(np.prod(np.arange(1, i + 1)))
    assert kk.FLOOR.value == certattn._fp.EXP_FLOOR


# --- compiled for real GPUs, no GPU needed ------------------------------------------

VARIANTS = {  # name: (kernel, capability, fusion, logits dtype)
    "rows-90-fp32": ("certify_rows_kernel", 90, False, "fp32"),
    "rows-90-fp16": ("certify_rows_kernel", 90, False, "fp16"),
    "rows-80-fp32": ("certify_rows_kernel", 80, False, "fp32"),
    "rows-80-bf16": ("certify_rows_kernel", 80, False, "bf16"),
    "exp-90": ("exp_poly_kernel", 90, False, "fp64"),
    "exp-90-fused": ("exp_poly_kernel", 90, True, "fp64"),
}


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """The PTX of every variant, compiled in one child process: compiling needs the
    kernels decorated for real (``TRITON_INTERPRET=0``), which this process is not."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ptx")
    code = (
        "import json, sys\n"
        "from certattn._topk_triton import compile_ptx\n"
        "for name, v in json.loads(sys.argv[1]).items():\n"
        "    open(sys.argv[2] + '/' + name, 'w').write(compile_ptx(*v))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    subprocess.run([sys.executable, "-c", code, json.dumps(VARIANTS), str(out)], env=env,
                   check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return {name: (out / name).read_text() for name in VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("name", [v for v in VARIANTS if v.startswith("rows")])
def test_compiled_ptx_is_float64_without_fusion(ptx, name):
    _kernel, capability, _fusion, _dtype = VARIANTS[name]
    text = ptx[name]
    assert f".target sm_{capability}" in text
    assert tt.ptx_problems(text) == []
    assert "mul.rn.f64" in text and "add.rn.f64" in text


@pytest.mark.slow
def test_the_ptx_check_sees_fusion(ptx):
    """The check can fail: with fusion on, the polynomial exp becomes fma.rn.f64."""
    assert tt.ptx_problems(ptx["exp-90"]) == []
    assert "fma (fused multiply-add with fusion off)" in tt.ptx_problems(ptx["exp-90-fused"])
