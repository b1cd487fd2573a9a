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
