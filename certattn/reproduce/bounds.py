"""Section ``bounds`` of ``certattn reproduce``: the logit-only tail bounds on real attention.

Every bound of :mod:`certattn.bounds` against the true tail at the exact ``k_eps``, and
the ``k`` each bound needs next to the exact one, with curves and ratio figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._runs import _Run, sample_rows
from ._summary import EPS_GRID, MAIN_EPS, Progress, Section, _save

_BOUND_NAMES = ("gap", "exact_head", "optimal_cuts", "all_gap", "uniform_gap")


def _bounds(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..bounds import _bound_curve, bound_k, tail_bound
    from ..distribution import tail_mass
    from ..plots.reproduce import plot_bound_curves, plot_bound_ratios

    sec = Section("bounds", "Logit-only bounds against the true tail")
    ei = EPS_GRID.index(MAIN_EPS)
    cuts = 4
    for run in runs:
        big = max(a.n_tokens for a in run.attentions) > 512
        count = 30 if quick else (120 if big else 300)
        x, _, _, idx = sample_rows(run, count, seed=3)
        n_valid = run.stats["n_valid"][idx]
        k = run.stats["k"][ei][idx]
        live = k < n_valid  # rows with a non-empty tail at k_eps
        x, k, n_valid = x[live], k[live], n_valid[live]
        tau = np.asarray(tail_mass(x, k=k), dtype=np.float64)
        ratios, k_frac, res = {}, {"exact": float(np.mean(k / n_valid))}, {}
        for j, name in enumerate(_BOUND_NAMES):
            nc = cuts if name == "optimal_cuts" else None
            b = np.asarray(tail_bound(x, k, bound=name, n_cuts=nc), dtype=np.float64)
            kb = np.asarray(bound_k(x, MAIN_EPS, bound=name, n_cuts=nc))
            r = b / np.maximum(tau, 1e-300)
            ratios[name] = r
            k_frac[name] = float(np.mean(kb / n_valid))
            res[name] = {
                "sound": bool(np.all(b >= tau)),
                "median_ratio": float(np.median(r)),
                "p90_ratio": float(np.quantile(r, 0.9)),
                "certifies_at_k_eps": float(np.mean(b <= MAIN_EPS)),
                "mean_k_over_n": k_frac[name],
            }
            note(f"{run.key}: bounds", j + 1, len(_BOUND_NAMES))
        sec.results[run.key] = {
            "eps": MAIN_EPS, "rows": int(x.shape[0]), "n_cuts_checkpoint": cuts,
            "exact_mean_k_over_n": k_frac["exact"], "bounds": res,
        }
        fig = plot_bound_ratios(ratios, k_frac, eps=MAIN_EPS,
                                title=f"{run.label}: logit-only tail bounds on "
                                      f"{x.shape[0]} real rows")
        sec.figures.append(_save(fig, out, f"bounds_ratio_{run.key}.png"))
        # One example row: a row whose k_eps / n is near the median.
        frac = k / n_valid
        r0 = int(np.argsort(frac)[len(frac) // 2])
        n0 = int(n_valid[r0])
        row = x[r0 : r0 + 1, :n0] if not run.causal else x[r0 : r0 + 1]
        ks = np.unique(np.linspace(1, n0 - 1, 60 if not quick else 20).astype(int))
        rows = np.repeat(row, ks.size, axis=0)
        t_curve = np.asarray(tail_mass(rows, k=ks), dtype=np.float64)
        # Each bound's whole curve over k of the one row, read at ks: the values
        # tail_bound gives at each k, without redoing the optimal-cuts programme per k.
        curves = {
            name: np.asarray(_bound_curve(row, name, cuts if name == "optimal_cuts" else None,
                                          -1)[0], dtype=np.float64)[0, ks - 1]
            for name in _BOUND_NAMES
        }
        fig = plot_bound_curves(ks, t_curve, curves, n=n0, eps=MAIN_EPS,
                                title=f"{run.label}: one real row (layer "
                                      f"{int(run.stats['layer'][idx[live][r0]])}), tail and "
                                      "bounds vs k")
        sec.figures.append(_save(fig, out, f"bounds_curve_{run.key}.png"))
    return sec
