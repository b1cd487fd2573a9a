"""Mutation run: does ``certattn verify`` (and do the registered tests) catch a false bound?

A fixed list of one-line falsifications (:data:`MUTANTS`) of the bound implementations.
The script copies the files git tracks into a temporary directory (never touching the
working tree), and for each mutant replaces exactly one line there, runs
``python -m certattn verify --only <ids> --rows R`` and the theorems' registered tests
(``pytest -x``), restores the line, and prints a Markdown table: which mutant was caught
by verify, by the tests, or by neither (``SURVIVED``).  A mutant that no input can tell
from the original (a change of cost, never of soundness) is listed with ``equivalent``.

Not part of CI (minutes per mutant on 2 cores)::

    python benchmarks/mutation.py                # every mutant, verify --rows 10000
    python benchmarks/mutation.py --rows 2000 --only topk-margin gap-single
    python benchmarks/mutation.py --no-tests     # verify alone
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One line of one file replaced: ``old`` (must occur exactly once) -> ``new``."""

    name: str
    path: str
    old: str
    new: str
    ids: tuple[str, ...]
    what: str
    equivalent: str = ""  # why no input can tell it from the original (empty: it is false)


def _m(name: str, path: str, old: str, new: str, ids: str, what: str, eq: str = "") -> Mutant:
    return Mutant(name, path, old, new, tuple(ids.split()), what, eq)


