"""Section ``gaussian`` of ``certattn reproduce``: the Gaussian ``k_eps`` rule on real attention.

The exact ``k_eps / n`` of real rows against their logit sigma, next to the rule
``Phi_c(sigma + Phi^{-1}(eps))`` of :mod:`certattn.gaussian`, with the error per budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._runs import _Run
from ._summary import EPS_GRID, Progress, Section, _save


def _gaussian(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..gaussian import estimate_sigma, keps_fraction
    from ..plots.reproduce import plot_keps_vs_sigma

    sec = Section("gaussian", "k_eps / n against the per-row sigma, with the Gaussian rule")
    shown = (0.001, 0.01, 0.1)
    for run in runs:
        sig = []
        for a in run.attentions:
            for li in range(len(a.layers)):
                sig.append(np.asarray(estimate_sigma(run.layer_logits(a, li))[1]).ravel())
        sigma = np.concatenate(sig)
        frac = run.stats["k"] / run.stats["n_valid"]
        res = {}
        for e in EPS_GRID:
            f = frac[EPS_GRID.index(e)]
            rule = np.asarray(keps_fraction(e, sigma))
            res[str(e)] = {
                "mean_k_over_n": float(f.mean()),
                "mean_rule": float(rule.mean()),
                "mean_abs_error": float(np.mean(np.abs(f - rule))),
                "corr": float(np.corrcoef(f, rule)[0, 1]) if f.std() > 0 else float("nan"),
                "rule_underpredicts": float(np.mean(rule < f)),
            }
        sec.results[run.key] = {"rows": int(sigma.size), "sigma_median": float(np.median(sigma)),
                                "by_eps": res}
        layer = run.stats["layer"]
        levels = np.unique(layer)  # one depth per layer, not per row
        depth = np.array([run.depth(int(v)) for v in levels])[np.searchsorted(levels, layer)]
        sub = _thin(sigma.size, 40_000)
        fig = plot_keps_vs_sigma(
            sigma[sub], {e: frac[EPS_GRID.index(e)][sub] for e in shown}, keps_fraction,
            depth=depth[sub], title=f"{run.label}: exact k_eps / n of real rows vs the "
            f"Gaussian rule ({sub.size} rows)")
        sec.figures.append(_save(fig, out, f"keps_vs_sigma_{run.key}.png"))
        note("gaussian", runs.index(run) + 1, len(runs))
    return sec


def _thin(n: int, cap: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(4).choice(n, size=cap, replace=False))
