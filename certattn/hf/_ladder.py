"""The equal-KL comparison: the kept fraction (and bytes read) each policy family needs
to reach a given next-token KL on the same text.

For each family a *ladder* of its parameter is run (one sparse forward per point,
:class:`certattn.hf._calibrate.Probe`), giving points (kept fraction, mean next-token
``KL(dense || sparse)``, top-1 agreement, bytes read); :func:`at_kl` interpolates each
family's ladder linearly in ``log KL`` to the kept fraction, top-1 and bytes at a target
KL.  Families (``FAMILIES``):

=========  ==============================================================  ==============
family     parameter (ladder)                                              bytes read
=========  ==============================================================  ==============
topk       certified Top-k, eps                                            K all + V kept
window     window + 4 sinks (StreamingLLM), total width                    K, V kept
quest      Quest pages of 16 keys, box bounds, key budget                  boxes + kept
headk      per-head fixed k of a BudgetTable from *other* text, eps        K all + V kept
headmean   per-head fixed k keeping as many keys per head as certified     K all + V kept
           Top-k did on the budget text (no coverage rule), eps
pyramid    PyramidKV-shaped per-layer top-k budget (1.5x to 0.5x mean)     K, V kept
twilight   uncertified top-p on 4-bit (KIVI, group 32) estimated scores    estimates + kept
search     certified search on 4-bit key estimates (``Search("quant")``)   estimates +
                                                                           K scored + V kept
=========  ==============================================================  ==============

Bytes are in units of the dense K + V reads (every visible key and value of every query
head, same width): exact Top-k scores every visible key (``0.5 + 0.5 kept``); Quest
reads a min and a max vector per page (``1/16``) plus its kept keys and values;
the 4-bit estimates with a float16 ``lo`` and ``step`` per channel and 32 keys cost
``(4 + 32 / 32) / 16 / 2 = 0.156`` of dense; PyramidKV evicts (reads its kept keys
only; here its per-query selection is the oracle top-k, optimistic for it).  Certified
search (:class:`certattn.policies.Search` with ``method="quant"``, 4 bits, groups of 32:
Theorem QUANT-SCORE) reads the same estimates, then the keys it scores exactly and the
values it keeps: ``0.156 + 0.5 scored + 0.5 kept``, its kept set certified like Top-k's
(it runs on the host, in NumPy, as every search does).
Certified top-p is certified Top-k at ``eps = 1 - p`` (the same kept sets), so it has
no separate ladder.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._array import from_numpy, to_numpy
from .._validate import InputError, check_number
from ..distribution import topk_mask
from ..policies import FixedK, Pages, Search, Selection, TopK, WindowSinks
from ._attention import observe
from ._calibrate import Probe

__all__ = ["FAMILIES", "EstimatedTopP", "HeadFixedK", "at_kl", "format_at_kl", "ladder",
           "pyramid_budgets"]

SINKS = 4
PAGE = 16
EST_BITS = 4
EST_GROUP = 32
#: 4-bit codes plus a float16 lo and step per channel and group of 32 keys, over 16 bits
#: per key entry, over K + V.
EST_BYTES = (EST_BITS + 2 * 16 / EST_GROUP) / 16 / 2


@dataclass(frozen=True)
class HeadFixedK:
    """The ``ks[h]`` largest scores per query of head ``h`` (ties by position)."""

    ks: tuple[int, ...]
    name: str = "head_fixed_k"

    def select(self, scores: Any, valid: Any, ctx: Any) -> Selection:
        xp = ctx.xp
        k = xp.asarray(self.ks, device=getattr(scores, "device", None))
        if int(scores.shape[-3]) != len(self.ks):
            raise InputError(f"{len(self.ks)} head budgets for {scores.shape[-3]} heads")
        return Selection(kept=topk_mask(scores, k[:, None]))


@dataclass(frozen=True)
class EstimatedTopP:
    """Twilight-style top-p, uncertified: the fewest keys whose mass under the softmax of
    *estimated* scores (queries times 4-bit dequantized keys) reaches ``p``."""

    p: float
    bits: int = EST_BITS
    group: int = EST_GROUP
    name: str = "estimated_topp"

    def __post_init__(self) -> None:
        check_number(self.p, name="p", low=0.0, high=1.0, closed_low=False, closed_high=True)

    def select(self, scores: Any, valid: Any, ctx: Any) -> Selection:
        from ..quant import quantize_keys

        keys = np.asarray(to_numpy(ctx.keys), dtype=np.float64)
        queries = np.asarray(to_numpy(ctx.queries), dtype=np.float64)
        ok = np.asarray(to_numpy(valid), dtype=bool)
        lead = keys.shape[:-2]
        khat = np.empty_like(keys)
        for idx in np.ndindex(*lead):
            ck = f"khat:{self.bits}:{self.group}:{idx}"
            if ck not in ctx.cache:
                ctx.cache[ck] = quantize_keys(keys[idx], self.bits, group=self.group,
                                              residual=False)._meta()[0]
            khat[idx] = ctx.cache[ck]
        est = np.where(ok, ctx.scale * queries @ np.swapaxes(khat, -1, -2), -np.inf)
        order = np.argsort(-est, axis=-1, kind="stable")
        s = np.take_along_axis(est, order, -1)
        w = np.exp(s - s[..., :1])
        mass = np.cumsum(w, -1) / w.sum(-1, keepdims=True)
        k = np.minimum((mass < self.p).sum(-1) + 1, ok.sum(-1))
        kept = np.zeros_like(ok)
        np.put_along_axis(kept, order, np.arange(ok.shape[-1]) < k[..., None], -1)
        dev = getattr(scores, "device", None)
        return Selection(kept=from_numpy(kept & ok, xp=ctx.xp, device=dev))


def pyramid_budgets(mean: int, layers: Sequence[int]) -> dict[int, int]:
    """PyramidKV's shape: budgets falling linearly from 1.5x to 0.5x ``mean`` (>= 1)."""
    n = len(layers)
    return {layer: max(1, round(mean * (1.5 - (i / (n - 1) if n > 1 else 0.5))))
            for i, layer in enumerate(layers)}


