"""The registry of batch checks and the ``certattn verify`` runner.

:data:`CHECKS` maps every theorem id to its check, default size and scaling;
:func:`rows_for` turns ``--rows N`` into each check's size (``BASE_ROWS`` scaling);
:func:`run_verify` picks the array backend, seeds each check, shows a progress bar on
stderr and turns a crash into a failed result; :func:`format_table` and :func:`to_json`
render the results.  The command line is :func:`certattn.cli.main` (``certattn verify``).

Each check's cost model is ``fixed + rows / rate`` CPU seconds (NumPy backend,
``benchmarks/verify_speed.py --fit``): ``rate`` is its marginal speed in rows per CPU
second at large ``--rows`` and ``fixed`` what it costs besides (imports, compilation,
index building, the fixed set of long rows, :func:`._common.row_shares`), fitted through
its times at the default size and at ``--rows 1,000,000``.  A check uses one core, and on
an idle machine its wall time is its CPU time.  :func:`estimated_seconds` sums the
checks' costs (with ``jobs``: the longest-first schedule of :func:`iter_verify`), and the
progress display uses the same model for its estimate of the time left.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backends import verify_backends
from .._progress import Progress, progress_enabled
from ..errors import InputError
from ._common import VerifyResult
from .approx import check_delta_error
from .bounds import (
    check_block_bounds,
    check_block_mass,
    check_block_score,
    check_gap_exact_head,
    check_gap_multi,
    check_gap_single,
    check_gap_uniform,
)
from .distribution import (
    check_budget_equiv,
    check_div_corollaries,
    check_topk_minimal,
    check_tv_kl,
    check_tv_tail,
)
from .gaussian import (
    check_gauss_finite_n,
    check_gauss_keps,
    check_gauss_limits,
    check_gauss_threshold,
    check_gauss_tilt,
    check_gauss_topfrac,
    check_gauss_validity,
)
from .geometry import (
    check_geo_depth,
    check_geo_gauss_eq,
    check_geo_headwise,
    check_geo_metric,
    check_geo_oracles,
    check_geo_proxy,
    check_geo_scope,
    check_geo_sigmoid_gate,
    check_geo_sphere_gate,
    check_geo_ungated_flat,
)
from .output import (
    check_mask_hidden,
    check_out_best,
    check_out_bounded,
    check_out_diameter,
    check_out_head_tail,
    check_out_var_decomp,
)
from .quant import check_quant_score
from .search import check_search_sound

BASE_ROWS = 100_000

MAX_JOBS = 256
"""Largest ``--jobs``."""

MAX_ROWS = 10_000_000
"""Largest ``--rows`` (:func:`estimated_seconds` says how long it takes)."""


@dataclass(frozen=True)
class _Spec:
    func: Callable[..., tuple[float, float]]
    default: int
    rate: float  # measured marginal rows per CPU second (NumPy, large --rows)
    row_based: bool = True
    minimum: int = 1
    fixed: float = 0.0  # measured CPU seconds besides rows / rate

    def seconds(self, rows: int) -> float:
        """Estimated CPU seconds of this check at ``rows`` rows."""
        return self.fixed + rows / self.rate


CHECKS: dict[str, _Spec] = {
    "TV-TAIL": _Spec(check_tv_tail, 100_000, 450_000, fixed=0.88),
    "TV-KL": _Spec(check_tv_kl, 40_000, 310_000, fixed=0.74),
    "DIV-COROLLARIES": _Spec(check_div_corollaries, 40_000, 270_000, fixed=0.88),
    "BUDGET-EQUIV": _Spec(check_budget_equiv, 60_000, 480_000, fixed=1.12),
    "TOPK-MINIMAL": _Spec(check_topk_minimal, 70_000, 460_000, fixed=2.61),
    "GAP-SINGLE": _Spec(check_gap_single, 60_000, 680_000, fixed=0.52),
    "GAP-EXACT-HEAD": _Spec(check_gap_exact_head, 30_000, 400_000, fixed=0.43),
    "GAP-MULTI": _Spec(check_gap_multi, 20_000, 54_000, False, 20, fixed=0.02),
    "GAP-UNIFORM": _Spec(check_gap_uniform, 50_000, 490_000, fixed=0.54),
    "BLOCK-BOUNDS": _Spec(check_block_bounds, 100_000, 98_000, fixed=0.26),
    "BLOCK-SCORE": _Spec(check_block_score, 20_000, 62_000, False, 12),
    "BLOCK-MASS": _Spec(check_block_mass, 300_000, 440_000),
    "OUT-BOUNDED": _Spec(check_out_bounded, 50_000, 150_000, fixed=0.93),
    "OUT-HEAD-TAIL": _Spec(check_out_head_tail, 50_000, 280_000, fixed=0.68),
    "OUT-DIAMETER": _Spec(check_out_diameter, 20_000, 21_000, False, 18, fixed=0.08),
    "OUT-BEST": _Spec(check_out_best, 10_000, 4_600, False, 18, fixed=0.23),
    "OUT-VAR-DECOMP": _Spec(check_out_var_decomp, 50_000, 180_000, fixed=1.01),
    "DELTA-ERROR": _Spec(check_delta_error, 20_000, 26_000, False, 200, fixed=0.21),
    "GAUSS-TILT": _Spec(check_gauss_tilt, 20_000, 3_500_000, fixed=0.01),
    "GAUSS-THRESHOLD": _Spec(check_gauss_threshold, 20_000, 1_200_000, fixed=0.06),
    "GAUSS-TOPFRAC": _Spec(check_gauss_topfrac, 20_000, 1_300_000, fixed=0.08),
    "GAUSS-KEPS": _Spec(check_gauss_keps, 20_000, 1_200_000, fixed=0.07),
    "GAUSS-FINITE-N": _Spec(check_gauss_finite_n, 100_000, 230_000, False, 64, fixed=0.05),
    "GAUSS-LIMITS": _Spec(check_gauss_limits, 2_000, 3_900, False, 32, fixed=0.01),
    "GAUSS-VALIDITY": _Spec(check_gauss_validity, 7_000, 72_000, False, 700, fixed=0.43),
    "SEARCH-SOUND": _Spec(check_search_sound, 10_000, 33_000, False, 32, fixed=0.33),
    "QUANT-SCORE": _Spec(check_quant_score, 20_000, 150_000, False, 144, fixed=0.25),
    "GEO-METRIC": _Spec(check_geo_metric, 20_000, 34_000, False, 4, fixed=0.16),
    "GEO-GAUSS-EQ": _Spec(check_geo_gauss_eq, 2_000, 3_600, False, 4, fixed=0.38),
    "GEO-ORACLES": _Spec(check_geo_oracles, 2_000, 4_200, False, 4, fixed=0.46),
    "GEO-UNGATED-FLAT": _Spec(check_geo_ungated_flat, 2_000, 59_000, False, 4, fixed=0.45),
    "GEO-SCOPE": _Spec(check_geo_scope, 800, 9_100, False, 4, fixed=0.16),
    "GEO-HEADWISE": _Spec(check_geo_headwise, 2_000, 41_000, False, 4, fixed=0.23),
    "GEO-SPHERE-GATE": _Spec(check_geo_sphere_gate, 2_000, 20_000, False, 4, fixed=0.13),
    "GEO-SIGMOID-GATE": _Spec(check_geo_sigmoid_gate, 500, 2_300, False, 4, fixed=0.21),
    "GEO-DEPTH": _Spec(check_geo_depth, 200, 680, False, 2, fixed=0.22),
    "GEO-PROXY": _Spec(check_geo_proxy, 2_000, 46_000, False, 4, fixed=0.20),
    "MASK-HIDDEN": _Spec(check_mask_hidden, 10_000, 36_000, False, 12),
}
"""Theorem id -> batch check, its default row count, its measured marginal speed (rows per
CPU second), whether ``--rows N`` gives it ``N`` rows (row-based) or a scaled default
(:func:`rows_for`, at least ``minimum``), and its measured fixed cost in CPU seconds
(``benchmarks/verify_speed.py --fit 1000000``)."""


def rows_for(theorem_id: str, rows: int | None) -> int:
    """Rows the check of ``theorem_id`` draws for ``--rows rows`` (None: its default).

    A row-based check draws ``rows`` logit rows.  The others (key blocks, queries, Monte
    Carlo rows, geometry points: instances that cost tens to thousands of logit rows each)
    draw ``default * f`` (at least their minimum) with ``f = rows / BASE_ROWS`` up to
    ``BASE_ROWS`` and ``f = sqrt(rows / BASE_ROWS)`` beyond: ``--rows 10,000,000`` gives
    them 10 times their default size (proportional scaling would make them 90% of the time).
    """
    spec = CHECKS[theorem_id]
    if rows is None:
        return spec.default
    if spec.row_based:
        return max(1, int(rows))
    f = int(rows) / BASE_ROWS
    return max(spec.minimum, math.ceil(spec.default * (f if f <= 1 else math.sqrt(f))))


def _backend(name: str) -> tuple[Any, Any]:
    """Namespace and device of a ``--backend`` choice (``_backends.verify_backends``)."""
    if name == "numpy":
        import array_api_compat.numpy as xnp

        return xnp, "cpu"
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - needs a GPU machine
            raise InputError(f"backend 'cupy' needs CuPy with a CUDA GPU: {exc}") from None
        import array_api_compat.cupy as xcp

        return xcp, cupy.cuda.Device()
    if name == "strict":
        import array_api_strict as xs

        return xs, xs.Device("CPU_DEVICE")
    raise InputError(f"backend must be one of {verify_backends()}, got {name!r}")


def _check_rows(rows: int | None) -> None:
    if rows is None:
        return
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or not (
        1 <= rows <= MAX_ROWS
    ):
        raise InputError(f"rows must be an integer from 1 to {MAX_ROWS:,}, got {rows!r}")


def estimated_seconds(
    rows: int | None = None, ids: list[str] | tuple[str, ...] | None = None, jobs: int = 1
) -> float:
    """Estimated run time of :func:`run_verify` in seconds (idle cores).

    Each check costs ``fixed + rows_for(id, rows) / rate`` CPU seconds (both measured on
    NumPy, see :data:`CHECKS`); with ``jobs = 1`` the estimate is their sum, with more the
    finish time of the longest-first schedule on ``jobs`` workers (as :func:`iter_verify`
    submits them).  An estimate: a busy or faster machine differs by its speed ratio.
    """
    wanted = list(CHECKS) if ids is None else list(ids)
    costs = sorted((CHECKS[t].seconds(rows_for(t, rows)) for t in wanted), reverse=True)
    workers = [0.0] * max(1, min(int(jobs), len(costs)))
    for c in costs:  # each task to the worker that frees first
        workers[workers.index(min(workers))] += c
    return max(workers)


@functools.cache
def _keep_freed_memory() -> None:
    """Keep freed array memory in the process (glibc only; elsewhere nothing happens).

    The checks allocate and free chunks of a few MiB thousands of times; by default glibc
    returns each to the system and every new chunk page-faults its way back (about a
    third of the CPU time was system time).  Chunks below 32 MiB then come from the
    heap and a freed heap is trimmed only above 1 GiB."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _run_check(tid: str, n: int, seed: int, backend: str, index: int,
               bar: Progress | None = None) -> tuple[float, float, float, str]:
    """Run one check: ``(violation, tolerance, seconds, crash message or "")``.

    The generator is ``default_rng([seed, index])``, so a check's result does not depend on
    the process it runs in or on the checks before it (``--jobs``)."""
    _keep_freed_memory()
    xp, device = _backend(backend)
    rng = np.random.default_rng([int(seed), index])
    t0 = time.perf_counter()
    msg = ""
    try:
        with np.errstate(all="ignore"):
            viol, tol = CHECKS[tid].func(n, xp=xp, device=device, rng=rng, progress=bar)
    except Exception as exc:  # a crash is a failure of that theorem, not of the run
        msg = f"{tid}: {type(exc).__name__}: {exc}"
        viol, tol = math.inf, math.nan
    return float(viol), float(tol), time.perf_counter() - t0, msg


