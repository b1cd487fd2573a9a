"""Section ``search`` of ``certattn reproduce``: certified search on real attention.

Keys scored and bytes read (over dense attention's float16 keys) by every search of
:func:`certattn.search.certified_search` -- MC-Search, ours, tree, gap, and per-key bounds
from 4- and 8-bit key estimates ("quant", Theorem QUANT-SCORE) -- at ``n`` = 128 and 256
(and 1024 for SmolLM2), next to the exact ``k_eps`` and the paper's 58.8 / 128 and
107.8 / 256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._runs import _Run
from ._summary import MAIN_EPS, PAPER, SIZES, Progress, Section, _save

# (label, method, keyword arguments) of every search the section runs
_SEARCHES = (
    ("mc", "mc", {}),
    ("ours", "ours", {}),
    ("tree", "tree", {}),
    ("gap", "gap", {}),
    ("quant4", "quant", {"bits": 4}),
    ("quant8", "quant", {"bits": 8}),
)


def _search(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..plots.reproduce import plot_search
    from ..search import METHODS, build_cells, certified_search
    from ..topk import certify_topk

    sec = Section("search", "Certified search: keys scored at n = 128, 256 (and 1024)")
    plot_res: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        if not run.windows:
            sec.results[run.key] = {"status": "pending",
                                    "reason": "no context of 128/256 keys available"}
            continue
        res: dict[str, Any] = {}
        for n, wins in sorted(run.windows.items()):
            acc: dict[str, list[np.ndarray]] = {"exact": []}
            steps = len(wins) * len(wins[0][0].layers)
            done = 0
            for a, window_rows in wins:
                rows = _spread(np.arange(a.n_tokens)[window_rows], SIZES.search_rows)
                for li in range(len(a.layers)):
                    q = a.queries[li][:, rows, :]
                    kk, vv = a.keys[li][:, :n, :], a.values[li][:, :n, :]
                    mask = a.mask[rows, :n]
                    logits = a.logits[li][:, rows, :n]
                    acc["exact"].append(np.asarray(certify_topk(logits, MAIN_EPS).k).ravel())
                    # mc, ours and gap search the same k-means cells: built once (as
                    # certified_search builds them: float64 keys, seed 0)
                    k64 = np.asarray(kk, dtype=np.float64)
                    flat = [build_cells("mc", k64[j], 0) for j in range(k64.shape[0])]
                    for label, method, kw in _SEARCHES:
                        shared = {"cells": flat} if METHODS[method]["cells"] == "flat" else {}
                        r = certified_search(q, kk, vv, MAIN_EPS, scale=a.scale, mask=mask,
                                             method=method, **kw, **shared)
                        for what, val in (("", r.scored), ("_cost", r.cost),
                                          ("_read", r.read_fraction)):
                            acc.setdefault(label + what, []).append(np.asarray(val).ravel())
                    done += 1
                    note(f"{run.key}: certified search, n = {n}", done, steps)
            m = {key: float(np.mean(np.concatenate(v))) for key, v in acc.items()}
            row: dict[str, Any] = {
                "queries": int(np.concatenate(acc["mc"]).size),
                "windows": len(wins),
                "rows_per_window_cap": SIZES.search_rows,
                "exact_k_eps": m["exact"],
                "paper_scored": PAPER["search_scored"].get(n),
                "paper_reduction": PAPER["search_reduction"].get(n),
            }
            for label, _, _ in _SEARCHES:
                row[f"{label}_scored"] = m[label]
                row[f"{label}_cost"] = m[f"{label}_cost"]
                row[f"{label}_read"] = m[f"{label}_read"]
                row[f"{label}_reduction"] = n / m[label]
            res[str(n)] = row
            plot_res.setdefault(run.label, {})[n] = {"mc": m["mc"], "tree": m["tree"],
                                                     "quant": m["quant4"],
                                                     "exact": m["exact"]}
        sec.results[run.key] = {"eps": MAIN_EPS, "by_n": res}
    if plot_res:
        fig = plot_search(plot_res, {n: v for n, v in PAPER["search_scored"].items()},
                          eps=MAIN_EPS)
        sec.figures.append(_save(fig, out, "search.png"))
    return sec


def _spread(rows: np.ndarray, cap: int | None) -> np.ndarray:
    """``rows``, or ``cap`` of them evenly spaced (first and last included) when longer."""
    if cap is None or rows.size <= cap:
        return rows
    return rows[np.unique(np.rint(np.linspace(0, rows.size - 1, cap)).astype(int))]
