r"""``certattn verify``: batch checks of every registered theorem (:mod:`certattn.theorems`).

For every theorem id, :data:`CHECKS` holds one check
``check(rows, *, xp, device, rng, progress) -> (max_violation, tolerance)``.  A check draws
``rows`` instances (logit rows, queries, parameter draws or Monte Carlo rows, see
:data:`CHECKS`), including adversarial ones (ties on grids, ``-inf`` masks, ranges up to
:math:`\pm 10^4` and next to the dtype's maximum, float16/float32/float64 inputs,
near-uniform rows, a few dominant keys), runs the LIBRARY's functions on the chosen array
backend and compares them with an independent float64 reference computed differently
(direct definitions, sums accumulated from the small end, extended precision,
quadrature or Monte Carlo).  The violation is

* identities: the relative error ``|lib - ref| / (|ref| + floor)`` (``floor`` only keeps
  underflowing values from dividing by zero, or states an absolute error budget);
* bounds: the relative slack below zero, ``max(0, true - bound) / scale``;
* Monte Carlo closed forms: ``max(0, |estimate - closed form| - bias) / standard error``
  (a z-score; tolerance 6);
* a logical failure (a certificate that is not minimal, a sign that is wrong) counts as a
  violation of 1.

A check passes when its largest violation is at most its tolerance; tolerances are
stated (and justified) in each check's docstring and never depend on the result.
Everything is chunked: at most about ``CHUNK_ELEMS`` (2^20) float64 numbers per step, so
``--rows 10_000_000`` (the most, :data:`MAX_ROWS`) runs in bounded memory, with a progress
bar on stderr (on a terminal, with ``CERTATTN_PROGRESS=1`` or ``--progress``) that
estimates the time left from each check's measured speed (:func:`estimated_seconds`).

``run_verify(rows=None)`` uses each check's default size (the whole run takes under a minute
on one core); ``rows=N`` gives ``N`` rows to the row-based checks (short rows scale, long
rows are a fixed set, :func:`._common.row_shares`) and scales the others by
``N / BASE_ROWS`` up to ``BASE_ROWS`` and by its square root beyond (at least their
minimum, :func:`rows_for`); :func:`estimated_seconds` says how long it takes, and
``jobs=N`` runs the checks in ``N`` worker processes.
:func:`iter_verify` yields the results one by one (the command line prints the finished
ones when interrupted).  ``backend="cupy"`` runs the
library on the GPU (``xp = cupy``); ``backend="strict"`` on ``array-api-strict`` (a
stand-in that catches non-standard code).  The geometry, search, Bennett-mass and
Gaussian Monte Carlo modules are NumPy-only by design (tiny matrices, or a host-side
engine that accepts device arrays); their checks run on the host whatever the backend.

The package: :mod:`._common` (result type, chunking, adversarial rows, shared
references), one module of checks per area (:mod:`.distribution`, :mod:`.bounds`,
:mod:`.output`, :mod:`.gaussian`, :mod:`.search`, :mod:`.geometry`) and :mod:`._runner`
(the registry :data:`CHECKS`, :func:`run_verify`, the table and JSON) and
:mod:`._power` (one counterfeit per theorem, ``certattn verify --power``: whether each
check rejects a slightly false statement, and the smallest falsification it sees); the
command line is :func:`certattn.cli.main` (``certattn verify``, ``python -m
certattn.verify``).
"""

from __future__ import annotations

from ._common import CHUNK_ELEMS, VerifyResult
from ._runner import (
    BASE_ROWS,
    CHECKS,
    MAX_JOBS,
    MAX_ROWS,
    estimated_seconds,
    format_table,
    iter_verify,
    rows_for,
    run_verify,
    to_json,
)

__all__ = [
    "BASE_ROWS",
    "CHECKS",
    "CHUNK_ELEMS",
    "MAX_JOBS",
    "MAX_ROWS",
    "VerifyResult",
    "estimated_seconds",
    "format_table",
    "iter_verify",
    "rows_for",
    "run_verify",
    "to_json",
]