@dataclass(frozen=True)
class Family:
    """One policy family: its ladder, its policy per point, its bytes model."""

    name: str
    label: str
    points: Callable[[int], list[Any]]
    build: Callable[[Any, dict[str, Any]], Any]
    bytes_read: Callable[[dict[str, Any]], float]


def _widths(n: int) -> list[int]:
    return sorted({max(SINKS + 1, round(n * f)) for f in (0.125, 0.25, 0.5, 0.75, 0.9, 0.97)})


EPS_LADDER = [0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4]


def _head_k(eps: float, setup: dict[str, Any]) -> dict[int, HeadFixedK]:
    table = setup["budgets"][eps]
    per: dict[int, list[int]] = {}
    for hb in table.heads:
        per.setdefault(hb.layer, []).append(hb.k_fixed)
    return {layer: HeadFixedK(tuple(ks)) for layer, ks in per.items()}


def equal_count_k(k: Any, n_valid: Any) -> int:
    """The fixed k whose kept count ``sum_i min(k, n_i)`` over rows ``i`` is closest to
    ``sum_i k_i`` (ties: the larger k): a fixed k keeping as many keys as per-row ``k_i``."""
    k, nv = np.asarray(k, dtype=np.int64).ravel(), np.asarray(n_valid, dtype=np.int64).ravel()
    want = int(k.sum())
    cands = np.arange(1, int(nv.max(initial=1)) + 1)
    miss = np.abs(np.minimum(cands[:, None], nv[None, :]).sum(axis=1) - want)
    return int(cands[len(cands) - 1 - np.argmin(miss[::-1])])  # the last of the closest


