"""Section ``identities`` of ``certattn reproduce``: TV-TAIL and TV-KL on real attention.

Checks ``TV = tau`` and ``TV = 1 - e^{-KL}`` with TV and KL computed directly from the
full and the truncated distributions, for Top-k sets and arbitrary kept sets, and plots
the errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._runs import _Run, sample_rows
from ._summary import EPS_GRID, MAIN_EPS, Progress, Section, _save


def _identities(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ..distribution import tail_mass, topk_mask
    from ..plots.reproduce import plot_identities

    sec = Section("identities", "Identity checks: TV = tail mass, TV = 1 - exp(-KL)")
    rng = np.random.default_rng(1)
    all_ok = True
    for run in runs:
        x, _, _, idx = sample_rows(run, 60 if quick else 400, seed=2)
        n_valid = run.stats["n_valid"][idx]
        k_eps = run.stats["k"][EPS_GRID.index(MAIN_EPS)][idx]
        kinds = {
            "top-k at k_eps(0.01)": topk_mask(x, np.minimum(k_eps, n_valid)),
            "top-k at random k": topk_mask(x, rng.integers(1, n_valid + 1)),
        }
        rand = (rng.random(x.shape) < rng.uniform(0.2, 0.9, size=(x.shape[0], 1))) & np.isfinite(x)
        rand[np.arange(x.shape[0]), np.argmax(x, axis=1)] = True  # never an empty kept set
        kinds["random kept set"] = rand
        taus, tvs, kls, res = [], [], [], {}
        for name, kept in kinds.items():
            tau = np.asarray(tail_mass(x, kept), dtype=np.float64)
            tv, kl = _direct_tv_kl(x, kept)
            tv_kl = -np.expm1(-kl)
            e1 = np.abs(tv - tau)
            e2 = np.abs(tv - tv_kl)
            tol = 1e-12 + 1e-9 * tau
            ok = bool(np.all(e1 <= tol) and np.all(e2 <= tol))
            all_ok &= ok
            res[name] = {
                "rows": int(x.shape[0]),
                "max_abs_tv_minus_tau": float(e1.max()),
                "max_abs_tv_minus_1_minus_exp_neg_kl": float(e2.max()),
                "tau_range": [float(tau.min()), float(tau.max())],
                "pass": ok,
            }
            taus.append(tau)
            tvs.append(tv)
            kls.append(kl)
        sec.results[run.key] = res
        fig = plot_identities(np.concatenate(taus), np.concatenate(tvs), np.concatenate(kls),
                              title=f"{run.label}: distribution-level identities on real rows")
        sec.figures.append(_save(fig, out, f"identities_{run.key}.png"))
        note("identities", runs.index(run) + 1, len(runs))
    sec.results["all_pass"] = all_ok
    sec.results["tolerance"] = "|difference| <= 1e-12 + 1e-9 * tau"
    return sec


def _direct_tv_kl(x: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TV(P, P_hat) = 0.5 sum |P - P_hat| and KL(P_hat || P), from the two distributions."""
    s = x.astype(np.float64)
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=1, keepdims=True)
    q = np.where(kept, p, 0.0)
    q /= q.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(p - q).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0)
    return tv, terms.sum(axis=1)
