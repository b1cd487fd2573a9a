"""Batch check of per-key score bounds from quantized keys: QUANT-SCORE.

Adversarial keys (Gaussian, an outlier channel, keys half-way between grid points,
zero-range channels, magnitudes beyond float16, tiny magnitudes) are quantized at 2, 4
and 8 bits, and on nested grids (2 of 4, 2 of 8 and 4 of 8 bits), in groups of 1, 7 and
64 keys (and one group); the exact quantization error
and the exact scores ``scale q.k`` must lie within the library's ``delta`` and
``[lower, upper]`` (QuantKeys.error_bound, score_bounds, page_upper): a float64 product
with its rigorous rounding bound settles every entry far from a bound, the others are
formed in longdouble (:func:`_exact_near`).
"""

from __future__ import annotations

import math

import numpy as np

from .._fp import U
from ._common import Worst, _ctx, _split, _steps, longdouble_ok

_KINDS = ("gauss", "outlier", "halfway", "zero_range", "huge", "tiny")

_GRIDS = ((2, 2), (4, 4), (8, 8), (2, 4), (2, 8), (4, 8))
"""``(bits, grid_bits)``: plain grids and nested ones (the top ``bits`` of a finer grid)."""


def _keys(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    from ..quant import quantize_keys

    k = rng.standard_normal((n, d))
    if kind == "outlier":
        k[:, rng.integers(d)] *= 1e3
    elif kind == "halfway":
        qk = quantize_keys(k, 4, group=None, residual=False)
        lo, st = qk.lo.astype(np.float64)[0], qk.step.astype(np.float64)[0]
        k = lo + st * (rng.integers(0, 15, (n, d)) + 0.5)
    elif kind == "zero_range":
        k[:, : max(1, d // 4)] = 0.1
        k[:, -1] = 0.5
    elif kind == "huge":
        k *= 1e6
    elif kind == "tiny":
        k *= 1e-30
    return k


def _exact_near(q: np.ndarray, keys: np.ndarray, scale: float,
                bounds: tuple[tuple[np.ndarray, float], ...]) -> tuple[np.ndarray, ...]:
    """The exact scores ``scale q.k`` (longdouble) of the entries that may pass a bound.

    A float64 product ``q @ keys.T`` errs by at most ``gamma_d |q|.|k|`` in any summation
    order (FMA included), so every entry whose float64 score is inside each
    ``(bound, sign)`` (``sign (s - bound) <= 0``) by more than
    ``(d + 4) 2^-52 scale |q|.|k|`` is inside exactly; only the other entries (rare on
    honest bounds, every entry a counterfeit moves across) are formed in longdouble.
    Returns ``(rows, cols, exact scores)`` of those entries.
    """
    d = q.shape[1]
    s = (q @ keys.T) * scale
    margin = 2 * (d + 4) * U * ((np.abs(q) @ np.abs(keys).T) * scale) + 1e-300
    near = np.zeros(s.shape, bool)
    for bound, sign in bounds:
        near |= np.isfinite(bound) & (sign * (s - bound) + margin > 0)
    i, j = np.nonzero(near)
    ld = np.longdouble
    return i, j, np.sum(q[i].astype(ld) * keys[j].astype(ld), axis=1) * ld(scale)


def check_quant_score(rows, *, xp, device, rng, progress):
    """QUANT-SCORE: for ``rows`` queries spread over every (kind, bits, grid, group) combination
    (n = 256 keys, d = 32), every key's exact error ``|k - khat|`` (longdouble) is at most
    ``delta`` and every exact score ``scale q.k`` lies in ``[lower, upper]`` and below its
    page bound.  Violation: excess relative to ``scale |q||k|``; tolerance 1e-15 (the
    longdouble reference errs by about ``d 2^-64``); 1e-12 where longdouble is float64."""
    from ..quant import quantize_keys

    ctx, w = _ctx(xp, device, rng, progress), Worst()
    combos = [(k, b, g, grid) for k in _KINDS for b, grid in _GRIDS
              for g in (1, 7, 64, None)]
    ld = np.longdouble
    for (kind, bits, group, grid), share in zip(combos, _split(rows, len(combos)),
                                                 strict=True):
        if share == 0:
            continue
        n, d = 256, 32
        keys = _keys(kind, n, d, ctx.rng)
        qk = quantize_keys(keys, bits, group=group, residual=bool(ctx.rng.integers(2)),
                           grid_bits=grid)
        khat, delta = qk.reconstruct(), qk.error_bound()
        err = np.abs(keys.astype(ld) - khat.astype(ld))
        mag = np.abs(keys).astype(ld) + 1e-300
        w.add(np.where(np.isfinite(delta), (err - delta.astype(ld)) / mag, 0.0).astype(float))
        mag_q = ctx.rng.choice([1e-3, 1.0, 30.0])
        scale = 1.0 / math.sqrt(d)
        knorm = np.linalg.norm(keys, axis=1)[None, :]
        for r in _steps(share, 16 * n):  # bounded memory: chunks of queries
            q = ctx.rng.standard_normal((r, d)) * mag_q
            lower, upper = qk.score_bounds(q, scale=scale)
            pu = qk.page_upper(q, scale=scale)[:, qk.group_of]
            norm = np.linalg.norm(q, axis=1)[:, None] * knorm * scale + 1e-300
            checks = ((lower, -1.0), (upper, 1.0), (pu, 1.0))
            i, j, s = _exact_near(q, keys, scale, checks)
            for bound, sign in checks:
                b = bound[i, j]
                ex = (sign * (s - b.astype(ld)) / norm[i, j].astype(ld)).astype(float)
                w.add(np.where(np.isfinite(b), ex, 0.0))
            ctx.tick(r)
    return w.value, (1e-15 if longdouble_ok() else 1e-12)
