"""Section ``output`` of ``certattn reproduce``: output-level bounds on real attention.

``|Attn - Attn_k|`` at the certified ``k_eps`` (the model's own values) against the bounds of
:func:`certattn.output.output_bounds`, with the figure of their ratios.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._runs import _Run
from ._summary import MAIN_EPS, SIZES, Progress, Section, _save


def _output(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..output import output_bounds
    from ..plots.reproduce import plot_output_bounds
    from ..topk import certify_topk

    sec = Section("output", "Output error |Attn - Attn_k| at k_eps against its bounds")
    names = ("bounded", "diameter_all", "diameter", "tail_head", "variance", "best")
    for run in runs:
        a = run.attentions[0]
        rng = np.random.default_rng(5)
        n_q = 8 if quick else 32
        layers = (range(min(2, len(a.layers))) if quick
                  else _layers(len(a.layers), SIZES.output_layers))
        errs, bnds = [], {n: [] for n in names}
        for j, li in enumerate(layers):
            h = int(rng.integers(a.n_heads))
            x = run.layer_logits(a, li)[h]
            q = np.sort(rng.choice(x.shape[0], size=min(n_q, x.shape[0]), replace=False))
            x = x[q]
            cert = certify_topk(x, MAIN_EPS)
            v = a.values[li, int(a.kv_head[h])]
            ob = output_bounds(x, v, k=cert.k, tail_upper=cert.tail_upper)
            errs.append(np.asarray(ob.error))
            for n in names:
                bnds[n].append(np.asarray(getattr(ob, n)))
            note(f"{run.key}: output bounds", j + 1, len(layers))
        err = np.concatenate(errs)
        bd = {n: np.concatenate(v) for n, v in bnds.items()}
        live = err > 0
        res = {}
        for n in names:
            b = bd[n]
            res[n] = {
                "sound": bool(np.all(b >= err)),
                "median_ratio": float(np.median(b[live] / err[live])) if live.any() else None,
            }
        tight = np.array([min(names[:-1], key=lambda m, i=i: bd[m][i]) for i in range(err.size)])
        res["tightest_share"] = {n: float(np.mean(tight == n)) for n in names[:-1]}
        sec.results[run.key] = {"eps": MAIN_EPS, "rows": int(err.size), "bounds": res,
                                "layers": [int(a.layers[li]) for li in layers],
                                "median_error": float(np.median(err))}
        fig = plot_output_bounds(err[live], {n: v[live] for n, v in bd.items()}, eps=MAIN_EPS,
                                 title=f"{run.label}: output error bounds on {int(live.sum())} "
                                       "real query rows")
        sec.figures.append(_save(fig, out, f"output_bounds_{run.key}.png"))
    return sec


def _layers(n: int, cap: int | None) -> list[int]:
    """All ``n`` layer positions, or at most ``cap`` of them evenly spaced (first and last
    included)."""
    if cap is None or n <= cap:
        return list(range(n))
    return sorted(set(np.rint(np.linspace(0, n - 1, cap)).astype(int).tolist()))