def _head_mean(eps: float, setup: dict[str, Any]) -> dict[int, HeadFixedK]:
    rec = setup["recorder"]
    per: dict[int, list[int]] = {}
    for layer in rec.layers():
        calls = [c for c in rec.calls if c.layer == layer]
        n_heads = int(calls[0].k[eps].shape[1])
        per[layer] = [equal_count_k(
            np.concatenate([c.k[eps][:, h][~c.masked[:, h]] for c in calls]),
            np.concatenate([c.n_valid[:, h][~c.masked[:, h]] for c in calls]))
            for h in range(n_heads)]
    return {layer: HeadFixedK(tuple(ks)) for layer, ks in per.items()}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("topk", "certified Top-k (eps)", lambda n: EPS_LADDER,
           lambda e, s: TopK(e), lambda r: 0.5 + 0.5 * r["kept_fraction"]),
    Family("window", f"window + {SINKS} sinks (width)", _widths,
           lambda w, s: WindowSinks(window=w - SINKS, sinks=SINKS),
           lambda r: r["kept_fraction"]),
    Family("quest", f"Quest, {PAGE}-key pages (budget)", _widths,
           lambda b, s: Pages(budget=b, page_size=PAGE),
           lambda r: r["kept_fraction"] + 1 / PAGE),
    Family("headk", "per-head fixed k, BudgetTable of other text (eps)",
           lambda n: EPS_LADDER, _head_k, lambda r: 0.5 + 0.5 * r["kept_fraction"]),
    Family("headmean", "per-head fixed k, Top-k's count per head on other text (eps)",
           lambda n: EPS_LADDER, _head_mean, lambda r: 0.5 + 0.5 * r["kept_fraction"]),
    Family("pyramid", "PyramidKV-shaped per-layer top-k (mean budget)",
           lambda n: [max(1, round(n * f)) for f in (0.06, 0.125, 0.25, 0.4, 0.6)],
           lambda b, s: {la: FixedK(k) for la, k in pyramid_budgets(b, s["layers"]).items()},
           lambda r: r["kept_fraction"]),
    Family("twilight", "estimated top-p, 4-bit keys, uncertified (1 - p)",
           lambda n: EPS_LADDER, lambda e, s: EstimatedTopP(1.0 - e),
           lambda r: EST_BYTES + r["kept_fraction"]),
    Family("search", "certified search, 4-bit key estimates (eps)",
           lambda n: EPS_LADDER,
           lambda e, s: Search(e, method="quant", bits=EST_BITS, group=EST_GROUP),
           lambda r: EST_BYTES + 0.5 * r["scored_fraction"] + 0.5 * r["kept_fraction"]),
)}


def _setup(model: Any, families: Sequence[str], budget_ids: Any, probe: Probe) -> dict[str, Any]:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    setup: dict[str, Any] = {"layers": list(range(int(n_layers or 1)))}
    need = [f for f in ("headk", "headmean") if f in families]
    if need:
        if budget_ids is None:
            raise InputError(f"the {need[0]} family needs other text for its per-head k "
                             "(budget_ids / --budget-text-file)")
        ids = torch.as_tensor(budget_ids, dtype=torch.long, device=model.device).reshape(1, -1)
        with observe(model, eps=EPS_LADDER) as rec, torch.no_grad():
            model(input_ids=ids)
        setup["recorder"] = rec
        setup["budgets"] = {e: rec.budget(0.9, e) for e in EPS_LADDER}
    return setup