def _check_jobs(jobs: int) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer)) or not (
        1 <= jobs <= MAX_JOBS
    ):
        raise InputError(f"jobs must be an integer from 1 to {MAX_JOBS}, got {jobs!r}")
    return int(jobs)


def iter_verify(
    rows: int | None = None,
    *,
    backend: str = "numpy",
    seed: int = 0,
    ids: list[str] | tuple[str, ...] | None = None,
    progress: bool | None = None,
    jobs: int = 1,
) -> Iterator[VerifyResult]:
    """Like :func:`run_verify`, but yields each result as its check finishes.

    An interrupted iteration has yielded exactly the finished checks (the command line
    prints them when stopped by Ctrl-C or SIGTERM).  With ``jobs > 1`` the results still
    come in registry order (each as soon as it and the ones before it are done).
    """
    from ..theorems import THEOREMS

    order = [t.id for t in THEOREMS]
    wanted = order if ids is None else list(ids)
    unknown = [i for i in wanted if i not in CHECKS]
    if unknown:
        raise InputError(f"no verify check for {', '.join(unknown)}; known: {', '.join(order)}")
    _check_rows(rows)
    jobs = _check_jobs(jobs)
    _backend(backend)  # an unknown backend fails here, before any work
    show = progress_enabled(progress)
    sizes = [rows_for(t, rows) for t in wanted]
    index = [order.index(t) if t in order else 0 for t in wanted]
    if jobs > 1 and len(wanted) > 1:
        yield from _iter_parallel(wanted, sizes, index, seed, backend, jobs, show)
        return
    cost = [CHECKS[t].seconds(n) for t, n in zip(wanted, sizes, strict=True)]
    cost_total, cost_done, t_start = sum(cost), 0.0, time.perf_counter()
    for i, (tid, n) in enumerate(zip(wanted, sizes, strict=True)):
        bar = _CheckBar(f"verify {i + 1}/{len(wanted)} {tid}", n, cost_done, cost[i],
                        cost_total, t_start) if show else None
        try:
            viol, tol, dt, msg = _run_check(tid, n, seed, backend, index[i], bar)
        finally:
            if bar is not None:
                bar.close()
        if msg:
            sys.stderr.write(msg + "\n")
        cost_done += cost[i]
        yield VerifyResult(tid, n, viol, tol, bool(viol <= tol), round(dt, 3))


