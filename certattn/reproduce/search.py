"""Section ``search`` of ``certattn reproduce``: certified search on real attention.

Keys scored by MC-Search and the tree search of :func:`certattn.search.certified_search`
at ``n`` = 128 and 256, next to the exact ``k_eps`` and the paper's 58.8 / 128 and
107.8 / 256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._runs import _Run
from ._summary import _MAIN_EPS, PAPER, Progress, Section, _save


def _search(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..plots.reproduce import plot_search
    from ..search import certified_search
    from ..topk import certify_topk

    sec = Section("search", "Certified search: keys scored at n = 128 and 256")
    plot_res: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        if not run.windows:
            sec.results[run.key] = {"status": "pending",
                                    "reason": "no context of 128/256 keys available"}
            continue
        res: dict[str, Any] = {}
        for n, wins in sorted(run.windows.items()):
            acc: dict[str, list[np.ndarray]] = {"mc": [], "tree": [], "exact": [], "mc_cost": [],
                                                "tree_cost": []}
            steps = len(wins) * len(wins[0][0].layers)
            done = 0
            for a, rows in wins:
                for li in range(len(a.layers)):
                    q = a.queries[li][:, rows, :]
                    kk, vv = a.keys[li][:, :n, :], a.values[li][:, :n, :]
                    mask = a.mask[rows, :n]
                    logits = a.logits[li][:, rows, :n]
                    acc["exact"].append(np.asarray(certify_topk(logits, _MAIN_EPS).k).ravel())
                    for method in ("mc", "tree"):
                        r = certified_search(q, kk, vv, _MAIN_EPS, scale=a.scale, mask=mask,
                                             method=method)
                        acc[method].append(np.asarray(r.scored).ravel())
                        acc[f"{method}_cost"].append(np.asarray(r.cost).ravel())
                    done += 1
                    note(f"{run.key}: certified search, n = {n}", done, steps)
            m = {key: float(np.mean(np.concatenate(v))) for key, v in acc.items()}
            res[str(n)] = {
                "queries": int(np.concatenate(acc["mc"]).size),
                "windows": len(wins),
                "mc_scored": m["mc"], "tree_scored": m["tree"], "exact_k_eps": m["exact"],
                "mc_cost": m["mc_cost"], "tree_cost": m["tree_cost"],
                "mc_reduction": n / m["mc"], "tree_reduction": n / m["tree"],
                "paper_scored": PAPER["search_scored"].get(n),
                "paper_reduction": PAPER["search_reduction"].get(n),
            }
            plot_res.setdefault(run.label, {})[n] = {"mc": m["mc"], "tree": m["tree"],
                                                     "exact": m["exact"]}
        sec.results[run.key] = {"eps": _MAIN_EPS, "by_n": res}
    if plot_res:
        fig = plot_search(plot_res, {n: v for n, v in PAPER["search_scored"].items()},
                          eps=_MAIN_EPS)
        sec.figures.append(_save(fig, out, "search.png"))
    return sec
