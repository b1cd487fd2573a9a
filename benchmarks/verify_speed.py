"""Throughput and peak memory of every ``certattn verify`` check, with its floor, in one run.

Usage: ``python benchmarks/verify_speed.py [--rows N] [--only ID ...] [--seed 0]
[--compare CHECKOUT] [--fit ROWS] [--json FILE]``

Each check runs in a fresh interpreter (so that its peak memory is its own): the child
imports certattn, records its resident set (``ru_maxrss``), runs the check at the size
``certattn verify --rows N`` gives it (default: each check's default size), and reports

* ``seconds`` (CPU seconds of the child, user + system: on a shared machine the wall time
  mostly measures the queue; for these single-threaded checks CPU time is the idle wall
  time), ``rows/s`` and ``logits/s`` (logits: the values of the adversarial rows
  the check draws, or, for checks that draw no logit rows, every value the check moves
  onto the array backend);
* ``floor``: the time of the check's minimal array passes on the same values, measured in
  the same child right after the check: one ``exp`` pass and one sort of every drawn row
  (checks without logit rows: one ``exp`` pass over their values), in CPU seconds;
  ``ratio`` = seconds /
  floor says how far a check is from what its data alone costs;
* ``peak MB``: the child's peak resident set, and ``+MB``: its growth over the imported
  interpreter (the memory the check itself needs).

``--fit ROWS`` measures every check at its default size and at ``--rows ROWS`` (two
children) and prints its cost model, ``fixed + rows / rate`` CPU seconds through both
points (the ``rate`` and ``fixed`` of :data:`certattn.verify.CHECKS`), the large size's
rows/s, ratio to the floor and peak memory, and what the fitted model gives at
``--rows 10,000,000``.

``--compare CHECKOUT`` also runs every check in another checkout of certattn (for
example ``git worktree add /tmp/base main``) right before this one's, and prints its
seconds and the speed-up (same run, same load).  ``--json FILE`` writes the rows.

The estimate column is :func:`certattn.verify.estimated_seconds` for the same size, so
``measured / estimate`` shows how well the CLI's rate table fits this machine.  The
machine may be shared: compare numbers of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _floor_seconds(shapes: list[tuple[tuple[int, ...], bool]]) -> float:
    """One exp pass (and one sort for logit rows) over arrays of the recorded shapes."""
    rng = np.random.default_rng(0)
    total = 0.0
    cache: dict[tuple[int, ...], np.ndarray] = {}
    for shape, logits in shapes:
        a = cache.get(shape)
        if a is None:
            a = cache.setdefault(shape, rng.standard_normal(shape))
        t0 = time.process_time()
        np.exp(a)
        if logits and a.ndim:
            np.sort(a, axis=-1)
        total += time.process_time() - t0
    return total


def child(tid: str, rows: int | None, seed: int) -> dict:
    """Run one check in this process and measure it (see the module docstring)."""
    import certattn.verify._common as common
    from certattn.verify import run_verify

    shapes: list[tuple[tuple[int, ...], bool]] = []
    draw, put = common._draw, common.Ctx.put

    def counting_draw(rng, kind, r, n, *rest):
        shapes.append(((r, n), True))
        return draw(rng, kind, r, n, *rest)

    def counting_put(self, a):
        shapes.append((tuple(np.shape(a)), False))
        return put(self, a)

    common._draw = counting_draw
    common.Ctx.put = counting_put
    for mod in list(sys.modules.values()):  # the check modules imported _draw by name
        if getattr(mod, "__name__", "").startswith("certattn.verify.") and hasattr(mod, "_draw"):
            mod._draw = counting_draw
    base = _maxrss_mb()
    cpu0 = time.process_time()
    (res,) = run_verify(rows, seed=seed, ids=[tid], progress=False)
    cpu = time.process_time() - cpu0
    peak = _maxrss_mb()
    drawn = [s for s in shapes if s[1]]
    used = drawn if drawn else [s for s in shapes if not s[1]]
    values = sum(int(np.prod(s)) for s, _ in used)
    floor = _floor_seconds(used)
    return {"id": tid, "rows": res.rows, "seconds": cpu, "wall": res.seconds,
            "passed": res.passed,
            "values": values, "floor": floor, "peak_mb": peak, "delta_mb": peak - base}


def _run_child(tid: str, rows: int | None, seed: int, root: str = _ROOT) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tid, "--seed", str(seed),
           "--root", root]
    if rows is not None:
        cmd += ["--rows", str(rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if out.returncode != 0:
        return {"id": tid, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(n0: int, s0: float, n1: int, s1: float) -> tuple[float, float]:
    """``(rate, fixed)`` of the line ``fixed + rows / rate`` through ``(n0, s0)``, ``(n1, s1)``.

    A line that would need a negative ``fixed`` (or two equal sizes) becomes the
    proportional model through the larger point (``fixed = 0``)."""
    slope = (s1 - s0) / (n1 - n0) if n1 != n0 else 0.0
    fixed = s0 - slope * n0
    if slope <= 0 or fixed < 0:
        return n1 / max(s1, 1e-9), 0.0
    return 1.0 / slope, fixed


def _fit_table(ids: list[str], rows: int, seed: int) -> list[dict]:
    """Both sizes of every check, the fitted cost model, and the large size's figures."""
    from certattn.verify import CHECKS, rows_for
    from certattn.verify._runner import _Spec

    print("| id | rows | s | rows | s | rows/s | ratio | peak MB | rate rows/s | fixed s "
          "| at 10^7 s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    out, total = [], 0.0
    for tid in ids:
        a, b = _run_child(tid, None, seed), _run_child(tid, rows, seed)
        if "error" in a or "error" in b:
            print(f"| {tid} | error: {a.get('error') or b.get('error')} |")
            continue
        rate, fixed = fit(a["rows"], a["seconds"], b["rows"], b["seconds"])
        spec = CHECKS[tid]
        big = _Spec(spec.func, spec.default, rate, spec.row_based, spec.minimum, fixed)
        at_max = big.seconds(rows_for(tid, 10_000_000))
        total += at_max
        ratio = f"{b['seconds'] / b['floor']:.0f}" if b["floor"] > 0 else "-"
        print(f"| {tid} | {a['rows']:,} | {a['seconds']:.2f} | {b['rows']:,} | "
              f"{b['seconds']:.2f} | {b['rows'] / max(b['seconds'], 1e-9):,.0f} | {ratio} | "
              f"{max(a['peak_mb'], b['peak_mb']):.0f} | {rate:,.0f} | {fixed:.2f} | "
              f"{at_max:.0f} |", flush=True)
        out.append({"id": tid, "small": a, "large": b, "rate": rate, "fixed": fixed})
    print(f"\nfitted total at --rows 10,000,000: {total:.0f} CPU-s")
    print("\n".join(f'    "{r["id"]}": rate={r["rate"]:.3g}, fixed={r["fixed"]:.2f}'
                    f' (now {CHECKS[r["id"]].rate:.3g}, {CHECKS[r["id"]].fixed:.2f})'
                    for r in out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", default=None, metavar="CHECKOUT")
    ap.add_argument("--fit", type=int, default=None, metavar="ROWS")
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=_ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.seed)))
        return
    from certattn.theorems import THEOREMS
    from certattn.verify import estimated_seconds

    ids = args.only or [t.id for t in THEOREMS]
    if args.fit:
        rows_out = _fit_table(ids, args.fit, args.seed)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows_out, f, indent=1)
        return
    cmp_head = " base s | speed-up |" if args.compare else ""
    print("| id | rows | seconds | estimate | rows/s | logits/s | floor s | ratio | peak MB "
          "| +MB |" + cmp_head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
          + ("---:|---:|" if args.compare else ""))
    tot_s = tot_est = tot_base = 0.0
    peak = 0.0
    rows_out = []
    for tid in ids:
        base = _run_child(tid, args.rows, args.seed, args.compare) if args.compare else None
        r = _run_child(tid, args.rows, args.seed)
        if "error" in r:
            print(f"| {tid} | error: {r['error']} |")
            continue
        est = estimated_seconds(args.rows, [tid])
        s = max(r["seconds"], 1e-9)
        tot_s, tot_est, peak = tot_s + s, tot_est + est, max(peak, r["peak_mb"])
        floor = f"{r['floor']:.3f} | {s / r['floor']:.1f}" if r["floor"] > 0 else "- | -"
        line = (f"| {tid} | {r['rows']:,} | {s:.2f} | {est:.2f} | {r['rows'] / s:,.0f} | "
                f"{r['values'] / s:,.3g} | {floor} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} |")
        if base is not None and "error" not in base:
            tot_base += base["seconds"]
            line += f" {base['seconds']:.2f} | {base['seconds'] / s:.2f} |"
            r["base_seconds"] = base["seconds"]
        print(line + ("" if r["passed"] else " FAIL"), flush=True)
        rows_out.append({**r, "estimate": est})
    print(f"\ntotal {tot_s:.1f} s (estimate {tot_est:.1f} s, measured/estimate "
          f"{tot_s / max(tot_est, 1e-9):.2f}); largest peak {peak:.0f} MB"
          + (f"; base {tot_base:.1f} s, speed-up {tot_base / tot_s:.2f}" if args.compare
             else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
