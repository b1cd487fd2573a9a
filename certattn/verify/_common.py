"""Shared machinery of the batch checks of :mod:`certattn.verify`.

The result type :class:`VerifyResult`, the running worst violation :class:`Worst`, the
relative-error and slack measures, the chunking helpers (at most about
:data:`CHUNK_ELEMS` float64 numbers per step), the per-check context (array namespace,
device, seeded generator, progress, dtypes), the seeded adversarial logit rows
(:func:`_draw`, :func:`_cases`: ties, ``-inf``, dtype-minimum and ``-10000`` masks, wide
ranges, values next to the dtype's maximum, dominant keys, near-uniform rows; windows of
a reused :class:`Pool` of normal and uniform numbers, scaled and shifted per row, so that
drawing costs a copy rather than a random number per logit), the row model
(:func:`row_shares`: short rows scale with ``--rows``, long rows are a fixed set) and the
float64 references computed from the definitions (softmax terms, tails summed from the
small end, Top-k masks) that several areas share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._array import device_of, from_numpy, to_numpy

Array = Any
CHUNK_ELEMS = 1 << 20
REL_FLOOR = 1e-250  # floor of relative errors: values below it are "zero" for every purpose

Progress = Callable[[int], None]


@dataclass(frozen=True)
class VerifyResult:
    """One line of the verify table."""

    id: str
    rows: int
    max_violation: float
    tolerance: float
    passed: bool
    seconds: float


class Worst:
    """Running maximum of violations (NaN counts as infinitely bad)."""

    def __init__(self) -> None:
        self.value = 0.0

    def add(self, v: Any) -> None:
        a = np.asarray(to_numpy(v) if not isinstance(v, float | int) else v, dtype=np.float64)
        if a.size:
            a = np.where(np.isnan(a), np.inf, a)
            self.value = max(self.value, float(np.max(a)))

    def flag(self, bad: Any) -> None:
        """A logical failure anywhere in ``bad`` counts as a violation of 1."""
        if bool(np.any(np.asarray(to_numpy(bad) if not isinstance(bad, bool) else bad))):
            self.value = max(self.value, 1.0)


def _rel(xp: Any, lib: Array, ref: Array, floor: float = REL_FLOOR) -> Array:
    return xp.abs(xp.astype(lib, xp.float64) - ref) / (xp.abs(ref) + floor)


def _slack(xp: Any, true: Array, bound: Array, scale: Any = None) -> Array:
    """``max(0, true - bound) / scale`` (``scale`` defaults to ``true``; 0 where both vanish)."""
    s = true if scale is None else scale
    over = xp.maximum(true - xp.astype(bound, xp.float64), xp.zeros_like(true))
    return xp.where(over > 0, over / xp.maximum(s, xp.full_like(true, 1e-300)), xp.zeros_like(true))


def _split(rows: int, parts: int) -> list[int]:
    return [rows // parts + (i < rows % parts) for i in range(parts)]


def _steps(rows: int, per_row: int) -> Iterator[int]:
    step = max(1, CHUNK_ELEMS // max(1, per_row))
    done = 0
    while done < rows:
        r = min(step, rows - done)
        yield r
        done += r


POOL = 1 << 20
"""Values in each of a check's pools of normal and uniform numbers (8 MiB each)."""


