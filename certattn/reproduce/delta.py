r"""Section ``delta`` of ``certattn reproduce``: Delta Attention's recovery, in output error.

Delta Attention (Willette, Lee, Hwang, NeurIPS 2025) corrects a sparse prefill (a
StreamingLLM window with sinks) by the dense-minus-sparse difference of one anchor row
every ``gamma`` rows.  The paper measures accuracy (RULER); we measure what the
correction does to the attention output itself, against exact attention, per query:
the relative output error of the window alone and of the window plus Delta, the share of
the error the correction removes, the cost in keys per query, and the sound per-row bound
of Theorem DELTA-ERROR (never below the exact error: the audit counts violations).  Both
come from :func:`certattn.approx.audit.audit` (methods ``window_sinks`` and ``delta``,
the latter on the same window and sinks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._runs import _Run
from ._summary import SIZES, Progress, Section
from .output import _layers

TITLE = "Delta Attention: output error recovered over a sliding window with sinks"

PAPER_DELTA = {
    "source": "Willette, Lee, Hwang, Delta Attention (NeurIPS 2025), Table 1, "
              "Llama-3.1-8B-Instruct, RULER average",
    "4K": {"dense": 96.74, "streaming": 90.52, "streaming_delta": 96.54},
    "32K": {"dense": 85.84, "streaming": 30.25, "streaming_delta": 81.27},
    "131K": {"dense": 73.16, "streaming": 27.45, "streaming_delta": 64.40},
    "recovered_4K": (96.54 - 90.52) / (96.74 - 90.52),
}


def _delta(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..approx.audit import audit

    sec = Section("delta", TITLE)
    sec.results["paper"] = PAPER_DELTA
    for run in runs:
        records = run.attentions
        note(f"delta: {run.label}", 0, 1)
        picked = _layers(len(records[0].layers), SIZES.delta_layers)
        layers = [int(records[0].layers[i]) for i in picked]
        rep = audit(records, ["window_sinks", "delta"], eps=0.01, layers=layers)
        note(f"delta: {run.label}", 1, 1)
        pooled = {r.method: r for r in rep.pooled}
        if set(pooled) != {"window_sinks", "delta"}:
            sec.results[run.key] = {"status": "pending", "reason": f"skipped: {rep.skipped}"}
            continue
        w, d = pooled["window_sinks"], pooled["delta"]
        recovered = 1.0 - d.rel_mean / w.rel_mean if w.rel_mean > 0 else math.nan
        sec.results[run.key] = {
            "source": run.source,
            "tokens": rep.tokens,
            "layers": layers,
            "queries": w.queries,
            "params": {"window_sinks": w.params, "delta": d.params},
            "window_rel_mean": w.rel_mean, "window_rel_p99": w.rel_p99,
            "delta_rel_mean": d.rel_mean, "delta_rel_p99": d.rel_p99,
            "recovered_mean": recovered,
            "window_cost_frac": w.cost_frac, "delta_cost_frac": d.cost_frac,
            "delta_bound_holds": d.unsound == 0,
            "unsound": int(d.unsound + w.unsound),
        }
    return sec


def _md_delta(sec: Section, s: Any) -> list[str]:
    p = sec.results["paper"]
    L = [f"Paper ({p['source']}): RULER at 4K dense {p['4K']['dense']}, StreamingLLM "
         f"{p['4K']['streaming']}, + Delta {p['4K']['streaming_delta']} (recovers "
         f"{p['recovered_4K']:.0%} of the gap); 131K: {p['131K']['dense']} / "
         f"{p['131K']['streaming']} / {p['131K']['streaming_delta']}.", "",
         "Ours, relative output error |O - Attn| / |Attn| against exact attention, all "
         "layers and heads pooled:", "",
         "| model | tokens | window: mean / p99 | + Delta: mean / p99 | mean error removed "
         "| cost / dense (window, + Delta) | DELTA-ERROR bound violated |",
         "|---|---|---|---|---|---|---|"]
    for key, r in sec.results.items():
        if key == "paper":
            continue
        if r.get("status") == "pending":
            L.append(f"| {key} | pending: {r['reason']} |  |  |  |  |  |")
            continue
        L.append(
            f"| {key} | {r['tokens']} | {r['window_rel_mean']:.3f} / {r['window_rel_p99']:.3f} "
            f"| {r['delta_rel_mean']:.3f} / {r['delta_rel_p99']:.3f} | "
            f"{r['recovered_mean']:.0%} | {r['window_cost_frac']:.2f}, "
            f"{r['delta_cost_frac']:.2f} | {r['unsound']} times |"
        )
    return L
