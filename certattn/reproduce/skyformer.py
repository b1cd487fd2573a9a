r"""Section ``skyformer`` of ``certattn reproduce``: the Skyformer paper's Figures 1 and 2 in kind.

Figure 1 of Chen et al. (NeurIPS 2021): the spectral norm of the output error for
``n`` in {512, 1024, 2048, 4096} and {16, 32, 64, 128, 256} landmarks, on pretrained
bert-base-cased with Wikitext-2 inputs. Ours, on real heads:

* MiniLM-L6 (BERT, bidirectional like the paper), one 512-token window of the corpus,
  layer 1, four heads; ``n = 512`` only (its position limit);
* SmolLM2-135M, the first four blocks run on 4,096 tokens of English prose (corpus, then
  Python's documentation), heads (layer 1, head 0) and (layer 3, head 4), attention
  computed **bidirectionally** over each length-``n`` prefix (Skyformer has no causal form);
  lengths in increasing order while a time budget lasts (the ones skipped are recorded).

Errors per (n, landmarks), mean over heads and, for the published form, over three
landmark draws (seeds 0, 1, 2; the normalised variants: seed 0):
``nystrom`` = :math:`\|\hat O - CV\|_2` of the published (un-normalised) Skyformer against
its own dense target, the Gaussian-kernel attention :math:`CV`, also relative to
:math:`\|CV\|_2`; ``code_vs_softmax`` = the same output against softmax attention;
``identity_vs_softmax`` and ``rows_vs_softmax`` = the two normalised variants of
:func:`certattn.approx.skyformer.skyformer` against softmax attention.

Figure 2 of the appendix: singular values of a trained model's attention output decay fast.
Ours: the singular values of the second layer's attention output (after the output
projection) and of each head's softmax output, with the ranks holding 90% and 99% of the
energy :math:`\sum \sigma_i^2`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ._runs import _Run
from ._summary import SIZES, Progress, Section, _save

TITLE = "Skyformer: output error vs landmarks (Fig. 1 in kind), attention-output spectrum (Fig. 2)"

PAPER_SKYFORMER = {
    "source": "Chen et al., NeurIPS 2021, Figure 1 (read off the figure)",
    "model": "bert-base-cased, Wikitext-2, pretrained weights",
    "landmarks": [16, 32, 64, 128, 256],
    "spectral_error": {"512": [2.15, 1.46, 1.06, 0.76, 0.51],
                       "4096": [3.80, 2.75, 2.17, 1.72, 1.27]},
}
"""The paper's numbers stated beside ours."""

LANDMARKS = (16, 32, 64, 128, 256)
SMOLLM2_NS = (512, 1024, 2048, 4096)
"""The paper's lengths (``--full``); the default run takes ``SIZES.skyformer_ns``."""
SEEDS = (0, 1, 2)
"""Landmark draws averaged for the published (un-normalised) Skyformer."""
BUDGET_S = 150.0
"""Seconds the SmolLM2 length sweep may take before longer lengths are skipped."""


def _errors(q: np.ndarray, k: np.ndarray, v: np.ndarray, landmarks: tuple[int, ...]
            ) -> dict[str, list[float]]:
    from ..approx._prep import prepare, softmax_attention
    from ..approx.skyformer import kernel_attention, skyformer

    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    exact, _ = softmax_attention(prepare(q, k, v, mask=None, causal=False, scale=None,
                                         kv_heads=None))
    cv = kernel_attention(q, k, v)
    ncv, nex = _spec(cv), _spec(exact)
    res: dict[str, list[float]] = {k_: [] for k_ in (
        "nystrom", "nystrom_rel", "code_vs_softmax", "identity_vs_softmax",
        "rows_vs_softmax")}
    for m in landmarks:
        codes = [skyformer(q, k, v, landmarks=m, seed=sd).output for sd in SEEDS]
        ident = skyformer(q, k, v, landmarks=m, seed=0, normalize="softmax",
                          dense_weights=False).output
        rows = skyformer(q, k, v, landmarks=m, seed=0, normalize="rows",
                         dense_weights=False).output
        e = float(np.mean([_spec(c - cv) for c in codes]))
        res["nystrom"].append(e)
        res["nystrom_rel"].append(e / ncv if ncv > 0 else float("nan"))
        res["code_vs_softmax"].append(float(np.mean([_spec(c - exact)
                                                     for c in codes])))
        res["identity_vs_softmax"].append(float(_spec(ident - exact)))
        res["rows_vs_softmax"].append(float(_spec(rows - exact)))
    res["norm_softmax_output"] = [float(nex)]
    res["norm_kernel_output"] = [float(ncv)]
    return res


def _spec(x: np.ndarray) -> float:
    """Spectral norm of a tall ``(n, d)`` matrix: the root of the largest eigenvalue of its
    ``(d, d)`` Gram matrix (the largest singular value to float64 relative accuracy, without
    the SVD of the ``(n, d)`` matrix)."""
    x = np.asarray(x, dtype=np.float64)
    g = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    return float(np.sqrt(max(float(np.linalg.eigvalsh(g)[-1]), 0.0)))