def _iter_parallel(wanted: list[str], sizes: list[int], index: list[int], seed: int,
                   backend: str, jobs: int, show: bool) -> Iterator[VerifyResult]:
    """``iter_verify`` with the checks in ``jobs`` worker processes (longest first)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cost = [CHECKS[t].seconds(n) for t, n in zip(wanted, sizes, strict=True)]
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    bar = Progress(f"verify ({jobs} jobs)", len(wanted), unit="checks") if show else None
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(wanted)), mp_context=ctx)
    try:
        futures = {}
        for i in sorted(range(len(wanted)), key=lambda j: -cost[j]):
            futures[i] = pool.submit(_run_check, wanted[i], sizes[i], seed, backend, index[i])
        done = 0
        for i, tid in enumerate(wanted):
            viol, tol, dt, msg = futures[i].result()
            if msg:
                sys.stderr.write(msg + "\n")
            done += 1
            if bar is not None:
                bar.update(done)
            yield VerifyResult(tid, sizes[i], viol, tol, bool(viol <= tol), round(dt, 3))
    finally:  # also when stopped early (Ctrl-C, SIGTERM): end the workers, do not wait
        if bar is not None:
            bar.close()
        workers = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            if proc.is_alive():
                proc.terminate()


class _CheckBar(Progress):
    """The bar of one check, with the time left of the whole run from the cost model.

    Rows of one check need not cost the same (longer rows come last), so the checks tick
    in row-equivalents of work (:func:`._common._cases`), and the estimate scales the
    measured costs (:data:`CHECKS` rates) by the speed observed so far on this machine.
    """

    def __init__(self, label: str, total: int, before: float, cost: float,
                 cost_total: float, t_start: float) -> None:
        super().__init__(label, total)
        self._before, self._cost, self._all, self._t_start = before, cost, cost_total, t_start

    def draw(self) -> None:
        done = self._before + self._cost * min(1.0, self.done / max(1, self.total))
        elapsed = time.perf_counter() - self._t_start
        speed = elapsed / done if done > 0 and elapsed > 1.0 else 1.0
        self.eta = max(0.0, (self._all - done) * speed)
        super().draw()


def run_verify(
    rows: int | None = None,
    *,
    backend: str = "numpy",
    seed: int = 0,
    ids: list[str] | tuple[str, ...] | None = None,
    progress: bool | None = None,
    jobs: int = 1,
) -> list[VerifyResult]:
    """Run the batch check of every registered theorem (or of ``ids``) and return the results.

    Parameters
    ----------
    rows : int, optional
        ``None``: each check's default size (under a minute on one core in total).
        ``N`` (1 to :data:`MAX_ROWS`): ``N`` rows for the row-based checks, the others
        scaled (:func:`rows_for`); see :func:`estimated_seconds` for the time.
    backend : {"numpy", "cupy", "strict"}
        Array library the library's functions run on.
    seed : int
        Every check draws from ``numpy.random.default_rng([seed, index of the id])``.
    ids : list of str, optional
        Theorem ids to check (default: every id of :data:`certattn.theorems.THEOREMS`).
    progress : bool, optional
        Progress bar on stderr; default: on a terminal or with ``CERTATTN_PROGRESS=1``.
    jobs : int
        Worker processes (1 to :data:`MAX_JOBS`), one check per task; the results are
        those of ``jobs=1`` (each check draws from its own seeded generator), only the
        seconds differ.

    Raises
    ------
    InputError
        (a ``ValueError``) Unknown id or backend, ``rows`` not an integer in ``[1, MAX_ROWS]``,
        ``jobs`` not an integer in ``[1, MAX_JOBS]``.
    """
    return list(iter_verify(rows, backend=backend, seed=seed, ids=ids, progress=progress,
                            jobs=jobs))


def format_table(results: list[VerifyResult]) -> str:
    """Markdown table: id, rows, max violation, tolerance, pass, seconds (and a summary)."""
    lines = [
        "| id | rows | max violation | tolerance | pass | seconds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.id} | {r.rows:,} | {r.max_violation:.3g} | {r.tolerance:.3g} | "
            f"{'pass' if r.passed else 'FAIL'} | {r.seconds:.2f} |"
        )
    bad = sum(not r.passed for r in results)
    total = sum(r.seconds for r in results)
    lines.append("")
    lines.append(f"{len(results) - bad} passed, {bad} failed, {total:.1f} s")
    return "\n".join(lines) + "\n"


def to_json(results: list[VerifyResult]) -> list[dict[str, Any]]:
    """The results as JSON-ready dicts with exactly the fields of :class:`VerifyResult`.

    A non-finite violation or tolerance (a check that crashed) becomes ``null``, so the
    output stays standard JSON.
    """
    from dataclasses import asdict

    out = [asdict(r) for r in results]
    for d in out:
        for key in ("max_violation", "tolerance"):
            if not math.isfinite(d[key]):
                d[key] = None
    return out
