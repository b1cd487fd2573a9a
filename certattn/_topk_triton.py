r"""Triton path of :func:`certattn.certify_topk` for torch tensors on CUDA (``[triton]``).

Chosen by ``CERTATTN_KERNEL=triton``, and by ``auto`` for torch CUDA tensors when Triton
is installed (:func:`certattn._backends.device_kernel`); on the CPU it runs only under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests run it.  The
kernels are in :mod:`certattn._topk_triton_kernels`.

The kernel (one program per row, float64 throughout)
----------------------------------------------------
1. One read of the logits (float16, bfloat16, float32 or float64, widened exactly):
   each term :math:`\hat e_i = \widehat{\exp}(\min(\max(s_i, -700), 710))` by the
   polynomial exp of :mod:`certattn._topk_numba` ("Terms, fused pass": within
   ``EXP_POLY_ERR`` = 192u, inside the :math:`\gamma_e = 2100u` that the acceptance test
   grants every term), stored in a float64 row of terms, their float64 sum :math:`\hat Z`
   (tile sums added in row order), the valid keys, the raised keys (below -700) and the
   NaN / ``+inf`` keys.  Never Triton's float32 ``tl.exp`` (``ex2.approx.f32``, about
   :math:`10^{-5}` relative at :math:`|x| = 80`): every float64 operation of the
   certified terms and sums rounds once, as the kernels are compiled with
   ``enable_fp_fusion=False`` (no fused multiply-add: a test reads the PTX).
2. Rows with NaN or ``+inf``, or with :math:`\hat Z \notin [e^{-650}/\varepsilon,
   e^{700}]` (they need the shifted terms) are *not settled*: the host recomputes them
   with the array kernel (:mod:`certattn._topk_array`), which reports NaN / ``+inf``
   to the caller or shifts.
3. Budget and acceptance test of :func:`certattn.topk._certify_rows`, verbatim
   (:math:`\alpha` per row: :math:`n e^{-699}` if the row has raised keys, else
   :math:`n 2^{-1073}`), from float64 scalars passed in a one-element-per-value float64
   tensor (a Python float argument would be float32 on the GPU).
4. The cut term by a ``K``-way search on the int64 bit patterns of the (positive) terms,
   which order like the terms: each round puts ``K`` thresholds in ``[a, h)`` (``a`` the
   smallest term above the last threshold that fits, ``h`` the smallest term known not
   to fit) and one pass over the row of terms gives, per threshold, the float64 sum of
   the terms at most it (:math:`S`), the largest such term and the smallest term
   above it; the row is settled when ``a = h``.  Thresholds are histogram edges: they
   only steer; no ``tl.sort``, no atomics (every reduction is a per-program
   ``tl.sum`` / ``tl.max`` / ``tl.min``).
5. Exact ties and the certified tail as in :mod:`certattn._topk_array`: the terms below
   the cut term (sum :math:`S_<`, the same selection as the last threshold that fit,
   so the same bits) and the largest :math:`j` of the equal ones with
   :math:`\mathrm{fl}(S_< + \mathrm{fl}(j v)) \le B`.  A row where :math:`S_< > B`
   (which the analysis excludes) is not settled (step 2's fallback).

Offsets are int64 (rows times ``n`` past :math:`2^{31}` keys).  The error analysis is that
of :mod:`certattn.topk` with the polynomial exp's bound: ``k`` and ``tail_upper`` agree
with the NumPy path within the agreement band of :mod:`certattn._topk_numba`.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ._fp import EXP_ABS_ERR, EXP_FLOOR

__all__ = ["BLOCK", "K", "chunk_function", "exp_poly", "kernels"]

BLOCK = 1024  # keys per tile of a row
K = 8  # thresholds per search round
_MOD: tuple[bool, Any] | None = None


def kernels() -> Any:
    """The kernels module, decorated for the current ``TRITON_INTERPRET`` (reloaded when
    it changed: Triton reads it when a kernel is decorated)."""
    global _MOD
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if _MOD is None or _MOD[0] != interpret:
        mod = importlib.import_module("certattn._topk_triton_kernels")
        if _MOD is not None:
            mod = importlib.reload(mod)
        _MOD = (interpret, mod)
    return _MOD[1]


def chunk_function(fallback: Callable[..., Any]) -> Callable[..., Any]:
    """The per-chunk function of :func:`certattn.topk._certify_rows` on the Triton path;
    ``fallback(chunk, eps, gamma)`` computes the rows the kernel does not settle."""

    def run(chunk: Any, eps: float, gamma: float) -> tuple[Any, Any, Any, Any]:
        if eps == 0.0 or chunk.shape[0] == 0:
            return fallback(chunk, eps, gamma)
        return certify_chunk(chunk, eps, gamma, fallback)

    return run


def exp_poly(a: Any) -> Any:
    """The kernel's polynomial exp of a float64 torch tensor (tests, the GPU check)."""
    import torch

    a = a.contiguous()
    out = torch.empty_like(a)
    kernels().exp_poly_kernel[(-(-a.numel() // BLOCK),)](
        a, out, a.numel(), BLOCK=BLOCK, enable_fp_fusion=False
    )
    return out


def params(n: int, eps: float, gamma: float) -> list[float]:
    """The float64 scalars of the kernel: ``eps, gamma, z_min, z_max, big, small``."""
    return [eps, gamma, math.exp(-650.0) / eps, math.exp(700.0),
            n * math.exp(EXP_FLOOR + 1.0), n * EXP_ABS_ERR]


def certify_chunk(
    chunk: Any, eps: float, gamma: float, fallback: Callable[..., Any]
) -> tuple[Any, Any, Any, Any]:
    """``(k, tail before widening, n_valid, top)`` of a torch ``(rows, n)`` chunk."""
    import torch

    x = chunk.contiguous()
    rows, n = x.shape
    dev = x.device
    par = torch.tensor(params(n, eps, gamma), dtype=torch.float64, device=dev)
    terms = torch.empty((rows, n), dtype=torch.float64, device=dev)
    k = torch.empty(rows, dtype=torch.int64, device=dev)
    tail = torch.empty(rows, dtype=torch.float64, device=dev)
    n_valid = torch.empty(rows, dtype=torch.int64, device=dev)
    top = torch.empty(rows, dtype=torch.float64, device=dev)
    status = torch.empty(rows, dtype=torch.int32, device=dev)
    kernel = kernels().certify_rows_kernel
    with np.errstate(all="ignore"):  # the interpreter: inf terms of rows that fall back
        kernel[(rows,)](
            x, x.stride(0), n, par, terms, k, tail, n_valid, top, status,
            BLOCK=BLOCK, K=K, enable_fp_fusion=False,
        )
    todo = torch.nonzero(status).flatten()
    if todo.numel():
        kf, tf, nf, topf = fallback(x[todo], eps, gamma)
        k[todo], tail[todo], n_valid[todo] = kf, tf, nf
        top[todo] = topf.to(torch.float64)
    return k, tail, n_valid, top


SIGNATURE = {
    "x_ptr": "*fp32", "stride": "i64", "n": "i64", "par_ptr": "*fp64", "terms_ptr": "*fp64",
    "k_ptr": "*i64", "tail_ptr": "*fp64", "nvalid_ptr": "*i64", "top_ptr": "*fp64",
    "status_ptr": "*i32", "BLOCK": "constexpr", "K": "constexpr",
}


def compile_ptx(name: str, capability: int, fusion: bool = False, dtype: str = "fp32") -> str:
    """The PTX of kernel ``name`` (``certify_rows_kernel`` for ``dtype`` logits, or
    ``exp_poly_kernel``) compiled for ``sm_<capability>``: no GPU needed, but the
    kernels must be decorated for real (``TRITON_INTERPRET`` unset or 0)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if name == "certify_rows_kernel":
        sig, const = dict(SIGNATURE, x_ptr=f"*{dtype}"), {"BLOCK": BLOCK, "K": K}
    else:
        sig = {"a_ptr": "*fp64", "out_ptr": "*fp64", "n": "i64", "BLOCK": "constexpr"}
        const = {"BLOCK": BLOCK}
    src = ASTSource(fn=getattr(kernels(), name), signature=sig, constexprs=const)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"enable_fp_fusion": fusion}
    )
    return compiled.asm["ptx"]


def ptx_problems(ptx: str) -> list[str]:
    """What the PTX of a certified float64 kernel must not hold: float32 ``exp``
    (``ex2.approx``), fused multiply-adds, float32 scalar parameters or arithmetic."""
    import re

    checks = {
        "ex2.approx (float32 exp)": r"\bex2\.approx",
        "fma (fused multiply-add with fusion off)": r"\bfma\.",
        "a float32 scalar parameter": r"\.param \.f32",
        "float32 arithmetic": r"\b(?:add|sub|mul|div)\.(?:rn\.)?f32",
    }
    return [what for what, pattern in checks.items() if re.search(pattern, ptx)]
