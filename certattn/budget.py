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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import InputError, check_eps, check_number
from .models._types import certify_qk
from .policies import TopK
from .topk import certify_topk

__all__ = [
    "MODELS",
    "BudgetTable",
    "HeadBudget",
    "attention_budget",
    "budget_for_model",
    "check_levels",
    "load_attention",
]

MODELS = ("minilm-sample", "minilm", "smollm2")
"""Built-in model names accepted by :func:`load_attention` and :func:`budget_for_model`
(besides a path to a GGUF file or a Hugging Face folder)."""


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
    metadata : dict
        ``n_sequences`` and ``n_tokens`` of the input.
    samples : tuple of (numpy.ndarray, numpy.ndarray)
        Per head (aligned with ``heads``): the raw per-query ``k`` and ``n_valid`` (int64)
        the summaries come from, so that tables of several documents can be merged
        exactly with :meth:`merge` (quantiles need every query's k).  Not written to JSON.
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
    samples: tuple[tuple[np.ndarray, np.ndarray], ...] = field(
        default=(), repr=False, compare=False
    )

    @classmethod
    def merge(cls, tables: Sequence[BudgetTable], *, source: str = "") -> BudgetTable:
        """Pool the queries of several tables (e.g. one per document) into one table.

        The result equals :func:`attention_budget` run on all the documents together, in
        the given order: per (layer, head) the raw per-query budgets are concatenated and
        summarised again (quantiles, fixed k, coverage; held-out coverage on the even/odd
        queries of the concatenation).

        Parameters
        ----------
        tables : sequence of BudgetTable
            Same eps, coverage, quantiles, layers and heads; each must carry its
            :attr:`samples` (tables made by this module do).
        source : str, optional
            Description of the pooled input (default: the sources joined by ``"; "``).

        Returns
        -------
        BudgetTable
        """
        tables = list(tables)
        if not tables:
            raise ValueError("merge needs at least one table")
        t0 = tables[0]
        for t in tables:
            if (t.eps, t.coverage, t.quantiles, t.layers, t.n_heads) != (
                t0.eps, t0.coverage, t0.quantiles, t0.layers, t0.n_heads
            ):
                raise ValueError(
                    "tables to merge must share eps, coverage, quantiles, layers and heads"
                )
            if len(t.samples) != len(t.heads):
                raise ValueError("a table without per-query samples cannot be merged")
        keys = [(h.layer, h.head) for h in t0.heads]
        pooled: dict[tuple[int, int], tuple[list[np.ndarray], list[np.ndarray]]] = {
            key: ([], []) for key in keys
        }
        for t in tables:
            for h, (k, nv) in zip(t.heads, t.samples, strict=True):
                pooled[(h.layer, h.head)][0].append(k)
                pooled[(h.layer, h.head)][1].append(nv)
        meta: dict[str, Any] = {"n_sequences": 0, "n_tokens": []}
        for t in tables:
            meta["n_sequences"] += int(t.metadata.get("n_sequences", 1))
            meta["n_tokens"] += list(t.metadata.get("n_tokens", []))
        return _table(
            eps=t0.eps, coverage=t0.coverage, quantiles=t0.quantiles, layers=t0.layers,
            n_heads=t0.n_heads,
            samples={key: (np.concatenate(a), np.concatenate(b)) for key, (a, b) in
                     pooled.items()},
            model=t0.model, source=source or "; ".join(t.source for t in tables), meta=meta,
        )

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


def _table(
    *,
    eps: float,
    coverage: float,
    quantiles: tuple[float, ...],
    layers: tuple[int, ...],
    n_heads: int,
    samples: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    model: str,
    source: str,
    meta: dict[str, Any],
) -> BudgetTable:
    """A :class:`BudgetTable` from raw per-query ``(k, n_valid)`` per (layer, head)."""
    heads, kept = [], []
    for layer in layers:
        for h in range(n_heads):
            k, nv = samples[(layer, h)]
            k = np.asarray(k, dtype=np.int64)
            nv = np.asarray(nv, dtype=np.int64)
            if k.size == 0:
                raise ValueError(f"layer {layer}, head {h}: every query row is masked")
            heads.append(_summarise(layer, h, k, nv, coverage, quantiles))
            kept.append((k, nv))
    return BudgetTable(
        eps=eps, coverage=coverage, quantiles=quantiles, layers=layers, n_heads=n_heads,
        heads=tuple(heads), model=model, source=source, metadata=meta, samples=tuple(kept),
    )


def _summarise(
    layer: int, head: int, k: np.ndarray, nv: np.ndarray, coverage: float, quantiles: tuple
) -> HeadBudget:
    frac = k / nv.astype(np.float64)
    kf = _fixed_k(k, coverage)
    held = None
    if k.size >= 4:
        held = float(np.mean(k[1::2] <= _fixed_k(k[0::2], coverage)))
    return HeadBudget(
        layer=int(layer),
        head=int(head),
        n_queries=int(k.size),
        n_mean=float(nv.mean(dtype=np.float64)),
        k_quantiles=tuple(int(np.quantile(k, q, method="inverted_cdf")) for q in quantiles),
        frac_quantiles=tuple(
            float(np.quantile(frac, q, method="inverted_cdf")) for q in quantiles
        ),
        k_mean=float(k.mean(dtype=np.float64)),
        frac_mean=float(frac.mean()),
        k_fixed=kf,
        coverage_measured=float(np.mean(k <= kf)),
        coverage_heldout=held,
    )


def check_levels(
    eps: float, coverage: float, quantiles: Sequence[float]
) -> tuple[float, float, tuple[float, ...]]:
    """Validated ``(eps, coverage, quantile levels)`` of a budget table."""
    eps = check_eps(eps)
    coverage = check_number(
        coverage, name="coverage", low=0.0, high=1.0, closed_low=False, closed_high=True
    )
    qs = tuple(
        check_number(q, name="quantile", low=0.0, high=1.0, closed_low=True, closed_high=True)
        for q in quantiles
    )
    if not qs:
        raise InputError("give at least one quantile level")
    return eps, coverage, qs


def _rows_text(query_rows: slice | None) -> str:
    return "all query rows" if query_rows is None else f"query rows {_slice_text(query_rows)}"


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

    :class:`~certattn.models.ModelAttention` inputs are certified from their queries and
    keys by :func:`certattn.certify_scores` (about the exact ``scale * q k^T`` from the given
    queries and keys, one block of query rows at a time: the logits are never formed);
    logits arrays are certified as given.

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
        1024-token sequence); default all.  Fully masked rows of logits arrays are skipped.
    progress : callable, optional
        ``progress(done, total)`` after each layer of each sequence.

    Returns
    -------
    BudgetTable
        With the raw per-query budgets in :attr:`BudgetTable.samples` (mergeable).
    """
    from .models import ModelAttention

    eps, coverage, qs = check_levels(eps, coverage, quantiles)
    if isinstance(attn, ModelAttention):
        attn = [attn]
    if isinstance(attn, (list, tuple)) and attn and all(
        isinstance(a, ModelAttention) for a in attn
    ):
        layers = tuple(int(v) for v in attn[0].layers)
        n_heads = attn[0].n_heads
        for a in attn:
            if tuple(int(v) for v in a.layers) != layers or a.n_heads != n_heads:
                raise ValueError("all ModelAttention inputs must record the same layers and heads")
        acc = _Accumulator(layers, n_heads)
        total, done = len(layers) * len(attn), 0
        for a in attn:
            rows = _clip_rows(query_rows, a.n_tokens)
            for li, layer in enumerate(layers):
                cert = a.certify_layer(li, eps, query_rows=rows, policy=TopK(eps))
                acc.add(layer, cert.k, cert.n_valid)
                done += 1
                if progress is not None:
                    progress(done, total)
        meta = {"n_sequences": len(attn), "n_tokens": [a.n_tokens for a in attn]}
        return acc.table(eps, coverage, qs, attn[0].model, _rows_text(query_rows), meta)
    arr = np.asarray(attn)
    if arr.ndim != 4:
        raise ValueError(
            "attention must be a ModelAttention, a list of them, or logits of shape "
            f"(layers, heads, queries, keys); got an array of shape {arr.shape}"
        )
    n_layers, n_heads = int(arr.shape[0]), int(arr.shape[1])
    acc = _Accumulator(tuple(range(n_layers)), n_heads)
    for li in range(n_layers):
        x = arr[li] if query_rows is None else arr[li][:, query_rows, :]
        if x.shape[1] == 0:
            raise ValueError(f"query_rows {query_rows} selects no query row")
        cert = certify_topk(x, eps, masked_rows="skip")
        k, nv, masked = (np.asarray(v) for v in (cert.k, cert.n_valid, cert.masked))
        acc.add(li, k, nv, keep=~masked)
        if progress is not None:
            progress(li + 1, n_layers)
    return acc.table(eps, coverage, qs, "", _rows_text(query_rows), {})


def _clip_rows(query_rows: slice | None, n: int) -> slice | None:
    if query_rows is None:
        return None
    start, stop, step = query_rows.indices(n)
    if stop <= start:
        raise ValueError(f"query_rows {query_rows} selects no query row")
    return slice(start, stop, step)


class _Accumulator:
    """Per (layer, head) lists of per-query ``k`` and ``n_valid`` arrays."""

    def __init__(self, layers: tuple[int, ...], n_heads: int) -> None:
        self.layers = layers
        self.n_heads = n_heads
        self.k: dict[tuple[int, int], list[np.ndarray]] = {
            (la, h): [] for la in layers for h in range(n_heads)
        }
        self.nv: dict[tuple[int, int], list[np.ndarray]] = {key: [] for key in self.k}

    def add(self, layer: int, k: Any, nv: Any, keep: np.ndarray | None = None) -> None:
        k = np.asarray(k)
        nv = np.asarray(nv)
        for h in range(self.n_heads):
            sel = slice(None) if keep is None else keep[h]
            self.k[(layer, h)].append(k[h][sel].astype(np.int64))
            self.nv[(layer, h)].append(nv[h][sel].astype(np.int64))

    def table(
        self, eps: float, coverage: float, qs: tuple[float, ...], model: str, source: str,
        meta: dict[str, Any],
    ) -> BudgetTable:
        samples = {
            key: (np.concatenate(self.k[key]) if self.k[key] else np.zeros(0, np.int64),
                  np.concatenate(self.nv[key]) if self.nv[key] else np.zeros(0, np.int64))
            for key in self.k
        }
        return _table(eps=eps, coverage=coverage, quantiles=qs, layers=self.layers,
                      n_heads=self.n_heads, samples=samples, model=model, source=source,
                      meta=meta)


def _slice_text(s: slice) -> str:
    a = "" if s.start is None else str(s.start)
    b = "" if s.stop is None else str(s.stop)
    return f"{a}:{b}" + ("" if s.step in (None, 1) else f":{s.step}")


def _model_label(model: Any) -> str:
    return model if isinstance(model, str) else os.fspath(model)


def _resolve(model: Any) -> tuple[Any, str]:
    """A loaded model and its label, from a name, a path or a loaded model."""
    from .models import load

    if isinstance(model, (str, os.PathLike)):
        return load(model), _model_label(model)
    if hasattr(model, "forward") and hasattr(model, "n_layers"):
        return model, str(getattr(model, "name", "model"))
    raise ValueError(f"model must be a name, a path or a loaded model, got {type(model)!r}")


def _sequences(
    m: Any, label: str, text: str | None, tokens: int | None
) -> tuple[list[list[int]], str]:
    """Token id sequences of one document and a description of them.

    Causal models get one sequence: the text (default: the built-in prose, repeated as
    often as needed to reach ``tokens``, default 1024) cut to ``tokens``.  Bidirectional
    (BERT) models without a text get three sequences of built-in prose (three 4-paragraph
    chunks, or with ``tokens`` three consecutive windows of exactly ``tokens`` tokens);
    with a text, one sequence.  Every limit is an error, never a silent cut: ``tokens``
    above the model's positions/context, a given text shorter than ``tokens``.
    """
    from ._corpus import PARAGRAPHS, corpus_text
    from .models import max_tokens

    cap = max_tokens(m)
    if tokens is not None:
        if isinstance(tokens, bool) or int(tokens) < 2:
            raise ValueError(f"tokens must be an integer >= 2, got {tokens!r}")
        tokens = int(tokens)
        if tokens > cap:
            what = ("context" if m.causal else
                    f"position table has {cap} rows")
            raise ValueError(
                f"{label} runs at most {cap} tokens (its {what}); got --tokens {tokens}"
            )
    if text is not None:
        ids = m.encode(text)
        if tokens is not None and len(ids) < tokens:
            raise ValueError(
                f"the text has {len(ids)} tokens, fewer than the {tokens} requested "
                "(only the built-in prose is repeated to reach --tokens)"
            )
        n = tokens if tokens is not None else len(ids)
        if n > cap:
            raise ValueError(
                f"the text has {len(ids)} tokens; {label} runs at most {cap}: pass "
                f"--tokens {cap} (or fewer) to cut it"
            )
        return [_cut(m, ids, n)], "the given text"
    if m.causal:
        n = tokens if tokens is not None else min(1024, cap)
        ids, reps = _repeat_prose(m, label, n)
        return [ids[:n]], f"built-in English prose{f' (repeated {reps}x)' if reps > 1 else ''}"
    if tokens is None:
        seqs = []
        for i in range(0, len(PARAGRAPHS), 4):
            ids = m.encode("\n\n".join(PARAGRAPHS[i : i + 4]))
            seqs.append(_cut(m, ids, min(len(ids), cap)))
        return seqs, "built-in English prose (three 4-paragraph chunks)"
    pre, post = _specials(m)
    width = tokens - len(pre) - len(post)
    if width < 1:
        raise ValueError(f"tokens must leave room for text between special tokens, got {tokens}")
    body = list(m.encode(corpus_text()))
    body = body[len(pre) : len(body) - len(post)]
    if not body:
        raise InputError(_NO_PROSE.format(label=label))
    need = 3 * width
    reps = -(-need // max(1, len(body)))
    body = body * reps
    seqs = [[*pre, *body[j * width : (j + 1) * width], *post] for j in range(3)]
    how = f"built-in English prose{f' (repeated {reps}x)' if reps > 1 else ''}"
    return seqs, f"{how}, three consecutive windows"


_NO_PROSE = ("{label}: its tokenizer encodes the built-in prose to no tokens of text; "
             "pass a text the vocabulary covers (--text)")


def _repeat_prose(m: Any, label: str, n: int) -> tuple[list[int], int]:
    """The built-in prose, repeated until it encodes to at least ``n`` tokens.

    The number of copies comes from the tokens one copy adds beyond the special tokens,
    so the work is bounded; a tokenizer that encodes the prose to nothing is refused.

    Returns
    -------
    ids : list of int
    reps : int
        Copies of the prose joined.
    """
    from ._corpus import corpus_text

    body = corpus_text()
    ids = list(m.encode(body))
    per_copy = len(ids) - len(list(m.encode("")))
    if per_copy < 1:
        raise InputError(_NO_PROSE.format(label=label))
    reps = 1
    for _ in range(4):  # each pass aims at n; joins only ever add tokens
        if len(ids) >= n:
            return ids, reps
        reps += -(-(n - len(ids)) // per_copy)
        ids = list(m.encode("\n\n".join([body] * reps)))
    raise InputError(
        f"{label}: its tokenizer encodes {reps} copies of the built-in prose to only "
        f"{len(ids)} tokens, fewer than {n}; pass a longer --text"
    )


def _specials(m: Any) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer puts before and after a text (``[CLS]``, ``[SEP]``)."""
    empty = list(m.encode(""))
    return empty[:1], empty[1:]


