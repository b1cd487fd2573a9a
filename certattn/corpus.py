r"""Serving budgets over a corpus, one task per document, on ``dask.distributed``.

:func:`budget_corpus` runs a model on every document of a corpus, certifies every query
row of every recorded (layer, head) with :func:`certattn.certify_topk` (the certified
minimal :math:`k_\varepsilon` of Theorems TV-TAIL and TV-KL), and summarises them into the
per-layer, per-head :class:`certattn.budget.BudgetTable` of ``certattn budget``.

Each document (or each document and group of layers) is one task, on a ``distributed``
client or in this process without one;
a task returns the per-query ``k`` and ``n_valid`` of its document, never a summary, and
the merge concatenates them per (layer, head) in document order.  Exact quantiles, the
fixed k and its held-out coverage (chosen on the even-indexed queries of the pooled
sequence, measured on the odd-indexed ones) need every per-query value, and pooling in
document order makes the table *equal* to a single :func:`certattn.budget.attention_budget`
call on all the documents' attention at once, however the tasks were scheduled.

The client gathers ``2 x queries x layers x heads`` small integers (about 600 kB per
512-token MiniLM document); the model and the logits stay on the workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import InputError, check_eps, check_number

__all__ = ["DocumentQueries", "budget_corpus", "document_queries", "merge_queries", "read_texts"]

_TEXT_MODELS = ("minilm", "smollm2")


@dataclass(frozen=True)
class DocumentQueries:
    """Per-query certified budgets of one document (what a task returns).

    Attributes
    ----------
    layers : tuple of int
        Model layers recorded.
    n_heads : int
        Query heads per layer.
    n_tokens : int
        Tokens of the document as run.
    k : tuple of tuple of numpy.ndarray
        ``k[layer_index][head]``: certified minimal k of every unmasked query row used.
    n_valid : tuple of tuple of numpy.ndarray
        Valid keys of the same rows.
    model : str
        Model name recorded by the forward.
    """

    layers: tuple[int, ...]
    n_heads: int
    n_tokens: int
    k: tuple[tuple[np.ndarray, ...], ...]
    n_valid: tuple[tuple[np.ndarray, ...], ...]
    model: str = ""


def read_texts(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """A corpus as ``(label, text)`` pairs: one document per non-blank line, or per file.

    A file gives one document per non-blank line (label ``FILE:LINE``); a directory one
    document per regular, non-hidden file, sorted by name (label: the file name).  Files
    are read as UTF-8; blank documents are skipped.

    Raises
    ------
    ValueError
        Missing or unreadable path, non-UTF-8 text, no document at all.
    """
    p = Path(path)
    docs: list[tuple[str, str]] = []
    try:
        if p.is_dir():
            for f in sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")):
                text = f.read_text(encoding="utf-8")
                if text.strip():
                    docs.append((f.name, text))
        else:
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    docs.append((f"{p.name}:{i}", line))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {p}: {exc}") from None
    if not docs:
        raise InputError(f"{p}: no documents (blank lines and empty files are skipped)")
    return docs


def document_queries(
    model: str,
    text: str,
    *,
    eps: float,
    tokens: int | None = None,
    layers: Sequence[int] | None = None,
    label: str = "",
) -> DocumentQueries:
    """One document's task: the model's attention, certified row by row.

    Rows are chosen as :func:`certattn.budget.budget_for_model` does: every query of a
    bidirectional model, the second half of a causal one (each query sees at least half
    the context); fully masked rows are skipped.

    Raises
    ------
    ValueError
        The model's own errors (too few tokens, ...), prefixed by the document's label.
    """
    from .budget import load_attention
    from .topk import certify_topk

    try:
        (att,) = load_attention(model, text, tokens=tokens, layers=layers)
    except ValueError as exc:
        raise InputError(f"document {label or '?'}: {exc}") from None
    rows = slice(att.n_tokens // 2, None) if model == "smollm2" else slice(None)
    ks, nvs = [], []
    for li in range(att.logits.shape[0]):
        cert = certify_topk(att.logits[li][:, rows, :], eps, masked_rows="skip")
        k, nv, masked = (np.asarray(a) for a in (cert.k, cert.n_valid, cert.masked))
        ks.append(tuple(k[h][~masked[h]] for h in range(k.shape[0])))
        nvs.append(tuple(nv[h][~masked[h]] for h in range(k.shape[0])))
    return DocumentQueries(
        layers=tuple(int(v) for v in att.layers), n_heads=int(att.logits.shape[1]),
        n_tokens=int(att.n_tokens), k=tuple(ks), n_valid=tuple(nvs), model=att.model,
    )


def merge_queries(
    docs: Sequence[DocumentQueries],
    eps: float,
    *,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    source: str = "",
) -> Any:
    """Pool per-document budgets per (layer, head), in order, into one ``BudgetTable``.

    The summary is that of :func:`certattn.budget.attention_budget` (``inverted_cdf``
    quantiles of k and k/n, the fixed k covering ``coverage`` of the queries, its coverage
    and its held-out coverage), over the concatenation of the documents' query rows.
    """
    from .budget import BudgetTable

    if not docs:
        raise InputError("no documents to merge")
    layers, n_heads = docs[0].layers, docs[0].n_heads
    for d in docs:
        if d.layers != layers or d.n_heads != n_heads:
            raise InputError("all documents must record the same layers and heads")
    heads = []
    for li, layer in enumerate(layers):
        for h in range(n_heads):
            k = np.concatenate([d.k[li][h] for d in docs]).astype(np.int64)
            nv = np.concatenate([d.n_valid[li][h] for d in docs]).astype(np.float64)
            if k.size == 0:
                raise InputError(f"layer {layer}, head {h}: every query row is masked")
            heads.append(_summarise(layer, h, k, nv, coverage, tuple(quantiles)))
    return BudgetTable(
        eps=eps, coverage=coverage, quantiles=tuple(quantiles), layers=layers,
        n_heads=n_heads, heads=tuple(heads), model=docs[0].model, source=source,
        metadata={"n_sequences": len(docs), "n_tokens": [d.n_tokens for d in docs]},
    )


def _summarise(
    layer: int, head: int, k: np.ndarray, nv: np.ndarray, coverage: float,
    quantiles: tuple[float, ...],
) -> Any:
    """One head's :class:`certattn.budget.HeadBudget` from its pooled per-query values.

    The definitions of :mod:`certattn.budget` (module docstring), computed the same way
    so that the numbers are bit for bit those of a single ``attention_budget`` run.
    """
    from .budget import HeadBudget

    def q_of(a: np.ndarray, q: float) -> Any:
        return np.quantile(a, q, method="inverted_cdf")

    frac = k / nv
    kf = int(q_of(k, coverage))
    held = None
    if k.size >= 4:
        held = float(np.mean(k[1::2] <= int(q_of(k[0::2], coverage))))
    return HeadBudget(
        layer=int(layer), head=int(head), n_queries=int(k.size), n_mean=float(nv.mean()),
        k_quantiles=tuple(int(q_of(k, q)) for q in quantiles),
        frac_quantiles=tuple(float(q_of(frac, q)) for q in quantiles),
        k_mean=float(k.mean()), frac_mean=float(frac.mean()), k_fixed=kf,
        coverage_measured=float(np.mean(k <= kf)), coverage_heldout=held,
    )


def _join_layers(parts: Sequence[DocumentQueries]) -> DocumentQueries:
    """One document's results from its layer groups, layers in group order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return DocumentQueries(
        layers=tuple(v for p in parts for v in p.layers), n_heads=first.n_heads,
        n_tokens=first.n_tokens, k=tuple(r for p in parts for r in p.k),
        n_valid=tuple(r for p in parts for r in p.n_valid), model=first.model,
    )


