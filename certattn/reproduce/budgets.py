"""Section ``budgets`` of ``certattn reproduce``: per-layer and per-head budgets.

Per layer, the mean ``k_eps / n`` and the reduction ``n / k`` at every budget of
:data:`EPS_GRID`, per-head heat maps and the serving budget table
``budget_<model>.json`` of :func:`certattn.budget.attention_budget`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._runs import _Run
from ._summary import EPS_GRID, MAIN_EPS, Progress, Section, _save


def _budgets(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..budget import attention_budget
    from ..plots.reproduce import plot_head_budgets, plot_layer_budgets

    sec = Section("budgets", "Per-layer budgets: mean k_eps / n and reduction n / k")
    plot_data = {}
    for run in runs:
        st = run.stats
        layers = np.unique(st["layer"])
        frac = np.zeros((len(EPS_GRID), layers.size))
        red = np.zeros_like(frac)
        table = []
        for i, layer in enumerate(layers):
            sel = st["layer"] == layer
            nv = st["n_valid"][sel].astype(np.float64)
            for ei in range(len(EPS_GRID)):
                k = st["k"][ei][sel].astype(np.float64)
                frac[ei, i] = float(np.mean(k / nv))
                red[ei, i] = float(nv.sum() / k.sum())
            table.append({"layer": int(layer),
                          "mean_k_over_n": {str(e): frac[j, i] for j, e in enumerate(EPS_GRID)},
                          "reduction": {str(e): red[j, i] for j, e in enumerate(EPS_GRID)}})
        nv_all = st["n_valid"].astype(np.float64)
        overall = {
            str(e): {"mean_k_over_n": float(np.mean(st["k"][j] / nv_all)),
                     "reduction": float(nv_all.sum() / st["k"][j].sum())}
            for j, e in enumerate(EPS_GRID)
        }
        plot_data[run.label] = {"layers": layers, "frac": frac, "reduction": red}
        bt = attention_budget(run.attentions, MAIN_EPS, query_rows=run.query_rows)
        name = f"budget_{run.key}.json"
        bt.write_json(out / name)
        sec.figures.append(name)
        sec.results[run.key] = {
            "rows": int(nv_all.size), "mean_n": float(nv_all.mean()), "per_layer": table,
            "overall": overall, "budget_table": name,
        }
        fig = plot_head_budgets(bt.frac_mean, bt.layers, eps=MAIN_EPS,
                                title=f"{run.label}: mean certified k_eps / n per head")
        sec.figures.append(_save(fig, out, f"head_budgets_{run.key}.png"))
        note("budgets", runs.index(run) + 1, len(runs))
    if plot_data:
        sec.figures.append(_save(plot_layer_budgets(plot_data, eps_list=EPS_GRID), out,
                                 "layer_budgets.png"))
    return sec
