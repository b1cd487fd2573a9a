"""Exact-arithmetic references (mpmath at 60 digits) for small rows.

Floats are converted to mpmath exactly (every binary float is a rational), so these
references are the real-number softmax of the given logits, up to 1e-75 relative.
"""

from __future__ import annotations

from collections.abc import Sequence

import mpmath
import numpy as np

_DPS = 80  # working precision of every reference below (local: never global)


@mpmath.workdps(_DPS)
def exact_weights(row: Sequence[float]) -> list[mpmath.mpf]:
    """Unnormalised exact weights exp(s_i - max) (0 for masked keys), in row order."""
    vals = [float(v) for v in np.asarray(row, dtype=np.float64)]
    finite = [v for v in vals if v != -np.inf]
    m = mpmath.mpf(max(finite))
    return [mpmath.mpf(0) if v == -np.inf else mpmath.exp(mpmath.mpf(v) - m) for v in vals]


@mpmath.workdps(_DPS)
def exact_tails(row: Sequence[float]) -> list[mpmath.mpf]:
    """``tails[k]`` = exact tail mass of the top-k set, for k = 0..n."""
    w = sorted(exact_weights(row), reverse=True)
    z = mpmath.fsum(w)
    tails = []
    acc = mpmath.mpf(0)
    suffix = [mpmath.mpf(0)] * (len(w) + 1)
    for i in range(len(w) - 1, -1, -1):
        acc += w[i]
        suffix[i] = acc
    for k in range(len(w) + 1):
        tails.append(suffix[k] / z)
    return tails


@mpmath.workdps(_DPS)
def exact_min_k(row: Sequence[float], eps: float) -> int:
    """The exact minimal k with tail(k) <= eps."""
    tails = exact_tails(row)
    e = mpmath.mpf(eps)
    return next(k for k, t in enumerate(tails) if t <= e)


@mpmath.workdps(_DPS)
def exact_tail_of_set(row: Sequence[float], kept: Sequence[bool]) -> mpmath.mpf:
    """Exact discarded mass of an arbitrary kept set."""
    w = exact_weights(row)
    z = mpmath.fsum(w)
    return mpmath.fsum(wi for wi, k in zip(w, kept, strict=True) if not k) / z