class Pool:
    """Reused pools of standard normal and uniform [0, 1) numbers, drawn once per check.

    A row of ``n`` values is a window of a pool at a random offset (one copy, no random
    number generation per value); the adversarial kinds then scale and shift each row by
    its own random factors, so rows stay as diverse as their per-row parameters."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._normal: np.ndarray | None = None
        self._uniform: np.ndarray | None = None

    def _window(self, pool: np.ndarray, r: int, n: int) -> np.ndarray:
        off = self._rng.integers(0, pool.size - n + 1, r)
        return np.lib.stride_tricks.sliding_window_view(pool, n)[off]

    def normal(self, r: int, n: int) -> np.ndarray:
        """``(r, n)`` standard normal numbers (fresh ones for rows longer than POOL / 4)."""
        if n > POOL // 4:
            return self._rng.standard_normal((r, n))
        if self._normal is None:
            self._normal = self._rng.standard_normal(POOL)
        return self._window(self._normal, r, n)

    def uniform(self, r: int, n: int) -> np.ndarray:
        """``(r, n)`` uniform numbers in [0, 1) (fresh ones for rows longer than POOL / 4)."""
        if n > POOL // 4:
            return self._rng.random((r, n))
        if self._uniform is None:
            self._uniform = self._rng.random(POOL)
        return self._window(self._uniform, r, n)


@dataclass
class Ctx:
    xp: Any
    device: Any
    rng: np.random.Generator
    progress: Progress | None
    dtypes: tuple[Any, ...]
    pool: Pool | None = None

    def put(self, a: Any) -> Array:
        return from_numpy(np.ascontiguousarray(a), xp=self.xp, device=self.device)

    def tick(self, r: int) -> None:
        if self.progress is not None:
            self.progress(r)


def _ctx(xp: Any, device: Any, rng: np.random.Generator, progress: Progress | None) -> Ctx:
    import array_api_compat as compat

    if compat.is_array_api_strict_namespace(xp):
        dtypes: tuple[Any, ...] = (np.float64, np.float32)
    else:
        dtypes = (np.float64, np.float32, np.float16)
    return Ctx(xp, device, rng, progress, dtypes, Pool(rng))


KINDS = ("normal", "ties", "masked", "wide", "near_max", "dominant", "uniform")


def _draw(
    rng: np.random.Generator, kind: str, r: int, n: int, dtype: Any, pool: Pool | None = None
) -> np.ndarray:
    """``r`` rows of ``n`` logits of one adversarial ``kind``, exactly representable in dtype.

    With a :class:`Pool` the standard normal and uniform matrices are windows of its pools
    (cheap); without, fresh numbers from ``rng``."""
    top = float(np.finfo(dtype).max)

    def normal() -> np.ndarray:
        return pool.normal(r, n) if pool is not None else rng.standard_normal((r, n))

    def unif() -> np.ndarray:
        return pool.uniform(r, n) if pool is not None else rng.random((r, n))

    if kind == "normal":
        x = normal() * rng.uniform(0.1, 5.0, (r, 1)) + rng.uniform(-50, 50, (r, 1))
    elif kind == "ties":  # a coarse grid: many exact ties, also at the cut
        x = np.round(normal() * rng.uniform(0.5, 3.0, (r, 1))) / 2
    elif kind == "masked":
        x = normal() * rng.uniform(0.5, 4.0, (r, 1))
        drop = unif() < rng.uniform(0.0, 0.95, (r, 1))
        drop[np.arange(r), rng.integers(0, n, r)] = False  # at least one valid key
        # a third of the rows masked by -inf, a third by the dtype's minimum (a finite
        # fill), a third by the additive bias -10000 (finite, the logit stays in the row)
        fill = rng.integers(0, 3, (r, 1))
        x = np.where(drop, np.where(fill == 0, -np.inf, np.where(fill == 1, -top, x - 1e4)), x)
    elif kind == "wide":  # spreads up to 1e4 around offsets up to +-1e4 (f16: smaller)
        big = 1e4 if dtype != np.float16 else 3e3
        spread = 10 ** rng.uniform(0, math.log10(big), (r, 1))
        x = normal() * spread + rng.uniform(-big, big, (r, 1))
    elif kind == "near_max":  # next to +-max of the dtype: differences are astronomically large
        sign = np.where(rng.random((r, 1)) < 0.5, 1.0, -1.0)
        steps = np.floor(unif() * 4.0)  # 0..3 steps of 2^-9 below 0.99 max: ties
        x = sign * 0.99 * top * (1 - steps * 2.0**-9)
        x = np.where(sign > 0, x, x * (1 - 2.0**-8))
    elif kind == "dominant":  # a few keys far above a noisy floor
        x = normal()
        hot = unif() < 2.0 / n
        x[hot] += rng.uniform(10, 40, int(hot.sum()))
    elif kind == "uniform":  # near-uniform rows (long rows are the float32 cumsum pitfall)
        x = 1e-3 * normal()
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    x = np.clip(x, -top, top, out=x, where=x > -np.inf)  # -inf masks stay -inf
    return x.astype(dtype)


LONG_KEYS = 128
"""Rows of more keys than this are *long* (rounding growth); the others are *short*."""

LONG_ROWS = 1024
"""Rows of each (kind, dtype, long length) combination, whatever ``--rows`` (fewer only when
an even split gives fewer): the long rows are a fixed set, the short rows take the rest."""


def row_shares(rows: int, lengths: list[int]) -> list[int]:
    """Rows of each combination of ``lengths`` keys (the row model of :func:`_cases`).

    ``rows`` split evenly, except that a combination of more than :data:`LONG_KEYS` keys
    gets at most :data:`LONG_ROWS` rows and the rows it leaves go to the short
    combinations (if there are none, the split stays even).  So a large ``--rows`` adds
    short rows (many cases: ties, masks, ranges) while the long rows (rounding growth)
    stay a fixed set, and up to ``LONG_ROWS`` rows per combination nothing changes.
    """
    even = _split(rows, len(lengths))
    short = [i for i, n in enumerate(lengths) if n <= LONG_KEYS]
    if not short or len(short) == len(lengths):
        return even
    shares = [0 if n <= LONG_KEYS else min(s, LONG_ROWS) for s, n in zip(even, lengths,
                                                                         strict=True)]
    for i, s in zip(short, _split(rows - sum(shares), len(short)), strict=True):
        shares[i] = s
    return shares


def _cases(
    ctx: Ctx,
    rows: int,
    ns: tuple[int, ...],
    kinds: tuple[str, ...] = KINDS,
    *,
    width: int = 1,
) -> Iterator[tuple[Array, Array, int, str]]:
    """Sub-batches ``(x_lib, x64, n, kind)`` covering ``rows`` rows over every (kind, dtype, n).

    Rows are shared out by :func:`row_shares`: evenly, but at most :data:`LONG_ROWS` rows of
    each combination with ``n > LONG_KEYS`` (the rest of ``rows`` goes to the short rows).

    ``x_lib`` is in the drawn dtype on the backend; ``x64`` is its exact float64 value.
    ``width`` = float64 numbers per logit kept alive by the check (sizes the chunks).
    """
    combos = [(k, d, n) for n in ns for d in ctx.dtypes for k in kinds]
    shares = row_shares(rows, [n for _, _, n in combos])
    # Progress ticks in row-equivalents of work (a row of n keys costs about n), so that
    # the bar moves evenly although the longest rows come last.
    per_key = rows / max(1, sum(s * c[2] for s, c in zip(shares, combos, strict=True)))
    work, ticked = 0.0, 0
    for (kind, dtype, n), share in zip(combos, shares, strict=True):
        for r in _steps(share, n * width):
            x = _draw(ctx.rng, kind, r, n, dtype, ctx.pool)
            yield ctx.put(x), ctx.put(x.astype(np.float64)), n, kind
            work += r * n * per_key
            step = min(rows, round(work)) - ticked
            ticked += step
            ctx.tick(step)


def _terms(xp: Any, x64: Array) -> tuple[Array, Array]:
    """``(e, Z)``: ``e_i = exp(s_i - max s)`` (0 for masked keys) and ``Z = sum e``."""
    m = xp.max(x64, axis=-1, keepdims=True)
    e = xp.exp(x64 - m)
    return e, xp.sum(e, axis=-1)


def _at(xp: Any, a: Array, idx: Array) -> Array:
    """``a[row, idx[row]]`` with ``idx`` clipped into range."""
    n = a.shape[-1]
    i = xp.clip(idx, 0, n - 1)
    return xp.take_along_axis(a, xp.reshape(xp.astype(i, xp.int64), (-1, 1)), axis=-1)[:, 0]


def topk_tail(xp: Any, cs_up: Array, k: Array) -> Array:
    """Exact-to-rounding ``T_k`` (sum of the ``n - k`` smallest terms) from the small end."""
    n = cs_up.shape[-1]
    t = _at(xp, cs_up, n - k - 1)
    return xp.where(k < n, t, xp.zeros_like(t))


def rank_mask(xp: Any, x64: Array, k: Array) -> Array:
    """A Top-k mask (ties by position) by an algorithm the library does not use.

    On the host: for rows of at most :data:`_COUNT_MAX` keys the definition itself, key
    ``i`` is kept iff ``#{j: s_j > s_i} + #{j < i: s_j = s_i} < k`` (pairwise counts); for
    longer rows one stable sort of ``-s`` whose first ``k`` positions are scattered into
    the mask.  Masked keys (``-inf``) are never kept.
    """

    x = to_numpy(x64)
    kk = np.asarray(to_numpy(k)).reshape(-1, 1)
    n = x.shape[-1]
    if n <= _COUNT_MAX:
        before = np.tril(np.ones((n, n), bool), -1)  # [i, j]: j < i
        mask = np.empty(x.shape, bool)
        step = max(1, CHUNK_ELEMS // (n * n))
        for a in range(0, x.shape[0], step):
            xa = x[a:a + step]
            rank = np.sum(xa[:, None, :] > xa[:, :, None], axis=-1)
            rank += np.sum((xa[:, None, :] == xa[:, :, None]) & before, axis=-1)
            mask[a:a + step] = rank < kk[a:a + step]
    else:
        order = np.argsort(-x, axis=-1, kind="stable")
        mask = np.zeros(x.shape, bool)
        np.put_along_axis(mask, order, np.arange(n)[None, :] < kk, axis=-1)
    return from_numpy(mask & (x > -np.inf), xp=xp, device=device_of(x64))


_COUNT_MAX = 32
"""Rows up to this many keys get the pairwise-count definition in :func:`rank_mask`."""


def rand_k(ctx: Ctx, r: int, lo: int, hi: int) -> Array:
    return ctx.put(ctx.rng.integers(lo, hi + 1, r).astype(np.int64))


def rand_kept(ctx: Ctx, x64: Array, r: int, n: int) -> Array:
    """An arbitrary kept set (random keys) that contains one valid key (the row maximum)."""
    xp = ctx.xp
    u = ctx.pool.uniform(r, n) if ctx.pool is not None else ctx.rng.random((r, n))
    kept = ctx.put(u < ctx.rng.uniform(0.05, 0.95, (r, 1)))
    top = x64 == xp.max(x64, axis=-1, keepdims=True)
    return kept | top


EPS = (0.3, 0.1, 1e-2, 1e-4, 1e-8, 1e-20)
"""Budgets the distribution, bound and search checks certify at."""


def longdouble_ok() -> bool:
    return np.finfo(np.longdouble).nmant >= 63