def _client(client: Any) -> tuple[Any, list[Any]]:
    """``(client, things to close)`` for a client, ``"local"`` or a scheduler address."""
    if client is None or not isinstance(client, str):
        return client, []
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            f"--dask needs the distributed extra: pip install 'certattn[distributed]' ({exc})"
        ) from None
    if client == "local":
        import logging

        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        cluster = LocalCluster(
            n_workers=cores, threads_per_worker=1, dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        c = Client(cluster)
        return c, [c, cluster]
    try:
        c = Client(client, timeout="30s")
    except OSError as exc:
        raise InputError(f"cannot reach the dask scheduler at {client}: {exc}") from None
    return c, [c]


def budget_corpus(
    texts: Sequence[str] | Sequence[tuple[str, str]],
    *,
    model: str = "minilm",
    eps: float = 0.01,
    tokens: int | None = None,
    layers: Sequence[int] | None = None,
    layer_groups: Sequence[Sequence[int]] | None = None,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    client: Any = None,
    source: str = "",
) -> Any:
    """Per-layer, per-head serving budgets of a model over a corpus, one task per document.

    Parameters
    ----------
    texts : sequence of str, or of (label, text)
        The documents (labels name them in error messages; see :func:`read_texts`).
    model : {"minilm", "smollm2"}
        A model that runs on text (see :func:`certattn.budget.load_attention`).
    eps : float
        TV budget in [0, 1).
    tokens : int, optional
        Keep the first ``tokens`` tokens of each document.
    layers : sequence of int, optional
        Model layers to record (default all).
    layer_groups : sequence of sequence of int, optional
        Instead of ``layers``: one task per document and group, each recording only its
        group's layers (the table lists the groups' layers in order).  This bounds the
        logits a task holds (``len(group)`` layers); the forward up to the group's layers
        is run again by every group.
    coverage, quantiles
        As in :func:`certattn.budget.attention_budget`.
    client : distributed.Client, str or None
        ``None``: run the documents one after the other in this process.  A
        ``distributed.Client``: one task per document on its cluster.  ``"local"``: a
        ``LocalCluster`` with one single-threaded worker per core (closed afterwards).
        Any other string: the address of a running scheduler (``"tcp://host:8786"``).
    source : str
        Description of the corpus for the table (default: the document count).

    Returns
    -------
    certattn.budget.BudgetTable
        The table of one ``attention_budget`` run over all documents: the same per-layer,
        per-head summary and JSON (``metadata`` holds ``n_sequences`` and ``n_tokens``),
        whatever the client.  Causal models use each document's second half of queries.

    Raises
    ------
    ValueError
        Bad ``eps``/``coverage``/``quantiles``, a model that does not run on text, an empty
        corpus, a document the model rejects (named by its label).
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
        raise InputError("give at least one quantile level")
    if model not in _TEXT_MODELS:
        raise InputError(
            f"a corpus needs a model that runs on text ({', '.join(_TEXT_MODELS)}), got {model!r}"
        )
    docs = [(f"{i}", t) if isinstance(t, str) else (str(t[0]), str(t[1]))
            for i, t in enumerate(texts)]
    if not docs:
        raise InputError("the corpus holds no documents")
    if layer_groups is not None:
        if layers is not None:
            raise InputError("give layers or layer_groups, not both")
        groups: list[list[int] | None] = [[int(v) for v in g] for g in layer_groups]
        if not groups or not all(groups):
            raise InputError("layer_groups must be non-empty groups of layer indices")
    else:
        groups = [None if layers is None else [int(v) for v in layers]]
    tasks = [(lab, t, g) for lab, t in docs for g in groups]  # document-major
    c, owned = _client(client)
    try:
        if c is None:
            parts = [
                document_queries(model, t, eps=eps, tokens=tokens, layers=g, label=lab)
                for lab, t, g in tasks
            ]
        else:
            futures = [
                c.submit(document_queries, model, t, eps=eps, tokens=tokens, layers=g,
                         label=lab, pure=False)
                for lab, t, g in tasks
            ]
            parts = c.gather(futures)
    finally:
        for thing in owned:
            thing.close()
    step = len(groups)
    results = [_join_layers(parts[i : i + step]) for i in range(0, len(parts), step)]
    lens = [r.n_tokens for r in results]
    rows = "second half of each document's query rows (causal)" if model == "smollm2" else (
        "all query rows"
    )
    desc = (
        f"{model}: {source or 'a corpus'}, {len(results)} document(s) of {min(lens)}-{max(lens)} "
        f"tokens ({sum(lens)} in all), {rows}"
    )
    return merge_queries(results, eps, coverage=coverage, quantiles=qs, source=desc)
