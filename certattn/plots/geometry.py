"""Figures for the curvature story (matplotlib; every function returns a Figure)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.colors import Normalize, SymLogNorm, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.tri import Triangulation
from numpy.typing import ArrayLike

from ..errors import InputError
from ..geometry._check import integer, number, real_array
from ..geometry.curvature import gaussian_curvature
from ..geometry.experiment import MODELS, ExperimentResults
from ..geometry.maps import (
    Gated,
    MeanMap,
    SigmoidGate,
    SphereCapGate,
    softmax_chart_attention,
    structured_depth_map,
    ungated_simplex,
)

__all__ = [
    "default_heads",
    "depth_curves",
    "plot_depth",
    "plot_experiment",
    "plot_simplex_curvature",
]


def default_heads(seed: int = 0) -> dict[str, tuple[MeanMap, str]]:
    """Heads for :func:`plot_simplex_curvature`: ``label -> (map, chart)``."""
    U = np.eye(3) + 0.3 * np.random.default_rng(seed).normal(size=(3, 3))
    return {
        "ungated (softmax chart)": (softmax_chart_attention(U), "softmax"),
        "headwise sigmoid gate, t=1, b=0": (
            Gated(softmax_chart_attention(np.eye(3)), SigmoidGate([1.0, 1.0], 0.0)), "softmax"),
        "elementwise sigmoid gate": (
            Gated(softmax_chart_attention(U),
                  SigmoidGate([[1.5, -1.0], [0.5, 1.0], [-1.0, 0.3]], [0.0, 0.5, -0.5])),
            "softmax"),
        "spherical-cap gate c=0.5": (
            Gated(ungated_simplex(np.eye(3)), SphereCapGate(0.5)), "simplex"),
    }


def _simplex_grid(resolution: int) -> np.ndarray:
    k = resolution
    pts = [(i, j, k - i - j) for i in range(1, k) for j in range(1, k - i)]
    return np.asarray(pts, dtype=np.float64) / k


def plot_simplex_curvature(
    heads: Mapping[str, tuple[MeanMap, str]] | None = None, resolution: int = 40
) -> Figure:
    """Gaussian curvature ``K`` (Fisher metric, ``Sigma = I``) over the attention simplex.

    Parameters
    ----------
    heads : mapping label -> (map, chart)
        ``chart`` is ``"simplex"`` (``theta = (alpha_1, alpha_2)``) or ``"softmax"``
        (``q = (log alpha_1/alpha_3, log alpha_2/alpha_3)``).  ``K`` is intrinsic, so the
        chart only says how to reach the point ``alpha``.  Default :func:`default_heads`.
    resolution : int
        Grid subdivisions of each simplex edge (interior points only).
    """
    heads = default_heads() if heads is None else heads
    if not heads:
        raise InputError("heads must name at least one head")
    if any(not isinstance(v, tuple) or len(v) != 2 or v[1] not in ("simplex", "softmax")
           for v in heads.values()):
        raise InputError("heads must map labels to (MeanMap, 'simplex' | 'softmax') pairs")
    alpha = _simplex_grid(integer(resolution, "resolution", minimum=3, maximum=2000))
    xy = np.stack([alpha[:, 1] + 0.5 * alpha[:, 2], np.sqrt(3) / 2 * alpha[:, 2]], -1)
    tri = Triangulation(xy[:, 0], xy[:, 1])
    fig = Figure(figsize=(4.2 * len(heads), 4.0), layout="constrained")
    axes = fig.subplots(1, len(heads), squeeze=False)[0]
    for ax, (label, (mp, chart)) in zip(axes, heads.items(), strict=True):
        if chart == "simplex":
            theta = alpha[:, :2]
        elif chart == "softmax":
            theta = np.log(alpha[:, :2] / alpha[:, 2:3])
        else:
            raise ValueError(f"unknown chart {chart!r}")
        K = gaussian_curvature(mp, theta)
        big = float(np.max(np.abs(K)))
        if big < 1e-10:  # flat to rounding: a neutral map on a unit scale
            norm: Normalize = TwoSlopeNorm(0.0, -1.0, 1.0)
        else:  # signed log scale: K ~ 1/s^2 blows up where the gate s -> 0
            norm = SymLogNorm(linthresh=1e-2, vmin=-big, vmax=big, base=10)
        tc = ax.tripcolor(tri, K, shading="gouraud", cmap="RdBu_r", norm=norm)
        if big >= 1e-10 and K.min() < 0 < K.max():
            ax.tricontour(tri, K, levels=[0.0], colors="k", linewidths=1.0)
        ax.plot([0, 1, 0.5, 0], [0, 0, np.sqrt(3) / 2, 0], color="0.3", lw=0.8)
        for (x, y), name in zip([(0, 0), (1, 0), (0.5, np.sqrt(3) / 2)],
                                ["$e_1$", "$e_2$", "$e_3$"], strict=True):
            ax.annotate(name, (x, y), textcoords="offset points",
                        xytext=(0, 6 if y > 0 else -12), ha="center")
        ax.set_aspect("equal")
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(-0.12, 0.98)
        rng_txt = "K = 0 (to rounding)" if big < 1e-10 else f"K in [{K.min():.3g}, {K.max():.3g}]"
        ax.set_title(f"{label}\n{rng_txt}", fontsize=9)
        ax.set_xlabel(r"attention weights $\alpha$ (barycentric)")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(tc, ax=ax, shrink=0.8,
                     label="Gaussian curvature K" + ("" if big < 1e-10 else " (symlog)"))
    fig.suptitle("Fisher-Rao curvature of head outputs over the simplex (black: K = 0)")
    return fig


def depth_curves(
    L_max: int = 6,
    beta: float = 1.0,
    A: ArrayLike | None = None,
    B: ArrayLike | None = None,
    values: ArrayLike | None = None,
) -> dict[str, np.ndarray]:
    """``K_L(theta_0)`` for ``L = 1..L_max`` in the structured regime (Theorem GEO-DEPTH).

    Returns arrays for ``"tied"`` (every layer ``A``), ``"aligned"`` (alternating PSD
    ``A``, ``B``), ``"opposite"`` (alternating ``A``, ``-A``) and ``"L^2 K_1"``.
    """
    A = np.array([[1.0, 0.2], [0.2, 0.6]]) if A is None else np.asarray(A, dtype=np.float64)
    B = np.array([[0.3, -0.1], [-0.1, 1.2]]) if B is None else np.asarray(B, dtype=np.float64)
    U = np.eye(3) if values is None else real_array(values, "values")
    A, B = real_array(A, "A"), real_array(B, "B")
    if A.shape != (2, 2) or B.shape != (2, 2):
        raise InputError(f"A and B must be (2, 2) matrices, got {A.shape} and {B.shape}")
    beta = number(beta, "beta")
    t0 = np.full(2, 1.0 / 3.0)
    Ls = np.arange(1, integer(L_max, "L_max", maximum=1000) + 1)
    out: dict[str, np.ndarray] = {"L": Ls}
    seqs = {
        "tied": lambda L: [A] * L,
        "aligned": lambda L: [A if i % 2 == 0 else B for i in range(L)],
        "opposite": lambda L: [A if i % 2 == 0 else -A for i in range(L)],
    }
    for name, seq in seqs.items():
        out[name] = np.array(
            [float(gaussian_curvature(structured_depth_map(U, seq(L), beta, t0), t0))
             for L in Ls]
        )
    out["L^2 K_1"] = Ls**2 * out["tied"][0]
    return out


def plot_depth(curves: Mapping[str, np.ndarray] | None = None, **kwargs: object) -> Figure:
    """``K_L`` against depth ``L``: tied (``L^2 K_1``), aligned, opposite layers."""
    c = depth_curves(**kwargs) if curves is None else curves  # type: ignore[arg-type]
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    L = c["L"]
    ax.plot(L, c["L^2 K_1"], "k--", lw=1.5, zorder=5, label=r"$L^2 K_1$ (closed form)")
    for name, marker in (("tied", "o"), ("aligned", "s"), ("opposite", "^")):
        ax.plot(L, c[name], marker=marker, ls="-", label=f"{name} layers (computed)")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("depth L (number of gated layers)")
    ax.set_ylabel(r"Gaussian curvature $K_L(\theta_0)$")
    ax.set_title("Depth amplification in the structured regime")
    ax.legend()
    return fig


def plot_experiment(results: ExperimentResults, measure: str = "curvature_density") -> Figure:
    """Test accuracy against measured curvature, one panel per task."""
    if not isinstance(results, ExperimentResults) or not results.runs:
        raise InputError("results must be ExperimentResults with at least one run")
    if measure not in ("curvature_density", "mean_abs_curvature", "proxy"):
        raise InputError("measure must be 'curvature_density', 'mean_abs_curvature' or "
                         f"'proxy', got {measure!r}")
    tasks = sorted({r.task for r in results.runs})
    fig = Figure(figsize=(5.0 * len(tasks), 4.0), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        for model in MODELS:
            rs = [r for r in results.runs if r.task == task and r.model == model]
            if rs:
                ax.scatter([getattr(r, measure) for r in rs], [r.test_accuracy for r in rs],
                           label=model)
        ax.set_xlabel(measure.replace("_", " ") + r" ($|K|\sqrt{\det g}$)"
                      if measure == "curvature_density" else measure.replace("_", " "))
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: r = {results.correlation(task, measure):.2f}")
        ax.legend()
    return fig


