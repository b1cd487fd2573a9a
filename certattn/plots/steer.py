"""Figures of the language-steering study (:func:`certattn.steer.study.language_study`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_head_tv", "plot_tradeoff"]


def plot_tradeoff(result: dict[str, Any]) -> Figure:
    """Success against meaning, one marker per (layer, direction, coefficient): the
    paper's trade-off.  Lines join one direction's coefficients at one layer."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    markers = {"sae": "o", "mean": "s", "random": "x"}
    for layer, entry in result["layers"].items():
        for name, marker in markers.items():
            cells = sorted((g for g in entry["grid"] if g["direction"] == name),
                           key=lambda g: g["coefficient"])
            if cells:
                ax.plot([g["meaning"] for g in cells], [g["success"] for g in cells],
                        marker=marker, label=f"{name}, layer {layer}")
    ax.set_xlabel("meaning proxy (embedding cosine to the unsteered text)")
    ax.set_ylabel(f"success (share detected as {result['lang']})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"steering English towards {result['lang']}")
    fig.tight_layout()
    return fig


def plot_head_tv(tv: Any, *, layer: int, lang: str) -> Figure:
    """Heatmap of the mean attention TV per (layer, head) under steering at ``layer``."""
    tv = np.asarray(tv, dtype=float)
    fig = Figure(figsize=(4.8, 6.0))
    ax = fig.subplots()
    im = ax.imshow(tv, aspect="auto", cmap="viridis", origin="lower")
    ax.axhline(layer + 0.5, color="w", lw=0.8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"attention TV, steered to {lang} at layer {layer}")
    fig.colorbar(im, ax=ax, label="mean TV over queries")
    fig.tight_layout()
    return fig
