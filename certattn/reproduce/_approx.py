"""Shared inputs of the approximation sections (``skyformer``, ``hybrid``, ``fal``).

The live models, loaded once per process, and the long English text of the Skyformer
run: the built-in corpus (about 1,400 SmolLM2 tokens) followed by the prose of Python's
own documentation topics (``pydoc_data.topics``, shipped with CPython; its exact text
depends on the Python version, which the section records).
"""

from __future__ import annotations

import functools
import sys
from typing import Any


@functools.lru_cache(maxsize=1)
def _smollm2() -> Any:
    from ..models import load_smollm2

    return load_smollm2()


@functools.lru_cache(maxsize=1)
def _minilm() -> Any:
    from ..models import load_minilm

    return load_minilm()


_SIGNALS: dict[tuple[int, int | None], tuple[tuple[int, ...], Any]] = {}


def signals(model: Any, text_or_ids: Any, *, n_layers: int | None = None) -> Any:
    """:func:`certattn.approx.fal.layer_signals`, shared across sections: the forwards of
    one ``reproduce`` run are kept (per model and layer count, one sequence each) and a
    causal model's request for a prefix of a kept sequence, with no more layers, is
    served by slicing it (a causal forward of a prefix is the prefix of the forward)."""
    from ..approx.fal import layer_signals

    ids = tuple(int(t) for t in (model.encode(text_or_ids) if isinstance(text_or_ids, str)
                                 else text_or_ids))
    for (mid, layers), (kept_ids, sig) in _SIGNALS.items():
        if mid != id(model):
            continue
        if kept_ids == ids and (layers is None or (n_layers is not None and n_layers <= layers)):
            return _cut(sig, len(ids), n_layers)
        if (getattr(model, "causal", False) and len(ids) <= len(kept_ids)
                and kept_ids[: len(ids)] == ids
                and (layers is None or (n_layers is not None and n_layers <= layers))):
            return _cut(sig, len(ids), n_layers)
    sig = layer_signals(model, list(ids), n_layers=n_layers)
    _SIGNALS[(id(model), n_layers)] = (ids, sig)
    return sig


def _cut(sig: Any, n: int, n_layers: int | None) -> Any:
    """The first ``n`` tokens and ``n_layers`` layers of kept layer signals."""
    import dataclasses

    L = len(sig.queries) if n_layers is None else n_layers
    return dataclasses.replace(
        sig, token_ids=sig.token_ids[:n], attn_out=sig.attn_out[:L, :n],
        mlp_in=sig.mlp_in[:L, :n], residual=sig.residual[:L, :n],
        queries=[x[:, :n] for x in sig.queries[:L]], keys=[x[:, :n] for x in sig.keys[:L]],
        values=[x[:, :n] for x in sig.values[:L]])


def forget_signals() -> None:
    """Drop the kept forwards (the end of a ``reproduce`` run)."""
    _SIGNALS.clear()


def long_text() -> tuple[str, str]:
    """The corpus followed by Python's documentation topics, and a description of it."""
    from .._corpus import corpus_text

    try:
        import pydoc_data.topics as topics
    except ImportError:  # some distributions strip it: the corpus alone (~1,400 tokens)
        return corpus_text(), "certattn's built-in corpus (pydoc_data unavailable)"
    body = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ver = ".".join(str(v) for v in sys.version_info[:3])
    return (corpus_text() + "\n\n" + body,
            f"certattn's built-in corpus, then Python {ver}'s pydoc_data.topics prose")


def minilm_window(m: Any, n: int = 512) -> list[int]:
    """``[CLS]`` + the first ``n - 2`` corpus tokens + ``[SEP]``."""
    from .._corpus import corpus_text

    ids = m.encode(corpus_text())
    return [ids[0], *ids[1 : n - 1], ids[-1]]


def figure(ncols: int = 2, width: float = 11.0) -> tuple[Any, Any]:
    """A figure (built without ``pyplot``) with a row of ``ncols`` axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.0), layout="constrained")
    return fig, fig.subplots(1, ncols)