def _cut(m: Any, ids: list[int], n: int) -> list[int]:
    """The first ``n`` ids, keeping a closing special token (``[SEP]``) when there is one."""
    if len(ids) <= n:
        return list(ids)
    _, post = _specials(m) if not m.causal else ([], [])
    if post and ids[-len(post):] == post:
        return [*ids[: n - len(post)], *post]
    return list(ids[:n])


def _check_layers(layers: Sequence[int] | None, n_layers: int, label: str) -> tuple[int, ...]:
    """The model layers to record, in order without repeats (default all of ``n_layers``).

    Raises
    ------
    InputError
        A layer outside ``0..n_layers-1`` (no negative indexing) or an empty list.
    """
    if layers is None:
        return tuple(range(n_layers))
    record = tuple(dict.fromkeys(int(i) for i in layers))
    bad = [i for i in record if not 0 <= i < n_layers]
    if bad or not record:
        raise InputError(f"layers must be in 0..{n_layers - 1} ({label} has {n_layers} "
                         f"layers), got {list(layers)}")
    return record


def load_attention(
    model: Any = "minilm-sample",
    text: str | None = None,
    *,
    tokens: int | None = None,
    layers: Sequence[int] | None = None,
) -> list:
    """Real attention of a model on a text (built-in English prose by default).

    Parameters
    ----------
    model : str, path or loaded model
        ``"minilm-sample"``: the shipped MiniLM sample (numpy only; no text allowed).
        ``"minilm"``, ``"smollm2"``, a ``.gguf`` file or a Hugging Face folder: see
        :func:`certattn.models.load`.  Causal models run one sequence (default 1024
        tokens of the built-in prose, repeated to reach ``tokens``); BERT models run
        three built-in chunks (or three windows of exactly ``tokens`` tokens).
    text : str, optional
        Text to run instead of the built-in prose.
    tokens : int, optional
        Sequence length; above the model's context (or MiniLM's 512 positions), or above
        a given text's length, is an error.
    layers : sequence of int, optional
        Model layers to record (default all).

    Returns
    -------
    list of ModelAttention
        Queries, keys and values (logits computed on access: short inputs only).

    Raises
    ------
    ImportError
        If a built-in model's package is missing (the message gives the pip command).
    ValueError
        Unknown model, text given for the sample, too few or too many tokens, bad file.
    """
    if tokens is not None and (isinstance(tokens, bool) or int(tokens) < 2):
        raise ValueError(f"tokens must be an integer >= 2, got {tokens!r}")
    if isinstance(model, str) and model == "minilm-sample":
        if text is not None or tokens is not None:
            raise ValueError("the minilm-sample model has fixed sentences: no text or tokens")
        from .models import load_sample

        return load_sample()
    m, label = _resolve(model)
    if layers is not None:
        layers = _check_layers(layers, m.n_layers, label)
    seqs, _ = _sequences(m, label, text, tokens)
    out = []
    for ids in seqs:
        att = m.attention(ids, layers=layers)
        att.metadata["text"] = text if text is not None else m.decode(ids)
        out.append(att)
    return out


