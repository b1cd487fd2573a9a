"""Figures of ``certattn reproduce`` (real attention of MiniLM and SmolLM2).

Each ``plot_*`` function takes plain NumPy data (computed by :mod:`certattn.reproduce`)
and returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no global state,
no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter

__all__ = [
    "plot_bound_curves",
    "plot_bound_ratios",
    "plot_head_budgets",
    "plot_identities",
    "plot_keps_vs_sigma",
    "plot_layer_budgets",
    "plot_output_bounds",
    "plot_search",
]

_BOUND_LABELS = {
    "gap": "single gap (Thm 4.5)",
    "exact_head": "single gap, exact head",
    "optimal_cuts": "multi-gap, optimal cuts",
    "all_gap": "multi-gap, every cut",
    "uniform_gap": "uniform gap",
}
_BOUND_COLORS = {
    "gap": "tab:red",
    "exact_head": "tab:orange",
    "optimal_cuts": "tab:purple",
    "all_gap": "tab:green",
    "uniform_gap": "tab:brown",
}
_EPS_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
_OUT_COLORS = {
    "bounded": "tab:red",
    "diameter_all": "tab:orange",
    "diameter": "tab:olive",
    "tail_head": "tab:green",
    "variance": "tab:blue",
    "best": "black",
}
_OUT_LABELS = {
    "bounded": "2Cτ (Prop 5.1)",
    "diameter_all": "τ·diam(V)",
    "diameter": "τ·diam(H,T) (Prop 5.3)",
    "tail_head": "τ·max_T |v−μ_H|",
    "variance": "√χ²·√Var (Thm 5.6)",
    "best": "best (Thm 5.6)",
}


def _positive(x: np.ndarray, floor: float = 1e-300) -> np.ndarray:
    return np.maximum(np.asarray(x, dtype=np.float64), floor)


def plot_identities(tau: np.ndarray, tv: np.ndarray, kl: np.ndarray, *, title: str) -> Figure:
    """TV vs tail mass and TV vs ``1 - e^{-KL}`` on real rows (Lemma 4.1, Thm 4.3).

    ``tv`` and ``kl`` are computed directly from the two distributions
    (``0.5 sum |P - P_hat|`` and ``sum P_hat log(P_hat / P)``), ``tau`` from the logits.
    Left: the identities on log axes; right: their relative residuals.
    """
    tau, tv, kl = (np.asarray(a, dtype=np.float64) for a in (tau, tv, kl))
    tv_kl = -np.expm1(-kl)
    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    lo = max(float(np.min(_positive(tau, 1e-20))), 1e-20)
    line = np.array([lo, 1.0])
    ax1.plot(line, line, color="0.5", lw=1, ls="--", label="y = x")
    ax1.scatter(tau, tv, s=10, alpha=0.6, color="tab:blue", label="TV(P, P̂) vs τ  (Lemma 4.1)")
    ax1.scatter(tv_kl, tv, s=10, alpha=0.6, marker="x", color="tab:orange",
                label="TV(P, P̂) vs 1 − e^(−KL(P̂‖P))  (Thm 4.3)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("tail mass τ  /  1 − e^(−KL)")
    ax1.set_ylabel("total variation TV(P, P̂), computed directly")
    ax1.legend(fontsize=8, loc="upper left")
    ax1.grid(alpha=0.3, which="both")
    ax1.set_title("The identities hold on every row and kept set", fontsize=10)
    r1 = np.abs(tv - tau) / _positive(tau)
    r2 = np.abs(tv - tv_kl) / _positive(tv_kl)
    ax2.scatter(tau, _positive(r1, 1e-18), s=10, alpha=0.6, color="tab:blue",
                label="|TV − τ| / τ")
    ax2.scatter(tau, _positive(r2, 1e-18), s=10, alpha=0.6, marker="x", color="tab:orange",
                label="|TV − (1 − e^(−KL))| / (1 − e^(−KL))")
    ax2.axhline(2.0**-52, color="0.4", ls=":", lw=1)
    ax2.text(0.02, 2.0**-52, "float64 ulp", transform=ax2.get_yaxis_transform(),
             va="bottom", fontsize=8, color="0.3")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_ylim(1e-18, 1.0)
    ax2.set_xlabel("tail mass τ")
    ax2.set_ylabel("relative residual (values at 1e-18 are exact zeros)")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.grid(alpha=0.3, which="both")
    ax2.set_title("Residuals: float64 rounding of the direct sums only", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_bound_ratios(
    ratios: Mapping[str, np.ndarray],
    k_frac: Mapping[str, float],
    *,
    eps: float,
    title: str,
) -> Figure:
    """Each logit-only bound against the true tail, at the exact minimal ``k_eps``.

    Left: distribution of ``bound / tau`` over rows (box plots, log scale; 1 = tight).
    Right: mean ``k / n`` that each bound needs to certify ``eps``, next to the exact
    minimal ``k_eps / n``.
    """
    names = [n for n in _BOUND_LABELS if n in ratios]
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1.4, 1.0))
    data = [np.clip(np.asarray(ratios[n], dtype=np.float64), 1.0, 1e12) for n in names]
    _ratio_boxes(ax1, data, [_BOUND_LABELS[n] for n in names],
                 [_BOUND_COLORS[n] for n in names], "bound / true tail mass τ  at k = k_eps", 15)
    ax1.set_title(f"Overshoot of each bound at the exact budget (ε = {eps:g}); "
                  "boxes: quartiles, whiskers 5-95%", fontsize=9)
    bars = ["exact", *names]
    vals = [k_frac["exact"], *[k_frac[n] for n in names]]
    cols = ["0.3", *[_BOUND_COLORS[n] for n in names]]
    ax2.barh(range(len(bars)), vals, color=cols, alpha=0.8)
    for i, v in enumerate(vals):
        ax2.text(min(v, 0.98), i, f" {v:.3f}", va="center", ha="right" if v > 0.8 else "left",
                 fontsize=8)
    ax2.set_yticks(range(len(bars)),
                   ["exact k_eps (floor)", *[_BOUND_LABELS[n] for n in names]], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel(f"mean k / n that certifies τ ≤ {eps:g}")
    ax2.grid(alpha=0.3, axis="x")
    ax2.set_title("Keys each bound must keep", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_bound_curves(
    k: np.ndarray,
    tau: np.ndarray,
    bounds: Mapping[str, np.ndarray],
    *,
    n: int,
    eps: float,
    title: str,
) -> Figure:
    """One real row: the true tail ``tau_k`` and every bound as functions of ``k / n``."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.asarray(k) / n
    for name in _BOUND_LABELS:
        if name in bounds:
            ax.plot(x, _positive(bounds[name], 1e-30), color=_BOUND_COLORS[name], lw=1.6,
                    label=_BOUND_LABELS[name])
    ax.plot(x, _positive(tau, 1e-30), color="black", lw=2.4, label="true tail τ_k")
    ax.axhline(eps, color="0.4", ls="--", lw=1)
    ax.text(0.01, eps, f" ε = {eps:g}", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=8, color="0.3")
    ax.set_yscale("log")
    lo = max(float(np.min(_positive(tau[tau > 0], 1e-30))) if np.any(tau > 0) else 1e-12,
             1e-16)
    ax.set_ylim(lo / 3, 1.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"kept fraction k / n  (n = {n})")
    ax.set_ylabel("discarded mass τ_k and its upper bounds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    return fig


def plot_keps_vs_sigma(
    sigma: np.ndarray,
    frac: Mapping[float, np.ndarray],
    rule: object,
    *,
    depth: np.ndarray,
    title: str,
) -> Figure:
    """Exact ``k_eps / n`` of real rows against their logit standard deviation.

    One panel per eps; points coloured by relative layer depth; black line: the
    Gaussian rule ``Phi_c(sigma + Phi^{-1}(eps))`` (``rule(eps, sigma_grid)``); white
    diamonds: binned means of the real rows.
    """
    eps_list = list(frac)
    fig = Figure(figsize=(4.0 * len(eps_list) + 1.0, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(eps_list), sharey=True))
    sigma = np.asarray(sigma, dtype=np.float64)
    # A few heads put all their mass on one key (sigma far above the rest): clip the axis
    # at the 99.5th percentile and say how many rows lie beyond it.
    right = max(float(np.quantile(sigma, 0.995)) * 1.1, 1.0)
    hidden = int(np.sum(sigma > right))
    grid = np.linspace(0.0, right, 300)
    bins = np.linspace(0.0, right, 41)
    sc = None
    for ax, e in zip(axes, eps_list, strict=True):
        f = np.asarray(frac[e], dtype=np.float64)
        sc = ax.scatter(sigma, f, c=depth, cmap="viridis", vmin=0, vmax=1, s=3, alpha=0.35,
                        rasterized=True, linewidths=0)
        ax.plot(grid, rule(e, grid), color="black", lw=2.2, label="Gaussian rule Φc(σ + Φ⁻¹(ε))")
        idx = np.where(sigma <= right, np.digitize(sigma, bins[1:-1]), -1)
        full = [b for b in range(len(bins) - 1) if np.sum(idx == b) >= 10]
        cen = np.array([sigma[idx == b].mean() for b in full])
        mean = np.array([f[idx == b].mean() for b in full])
        ax.plot(cen, mean, ls="none", marker="D", mfc="white", mec="black", ms=5,
                label="real rows, mean per σ bin (≥ 10 rows)")
        ax.set_title(f"ε = {e:g}", fontsize=10)
        if hidden:
            ax.text(0.98, 0.97, f"{hidden} rows with σ̂ > {right:.1f} not shown",
                    transform=ax.transAxes, ha="right", va="top", fontsize=8, color="0.3")
        ax.set_xlabel("per-row logit standard deviation σ̂")
        ax.set_xlim(0, grid[-1])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact minimal k_eps / n")
    axes[0].legend(fontsize=8, loc="lower left")
    if sc is not None:
        cb = fig.colorbar(sc, ax=list(axes), shrink=0.9, pad=0.01)
        cb.set_label("layer depth (0 = first, 1 = last)")
        cb.solve_alpha = False
        cb.set_alpha(1.0)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_output_bounds(
    error: np.ndarray, bounds: Mapping[str, np.ndarray], *, eps: float, title: str
) -> Figure:
    """The output error ``|Attn - Attn_k|`` at ``k = k_eps`` against each bound.

    Left: bound vs true error per row (log-log; every point lies above ``y = x``).
    Right: distribution of ``bound / error``.
    """
    err = _positive(error, 1e-30)
    names = [n for n in _OUT_LABELS if n in bounds and np.all(np.isfinite(bounds[n]))]
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1.2, 1.0))
    lo, hi = float(err.min()), max(float(np.max(bounds[n])) for n in names)
    ax1.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=1, label="y = x (exact error)")
    for n in names:
        y = _positive(bounds[n], 1e-30)
        if n == "best":  # hollow, so the bound that attains it stays visible underneath
            ax1.scatter(err, y, s=16, facecolors="none", edgecolors="black", linewidths=0.6,
                        label=_OUT_LABELS[n], rasterized=True)
        else:
            ax1.scatter(err, y, s=8, alpha=0.5, color=_OUT_COLORS[n], label=_OUT_LABELS[n],
                        rasterized=True, linewidths=0)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlim(lo / 1.5, hi * 1.5)
    ax1.set_ylim(lo / 1.5, hi * 1.5)
    for axis in (ax1.xaxis, ax1.yaxis):
        axis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("true output error |Attn − Attn_k|₂")
    ax1.set_ylabel("upper bound")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, loc="lower right", markerscale=2)
    ax1.set_title(f"Output error at the certified k_eps (ε = {eps:g})", fontsize=10)
    data = [_positive(bounds[n], 1e-30) / err for n in names]
    _ratio_boxes(ax2, data, [_OUT_LABELS[n] for n in names], [_OUT_COLORS[n] for n in names],
                 "bound / true error", 20)
    ax2.set_title("How loose each bound is (1 = exact)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_layer_budgets(
    per_model: Mapping[str, Mapping[str, object]], *, eps_list: Sequence[float]
) -> Figure:
    """Per layer: mean exact ``k_eps / n`` and the reduction ``n / k``, one line per eps.

    ``per_model[label]`` holds ``layers`` (model layer indices), ``frac`` (``(E, L)`` mean
    k/n) and ``reduction`` (``(E, L)`` total n / total k).
    """
    labels = list(per_model)
    fig = Figure(figsize=(5.2 * len(labels), 7.2), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(labels), squeeze=False))
    for j, lab in enumerate(labels):
        d = per_model[lab]
        layers = np.asarray(d["layers"])
        for i, e in enumerate(eps_list):
            col = _EPS_COLORS[i % len(_EPS_COLORS)]
            axes[0, j].plot(layers, np.asarray(d["frac"])[i], marker="o", ms=4, color=col,
                            label=f"ε = {e:g}")
            axes[1, j].plot(layers, np.asarray(d["reduction"])[i], marker="o", ms=4, color=col,
                            label=f"ε = {e:g}")
        axes[0, j].set_ylim(0, 1.02)
        axes[0, j].set_ylabel("mean exact k_eps / n")
        axes[0, j].set_title(lab, fontsize=10)
        axes[1, j].set_yscale("log")
        top = float(np.max(d["reduction"]))
        ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500) if t <= top * 1.3]
        axes[1, j].yaxis.set_major_locator(FixedLocator(ticks))
        axes[1, j].yaxis.set_major_formatter("{x:g}x")
        axes[1, j].yaxis.set_minor_formatter(NullFormatter())
        axes[1, j].set_ylim(0.95, top * 1.3)
        axes[1, j].set_ylabel("reduction n / k  (total keys / kept keys)")
        axes[1, j].set_xlabel("layer")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3, which="both")
            if layers.size <= 12:
                ax.set_xticks(layers)
        axes[0, j].legend(fontsize=8, loc="best")
    fig.suptitle("Certified Top-k budgets per layer (exact minimal k_eps, TV ≤ ε)", fontsize=11)
    return fig


