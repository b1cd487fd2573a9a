r"""The power of the batch checks: every check run against a counterfeit of its theorem.

A check that passes proves little unless it would fail on a statement that is slightly
false.  :data:`COUNTERFEITS` gives every registered theorem one counterfeit, a family in
a relative size ``delta``: a bound scaled by ``1 - delta`` (or a log-mass lowered by
``-log(1 - delta)``, a score bound moved inwards by ``delta |bound|``), an identity or
closed form scaled by ``1 + delta``, a certified Top-k's tail bound scaled by
``1 - delta`` (for the rounding-level statements, ``delta`` of the order of their
rounding margin removes it).  Each counterfeit's :attr:`Counterfeit.delta` is 1e-6,
except where the check's tolerance is stated above it (finite differences: GEO-GAUSS-EQ,
GEO-SCOPE 1e-5, GEO-PROXY 1e-3; Monte Carlo z-scores: GAUSS-FINITE-N 1e-2,
GAUSS-LIMITS and GAUSS-VALIDITY 0.1).

A counterfeit is applied without editing the library: :func:`counterfeit` substitutes the
wrapped function for the original in every loaded ``certattn`` module that binds it (the
library module and those that imported it), or a method on its class, for the duration of
a ``with`` block, and restores the originals on exit.  The check itself is unchanged.

:func:`power` runs the check of one theorem against its counterfeit at ``delta`` (the
counterfeit's :attr:`Counterfeit.delta`, default) and reports whether it was rejected,
and the smallest ``delta`` it rejects at the given rows (its sharpness, by bisection on
``log10 delta`` between ``1e-16`` and ``0.5``).  ``certattn verify --power`` prints the
table (:func:`format_power`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["COUNTERFEITS", "Counterfeit", "PowerResult", "counterfeit", "format_power", "power"]

Wrap = Callable[[Any, float], Any]
"""``(result, delta) -> counterfeit result``."""


@dataclass(frozen=True)
class Counterfeit:
    """A slightly false version of one theorem's statement.

    Attributes
    ----------
    targets : tuple of str
        ``"certattn.module:name"`` or ``"certattn.module:Class.method"``: what is wrapped.
    wrap : callable
        ``wrap(result, delta)``: the counterfeit result of a wrapped call.
    what : str
        One line: the false statement.
    delta : float
        The size at which ``certattn verify --power`` and the tests expect rejection.
    """

    targets: tuple[str, ...]
    wrap: Wrap
    what: str
    delta: float = 1e-6


# ------------------------------------------------------------------ result transforms
def _mul(f: float) -> Callable[[Any], Any]:
    def g(a: Any) -> Any:
        if isinstance(a, float | int) and not isinstance(a, bool):
            return a * f
        if hasattr(a, "dtype") and "float" in str(a.dtype):
            return a * f
        return a

    return g


def _fields(names: tuple[str, ...], sign: float) -> Wrap:
    """Scale the named fields of a dataclass result by ``1 + sign * delta``."""

    def wrap(res: Any, delta: float) -> Any:
        f = _mul(1.0 + sign * delta)
        return dataclasses.replace(res, **{n: f(getattr(res, n)) for n in names})

    return wrap


def _scale(sign: float) -> Wrap:
    """Scale the (array or float) result by ``1 + sign * delta``."""

    def wrap(res: Any, delta: float) -> Any:
        return _mul(1.0 + sign * delta)(res)

    return wrap


def _log_down(res: Any, delta: float) -> Any:
    return res + math.log1p(-delta)


def _inward(res: Any, delta: float) -> Any:
    """Score bounds ``(lower, upper, ...)`` moved inwards by ``delta |bound|``."""
    lo, up = res[0], res[1]
    lo2, up2 = lo + delta * abs(lo), up - delta * abs(up)
    if dataclasses.is_dataclass(res):
        return dataclasses.replace(res, lower=lo2, upper=up2)
    return (lo2, up2, *tuple(res)[2:])


def _any(sign: float, names: tuple[str, ...] = ("riemann", "ricci", "scalar")) -> Wrap:
    """Scale an array result, or the named fields of a dataclass result, by ``1 + sign delta``."""
    fields = _fields(names, sign)

    def wrap(res: Any, delta: float) -> Any:
        if dataclasses.is_dataclass(res):
            return fields(res, delta)
        return _mul(1.0 + sign * delta)(res)

    return wrap


def _shift_flat(res: Any, delta: float) -> Any:
    """A curvature that should vanish shifted by ``delta`` times its natural scale."""
    scale = 1.0
    if res.second_fundamental_form is not None:
        ii = res.second_fundamental_form
        scale = np.sum(ii * ii, axis=(-3, -2, -1)) / np.linalg.det(res.metric) + 1.0
    return dataclasses.replace(res, scalar=res.scalar + delta * scale)


def _shift_rule(res: Any, delta: float) -> Any:
    """A Monte Carlo comparison whose rule is off by ``delta`` (a fraction of n)."""
    return dataclasses.replace(res, rule=res.rule + delta)


_UP, _DOWN = 1.0, -1.0
_CF = Counterfeit

COUNTERFEITS: dict[str, Counterfeit] = {
    "TV-TAIL": _CF(("certattn.distribution:tail_mass",), _scale(_UP),
                   "tail_mass(x, kept) = (1 + delta) tau"),
    "TV-KL": _CF(("certattn.distribution:truncation_divergences",), _fields(("kl",), _UP),
                 "KL(P_hat||P) = -(1 + delta) log(1 - tau)"),
    "DIV-COROLLARIES": _CF(("certattn.distribution:truncation_divergences",),
                           _fields(("chi2", "hellinger2"), _UP),
                           "chi2 and H^2 of the truncation scaled by 1 + delta"),
    "BUDGET-EQUIV": _CF(("certattn.topk:certify_topp",), _fields(("tail_upper",), _DOWN),
                        "top-p's certified tail (1 - delta) x its sound bound"),
    "TOPK-MINIMAL": _CF(("certattn.topk:certify_topk",), _fields(("tail_upper",), _DOWN),
                        "certify_topk's tail_upper scaled by 1 - delta (margin removed)"),
    "GAP-SINGLE": _CF(("certattn.bounds:gap_bound",), _scale(_DOWN),
                      "1/(1 + (k/(n-k)) e^Delta) scaled by 1 - delta"),
    "GAP-EXACT-HEAD": _CF(("certattn.bounds:gap_exact_head_bound",), _scale(_DOWN),
                          "the exact-head gap bound scaled by 1 - delta"),
    "GAP-MULTI": _CF(("certattn.bounds:multigap_bound",), _scale(_DOWN),
                     "X/(k + X) scaled by 1 - delta"),
    "GAP-UNIFORM": _CF(("certattn.bounds:uniform_gap_bound",), _scale(_DOWN),
                       "1/(1 + k expm1(min gap)) scaled by 1 - delta"),
    "BLOCK-BOUNDS": _CF(("certattn.blocks:block_tail_bounds",), _fields(("upper",), _DOWN),
                        "the block upper tail bound scaled by 1 - delta"),
    "BLOCK-SCORE": _CF(("certattn.blocks:key_block_bounds",), _inward,
                       "block score bounds moved inwards by delta |bound|"),
    "BLOCK-MASS": _CF(("certattn.cells:bennett_log_mass",), _log_down,
                      "the Bennett mass bound scaled by 1 - delta"),
    "OUT-BOUNDED": _CF(("certattn.output:output_bounds",), _fields(("bounded",), _DOWN),
                       "|Attn - Attn_k| <= (1 - delta) 2 C tau"),
    "OUT-HEAD-TAIL": _CF(("certattn.output:head_tail_terms",), _fields(("tau",), _UP),
                         "Attn - Attn_k = (1 + delta) tau (mu_T - mu_H)"),
    "OUT-DIAMETER": _CF(("certattn.output:output_bounds",),
                        _fields(("tail_head", "diameter", "diameter_all"), _DOWN),
                        "the diameter chain's bounds scaled by 1 - delta"),
    "OUT-BEST": _CF(("certattn.output:output_bounds",), _fields(("variance", "best"), _DOWN),
                    "the variance bound and best scaled by 1 - delta"),
    "OUT-VAR-DECOMP": _CF(("certattn.output:variance_decomposition",),
                          _fields(("within_head", "within_tail", "between", "total",
                                   "error"), _UP),
                          "every term of the decomposition scaled by 1 + delta"),
    "DELTA-ERROR": _CF(("certattn.approx.delta:delta_correct",),
                       _fields(("error_bound",), _DOWN),
                       "delta_correct's error_bound scaled by 1 - delta"),
    "GAUSS-TILT": _CF(("certattn.gaussian:tilted_normal",),
                      lambda r, d: (r[0] * (1 + d), r[1]),
                      "the tilted mean scaled by 1 + delta"),
    "GAUSS-THRESHOLD": _CF(("certattn.gaussian:discarded_mass",), _scale(_UP),
                           "discarded_mass scaled by 1 + delta"),
    "GAUSS-TOPFRAC": _CF(("certattn.gaussian:top_fraction_tail_mass",), _scale(_UP),
                         "top_fraction_tail_mass scaled by 1 + delta"),
    "GAUSS-KEPS": _CF(("certattn.gaussian:keps_fraction",), _scale(_UP),
                      "keps_fraction scaled by 1 + delta"),
    "GAUSS-FINITE-N": _CF(("certattn.gaussian:expected_tail_sum",), _scale(_UP),
                          "expected_tail_sum scaled by 1 + delta", 1e-2),
    "GAUSS-LIMITS": _CF(("certattn.gaussian:participation_ratio_limit",), _scale(_UP),
                        "participation_ratio_limit scaled by 1 + delta", 1e-1),
    "GAUSS-VALIDITY": _CF(("certattn.gaussian_mc:monte_carlo_keps",), _shift_rule,
                          "the k_eps rule off by delta (absolute fraction of n)", 1e-1),
    "SEARCH-SOUND": _CF(("certattn.search:certified_search",), _fields(("tail_upper",), _DOWN),
                        "certified_search's tail_upper scaled by 1 - delta"),
    "QUANT-SCORE": _CF(("certattn.quant:QuantKeys.error_bound",), _scale(_DOWN),
                       "the quantisation error bound scaled by 1 - delta"),
    "GEO-METRIC": _CF(("certattn.geometry.metric:pullback_metric",
                       "certattn.geometry.metric:gaussian_fisher_metric"), _scale(_UP),
                      "the pull-back / Fisher metric scaled by 1 + delta"),
    "GEO-GAUSS-EQ": _CF(("certattn.geometry.curvature:gauss_route",), _any(_UP),
                        "the Gauss route's curvatures scaled by 1 + delta", 1e-5),
    "GEO-ORACLES": _CF(("certattn.geometry.curvature:curvature",
                        "certattn.geometry.curvature:christoffel"), _any(_UP),
                       "curvatures and Christoffel symbols scaled by 1 + delta"),
    "GEO-UNGATED-FLAT": _CF(("certattn.geometry.curvature:curvature",), _shift_flat,
                            "K = 0 shifted by delta (1 + sum II^2 / det g)"),
    "GEO-SCOPE": _CF(("certattn.geometry.curvature:curvature",), _any(_UP),
                     "K(0) = -4 (1 + delta)", 1e-5),
    "GEO-HEADWISE": _CF(("certattn.geometry.gating:headwise_second_fundamental_form",),
                        _any(_UP), "the headwise II scaled by 1 + delta"),
    "GEO-SPHERE-GATE": _CF(("certattn.geometry.gating:sphere_cap_curvature",), _any(_UP),
                           "sigma^2/c^2 scaled by 1 + delta"),
    "GEO-SIGMOID-GATE": _CF(("certattn.geometry.gating:sigmoid_gate_curvature_at_zero",),
                            _any(_UP), "K(0) of the sigmoid gate scaled by 1 + delta"),
    "GEO-DEPTH": _CF(("certattn.geometry.gating:depth_curvature",), _any(_UP),
                     "depth_curvature scaled by 1 + delta"),
    "GEO-PROXY": _CF(("certattn.geometry.proxy:nonlinearity_proxy",), _any(_UP),
                     "nonlinearity_proxy scaled by 1 + delta", 1e-3),
    "MASK-HIDDEN": _CF(("certattn.attention:certify_attention",),
                       _fields(("tail_upper", "error_bound"), _DOWN),
                       "certify_attention's tail_upper and error_bound scaled by 1 - delta"),
}
"""Theorem id -> its counterfeit (``tests/test_verify_power.py`` checks the keys against
:data:`certattn.theorems.THEOREMS`)."""


# ------------------------------------------------------------------ substitution
def _resolve(target: str) -> tuple[Any, str, Any]:
    """``(owner, attribute, original)`` of ``"module:name"`` or ``"module:Class.name"``."""
    import importlib

    mod_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(mod_name)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    return owner, name, owner.__dict__[name]


def _wrapped(orig: Any, wrap: Wrap, delta: float) -> Any:
    def fake(*args: Any, **kwargs: Any) -> Any:
        return wrap(orig(*args, **kwargs), delta)

    fake.__wrapped__ = orig  # type: ignore[attr-defined]
    return fake


@contextlib.contextmanager
def counterfeit(theorem_id: str, delta: float | None = None) -> Iterator[Counterfeit]:
    """Within the block, the library computes the counterfeit of ``theorem_id``.

    Every loaded ``certattn`` module attribute bound to a target (the defining module and
    every module that imported the function by name) is replaced, and restored on exit.
    """
    cf = COUNTERFEITS[theorem_id]
    d = cf.delta if delta is None else float(delta)
    saved: list[tuple[Any, str, Any]] = []
    try:
        for target in cf.targets:
            owner, name, orig = _resolve(target)
            fake = _wrapped(orig, cf.wrap, d)
            if isinstance(owner, type):
                saved.append((owner, name, orig))
                setattr(owner, name, fake)
                continue
            for mod in [m for k, m in list(sys.modules.items())
                        if k.startswith("certattn") and m is not None]:
                if mod.__dict__.get(name) is orig:
                    saved.append((mod, name, orig))
                    setattr(mod, name, fake)
        yield cf
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


# ------------------------------------------------------------------ power
@dataclass(frozen=True)
class PowerResult:
    """One line of the power table."""

    id: str
    rows: int
    delta: float
    rejected: bool
    sharpness: float | None
    what: str
    seconds: float


LO, HI = 1e-16, 0.5
"""Range of the bisection on ``delta`` (sharpness ``None``: not rejected even at ``HI``)."""


def _rejects(tid: str, delta: float, rows: int | None, seed: int) -> bool:
    from ._runner import iter_verify

    with counterfeit(tid, delta):
        res = next(iter(iter_verify(rows, seed=seed, ids=[tid], progress=False)))
    return not res.passed


def power(
    theorem_id: str,
    rows: int | None = None,
    *,
    seed: int = 0,
    steps: int = 4,
    sharpness: bool = True,
) -> PowerResult:
    """Run the check of ``theorem_id`` against its counterfeit.

    Parameters
    ----------
    theorem_id : str
        A key of :data:`COUNTERFEITS`.
    rows : int, optional
        As ``certattn verify --rows`` (None: the check's default size).
    seed : int
        The check's seed.
    steps : int
        Bisection steps on ``log10 delta`` (4: within a factor of about 4 below the
        counterfeit's delta, 10 decades).
    sharpness : bool
        False: only test the counterfeit's own ``delta``.

    Returns
    -------
    PowerResult
        ``rejected`` at the counterfeit's ``delta``; ``sharpness``: the smallest rejected
        ``delta`` found (an upper estimate, within the bisection's resolution), ``None``
        when not rejected even at 0.5.
    """
    from ._runner import rows_for

    cf = COUNTERFEITS[theorem_id]
    t0 = time.perf_counter()
    rejected = _rejects(theorem_id, cf.delta, rows, seed)
    sharp: float | None = None
    if sharpness:
        lo, hi = math.log10(LO), math.log10(HI)
        if rejected:
            hi = math.log10(cf.delta)
        elif not _rejects(theorem_id, HI, rows, seed):
            hi = math.nan
        else:
            lo = math.log10(cf.delta)
        if not math.isnan(hi):
            for _ in range(steps):
                mid = 0.5 * (lo + hi)
                if _rejects(theorem_id, 10**mid, rows, seed):
                    hi = mid
                else:
                    lo = mid
            sharp = 10**hi
    return PowerResult(theorem_id, rows_for(theorem_id, rows), cf.delta, rejected, sharp,
                       cf.what, round(time.perf_counter() - t0, 3))


def format_power(results: list[PowerResult]) -> str:
    """Markdown table: id, rows, counterfeit, delta, rejected, sharpness, seconds."""
    lines = ["| id | rows | counterfeit | delta | rejected | sharpness | seconds |",
             "|---|---:|---|---:|---|---:|---:|"]
    for r in results:
        sharp = "-" if r.sharpness is None else f"{r.sharpness:.2g}"
        what = r.what.replace("|", "\\|")
        lines.append(f"| {r.id} | {r.rows:,} | {what} | {r.delta:.0e} | "
                     f"{'yes' if r.rejected else 'NO'} | {sharp} | {r.seconds:.1f} |")
    bad = sum(not r.rejected for r in results)
    lines += ["", f"{len(results) - bad} rejected, {bad} not rejected"]
    return "\n".join(lines) + "\n"