def budget_for_model(
    model: Any = "minilm-sample",
    text: str | None = None,
    *,
    tokens: int | None = None,
    eps: float = 0.01,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    layers: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BudgetTable:
    """:func:`attention_budget` of a model on one document (the ``certattn budget`` command).

    One call is one document and a pure function of its arguments, so a corpus is
    certified document by document (in any order, on any worker) and the tables are
    pooled with :meth:`BudgetTable.merge`.  The forward streams: each layer's queries and
    keys are certified (:func:`certattn.certify_scores`, by blocks of query rows) as soon
    as the layer is computed, then dropped, so memory is the weights plus ``O(n d)`` per
    layer plus a bounded chunk of scores, never ``O(n^2)``.

    Causal models use the query rows of the second half of the sequence, where each query
    sees at least half the context; bidirectional ones use every row.

    Parameters
    ----------
    model : str, path or loaded model
        ``"minilm-sample"`` (shipped data), a name or path for
        :func:`certattn.models.load`, or a model it returned (to load once for many
        documents).
    text : str, optional
        The document (default: built-in prose; see :func:`load_attention`).
    tokens : int, optional
        Sequence length (see :func:`load_attention`).
    eps, coverage, quantiles
        As in :func:`attention_budget`.
    layers : sequence of int, optional
        Model layers to certify (default all).
    progress : callable, optional
        ``progress(done, total)`` after each layer of each sequence.

    Returns
    -------
    BudgetTable
    """
    eps, coverage, qs = check_levels(eps, coverage, quantiles)
    if isinstance(model, str) and model == "minilm-sample":
        if layers is not None:
            raise ValueError("the minilm-sample model has fixed layers (0, 2, 5)")
        atts = load_attention(model, text, tokens=tokens)
        table = attention_budget(atts, eps, coverage=coverage, quantiles=qs, progress=progress)
        lens = ", ".join(str(a.n_tokens) for a in atts)
        desc = (f"minilm-sample: the shipped sample sentences, {len(atts)} sequence(s) of "
                f"{lens} tokens, {table.source}")
        return replace(table, source=desc)
    m, label = _resolve(model)
    seqs, what = _sequences(m, label, text, tokens)
    record = _check_layers(layers, m.n_layers, label)
    acc = _Accumulator(record, m.n_heads)
    total, done = len(seqs) * m.n_layers, 0
    policy = TopK(eps)
    rows: slice | None = None
    for ids in seqs:
        n = len(ids)
        rows = slice(n // 2, n) if m.causal else None

        def on_layer(i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: Any = rows,
                     n: int = n) -> None:
            nonlocal done
            if i in record:
                cert = certify_qk(q, k, eps, kv_head=m.kv_head if m.causal else
                                  np.arange(m.n_heads), scale=m.head_dim**-0.5,
                                  causal=m.causal, query_rows=rows, policy=policy)
                acc.add(i, cert.k, cert.n_valid)
            done += 1
            if progress is not None:
                progress(done, total)

        if m.causal:
            m.forward(ids, layers=(), on_layer=on_layer)
        else:
            m.forward(ids, layers=(), keep_probs=False, on_layer=on_layer)
    lens = ", ".join(str(len(s)) for s in seqs)
    rows_txt = _rows_text(None if rows is None else slice(rows.start, None))
    desc = f"{label}: {what}, {len(seqs)} sequence(s) of {lens} tokens, {rows_txt}"
    if m.causal:
        desc += " (causal: each query sees its prefix)"
    meta = {"n_sequences": len(seqs), "n_tokens": [len(s) for s in seqs]}
    return acc.table(eps, coverage, qs, m.name, desc, meta)


