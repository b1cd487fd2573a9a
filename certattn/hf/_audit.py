"""``certattn audit --model FOLDER`` for any architecture transformers loads.

:func:`attention_records` runs the model once per sequence (the sequences
:func:`certattn.budget._sequences` gives, as for the NumPy forwards) with an attention
function that records each layer's queries, keys (after RoPE and the cache update) and
values and returns the model's own eager attention, and builds the
:class:`~certattn.models.ModelAttention` records :func:`certattn.approx.audit.audit` reads.

The audit compares each method with exact attention of ``scale q.k`` under one boolean
mask per sequence, so what it cannot express is refused in one line: logit softcapping
(Gemma-2), attention sinks, ``position_bias``, an additive mask with finite values other
than eager's fill (a bias), layers whose masks differ (sliding-window layers on a text
longer than the window: use fewer ``--tokens``) and layers with different scales.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .._validate import InputError
from ..budget import _check_layers, _sequences
from ..models import ModelAttention
from ._attention import _eager_of, _switched
from ._budget import _Adapter
from ._evaluate import load, quiet_loading

__all__ = ["attention_records"]

CAPTURE_NAME = "certattn_capture"

_CAPTURE: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "certattn_hf_capture", default=None
)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().to(torch.float32).cpu().numpy()


def _visible(attention_mask: Any, lq: int, lk: int) -> np.ndarray:
    """The (Lq, Lk) bool visibility of batch row 0; refuses a finite additive bias."""
    if attention_mask is None:
        return np.ones((lq, lk), dtype=bool)
    m = attention_mask[0, 0, :, :lk].expand(lq, lk)
    if m.dtype == torch.bool:
        return m.cpu().numpy()
    vis = m > torch.finfo(m.dtype).min / 2
    if bool((m[vis] != 0).any()):
        raise InputError("the audit takes boolean masks: this model adds a finite bias to "
                         "its logits (e.g. ALiBi)")
    return vis.cpu().numpy()


def _capture(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
             **kwargs: Any) -> tuple[Any, Any]:
    """Record one call's queries, keys, values, mask and scale; return eager's output."""
    eager = _eager_of(module)
    calls = _CAPTURE.get()
    if calls is not None:
        if kwargs.get("softcap") is not None:
            raise InputError("the audit compares with softmax(scale q.k): logit softcapping "
                             "(Gemma-2) is not supported; certattn evaluate runs it")
        if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
            raise InputError("attention sinks (gpt-oss s_aux) are not supported by the audit")
        if kwargs.get("position_bias") is not None:
            raise InputError("position_bias attention is not supported by the audit")
        scaling = kwargs.get("scaling")
        idx = getattr(module, "layer_idx", None)
        calls.append({
            "layer": idx if isinstance(idx, int) else len(calls),
            "q": _numpy(query[0]), "k": _numpy(key[0]), "v": _numpy(value[0]),
            "mask": _visible(attention_mask, query.shape[2], key.shape[2]),
            "scale": query.shape[-1] ** -0.5 if scaling is None else float(scaling),
        })
    return eager(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def _capturing(model: Any) -> Iterator[list[dict[str, Any]]]:
    if AttentionInterface._global_mapping.get(CAPTURE_NAME) not in (None, _capture):
        raise InputError(f"attention implementation {CAPTURE_NAME!r} is already registered")
    AttentionInterface.register(CAPTURE_NAME, _capture)
    AttentionMaskInterface.register(CAPTURE_NAME, eager_mask)
    calls: list[dict[str, Any]] = []
    with _switched(model, CAPTURE_NAME):
        token = _CAPTURE.set(calls)
        try:
            yield calls
        finally:
            _CAPTURE.reset(token)


def _record(label: str, ids: list[int], tok: Any, calls: list[dict[str, Any]],
            layers: tuple[int, ...]) -> ModelAttention:
    """One :class:`ModelAttention` from the captured calls of one forward."""
    calls = [c for c in calls if c["layer"] in layers]
    if not calls:
        raise InputError(f"{label}: no attention call went through the audit's recorder")
    first = calls[0]
    for c in calls[1:]:
        if not np.array_equal(c["mask"], first["mask"]):
            raise InputError(f"{label}: layers {first['layer']} and {c['layer']} mask "
                             "different keys (a sliding window shorter than the text?); the "
                             "audit takes one mask per sequence: pass fewer --tokens")
        if c["scale"] != first["scale"]:
            raise InputError(f"{label}: layers scale their logits differently; the audit "
                             "takes one scale")
    h, h_kv = first["q"].shape[0], first["k"].shape[0]
    return ModelAttention.from_qkv(
        model=label, tokens=tuple(tok.hf.convert_ids_to_tokens(list(ids))),
        token_ids=np.asarray(ids), layers=np.asarray([c["layer"] for c in calls]),
        queries=np.stack([c["q"] for c in calls]), keys=np.stack([c["k"] for c in calls]),
        values=np.stack([c["v"] for c in calls]),
        kv_head=np.arange(h) // (h // h_kv), scale=first["scale"], mask=first["mask"],
        metadata={"text": tok.decode(ids), "source": "certattn.hf"},
    )


def attention_records(path: str, text: str | None = None, *, tokens: int | None = None,
                      layers: Sequence[int] | None = None) -> list[ModelAttention]:
    """Queries, keys and values of a Hugging Face model's attention, as the audit reads them.

    Parameters
    ----------
    path : str
        A Hugging Face model folder.
    text : str, optional
        The document (default: built-in prose, as :func:`certattn.budget.load_attention`).
    tokens : int, optional
        Sequence length.
    layers : sequence of int, optional
        Model layers to record (default all).

    Returns
    -------
    list of ModelAttention
    """
    quiet_loading()
    model, tok = load(path)
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    wanted = _check_layers(layers, n_layers, path) if n_layers else tuple(layers or ())
    seqs, _ = _sequences(_Adapter(model, tok), path, text, tokens)
    out = []
    for ids in seqs:
        with _capturing(model) as calls, torch.no_grad():
            model(input_ids=torch.tensor([ids], device=model.device))
        keep = wanted or tuple(sorted({c["layer"] for c in calls}))
        out.append(_record(path, ids, tok, calls, keep))
    return out
