r"""Section ``fal`` of ``certattn reproduce``: the similarity profile behind FAL.

FAL (First Attentions Last, NeurIPS 2025) motivates feeding the first block's attention
output to every later MLP by a high CKA similarity between attention outputs and MLP
inputs across blocks (GPT-2-family models; the code is not public, so no per-layer numbers
of theirs are stated). Ours, per layer :math:`l`, on MiniLM-L6 (three texts, averaged) and
SmolLM2-135M (the run's first 1,024 tokens): linear CKA and mean cosine of the first
attention output :math:`A_0` with :math:`A_l` and with the MLP input :math:`M_l`, and
CKA(:math:`A_l, M_l`) (the block's own connection that FAL bypasses); see
:mod:`certattn.approx.fal`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._runs import _Run
from ._summary import Progress, Section, _save

TITLE = "FAL premise: similarity of the first attention output to later layers"

PAPER_FAL = {
    "source": "Kim et al., FAL (NeurIPS 2025)",
    "claim": "high CKA similarity between the first attention output and later MLP inputs; "
             "FAL up to 44% less multi-GPU training time, up to 1.18x single-GPU throughput",
}

_KEYS = ("cka_attn", "cka_mlp_in", "cos_attn", "cos_mlp_in", "cka_own_mlp_in")


def _fal(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from .._corpus import PARAGRAPHS
    from ..approx.fal import fal_profile
    from ._approx import _minilm, _smollm2, figure, signals

    sec = Section("fal", TITLE)
    sec.results["paper"] = PAPER_FAL
    keys = {r.key for r in runs}
    if quick:
        for key in ("minilm", "smollm2"):
            sec.results[key] = {"status": "pending",
                                "reason": "needs the live model (skipped in quick mode)"}
        return sec
    profiles: dict[str, dict[str, list[float]]] = {}
    if "minilm" in keys:
        m = _minilm()
        texts = ["\n\n".join(PARAGRAPHS[i : i + 4]) for i in range(0, 12, 4)]
        profs = []
        for i, t in enumerate(texts):
            profs.append(fal_profile(signals(m, t)))
            note("fal: MiniLM", i + 1, len(texts))
        profiles["minilm"] = {k: np.mean([p[k] for p in profs], axis=0).tolist() for k in _KEYS}
        sec.results["minilm"] = {"source": "all-MiniLM-L6-v2 on the 3 built-in texts of the "
                                 "minilm run (averaged)", **profiles["minilm"]}
    else:
        sec.results["minilm"] = {"status": "pending", "reason": "model not loaded"}
    run = next((r for r in runs if r.key == "smollm2"), None)
    if run is not None:
        sm = _smollm2()
        ids = [int(t) for t in run.attentions[0].token_ids]
        note(f"fal: SmolLM2 forward on {len(ids)} tokens", 0, 1)
        prof = fal_profile(signals(sm, ids))
        note(f"fal: SmolLM2 forward on {len(ids)} tokens", 1, 1)
        profiles["smollm2"] = {k: prof[k] for k in _KEYS}
        sec.results["smollm2"] = {"source": f"SmolLM2-135M-Instruct on the run's {len(ids)} "
                                  "tokens", **profiles["smollm2"]}
    else:
        sec.results["smollm2"] = {"status": "pending", "reason": "SmolLM2 run not available"}
    if profiles:
        fig, axes = figure()
        for ax, what in zip(axes, ("cka", "cos"), strict=True):
            for key, p in profiles.items():
                for sig, style in (("attn", "-o"), ("mlp_in", "--s")):
                    ax.plot(range(len(p[f"{what}_{sig}"])), p[f"{what}_{sig}"], style,
                            markersize=3, label=f"{key}: A_0 vs {sig}_l")
            ax.set_xlabel("layer l")
            ax.set_ylabel("linear CKA" if what == "cka" else "mean cosine")
            ax.legend(fontsize=7)
        axes[0].set_title("FAL premise: first attention output vs later layers")
        sec.figures.append(_save(fig, out, "fal_similarity.png"))
    return sec


def _md_fal(sec: Section, s: Any) -> list[str]:
    p = sec.results["paper"]
    L = [f"Paper ({p['source']}): {p['claim']}. No per-layer numbers of theirs are public; "
         "ours per layer l (A = attention output after the output projection, M = MLP "
         "input as the MLP reads it):", ""]
    for key in ("minilm", "smollm2"):
        r = sec.results.get(key, {})
        if r.get("status") == "pending":
            L.append(f"- {key}: pending ({r['reason']}).")
            continue
        n = len(r["cka_attn"])
        L += ["", f"**{key}** ({r['source']})", "",
              "| quantity | " + " | ".join(str(i) for i in range(n)) + " |",
              "|---|" + "---|" * n]
        names = {"cka_attn": "CKA(A_0, A_l)", "cka_mlp_in": "CKA(A_0, M_l)",
                 "cos_attn": "cos(A_0, A_l)", "cos_mlp_in": "cos(A_0, M_l)",
                 "cka_own_mlp_in": "CKA(A_l, M_l)"}
        for k, label in names.items():
            L.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in r[k]) + " |")
    return L
