"""certify_topk against the sort + cumsum baseline, measured side by side in one run.

Usage: ``python benchmarks/certify_speed.py [--rows 2048] [--n 4096] [--repeats 11] [--more]
[--long] [--threads 1 2] [--break-even]``

Each case is timed for every thread count (``CERTATTN_NUM_THREADS``): the compiled path
(``CERTATTN_KERNEL=numba``, when numba is installed), the NumPy path
(``CERTATTN_KERNEL=numpy``), the baseline, one logsumexp and the read floor
(``x.max(-1)``, one pass over the logits).

The baseline is the issue's reference (float32 sort, float32 exp, float64 cumsum); the
ratio is baseline time / certify_topk time, each the median of interleaved repeats on
the same input (the machine is noisy, so only same-run ratios mean anything), in an order
that rotates from one repeat to the next.  The
second ratio compares with one ``scipy.special.logsumexp`` pass over the batch.
``--more`` adds the shapes users meet beyond the issue's Gaussian batch (sigma = 3): causal
masks (-inf after a prefix), float16 and float64 logits, and shorter (n / 4) rows;
``--long`` adds long rows (2^20 keys, and 2^22 keys, which the compiled path tiles).

The "default" columns are what a user gets with nothing set (``CERTATTN_KERNEL=auto``):
the compiled path with numba installed, the NumPy path without.  ``--break-even``
measures the ``auto`` rule instead: the first call of a fresh process on each path
(importing numba and loading the disk-cached kernel, after one run that fills the cache),
and the per-call time of both paths from 256 keys to
2^23, with the number of calls of each size that repay the one-time load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from scipy.special import logsumexp

import certattn


def baseline(x: np.ndarray, eps: float) -> np.ndarray:
    s = np.sort(x, axis=-1)
    e = np.exp(s - s[:, -1:])
    cs = np.cumsum(e, axis=-1, dtype=np.float64)
    return x.shape[-1] - (cs <= eps * cs[:, -1:]).sum(-1)


_FIRST_CALL = (
    "import time, numpy as np, certattn\n"
    "x = np.random.default_rng(0).standard_normal((16, 4096)).astype(np.float32)\n"
    "t0 = time.process_time(); certattn.certify_topk(x, 0.01)\n"
    "print(time.process_time() - t0)\n"
)


def _first_call(kernel: str) -> float:
    """CPU seconds of the first certify_topk call in a fresh process (certattn imported;
    CPU time: on a shared machine the wall clock mostly measures waiting)."""
    env = dict(os.environ, CERTATTN_KERNEL=kernel, CERTATTN_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return float(out.stdout.split()[-1])


def _median_call(f, repeats: int, clock) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = clock()
        f()
        times.append(clock() - t0)
    return statistics.median(times)


def break_even(args: argparse.Namespace, clock) -> None:
    """The ``auto`` rule's numbers: one-time load, per-call saving, calls to repay (one
    thread, process CPU time throughout)."""
    os.environ["CERTATTN_NUM_THREADS"] = "1"
    clock = time.process_time
    _first_call("numba")  # fills numba's disk cache if this machine never compiled
    firsts = {k: [] for k in ("numba", "numpy")}
    for _ in range(5):  # interleaved fresh processes
        for k in firsts:
            firsts[k].append(_first_call(k))
    fn, fp = (statistics.median(firsts[k]) for k in ("numba", "numpy"))
    load = fn - fp
    print(f"first call in a fresh process, (16, 4096): compiled {fn * 1e3:.0f} ms, NumPy path "
          f"{fp * 1e3:.0f} ms: one-time load {load * 1e3:.0f} ms (median of 5 each; CPU time, "
          "one thread)")
    print("| keys per call (rows x n) | compiled CPU ms | NumPy path CPU ms | NumPy / compiled "
          "| calls that repay the load |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    for rows, n in ((1, 256), (1, 4096), (4, 4096), (16, 4096), (64, 4096), (256, 4096),
                    (1024, 4096), (2048, 4096)):
        x = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
        med = {}
        for k in ("numba", "numpy"):
            os.environ["CERTATTN_KERNEL"] = k
            med[k] = _median_call(lambda x=x: certattn.certify_topk(x, args.eps), args.repeats,
                                  clock)
        saving = med["numpy"] - med["numba"]
        repay = f"{load / saving:.0f}" if saving > 0 else "never"
        print(f"| {rows} x {n} = {rows * n} | {med['numba'] * 1e3:.3f} "
              f"| {med['numpy'] * 1e3:.3f} | {med['numpy'] / med['numba']:.2f}x | {repay} |")
    os.environ.pop("CERTATTN_KERNEL", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[3.0, 6.0])
    ap.add_argument(
        "--cpu-time", action="store_true",
        help="time with process CPU time instead of wall clock (steadier on a busy machine)",
    )
    ap.add_argument(
        "--more", action="store_true",
        help="also time causal masks, float16 and float64 logits and shorter rows",
    )
    ap.add_argument(
        "--long", action="store_true",
        help="also time long rows: 16 rows of 2^20 keys (a row of terms is kept) and 4 rows "
        "of 2^22 keys (tiled, bounded memory)",
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--break-even", action="store_true",
                    help="measure the auto rule (fresh-process load, per-call times) only")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.break_even:
        break_even(args, clock)
        return
    rng = np.random.default_rng(0)
    try:
        import numba  # noqa: F401

        kernels = ["numba", "numpy", "auto"]
    except ImportError:
        kernels = ["numpy", "auto"]
    print(
        f"rows={args.rows} n={args.n} eps={args.eps} float32 unless said, "
        f"median of {args.repeats}; ratios are same-run"
    )
    print(
        "| sigma, case | threads | baseline ms | compiled ms | NumPy path ms | logsumexp ms "
        "| read floor ms | NumPy / compiled | compiled / floor | compiled / lse "
        "| baseline / compiled | default ms | default / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [
        (f"{sigma:g}", (rng.standard_normal((args.rows, args.n)) * sigma).astype(np.float32))
        for sigma in args.sigmas
    ]
    if args.more:
        x = (rng.standard_normal((args.rows, args.n)) * 3).astype(np.float32)
        prefix = np.linspace(1, args.n, args.rows).astype(int)[:, None]
        cases += [
            ("3, causal", np.where(np.arange(args.n) < prefix, x, -np.inf).astype(np.float32)),
            ("3, float16", x.astype(np.float16)),
            ("3, float64", x.astype(np.float64)),
            ("3, n / 4", x.reshape(4 * args.rows, args.n // 4)),
        ]

    if args.long:
        for rows, logn in ((16, 20), (4, 22)):
            x = (rng.standard_normal((rows, 1 << logn)) * 3).astype(np.float32)
            cases.append((f"3, {rows} x 2^{logn}", x))

    def certify(x: np.ndarray, kernel: str) -> np.ndarray:
        os.environ["CERTATTN_KERNEL"] = kernel
        return np.asarray(certattn.certify_topk(x, args.eps).k)

    for label, x in cases:
        for threads in args.threads:
            os.environ["CERTATTN_NUM_THREADS"] = str(threads)
            funcs = {
                "base": lambda x=x: baseline(x, args.eps),
                **{k: (lambda x=x, k=k: certify(x, k)) for k in kernels},
                "lse": lambda x=x: logsumexp(x, axis=-1),
                "floor": lambda x=x: x.max(-1),
            }
            times: dict[str, list[float]] = {name: [] for name in funcs}
            names = list(funcs)
            for f in funcs.values():  # warm-up: threads, scratch buffers, first touch of x
                f()
            for i in range(args.repeats):
                # Rotate the order: on a virtual machine the call right after the baseline
                # (which allocates and frees about 200 MB) runs up to 25% slower, so each
                # function follows each other one equally often.
                j = i % len(names)
                for name in names[j:] + names[:j]:
                    t0 = clock()
                    funcs[name]()
                    times[name].append(clock() - t0)
            med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            fast = "numba" if "numba" in med else "numpy"
            k_fast = certify(x, fast)
            agree_np = float(np.mean(k_fast == certify(x, "numpy")))
            agree_base = float(np.mean(k_fast == baseline(x, args.eps)))
            comp = f"{med['numba']:.1f}" if "numba" in med else "-"
            print(
                f"| {label} | {threads} | {med['base']:.1f} | {comp} | {med['numpy']:.1f} "
                f"| {med['lse']:.1f} | {med['floor']:.2f} "
                f"| {med['numpy'] / med[fast]:.2f}x | {med[fast] / med['floor']:.1f} "
                f"| {med[fast] / med['lse']:.2f} | {med['base'] / med[fast]:.2f}x "
                f"| {med['auto']:.1f} | {med['auto'] / med['floor']:.1f} |"
                f"  (k: compiled = NumPy path on {agree_np:.1%} of rows, "
                f"= baseline on {agree_base:.1%})"
            )
    os.environ.pop("CERTATTN_KERNEL", None)


if __name__ == "__main__":
    main()
