"""certify_topk against the sort + cumsum baseline, measured side by side in one run.

Usage: ``python benchmarks/certify_speed.py [--rows 2048] [--n 4096] [--repeats 11] [--more]
[--long] [--threads 1 2]``

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
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from scipy.special import logsumexp

import certattn


def baseline(x: np.ndarray, eps: float) -> np.ndarray:
    s = np.sort(x, axis=-1)
    e = np.exp(s - s[:, -1:])
    cs = np.cumsum(e, axis=-1, dtype=np.float64)
    return x.shape[-1] - (cs <= eps * cs[:, -1:]).sum(-1)


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
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    try:
        import numba  # noqa: F401

        kernels = ["numba", "numpy"]
    except ImportError:
        kernels = ["numpy"]
    print(
        f"rows={args.rows} n={args.n} eps={args.eps} float32 unless said, "
        f"median of {args.repeats}; ratios are same-run"
    )
    print(
        "| sigma, case | threads | baseline ms | compiled ms | NumPy path ms | logsumexp ms "
        "| read floor ms | NumPy / compiled | compiled / floor | compiled / lse "
        "| baseline / compiled |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
                f"| {med[fast] / med['lse']:.2f} | {med['base'] / med[fast]:.2f}x |"
                f"  (k: compiled = NumPy path on {agree_np:.1%} of rows, "
                f"= baseline on {agree_base:.1%})"
            )
    os.environ.pop("CERTATTN_KERNEL", None)


if __name__ == "__main__":
    main()