MUTANTS: tuple[Mutant, ...] = (
    _m("topk-margin", "certattn/topk.py",
       "gamma = 2.0 * (n + 4096) * U + GAMMA_EXP", "gamma = 0.0",
       "TOPK-MINIMAL BUDGET-EQUIV", "certify_topk's rounding margin removed"),
    _m("topk-division", "certattn/topk.py",
       "tail = tail * (1.0 + 4 * U) + SMALLEST", "tail = tail",
       "TOPK-MINIMAL BUDGET-EQUIV", "certify_topk's division not rounded up"),
    _m("topk-budget", "certattn/topk.py",
       "budget = (eps * z_lo - alpha) / (1.0 + gamma)",
       "budget = 1.001 * (eps * z_lo - alpha) / (1.0 + gamma)",
       "TOPK-MINIMAL BUDGET-EQUIV", "certify_topk accepts a tail 0.1% over eps"),
    _m("gap-single", "certattn/bounds.py",
       "z = _log_k(p, xp) - _log_m(p, xp) + delta",
       "z = _log_k(p, xp) - _log_m(p, xp) + 1.001 * delta",
       "GAP-SINGLE", "GAP-SINGLE's gap inflated 0.1%"),
    _m("gap-exact-head", "certattn/bounds.py",
       'log_x = xp.where(p["has_tail"], _log_m(p, xp) + p["d_next"], neg_inf(xp, head))',
       'log_x = xp.where(p["has_tail"], _log_m(p, xp) + p["d_next"] - 1e-3, neg_inf(xp, head))',
       "GAP-EXACT-HEAD", "the exact-head bound's tail term scaled by e^-0.001"),
    _m("gap-all", "certattn/bounds.py",
       'log_x = p["at_next"](suffix, -math.inf)',
       'log_x = p["at_next"](suffix, -math.inf) - 1e-3',
       "GAP-MULTI", "the all-gap bound's X scaled by e^-0.001"),
    _m("gap-uniform", "certattn/bounds.py",
       "direct = -xp.log1p(k * xp.expm1(dc))", "direct = -xp.log1p(k * xp.expm1(1.001 * dc))",
       "GAP-UNIFORM", "GAP-UNIFORM's minimal gap inflated 0.1%"),
    _m("log-margin", "certattn/_fp.py",
       "return U * (factor * (a + b) + 4.0 * n + 16384.0)",
       "return 0.0 * U * (factor * (a + b) + 4.0 * n + 16384.0)",
       "GAP-SINGLE GAP-EXACT-HEAD GAP-MULTI GAP-UNIFORM BLOCK-BOUNDS",
       "the log-space rounding margin of every gap and block bound removed"),
    _m("round-up", "certattn/_fp.py",
       "v = xp.exp(xp.minimum(t, 0.0)) * (1.0 + 4 * U) + 2 * SMALLEST",
       "v = xp.exp(xp.minimum(t, 0.0))",
       "GAP-SINGLE GAP-EXACT-HEAD GAP-MULTI GAP-UNIFORM BLOCK-BOUNDS",
       "round_up's final exp not rounded up"),
    _m("block-upper", "certattn/blocks.py",
       "t_up, h_lo = lse(a, xp, tail), lse(b, xp, head)",
       "t_up, h_lo = lse(a, xp, tail) - 1e-3, lse(b, xp, head)",
       "BLOCK-BOUNDS", "the block upper bound's tail mass scaled by e^-0.001"),
    _m("ball-score", "certattn/cells.py",
       "return _closed(xp, (dot + spread) * scale + (margin * scale + _TINY), upper=True)",
       "return _closed(xp, (dot + 0.999 * spread) * scale + (margin * scale + _TINY), "
       "upper=True)",
       "BLOCK-SCORE SEARCH-SOUND", "the ball score bound's spread |q| r scaled by 0.999"),
    _m("bennett", "certattn/cells.py",
       "bound = log_n + mean_up + np.minimum(log_ratio, b)",
       "bound = log_n + mean_up + np.minimum(log_ratio, b) - 1e-3",
       "BLOCK-MASS SEARCH-SOUND", "the Bennett mass bound scaled by e^-0.001"),
    _m("out-bounded", "certattn/output.py",
       'out["bounded"] = _floored(_up(2.0 * c * tau_up, 4 * U), tau_up, xp)',
       'out["bounded"] = _floored(_up(1.999 * c * tau_up, 4 * U), tau_up, xp)',
       "OUT-BOUNDED OUT-DIAMETER OUT-BEST", "2 C tau -> 1.999 C tau"),
    _m("out-tail-head", "certattn/output.py",
       'out["tail_head"] = _floored(_up(tau_up * (th + delta), 4 * U), tau_up, xp)',
       'out["tail_head"] = _floored(_up(0.999 * tau_up * (th + delta), 4 * U), tau_up, xp)',
       "OUT-DIAMETER OUT-BEST", "tau max over T of dist(v_j, mu_H) scaled by 0.999"),
    _m("out-variance", "certattn/output.py",
       'out["variance"] = _up(_chi_sqrt(tau_up, xp) * (xp.sqrt(var) + _FLOOR), 6 * U)',
       'out["variance"] = _up(0.999 * _chi_sqrt(tau_up, xp) * (xp.sqrt(var) + _FLOOR), 6 * U)',
       "OUT-BEST", "the variance bound scaled by 0.999"),
    _m("delta-rounding", "certattn/approx/delta.py",
       "e_s[..., sparse_rows], e_s[..., a], e_d[..., pos[a]], r",
       "e_s[..., sparse_rows], e_s[..., a], e_d[..., pos[a]], 0.0 * r",
       "DELTA-ERROR", "DELTA-ERROR's rounding term r removed",
       "unobservable: r = 2u(|corr| + |O|) is added to three rounding bounds (e_s twice, "
       "e_d) of at least (n + dv + 8)u C each, far above the one rounding r covers"),
    _m("delta-dense", "certattn/approx/delta.py",
       "err[..., dense] = e_d", "err[..., dense] = 0.0 * e_d",
       "DELTA-ERROR", "the dense rows' error set to zero"),
    _m("christoffel", "certattn/geometry/curvature.py",
       'return 0.5 * np.einsum("...kl,...lij->...kij", gi, T)',
       'return 0.55 * np.einsum("...kl,...lij->...kij", gi, T)',
       "GEO-ORACLES GEO-GAUSS-EQ", "christoffel scaled by 1.1"),
    _m("kl-from-tail", "certattn/distribution.py",
       "return -xp.log1p(-t)", "return -1.001 * xp.log1p(-t)",
       "BUDGET-EQUIV TV-KL", "kl_from_tail scaled by 1.001"),
    _m("hidden-tail", "certattn/masks.py",
       "t = add_up(tail, h, xp)", "t = add_up(tail, 0.999 * h, xp)",
       "MASK-HIDDEN", "the hidden keys' mass scaled by 0.999"),
    _m("quant-delta", "certattn/quant.py",
       "delta = step * (quant_step_factor(self.grid_bits) + (run - 1.0) / 2.0) + \\",
       "delta = 0.999 * step * (quant_step_factor(self.grid_bits) + (run - 1.0) / 2.0) + \\",
       "QUANT-SCORE SEARCH-SOUND", "the quantisation error bound scaled by 0.999"),
    _m("quant-nested", "certattn/quant.py",
       "delta = step * (quant_step_factor(self.grid_bits) + (run - 1.0) / 2.0) + \\",
       "delta = step * (quant_step_factor(self.grid_bits) + 0.999 * (run - 1.0) / 2.0) + \\",
       "QUANT-SCORE", "a nested grid's half-run widening scaled by 0.999"),
    _m("keps-fraction", "certattn/gaussian.py",
       "return _out(xp, _ndtr(-(sig + _ndtri(e, log=log)), log=log), dtype)",
       "return _out(xp, _ndtr(-(1.001 * sig + _ndtri(e, log=log)), log=log), dtype)",
       "GAUSS-KEPS", "keps_fraction with sigma inflated 0.1%"),
    _m("discarded-mass", "certattn/gaussian.py",
       "return _out(xp, _ndtr((t_ - mu_ - sig * sig) / sig, log=log), dtype)",
       "return _out(xp, _ndtr((t_ - mu_ - 1.001 * sig * sig) / sig, log=log), dtype)",
       "GAUSS-THRESHOLD", "discarded_mass with sigma^2 inflated 0.1%"),
)


