r"""Serving budgets over a corpus, one task per document, on ``dask.distributed``.

:func:`budget_corpus` runs :func:`certattn.budget.budget_for_model` on every document of a
corpus (the certified minimal :math:`k_\varepsilon` of every query row of every recorded
(layer, head); Theorems TV-TAIL and TV-KL) and pools the per-document tables with
:meth:`certattn.budget.BudgetTable.merge` into the per-layer, per-head table of
``certattn budget``.

Each document is one task, on a ``distributed`` client or in this process without one.
A task returns its document's :class:`~certattn.budget.BudgetTable`, which keeps every
per-query value, and the merge concatenates them per (layer, head) in document order:
exact quantiles, the fixed k and its held-out coverage need every per-query value, and
pooling in document order makes the table *equal* to a single
:func:`certattn.budget.attention_budget` call on all the documents' attention at once,
however the tasks were scheduled.  A task's memory is the model plus one layer's
activations and a bounded chunk of scores (the forward streams, layer by layer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._backends import usable_cores
from ._validate import InputError

__all__ = ["budget_corpus", "document_budget", "read_texts"]


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


def document_budget(
    model: str,
    text: str,
    *,
    eps: float,
    tokens: int | None = None,
    layers: Sequence[int] | None = None,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    label: str = "",
) -> Any:
    """One document's task: :func:`certattn.budget.budget_for_model` on it.

    Raises
    ------
    ValueError
        The model's own errors (too few tokens, ...), prefixed by the document's label.
    """
    from .budget import budget_for_model

    try:
        return budget_for_model(model, text, tokens=tokens, eps=eps, coverage=coverage,
                                quantiles=quantiles, layers=layers)
    except ValueError as exc:
        raise InputError(f"document {label or '?'}: {exc}") from None


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
        cluster = LocalCluster(  # a task's error is raised here: no worker log of it
            n_workers=usable_cores(), threads_per_worker=1, dashboard_address=":0",  # any free port
            silence_logs=logging.CRITICAL,
        )
        # not the process's default client: a caller's later dask.compute must not be
        # sent to this client once it is closed
        c = Client(cluster, set_as_default=False)
        return c, [c, cluster]
    try:
        c = Client(client, timeout="30s", set_as_default=False)
    except OSError as exc:
        raise InputError(f"cannot reach the dask scheduler at {client}: {exc}") from None
    except (ValueError, TypeError) as exc:  # distributed's address parser
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise InputError(f"not a dask scheduler address: {client!r} ({msg}); give 'local' "
                         "or tcp://host:port") from None
    return c, [c]


_QUIET = ("distributed.worker", "distributed.client")


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Silence ``distributed``'s worker and client logging in this process while the
    corpus runs (the workers of ``"local"`` are silenced by their cluster).

    A failing task is raised to the caller (one line from the CLI); distributed would
    also log it ("Compute Failed" with a traceback).
    """
    logs = [logging.getLogger(name) for name in _QUIET]
    before = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, before, strict=True):
            log.setLevel(level)


def _run_tasks(c: Any, docs: list[tuple[str, str]], model: str, kw: dict,
               progress: Callable[[int, int], None] | None) -> list[Any]:
    """Every document's table, in document order; ``progress(done, total)`` as they finish."""
    total = len(docs)
    if c is None:
        tables = []
        for lab, t in docs:
            tables.append(document_budget(model, t, label=lab, **kw))
            if progress is not None:
                progress(len(tables), total)
        return tables
    from distributed import as_completed

    futures = [c.submit(document_budget, model, t, label=lab, pure=False, **kw)
               for lab, t in docs]
    if progress is not None:
        for done, _ in enumerate(as_completed(futures), start=1):
            progress(done, total)
    return c.gather(futures)


def budget_corpus(
    texts: Sequence[str] | Sequence[tuple[str, str]],
    *,
    model: str = "minilm",
    eps: float = 0.01,
    tokens: int | None = None,
    layers: Sequence[int] | None = None,
    coverage: float = 0.9,
    quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
    client: Any = None,
    source: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Per-layer, per-head serving budgets of a model over a corpus, one task per document.

    Parameters
    ----------
    texts : sequence of str, or of (label, text)
        The documents (labels name them in error messages; see :func:`read_texts`).
    model : str or path
        A model that runs on text: a name or path for :func:`certattn.models.load` (not
        the shipped ``"minilm-sample"``, which holds fixed attention).
    eps : float
        TV budget in [0, 1).
    tokens : int, optional
        Sequence length of each document (:func:`certattn.budget.load_attention`).
    layers : sequence of int, optional
        Model layers to certify (default all).
    coverage, quantiles
        As in :func:`certattn.budget.attention_budget`.
    client : distributed.Client, str or None
        ``None``: run the documents one after the other in this process.  A
        ``distributed.Client``: one task per document on its cluster.  ``"local"``: a
        ``LocalCluster`` with one single-threaded worker per core (closed afterwards).
        Any other string: the address of a running scheduler (``"tcp://host:8786"``).
    source : str
        Description of the corpus for the table (default: the document count).
    progress : callable, optional
        ``progress(documents_done, documents_total)`` as each document's task finishes.

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
    from .budget import BudgetTable, check_levels

    eps, coverage, qs = check_levels(eps, coverage, quantiles)
    if model == "minilm-sample":
        raise InputError("a corpus needs a model that runs on text (a name or path), "
                         "not the shipped minilm-sample")
    docs = [(f"{i}", t) if isinstance(t, str) else (str(t[0]), str(t[1]))
            for i, t in enumerate(texts)]
    if not docs:
        raise InputError("the corpus holds no documents")
    kw = {"eps": eps, "tokens": tokens, "layers": None if layers is None else list(layers),
          "coverage": coverage, "quantiles": qs}
    with _quiet_distributed():
        c, owned = _client(client)
        try:
            tables = _run_tasks(c, docs, model, kw, progress)
        finally:
            for thing in owned:
                thing.close()
    lens = [n for t in tables for n in t.metadata.get("n_tokens", [])]
    span = f"{min(lens)}-{max(lens)} tokens ({sum(lens)} in all)" if lens else "?"
    desc = f"{tables[0].model}: {source or 'a corpus'}, {len(tables)} document(s) of {span}"
    return BudgetTable.merge(tables, source=desc)