def plot_head_budgets(
    frac_mean: np.ndarray, layers: Sequence[int], *, eps: float, title: str
) -> Figure:
    """Heat map of the mean exact ``k_eps / n`` per (layer, head)."""
    frac_mean = np.asarray(frac_mean, dtype=np.float64)
    n_layers, n_heads = frac_mean.shape
    fig = Figure(figsize=(max(5.0, 0.55 * n_heads + 2.5), max(3.2, 0.24 * n_layers + 1.8)),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac_mean, aspect="auto", cmap=colormaps["magma"], vmin=0, vmax=1,
                   origin="upper")
    ax.set_xticks(range(n_heads))
    step = 1 if n_layers <= 12 else 2
    ax.set_yticks(range(0, n_layers, step), [str(v) for v in list(layers)[::step]])
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    if n_layers * n_heads <= 120:
        for i in range(n_layers):
            for h in range(n_heads):
                v = frac_mean[i, h]
                ax.text(h, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(f"mean k_eps / n  (ε = {eps:g})")
    ax.set_title(title, fontsize=10)
    return fig


def plot_search(
    results: Mapping[str, Mapping[int, Mapping[str, float]]],
    paper: Mapping[int, float],
    *,
    eps: float,
) -> Figure:
    """Keys scored by certified search at ``n`` = 128 and 256, next to the paper.

    ``results[model][n]`` holds mean ``scored`` keys per method (``"mc"``, ``"tree"``,
    ``"quant"``) and
    ``"exact"`` (mean exact ``k_eps``: what a search must keep at the least).
    """
    ns = sorted({n for r in results.values() for n in r} | set(paper))
    table = {"bert-base-uncased\n(paper)": {n: {"mc": paper[n]} for n in paper}, **results}
    groups: list[tuple[str, str, str]] = [
        ("mc", "MC-Search (Algorithm 2)", "tab:blue"),
        ("tree", "tree search (certattn)", "tab:green"),
        ("quant", "4-bit key estimates (certattn)", "tab:purple"),
        ("exact", "exact k_eps (keys kept; floor)", "tab:red"),
    ]
    fig = Figure(figsize=(4.6 * len(ns) + 1.0, 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ns), squeeze=False)[0])
    models = list(table)
    width = 0.8 / len(groups)
    for ax, n in zip(axes, ns, strict=True):
        for gi, (key, label, col) in enumerate(groups):
            xs, vals = [], []
            for mi, m in enumerate(models):
                v = table[m].get(n, {}).get(key)
                if v is not None:
                    xs.append(mi + (gi - (len(groups) - 1) / 2) * width)
                    vals.append(v)
            if vals:
                bars = ax.bar(xs, vals, width=width, color=col, label=label)
                for b, v in zip(bars, vals, strict=True):
                    ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center",
                            va="bottom", fontsize=7)
        ax.axhline(n, color="0.3", ls="--", lw=1)
        ax.text(-0.55, n * 1.01, f"all n = {n} keys", ha="left", va="bottom", fontsize=8)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_ylim(0, n * 1.15)
        ax.set_ylabel("keys per query (mean)")
        ax.set_title(f"n = {n} keys, ε = {eps:g}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(groups), fontsize=8)
    fig.suptitle("Certified search: keys scored before the certificate holds", fontsize=11)
    return fig


def _ratio_boxes(
    ax: Any, data: list[np.ndarray], labels: list[str], colors: list[str], ylabel: str,
    rotation: float,
) -> None:
    """Log-scale boxes (5-95% whiskers) of bound/true ratios, with the exact line at 1."""
    bp = ax.boxplot(data, whis=(5, 95), showfliers=False, patch_artist=True,
                    medianprops={"color": "black"})
    for patch, color in zip(bp["boxes"], colors, strict=True):
        patch.set_facecolor(color)
        patch.set_alpha(0.55)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=rotation, fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="0.4", ls="--", lw=1)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both", axis="y")
