r"""Section ``hybrid`` of ``certattn reproduce``: component usage of a linear + window hybrid.

The seed paper (Benfeghoul et al., arXiv 2510.05901) finds that converted LoLCATs-style
hybrids barely use their linear branch: sliding-window-only attention matches the hybrid
within about 0.5% on PIQA, ARC, HellaSwag, WinoGrande and MMLU. We measure, on the
SmolLM2 run (query rows of its second half, full causal context):

* per layer, the exact softmax mass outside the 64-key window (what the linear branch must
  carry; TV-TAIL makes it the exact total variation of window-only attention);
* on a few heads, Hedgehog maps fitted here by attention-weight transfer (seed, heads,
  tokens and steps recorded) and, for the untrained identity maps and the fitted maps at
  :math:`\gamma = 0.1` (LoLCATs' initial window factor): the hybrid's own window share and
  the total variation to exact attention of the hybrid, window-only and linear-only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ._runs import _Run
from ._summary import SIZES, Progress, Section, _save

TITLE = "Hybrid linear + window attention: component usage (mass outside the window, shares, TV)"

PAPER_HYBRID = {
    "source": "Benfeghoul et al., arXiv 2510.05901",
    "claim": "converted hybrids rely almost entirely on the sliding window: SWA-only matches "
             "the hybrid within about 0.5% on PIQA, ARC, HellaSwag, WinoGrande, MMLU",
    "window": 64,
    "gamma_init": 0.1,
}

WINDOW = 64
FIT = {"layers": (4, 15, 26), "heads": (0, 4), "tokens": 256, "steps": 150, "lr": 0.03,
       "seed": 0}
"""The attention-weight-transfer fit (kept small: CPU seconds); ``steps`` is the
``--full`` value, the default run takes ``SIZES.hedgehog_steps``."""

_FIELDS = ("exact_outside", "window_share", "tv_hybrid", "tv_window", "tv_linear",
           "err_hybrid", "err_window", "err_linear")


def _hybrid(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..approx.hybrid import fit_hedgehog, hybrid_usage, identity_maps
    from ..distribution import tail_mass
    from ._approx import figure

    sec = Section("hybrid", TITLE)
    sec.results["paper"] = PAPER_HYBRID
    run = next((r for r in runs if r.key == "smollm2"), None)
    if run is None:
        sec.results["smollm2"] = {"status": "pending", "reason": "needs the SmolLM2 run "
                                  "(causal; skipped in quick mode or not installed)"}
        return sec
    a = run.attentions[0]
    n = a.n_tokens
    rows = run.query_rows or slice(0, n)
    lq = len(range(n)[rows])
    pos = np.arange(n)[rows][:, None]
    win = (np.arange(n)[None, :] <= pos) & (np.arange(n)[None, :] > pos - WINDOW)
    per_layer = []
    for li in range(a.n_layers):
        x = run.layer_logits(a, li)
        tau = np.asarray(tail_mass(x, np.broadcast_to(win, x.shape)), dtype=np.float64)
        per_layer.append({"layer": int(a.layers[li]), "mean": float(tau.mean()),
                          "median": float(np.median(tau)), "p90": float(np.quantile(tau, 0.9))})
        note("hybrid: mass outside the window", li + 1, a.n_layers)
    t0 = time.perf_counter()
    layers = [L for L in FIT["layers"] if L in a.layers.tolist()]
    heads = list(FIT["heads"])
    nf = min(FIT["tokens"], n)
    q, k, v = [], [], []
    for L in layers:
        for h in heads:
            hd = a.head(L, h)
            q.append(hd.queries)
            k.append(hd.keys)
            v.append(hd.values)
    qa, ka, va = (np.stack(z).astype(np.float64) for z in (q, k, v))
    note("hybrid: Hedgehog attention-weight transfer", 0, 1)
    maps = fit_hedgehog(qa[:, :nf], ka[:, :nf], steps=SIZES.hedgehog_steps, lr=FIT["lr"],
                        seed=FIT["seed"], provenance={
                            "model": a.model, "layers": layers, "heads": heads,
                            "tokens": f"positions 0-{nf - 1} of the run's text",
                            "text": "certattn built-in corpus"})
    note("hybrid: Hedgehog attention-weight transfer", 1, 1)
    fit_s = time.perf_counter() - t0
    usage: dict[str, Any] = {}
    for name, mp in (("identity_maps", identity_maps(qa.shape[-1], heads=qa.shape[0])),
                     ("fitted_maps", maps)):
        u = hybrid_usage(qa[:, rows], ka, va, causal=True, feature_maps=mp, window=WINDOW)
        usage[name] = {
            "per_head": [{"layer": L, "head": h, **{f: float(getattr(u, f)[i].mean())
                                                     for f in _FIELDS}}
                         for i, (L, h) in enumerate((L, h) for L in layers for h in heads)],
            "mean": {f: float(getattr(u, f).mean()) for f in _FIELDS},
        }
    sec.results["smollm2"] = {
        "window": WINDOW, "gamma": 0.1, "query_rows": f"{np.arange(n)[rows][0]}-"
        f"{np.arange(n)[rows][-1]} of {n}", "rows_per_head": lq,
        "outside_window_by_layer": per_layer,
        "fit": {**maps.fit, "seconds": round(fit_s, 1)},
        "usage": usage,
    }
    fig, (ax1, ax2) = figure()
    ax1.plot([r["layer"] for r in per_layer], [r["mean"] for r in per_layer], marker="o",
             label="mean")
    ax1.plot([r["layer"] for r in per_layer], [r["p90"] for r in per_layer], marker=".",
             label="p90")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("exact softmax mass outside the window")
    ax1.set_title(f"SmolLM2: mass the linear branch must carry (w = {WINDOW})")
    ax1.legend()
    names = ["exact_outside", "window_share", "tv_hybrid", "tv_window", "tv_linear"]
    xs = np.arange(len(names))
    for j, (name, r) in enumerate(usage.items()):
        ax2.bar(xs + 0.4 * j - 0.2, [r["mean"][f] for f in names], width=0.4, label=name)
    ax2.set_xticks(xs, names, rotation=20, fontsize=7)
    ax2.set_title(f"Component usage on {len(layers) * len(heads)} heads (gamma = 0.1)")
    ax2.legend()
    sec.figures.append(_save(fig, out, "hybrid_usage.png"))
    return sec


def _md_hybrid(sec: Section, s: Any) -> list[str]:
    p = sec.results["paper"]
    L = [f"Seed paper ({p['source']}): {p['claim']}. Ours measures the attention itself "
         "(no fine-tuning, no benchmarks).", ""]
    r = sec.results.get("smollm2", {})
    if r.get("status") == "pending":
        return [*L, f"SmolLM2: pending ({r['reason']})."]
    per = r["outside_window_by_layer"]
    L += [f"Exact softmax mass outside the last {r['window']} keys (query rows "
          f"{r['query_rows']}), by layer: mean "
          + ", ".join(f"{x['layer']}: {x['mean']:.2f}" for x in per)
          + f". Over all layers: {np.mean([x['mean'] for x in per]):.3f}.", ""]
    f = r["fit"]
    L += [f"Hedgehog fit: {f['method']}, seed {f['seed']}, layers {f['layers']}, heads "
          f"{f['heads']}, {f['tokens']}, {f['steps']} steps (lr {f['lr']}), cross-entropy "
          f"{f['loss_start']:.3f} -> {f['loss_end']:.3f} (floor = target entropy "
          f"{f.get('loss_floor', float('nan')):.3f}; {f['seconds']} s).", "",
          "| maps | exact mass outside W | hybrid window share | TV hybrid | TV window-only "
          "| TV linear-only | err hybrid | err window | err linear |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, u in r["usage"].items():
        m = u["mean"]
        L.append(f"| {name} | " + " | ".join(f"{m[x]:.3f}" for x in _FIELDS) + " |")
    return L