def ladder(model: Any, ids: Any, families: Sequence[str] = ("topk", "window", "quest"),
           *, budget_ids: Any = None, points: dict[str, list[Any]] | None = None,
           progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every family's ladder on ``ids``.

    Parameters
    ----------
    model : transformers causal LM
    ids : sequence of int or (1, L) tensor
    families : sequence of str
        Keys of ``FAMILIES``.
    budget_ids : sequence of int, optional
        Other text, for the ``headk`` family's BudgetTable (coverage 0.9).
    points : dict, optional
        Family name -> its ladder (default: ``FAMILIES[name].points(L)``).
    progress : callable, optional
        Called with one line per point.

    Returns
    -------
    list of dict
        One row per point: ``family``, ``param``, ``kept_fraction``, ``scored_fraction``
        (keys scored exactly over visible keys), ``kl_mean``, ``top1``, ``bytes_fraction``
        (of the dense K + V reads), ``ppl``, ``kl_p99``, ``kl_max``.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise InputError(f"unknown families {unknown}: give some of {list(FAMILIES)}")
    for name in ("headk", "headmean"):
        bad = [e for e in (points or {}).get(name) or () if e not in EPS_LADDER]
        if name in families and bad:
            raise InputError(f"the {name} ladder takes eps from {EPS_LADDER}, not {bad}")
    probe = Probe(model, ids)
    setup = _setup(model, families, budget_ids, probe)
    rows = []
    for name in families:
        fam = FAMILIES[name]
        for param in (points or {}).get(name) or fam.points(probe.tokens):
            r = probe.run(fam.build(param, setup), f"{name}:{param}")
            row = {"family": name, "param": param, "bytes_fraction": fam.bytes_read(r)}
            row.update({k: r[k] for k in ("kept_fraction", "scored_fraction", "kl_mean",
                                          "top1", "ppl", "kl_p99", "kl_max")})
            rows.append(row)
            if progress is not None:
                progress(f"{name} {param}: kept {row['kept_fraction']:.3f}, "
                         f"KL {row['kl_mean']:.3e}")
    return rows


def _log(x: float) -> float:
    return math.log(max(x, 1e-300))


def _interpolate(points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The smallest kept fraction reaching ``target`` along one ladder (sorted by kept):
    the first crossing of ``KL <= target``, linear in log KL between its two points."""
    pts = sorted(points, key=lambda r: r["kept_fraction"])
    keys = ("kept_fraction", "top1", "bytes_fraction")
    if pts[0]["kl_mean"] <= target:
        return {**{k: pts[0][k] for k in keys}, "status": "below"}  # at most this
    for a, b in itertools.pairwise(pts):
        if b["kl_mean"] <= target < a["kl_mean"]:
            if b["kl_mean"] <= 0.0:  # no log-KL line to a dense-equal point: b bounds it
                return {**{k: b[k] for k in keys}, "status": "below"}
            w = (_log(a["kl_mean"]) - _log(target)) / (_log(a["kl_mean"]) - _log(b["kl_mean"]))
            return {**{k: a[k] + w * (b[k] - a[k]) for k in keys}, "status": "ok"}
    return {**{k: pts[-1][k] for k in keys}, "status": "above"}  # more than this


def at_kl(rows: Sequence[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Per family and target KL: kept fraction, top-1 and bytes, interpolated on log KL.

    ``status`` is ``"ok"`` (interpolated between two points), ``"below"`` (the values are
    those of a point that meets the target, an upper bound on what it needs: the ladder's
    smallest point, or the first point meeting it whose KL is 0, where no log-KL line
    reaches) or ``"above"`` (no point meets it: the values are the ladder's largest, a
    lower bound).
    """
    out = []
    for t in targets:
        check_number(t, name="target KL", low=0.0, high=math.inf, closed_low=False,
                     closed_high=False)
        for fam in dict.fromkeys(r["family"] for r in rows):
            res = _interpolate([r for r in rows if r["family"] == fam], t)
            out.append({"kl": t, "family": fam, **res})
    return out


def format_at_kl(table: Sequence[dict[str, Any]], reference: str = "topk") -> str:
    """The equal-KL table as Markdown: kept, kept relative to ``reference``, top-1, bytes."""
    ref = {r["kl"]: r for r in table if r["family"] == reference}
    mark = {"ok": "", "below": "<= ", "above": "> "}
    lines = ["| KL | family | kept | topk kept / kept | top-1 same | bytes (of dense K+V) |",
             "|---|---|---|---|---|---|"]
    for r in table:
        base = ref.get(r["kl"])
        rel = (f"{base['kept_fraction'] / r['kept_fraction']:.2f}"
               if base is not None and r["kept_fraction"] > 0 else "-")
        label = FAMILIES[r["family"]].label if r["family"] in FAMILIES else r["family"]
        lines.append(f"| {r['kl']:.0e} | {label} | "
                     f"{mark[r['status']]}{r['kept_fraction']:.3f} | {rel} | "
                     f"{r['top1']:.3f} | {r['bytes_fraction']:.3f} |")
    return "\n".join(lines)



def run_compare(model_name: str, text_file: str | None, tokens: int | None,
                families: str, at: str, budget_text_file: str | None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``certattn compare``: load, run the ladders, interpolate: ``{"model", "tokens",
    "ladder", "at_kl"}``; every bad input an :class:`InputError` before the model loads."""
    from ._calibrate import load_text_ids, read_text

    fams = [f.strip() for f in families.split(",") if f.strip()]
    unknown = [f for f in fams if f not in FAMILIES]
    if not fams or unknown:
        raise InputError(f"unknown families {unknown}: give some of {list(FAMILIES)}")
    try:
        targets = [float(x) for x in at.split(",")]
    except ValueError:
        raise InputError(f"--at-kl must be a comma list of numbers, got {at!r}") from None
    for t in targets:
        check_number(t, name="--at-kl", low=0.0, high=math.inf, closed_low=False,
                     closed_high=False)
    for fam in ("headk", "headmean"):
        if fam in fams and budget_text_file is None:
            raise InputError(f"the {fam} family needs --budget-text-file (other text)")
    budget = None if budget_text_file is None else read_text(budget_text_file)
    model, tok, ids = load_text_ids(model_name, text_file, tokens)
    budget_ids = None if budget is None else tok.encode(budget)[: len(ids)]
    rows = ladder(model, ids, fams, budget_ids=budget_ids, progress=progress)
    return {"model": model_name, "tokens": len(ids), "ladder": rows,
            "at_kl": at_kl(rows, targets)}
