"""Figures of the Gaussian score model (THEORY.md section 5).

Each ``plot_*`` function returns a :class:`matplotlib.figure.Figure` (built without
``pyplot``, so no global state and no display needed); :func:`save_gaussian_figures`
writes them all as PNG (``certattn plot gaussian --out DIR``).  All Monte Carlo is seeded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from certattn.errors import InputError
from certattn.gaussian import keps_fraction, predict_k, top_fraction_tail_mass
from certattn.gaussian_mc import gaussian_validity, monte_carlo_keps, single_gap_overshoot
from certattn.topk import certify_topk

__all__ = [
    "plot_keps_vs_sigma",
    "plot_predicted_vs_exact",
    "plot_single_gap_overshoot",
    "plot_tail_vs_kept",
    "save_gaussian_figures",
]

_EPS_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
_N_MARKERS = ("o", "s", "^", "D")


def plot_keps_vs_sigma(
    *,
    ns: tuple[int, ...] = (128, 1024),
    eps: tuple[float, ...] = (0.1, 0.01, 0.001),
    rows: int = 2000,
    sigmas: np.ndarray | None = None,
    seed: int = 0,
) -> Figure:
    """``k_eps / n`` against ``sigma``: the rule (GAUSS-KEPS) and Monte Carlo means.

    Curves: the population rule per ``eps``.  Markers: mean exact ``k_eps / n`` over
    ``rows`` Gaussian rows for each ``n`` (hollow where :func:`gaussian_validity` says the
    rule is not to be trusted).  Dotted verticals: ``sigma = sqrt(2 ln n)``.
    """
    sig_mc = np.arange(0.5, 4.01, 0.5) if sigmas is None else np.asarray(sigmas, float)
    sig_line = np.linspace(0.0, max(4.0, float(sig_mc.max())), 300)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for j, e in enumerate(eps):
        ax.plot(sig_line, keps_fraction(e, sig_line), color=_EPS_COLORS[j], lw=2,
                label=f"rule, ε = {e:g}")
    for i, n in enumerate(ns):
        r = monte_carlo_keps(n, sig_mc[:, None], np.asarray(eps)[None, :], rows=rows, seed=seed)
        ok = gaussian_validity(n, sig_mc).trusted
        for j in range(len(eps)):
            col = _EPS_COLORS[j]
            for mask, face in ((ok, col), (~ok, "none")):
                ax.errorbar(sig_mc[mask], r.mean[mask, j], yerr=2 * r.sem[mask, j], ls="none",
                            marker=_N_MARKERS[i], ms=6, mfc=face, mec=col, ecolor=col)
        ax.axvline(np.sqrt(2 * np.log(n)), color="0.4", ls=":", lw=1)
        ax.text(np.sqrt(2 * np.log(n)) + 0.03, 0.97, f"σ = √(2 ln {n})", ha="left", va="top",
                rotation=90, fontsize=8, color="0.3", transform=ax.get_xaxis_transform())
    for i, n in enumerate(ns):  # legend entries for the marker shapes
        ax.plot([], [], ls="none", marker=_N_MARKERS[i], color="0.3",
                label=f"exact k_eps/n, n = {n} (mean of {rows} rows)")
    ax.plot([], [], ls="none", marker="o", mfc="none", mec="0.3",
            label="hollow: validity diagnostic fails")
    ax.set_xlabel("score standard deviation σ")
    ax.set_ylabel("kept fraction  k_eps / n")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(0, sig_line[-1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Top-k budget of i.i.d. Gaussian logits: rule Φc(σ + Φ⁻¹(ε)) vs exact",
                 fontsize=10)
    return fig


def plot_tail_vs_kept(
    *,
    sigmas: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0),
    n: int = 1024,
    rows: int = 200,
    seed: int = 0,
) -> Figure:
    """Tail mass ``tau`` against the kept fraction ``rho`` (GAUSS-TOPFRAC), log scale.

    Curves: ``Phi(Phi^{-1}(1 - rho) - sigma)``; markers: mean exact tail mass of the top
    ``ceil(rho n)`` keys over ``rows`` Gaussian rows of length ``n``.
    """
    rho_line = np.linspace(0.0005, 0.9995, 400)
    rho_mc = np.linspace(0.05, 0.95, 10)
    fig = Figure(figsize=(7.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    z = np.sort(np.random.default_rng(seed).standard_normal((rows, n)), axis=-1)
    k = np.ceil(rho_mc * n).astype(int)
    for j, s in enumerate(sigmas):
        col = _EPS_COLORS[j % len(_EPS_COLORS)]
        ax.plot(rho_line, top_fraction_tail_mass(rho_line, s), color=col, lw=2,
                label=f"σ = {s:g}: rule Φ(Φ⁻¹(1-ρ) - σ)")
        c = np.cumsum(np.exp(s * (z - z[:, -1:])), axis=-1)  # small end first
        tau = c[:, n - k - 1] / c[:, -1:]  # tail of the top k: the n - k smallest
        ax.plot(k / n, tau.mean(axis=0), ls="none", marker="o", color=col, mfc="white")
    ax.plot([], [], ls="none", marker="o", color="0.3", mfc="white",
            label=f"exact, n = {n} (mean of {rows} rows)")
    ax.axhline(0.01, color="0.5", ls="--", lw=1)
    ax.text(0.42, 0.01, "ε = 0.01", ha="left", va="bottom", fontsize=8, color="0.4",
            transform=ax.get_yaxis_transform())
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept fraction ρ = k / n  (top keys)")
    ax.set_ylabel("discarded attention mass τ  (= TV distance)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Tail mass left by keeping the top fraction of Gaussian logits", fontsize=10)
    return fig


def _real_rows() -> tuple[np.ndarray, np.ndarray]:
    """MiniLM sample logits as (rows, n) per sentence, stacked with their layer index."""
    from certattn.models import load_sample

    out, layer = [], []
    for m in load_sample():
        for li, lay in enumerate(m.layers):
            x = np.asarray(m.logits[li], dtype=np.float64).reshape(-1, m.logits.shape[-1])
            out.append(x)
            layer.append(np.full(x.shape[0], int(lay)))
    return out, np.concatenate(layer)


def plot_predicted_vs_exact(*, eps: float = 0.01, rows: int = 400, seed: int = 0) -> Figure:
    """Rule-guided ``predict_k`` against the exact certified ``k`` (``certify_topk``).

    Left: real rows (all-MiniLM-L6-v2 sample shipped with certattn, layers 0, 2, 5, all
    heads), predicted vs exact ``k``.  Right: distribution of the ratio predicted / exact
    on Gaussian rows (``n = 1024``) and on the real rows.
    """
    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    blocks, layers = _real_rows()
    pred = np.concatenate([np.asarray(predict_k(x, eps)) for x in blocks])
    exact = np.concatenate([np.asarray(certify_topk(x, eps).k) for x in blocks])
    nmax = max(x.shape[-1] for x in blocks)
    for j, lay in enumerate(np.unique(layers)):
        m = layers == lay
        jit = np.random.default_rng(j).uniform(-0.25, 0.25, m.sum())
        ax1.scatter(exact[m] + jit, pred[m], s=6, alpha=0.35, color=_EPS_COLORS[j],
                    label=f"layer {lay} ({m.sum()} rows)")
    ax1.plot([0, nmax], [0, nmax], color="k", lw=1, label="predicted = exact")
    ax1.set_xlabel(f"exact certified k (certify_topk, ε = {eps:g})")
    ax1.set_ylabel("predicted k  (rule with σ estimated per row)")
    ax1.set_title(f"Real attention rows: all-MiniLM-L6-v2, n = 41-53, ε = {eps:g}",
                  fontsize=10)
    ax1.legend(fontsize=8, markerscale=2)
    ax1.grid(alpha=0.3)
    ax1.set_xlim(0, nmax + 1)
    ax1.set_ylim(0, nmax + 1)

    rng = np.random.default_rng(seed)
    curves = []
    for s in (1.0, 2.0, 3.0):
        x = s * rng.standard_normal((rows, 1024))
        ratio = np.asarray(predict_k(x, eps)) / np.asarray(certify_topk(x, eps).k)
        curves.append((f"Gaussian, n = 1024, σ = {s:g}", ratio, "-"))
    curves.append(("MiniLM rows (left panel)", pred / exact, "--"))
    for j, (name, ratio, ls) in enumerate(curves):
        r = np.sort(ratio)
        under = np.mean(ratio < 1)
        col = _EPS_COLORS[j] if ls == "-" else "k"
        ax2.step(r, np.arange(1, r.size + 1) / r.size, where="post", color=col, ls=ls, lw=1.8,
                 label=f"{name}: median {np.median(ratio):.2f}, under {100 * under:.0f}%")
    ax2.axvline(1.0, color="0.5", lw=1)
    ax2.set_xscale("log")
    ax2.set_xlim(0.25, 4)
    ticks = [0.25, 0.5, 0.75, 1, 1.5, 2, 4]
    ax2.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
    ax2.minorticks_off()
    ax2.set_xlabel("predicted k / exact k   (< 1: the rule under-predicts)")
    ax2.set_ylabel("fraction of rows with ratio ≤ x")
    ax2.set_title("Rule-guided vs exact budget: cumulative distribution of the ratio",
                  fontsize=10)
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(alpha=0.3)
    return fig


def plot_single_gap_overshoot(
    *,
    ns: tuple[int, ...] = (128, 1024, 4096),
    sigmas: np.ndarray | None = None,
    eps: float = 0.01,
    rows: int = 300,
    seed: int = 0,
) -> Figure:
    """How far the single-gap bound (Thm 4.5) overshoots the true tail at ``k = k_eps``.

    Median (line) and interquartile range (band) of ``bound / tau`` over ``rows``
    Gaussian rows per point.
    """
    sig = np.arange(0.25, 4.01, 0.25) if sigmas is None else np.asarray(sigmas, float)
    fig = Figure(figsize=(7.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, n in enumerate(ns):
        r = single_gap_overshoot(n, sig, eps, rows=rows, seed=seed)
        q1, med, q3 = np.nanpercentile(r, [25, 50, 75], axis=-1)
        col = _EPS_COLORS[i]
        ax.plot(sig, med, color=col, marker=_N_MARKERS[i], lw=2, label=f"n = {n}: median")
        ax.fill_between(sig, q1, q3, color=col, alpha=0.2, lw=0)
    ax.plot([], [], color="0.5", alpha=0.3, lw=8, label="interquartile range")
    ax.axhline(1.0, color="k", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("score standard deviation σ")
    ax.set_ylabel("single-gap bound / true tail mass at k = k_eps")
    ax.set_title(f"Looseness of the single-gap bound (Thm 4.5) on Gaussian rows, ε = {eps:g}",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def save_gaussian_figures(out_dir: str | Path, *, quick: bool = False) -> list[Path]:
    """Write the Gaussian-model figures as PNG into ``out_dir``; return their paths.

    ``quick=True`` uses fewer Monte Carlo rows and grid points (seconds instead of tens
    of seconds); the figures keep the same layout.

    Raises
    ------
    InputError
        (a ``ValueError``) ``out_dir`` is empty, an existing file, or cannot be created
        or written; checked before any figure is computed.
    """
    out = Path(out_dir)
    if not str(out_dir):
        raise InputError("the output folder name is empty")
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write figures to {out}: it exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"cannot write figures to {out}: permission denied")
    rows = 200 if quick else 2000
    figs = {
        "gaussian_keps_vs_sigma": plot_keps_vs_sigma(
            rows=rows, sigmas=np.arange(0.5, 4.01, 1.0 if quick else 0.25)),
        "gaussian_tail_vs_kept": plot_tail_vs_kept(rows=50 if quick else 400),
        "gaussian_predicted_vs_exact": plot_predicted_vs_exact(rows=100 if quick else 1000),
        "gaussian_single_gap_overshoot": plot_single_gap_overshoot(
            rows=60 if quick else 500, sigmas=np.arange(0.5, 4.01, 0.5 if quick else 0.25)),
    }
    paths = []
    for name, fig in figs.items():
        p = out / f"{name}.png"
        try:
            fig.savefig(p, dpi=130)
        except OSError as exc:
            raise InputError(f"cannot write {p}: {exc.strerror or exc}") from None
        paths.append(p)
    return paths