def _copy_tree(dst: Path) -> None:
    """Copy every file git tracks (as it is in the working tree) into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _tests_of(ids: tuple[str, ...]) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from certattn.theorems import THEOREMS

    sys.path.pop(0)
    out: list[str] = []
    for t in THEOREMS:
        if t.id in ids:
            out += [x for x in t.tests if x not in out]
    return out


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[bool, str]:
    """``(failed, last line)`` of a command run in the copy."""
    env = dict(os.environ, PYTHONPATH=str(cwd), CERTATTN_PROGRESS="0")
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, "timeout"
    lines = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode != 0, lines[-1] if lines else ""


def run(mutants: list[Mutant], rows: int, tests: bool, timeout: float) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="certattn-mutation-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        for m in mutants:
            path = root / m.path
            text = path.read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"{m.name}: the line to mutate occurs {text.count(m.old)} "
                                 f"times in {m.path} (the list is out of date)")
            t0 = time.perf_counter()
            path.write_text(text.replace(m.old, m.new))
            try:
                v_fail, v_line = _run([sys.executable, "-m", "certattn", "verify", "--only",
                                       *m.ids, "--rows", str(rows)], root, timeout)
                t_fail, t_line = (False, "not run")
                if tests:
                    t_fail, t_line = _run([sys.executable, "-m", "pytest", "-x", "-q",
                                           "-p", "no:cacheprovider", *_tests_of(m.ids)],
                                          root, timeout)
            finally:
                path.write_text(text)
            res = {"name": m.name, "what": m.what, "ids": " ".join(m.ids),
                   "verify": v_fail, "tests": t_fail if tests else None,
                   "equivalent": m.equivalent, "seconds": time.perf_counter() - t0,
                   "verify_line": v_line, "tests_line": t_line}
            results.append(res)
            print(_row(res), flush=True)
    return results


def _row(r: dict) -> str:
    caught = "killed" if r["verify"] or r["tests"] else (
        "equivalent" if r["equivalent"] else "SURVIVED")
    tests = "-" if r["tests"] is None else ("caught" if r["tests"] else "passed")
    return (f"| {r['name']} | {r['what']} | {r['ids']} | "
            f"{'caught' if r['verify'] else 'passed'} | {tests} | {caught} |")


HEADER = ("| mutant | change | verify --only | verify | registered tests | result |\n"
          "|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000, help="verify --rows (default 10000)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--no-tests", action="store_true", help="run verify alone")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.what} [{' '.join(m.ids)}]")
        return 0
    print(HEADER, flush=True)
    res = run(chosen, args.rows, not args.no_tests, args.timeout)
    killed = sum(bool(r["verify"] or r["tests"]) for r in res)
    by_verify = sum(bool(r["verify"]) for r in res)
    survived = [r["name"] for r in res
                if not (r["verify"] or r["tests"]) and not r["equivalent"]]
    print(f"\n{killed} of {len(res)} killed ({by_verify} by verify alone); "
          f"survivors: {', '.join(survived) or 'none'}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