def _mean(rows: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    return {key: np.mean([r[key] for r in rows], axis=0).tolist() for key in rows[0]}


def _spectrum(x: np.ndarray) -> dict[str, Any]:
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= s.size]
    return {
        "shape": list(x.shape),
        "sigma_over_sigma1": {str(r): float(s[r - 1] / s[0]) for r in ranks},
        "rank_90": int(np.searchsorted(energy, 0.90) + 1),
        "rank_99": int(np.searchsorted(energy, 0.99) + 1),
        "sigma": s.tolist(),
    }


def _head_spectra(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool
                  ) -> dict[str, Any]:
    from ..approx._prep import prepare, softmax_attention

    out, _ = softmax_attention(prepare(q, k, v, mask=None, causal=causal, scale=None,
                                       kv_heads=None))
    specs = [_spectrum(o) for o in out]
    return {"heads": len(specs),
            "mean_rank_90": float(np.mean([s["rank_90"] for s in specs])),
            "mean_rank_99": float(np.mean([s["rank_99"] for s in specs])),
            "head_dim": int(v.shape[-1]),
            "sigma_over_sigma1": {r: float(np.mean([s["sigma_over_sigma1"][r] for s in specs]))
                                  for r in specs[0]["sigma_over_sigma1"]}}


def _skyformer(runs: list[_Run], out: Path, quick: bool, note: Progress) -> Section:
    from ._approx import _minilm, _smollm2, figure, long_text, minilm_window, signals

    sec = Section("skyformer", TITLE)
    sec.results["paper"] = PAPER_SKYFORMER
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    spectra: dict[str, np.ndarray] = {}
    if quick:
        from ..models import load_sample

        a = load_sample()[0]
        li = 1
        lms = (4, 8, 16)
        rows = [_errors(a.queries[li, h], a.keys[li, h], a.values[li, h], lms)
                for h in (0, 3, 6, 9)]
        sec.results["minilm"] = {"source": f"shipped sample, layer {int(a.layers[li])}, "
                                 "heads 0, 3, 6, 9", "landmarks": list(lms),
                                 "by_n": {str(a.n_tokens): _mean(rows)},
                                 "spectrum_heads": _head_spectra(a.queries[li], a.keys[li],
                                                                 a.values[li], False)}
        curves["minilm"] = sec.results["minilm"]["by_n"]
        sec.results["smollm2"] = {"status": "pending", "reason": "skipped in quick mode"}
    else:
        keys = {r.key for r in runs}
        if "minilm" in keys:
            note("skyformer: MiniLM n = 512", 0, 1)
            m = _minilm()
            sig = signals(m, minilm_window(m, 512), n_layers=2)
            heads = (0, 3, 6, 9)
            rows = [_errors(sig.queries[1][h], sig.keys[1][h], sig.values[1][h], LANDMARKS)
                    for h in heads]
            sec.results["minilm"] = {
                "source": "all-MiniLM-L6-v2, first 512 tokens of the corpus, layer 1, heads "
                          "0, 3, 6, 9, bidirectional", "landmarks": list(LANDMARKS),
                "by_n": {"512": _mean(rows)},
                "spectrum_layer_output": _spectrum(sig.attn_out[1]),
                "spectrum_heads": _head_spectra(sig.queries[1], sig.keys[1], sig.values[1],
                                                False)}
            curves["minilm"] = sec.results["minilm"]["by_n"]
            spectra["minilm"] = np.asarray(sec.results["minilm"]["spectrum_layer_output"]
                                           ["sigma"])
            note("skyformer: MiniLM n = 512", 1, 1)
        if "smollm2" in keys:
            t0 = time.perf_counter()
            sm = _smollm2()
            text, where = long_text()
            ns = SIZES.skyformer_ns
            ids = sm.encode(text)[: max(ns)]
            note(f"skyformer: SmolLM2 forward on {len(ids)} tokens (4 blocks)", 0, 1)
            # a slice of the run's forward (kept since loading) when ids are its prefix
            sig = signals(sm, ids, n_layers=4)
            kvh = np.arange(sm.n_heads) // (sm.n_heads // sm.n_kv_heads)
            picks = ((1, 0), (3, 4))
            by_n: dict[str, Any] = {}
            skipped = [n for n in ns if n > len(ids)]  # text too short
            for i, n in enumerate(n for n in ns if n <= len(ids)):
                if time.perf_counter() - t0 > BUDGET_S:
                    skipped.append(n)
                    continue
                rows = [_errors(sig.queries[layer][h, :n], sig.keys[layer][kvh[h], :n],
                                sig.values[layer][kvh[h], :n], LANDMARKS)
                        for layer, h in picks]
                by_n[str(n)] = _mean(rows)
                note("skyformer: SmolLM2 lengths", i + 1, len(ns))
            nn = min(1024, len(ids))
            lay = 1
            sec.results["smollm2"] = {
                "source": f"SmolLM2-135M-Instruct on {len(ids)} tokens ({where}); heads "
                          "(layer 1, head 0), (layer 3, head 4); bidirectional attention over "
                          "each length-n prefix of the causal model's queries/keys/values",
                "landmarks": list(LANDMARKS), "by_n": by_n,
                "skipped_n": skipped, "budget_s": BUDGET_S,
                "not_run_n": [n for n in SMOLLM2_NS if n not in ns],
                "spectrum_layer_output": _spectrum(sig.attn_out[lay][:nn]),
                "spectrum_heads": _head_spectra(sig.queries[lay][:, :nn],
                                                sig.keys[lay][kvh, :nn],
                                                sig.values[lay][kvh, :nn], True),
                "spectrum_note": f"layer {lay}, first {nn} tokens, causal (as the model runs)"}
            curves["smollm2"] = by_n
            spectra["smollm2"] = np.asarray(sec.results["smollm2"]["spectrum_layer_output"]
                                            ["sigma"])
        for key in ("minilm", "smollm2"):
            if key not in keys:
                sec.results[key] = {"status": "pending", "reason": "model not loaded"}
    if curves:
        fig, (ax1, ax2) = figure()
        for key, by_n in curves.items():
            for n, r in by_n.items():
                lm = sec.results[key]["landmarks"]
                ax1.plot(lm, r["nystrom_rel"], marker="o", label=f"{key} n={n}")
        for n, vals in PAPER_SKYFORMER["spectral_error"].items():
            ax1.plot(PAPER_SKYFORMER["landmarks"], np.asarray(vals) / 10, "k--", alpha=0.5,
                     label=f"paper n={n} (absolute / 10)")
        ax1.set_xscale("log", base=2)
        ax1.set_yscale("log")
        ax1.set_xlabel("landmarks")
        ax1.set_ylabel("||O_hat - CV||_2 / ||CV||_2")
        ax1.set_title("Skyformer Nystrom error on real heads")
        ax1.legend(fontsize=6)
        for key, s in spectra.items():
            ax2.semilogy(np.arange(1, s.size + 1), s / s[0], label=key)
        ax2.set_xlabel("index")
        ax2.set_ylabel("sigma_i / sigma_1")
        ax2.set_title("Singular values of layer-1 attention output")
        if spectra:
            ax2.legend()
        sec.figures.append(_save(fig, out, "skyformer.png"))
    return sec


