"""``certattn budget --model FOLDER`` for any architecture transformers loads.

The Hugging Face folders of the two built-in families (BERT, Llama / Mistral / Qwen2) run
through certattn's NumPy forwards (:func:`certattn.budget.budget_for_model`, no torch);
any other folder runs here: the model under :func:`certattn.hf.observe` at one eps, on the
same sequences the NumPy path would use (:func:`certattn.budget._sequences`: causal models
one sequence, by default 1024 tokens of the built-in prose; bidirectional ones three
chunks), and :meth:`Recorder.budget` on the same query rows (a causal model's second
half, every row of a bidirectional one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .._validate import InputError
from ..budget import BudgetTable, _sequences
from ._attention import LayerCall, Recorder, observe
from ._evaluate import load, quiet_loading

__all__ = ["budget_table"]


class _Adapter:
    """What :func:`certattn.budget._sequences` reads of a model: ``encode``, ``causal``,
    ``max_positions``."""

    def __init__(self, model: Any, tok: Any) -> None:
        self.encode = tok.encode
        self.causal = model.get_output_embeddings() is not None
        cfg = model.config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or 1 << 20)


def _rows(call: LayerCall, rows: slice) -> LayerCall:
    """The call restricted to query ``rows`` (last axis of every per-row array)."""
    return replace(call, n_valid=call.n_valid[..., rows], masked=call.masked[..., rows],
                   k={e: v[..., rows] for e, v in call.k.items()},
                   tail_upper={e: v[..., rows] for e, v in call.tail_upper.items()})


def budget_table(path: str, text: str | None = None, *, tokens: int | None = None,
                 eps: float = 0.01, coverage: float = 0.9,
                 progress: Callable[[int, int], None] | None = None) -> BudgetTable:
    """The ``certattn budget`` table of a Hugging Face folder, through :func:`observe`.

    Parameters
    ----------
    path : str
        A Hugging Face model folder (``config.json``, weights, tokenizer).
    text : str, optional
        The document (default: built-in prose).
    tokens : int, optional
        Sequence length (as :func:`certattn.budget.budget_for_model`).
    eps, coverage : float
        TV budget and the fixed k's coverage.
    progress : callable, optional
        ``progress(done, total)`` after each sequence.
    """
    quiet_loading()
    model, tok = load(path)
    m = _Adapter(model, tok)
    seqs, what = _sequences(m, path, text, tokens)
    rec = Recorder(eps=(eps,))
    for i, ids in enumerate(seqs):
        with observe(model, eps=eps) as one, torch.no_grad():
            model(input_ids=torch.tensor([ids], device=model.device))
        rows = slice(len(ids) // 2, None) if m.causal else slice(None)
        rec.calls.extend(_rows(c, rows) for c in one.calls)
        if progress is not None:
            progress(i + 1, len(seqs))
    if not rec.calls:
        raise InputError(f"{path}: no attention call went through certattn.hf")
    table = rec.budget(coverage=coverage, eps=eps, model=str(path))
    lens = ", ".join(str(len(s)) for s in seqs)
    rows_txt = "query rows n//2: (causal: each query sees its prefix)" if m.causal else \
        "all query rows"
    return replace(
        table,
        source=f"{path}: {what}, {len(seqs)} sequence(s) of {lens} tokens, {rows_txt}, "
               f"transformers {type(model).__name__} under certattn.hf.observe",
        metadata={**table.metadata, "n_sequences": len(seqs),
                  "n_tokens": [len(s) for s in seqs]},
    )
