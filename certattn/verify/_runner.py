"""The registry of batch checks and the ``certattn verify`` runner.

:data:`CHECKS` maps every theorem id to its check, default size and scaling;
:func:`rows_for` turns ``--rows N`` into each check's size (``BASE_ROWS`` scaling);
:func:`run_verify` picks the array backend, seeds each check, shows a progress bar on
stderr and turns a crash into a failed result; :func:`format_table` and :func:`to_json`
render the results and :func:`main` is the command line.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    check_out_best,
    check_out_bounded,
    check_out_diameter,
    check_out_head_tail,
    check_out_var_decomp,
)
from .search import check_search_sound

BASE_ROWS = 100_000


@dataclass(frozen=True)
class _Spec:
    func: Callable[..., tuple[float, float]]
    default: int
    row_based: bool = True
    minimum: int = 1


CHECKS: dict[str, _Spec] = {
    "TV-TAIL": _Spec(check_tv_tail, 100_000),
    "TV-KL": _Spec(check_tv_kl, 40_000),
    "DIV-COROLLARIES": _Spec(check_div_corollaries, 40_000),
    "BUDGET-EQUIV": _Spec(check_budget_equiv, 60_000),
    "TOPK-MINIMAL": _Spec(check_topk_minimal, 70_000),
    "GAP-SINGLE": _Spec(check_gap_single, 60_000),
    "GAP-EXACT-HEAD": _Spec(check_gap_exact_head, 30_000),
    "GAP-MULTI": _Spec(check_gap_multi, 20_000, False, 20),
    "GAP-UNIFORM": _Spec(check_gap_uniform, 50_000),
    "BLOCK-BOUNDS": _Spec(check_block_bounds, 100_000),
    "BLOCK-SCORE": _Spec(check_block_score, 20_000, False, 12),
    "BLOCK-MASS": _Spec(check_block_mass, 300_000),
    "OUT-BOUNDED": _Spec(check_out_bounded, 50_000),
    "OUT-HEAD-TAIL": _Spec(check_out_head_tail, 50_000),
    "OUT-DIAMETER": _Spec(check_out_diameter, 20_000, False, 18),
    "OUT-BEST": _Spec(check_out_best, 10_000, False, 18),
    "OUT-VAR-DECOMP": _Spec(check_out_var_decomp, 50_000),
    "DELTA-ERROR": _Spec(check_delta_error, 20_000, False, 200),
    "GAUSS-TILT": _Spec(check_gauss_tilt, 20_000),
    "GAUSS-THRESHOLD": _Spec(check_gauss_threshold, 20_000),
    "GAUSS-TOPFRAC": _Spec(check_gauss_topfrac, 20_000),
    "GAUSS-KEPS": _Spec(check_gauss_keps, 20_000),
    "GAUSS-FINITE-N": _Spec(check_gauss_finite_n, 100_000, False, 64),
    "GAUSS-LIMITS": _Spec(check_gauss_limits, 2_000, False, 32),
    "GAUSS-VALIDITY": _Spec(check_gauss_validity, 7_000, False, 700),
    "SEARCH-SOUND": _Spec(check_search_sound, 10_000, False, 32),
    "GEO-METRIC": _Spec(check_geo_metric, 20_000, False, 4),
    "GEO-GAUSS-EQ": _Spec(check_geo_gauss_eq, 2_000, False, 4),
    "GEO-ORACLES": _Spec(check_geo_oracles, 2_000, False, 4),
    "GEO-UNGATED-FLAT": _Spec(check_geo_ungated_flat, 2_000, False, 4),
    "GEO-SCOPE": _Spec(check_geo_scope, 800, False, 4),
    "GEO-HEADWISE": _Spec(check_geo_headwise, 2_000, False, 4),
    "GEO-SPHERE-GATE": _Spec(check_geo_sphere_gate, 2_000, False, 4),
    "GEO-SIGMOID-GATE": _Spec(check_geo_sigmoid_gate, 500, False, 4),
    "GEO-DEPTH": _Spec(check_geo_depth, 200, False, 2),
    "GEO-PROXY": _Spec(check_geo_proxy, 2_000, False, 4),
}
"""Theorem id -> batch check, its default row count, whether ``--rows N`` gives it ``N``
rows (row-based) or ``default * N / BASE_ROWS`` (at least ``minimum``)."""


def rows_for(theorem_id: str, rows: int | None) -> int:
    """Rows the check of ``theorem_id`` draws for ``--rows rows`` (None: its default)."""
    spec = CHECKS[theorem_id]
    if rows is None:
        return spec.default
    if spec.row_based:
        return max(1, int(rows))
    return max(spec.minimum, math.ceil(spec.default * int(rows) / BASE_ROWS))


def _backend(name: str) -> tuple[Any, Any]:
    if name == "numpy":
        import array_api_compat.numpy as xnp

        return xnp, "cpu"
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - needs a GPU machine
            raise ValueError(f"backend 'cupy' needs CuPy with a CUDA GPU: {exc}") from None
        import array_api_compat.cupy as xcp

        return xcp, cupy.cuda.Device()
    if name == "strict":
        import array_api_strict as xs

        return xs, xs.Device("CPU_DEVICE")
    raise ValueError(f"backend must be 'numpy', 'cupy' or 'strict', got {name!r}")


class _Bar:
    """Progress bar on stderr: ``ID  done/total rows  pct  seconds``."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.t0 = label, total, 0, time.perf_counter()
        self.last = 0.0

    def __call__(self, r: int) -> None:
        self.done += r
        now = time.perf_counter()
        if now - self.last < 0.2 and self.done < self.total:
            return
        self.last = now
        frac = min(1.0, self.done / max(1, self.total))
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\r{self.label:<18} [{bar:<30}] {self.done:>11,}/{self.total:,} rows "
            f"{now - self.t0:7.1f}s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 100 + "\r")
        sys.stderr.flush()


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return os.environ.get("CERTATTN_PROGRESS") == "1" or sys.stderr.isatty()


