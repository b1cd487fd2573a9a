"""The figure of ``certattn evaluate``: what each policy family does at each kept fraction.

:func:`plot_evaluate` takes the rows of :func:`certattn.hf.evaluate` (each with a
``family``, as ``certattn evaluate`` writes them) and returns a
:class:`matplotlib.figure.Figure` built without ``pyplot``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["KL_FLOOR", "plot_evaluate"]

KL_FLOOR = 1e-10
"""KL values below this are drawn at it (a log axis cannot show 0)."""


def _families(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The non-dense rows by family, each family sorted by kept fraction."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        fam = str(r.get("family", r["name"]))
        if fam != "dense":
            out.setdefault(fam, []).append(r)
    return {f: sorted(rs, key=lambda r: r["kept_fraction"]) for f, rs in out.items()}


def plot_evaluate(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """KL(dense || sparse) mean and top-1 agreement against the kept fraction.

    One curve (markers joined in kept order) per policy family; the dense row is left out
    (kept 1, KL 0, top-1 1).  KL is drawn on a log axis, floored at :data:`KL_FLOOR`.
    """
    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    ax_kl, ax_top = fig.subplots(1, 2)
    for fam, rs in _families(rows).items():
        kept = np.array([r["kept_fraction"] for r in rs], dtype=np.float64)
        kl = np.maximum(np.array([r["kl_mean"] for r in rs], dtype=np.float64), KL_FLOOR)
        top = np.array([r["top1"] for r in rs], dtype=np.float64)
        line, = ax_kl.plot(kept, kl, marker="o", label=fam)
        ax_top.plot(kept, top, marker="o", color=line.get_color(), label=fam)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel(f"KL(dense || sparse), mean over positions (nats, >= {KL_FLOOR:g})")
    ax_top.set_ylabel("top-1 next token same as dense")
    for ax in (ax_kl, ax_top):
        ax.set_xlabel("kept keys / visible keys")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