def _md_skyformer(sec: Section, s: Any) -> list[str]:
    p = sec.results["paper"]
    L = [f"Paper ({p['source']}; {p['model']}): spectral-norm output error at landmarks "
         f"{p['landmarks']}: n = 512: {p['spectral_error']['512']}; n = 4096: "
         f"{p['spectral_error']['4096']}. Ours (mean over heads; `nystrom` and "
         f"`code_vs_softmax` also over {len(SEEDS)} landmark draws): "
         "`nystrom` = published Skyformer vs its own target CV (absolute, then relative to "
         "‖CV‖_2); the others against softmax attention.", "",
         "| model | n | quantity | by landmarks | ‖Attn‖_2 | ‖CV‖_2 |",
         "|---|---|---|---|---|---|"]
    for key in ("minilm", "smollm2"):
        r = sec.results.get(key, {})
        if r.get("status") == "pending":
            L.append(f"| {key} | - | pending: {r['reason']} | | | |")
            continue
        for n, v in r.get("by_n", {}).items():
            for q in ("nystrom", "nystrom_rel", "code_vs_softmax", "identity_vs_softmax",
                      "rows_vs_softmax"):
                vals = ", ".join(f"{x:.3g}" for x in v[q])
                L.append(f"| {key} | {n} | {q} | {vals} | {v['norm_softmax_output'][0]:.3g} | "
                         f"{v['norm_kernel_output'][0]:.3g} |")
        if r.get("skipped_n"):
            L.append(f"| {key} | {r['skipped_n']} | skipped (text too short or time budget "
                     f"{r['budget_s']} s spent) | | | |")
    L += ["", "Attention-output spectrum (seed Figure 2: fast decay):", "",
          "| model | matrix | sigma_k / sigma_1 (k = 1, 2, 4, ...) | rank for 90% / 99% "
          "energy |", "|---|---|---|---|"]
    for key in ("minilm", "smollm2"):
        r = sec.results.get(key, {})
        if "spectrum_heads" not in r:
            continue
        sp = r.get("spectrum_layer_output")
        if sp is not None:
            vals = ", ".join(f"{x:.3g}" for x in sp["sigma_over_sigma1"].values())
            L.append(f"| {key} | layer 1 output {tuple(sp['shape'])} | {vals} | "
                     f"{sp['rank_90']} / {sp['rank_99']} |")
        hs = r["spectrum_heads"]
        vals = ", ".join(f"{x:.3g}" for x in hs["sigma_over_sigma1"].values())
        L.append(f"| {key} | mean of {hs['heads']} head outputs (d = {hs['head_dim']}) | "
                 f"{vals} | {hs['mean_rank_90']:.1f} / {hs['mean_rank_99']:.1f} |")
    return L