def run_verify(
    rows: int | None = None,
    *,
    backend: str = "numpy",
    seed: int = 0,
    ids: list[str] | tuple[str, ...] | None = None,
    progress: bool | None = None,
) -> list[VerifyResult]:
    """Run the batch check of every registered theorem (or of ``ids``) and return the results.

    Parameters
    ----------
    rows : int, optional
        ``None``: each check's default size (about a minute on 2 cores in total).
        ``N``: ``N`` rows for the row-based checks, the others scaled by ``N / BASE_ROWS``.
    backend : {"numpy", "cupy", "strict"}
        Array library the library's functions run on.
    seed : int
        Every check draws from ``numpy.random.default_rng([seed, index of the id])``.
    ids : list of str, optional
        Theorem ids to check (default: every id of :data:`certattn.theorems.THEOREMS`).
    progress : bool, optional
        Progress bar on stderr; default: on a terminal or with ``CERTATTN_PROGRESS=1``.

    Raises
    ------
    ValueError
        Unknown id or backend, ``rows < 1``.
    """
    from ..theorems import THEOREMS

    order = [t.id for t in THEOREMS]
    wanted = order if ids is None else list(ids)
    unknown = [i for i in wanted if i not in CHECKS]
    if unknown:
        raise ValueError(f"no verify check for {', '.join(unknown)}; known: {', '.join(order)}")
    if rows is not None and (isinstance(rows, bool) or int(rows) < 1):
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    xp, device = _backend(backend)
    show = _want_progress(progress)
    out = []
    for tid in wanted:
        n = rows_for(tid, rows)
        rng = np.random.default_rng([int(seed), order.index(tid) if tid in order else 0])
        bar = _Bar(tid, n) if show else None
        t0 = time.perf_counter()
        try:
            with np.errstate(all="ignore"):
                viol, tol = CHECKS[tid].func(n, xp=xp, device=device, rng=rng, progress=bar)
        except Exception as exc:  # a crash is a failure of that theorem, not of the run
            if bar is not None:
                bar.close()
            sys.stderr.write(f"{tid}: {type(exc).__name__}: {exc}\n")
            viol, tol = math.inf, math.nan
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        viol, tol = float(viol), float(tol)
        out.append(VerifyResult(tid, n, viol, tol, bool(viol <= tol), round(dt, 3)))
    return out


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


def main(argv: list[str] | None = None) -> int:
    """``certattn verify ...`` with these arguments (one CLI: :mod:`certattn.cli`).

    Exit status 0 when every check passes, 1 when one fails, 2 on bad usage.
    """
    from ..cli import main as cli_main

    return cli_main(["verify", *(sys.argv[1:] if argv is None else argv)])
