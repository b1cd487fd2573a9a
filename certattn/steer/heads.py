"""Which attention heads a steering direction moves, and what removing them does.

The measure is the one certattn certifies everywhere else: the total variation distance
between two attention distributions of the same query,

.. math::  \\mathrm{TV}(p, q) = \\tfrac12 \\sum_j |p_j - q_j|,

here between the steered and the unsteered model on the same tokens, averaged over query
positions, per (layer, head).  Layers up to the steered one read an unchanged residual,
so their TV is exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .steering import decoder_layers

__all__ = ["ablate_heads", "attention_tv", "head_tv"]


def attention_tv(p: Any, q: Any) -> np.ndarray:
    """Mean over queries of ``TV(p, q)``: arrays ``(..., heads, queries, keys)`` ->
    ``(heads,)`` (leading axes averaged too)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim < 3:
        raise InputError(f"attention shapes differ or are not (..., H, Lq, Lk): "
                         f"{p.shape} vs {q.shape}")
    tv = 0.5 * np.abs(p - q).sum(-1)  # (..., H, Lq)
    return tv.reshape(-1, tv.shape[-2], tv.shape[-1]).mean(axis=(0, 2))


@torch.no_grad()
def _attentions(model: Any, ids: Any) -> list[np.ndarray]:
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl != "eager":
        raise InputError(f"head TV needs attn_implementation='eager' (the model has {impl!r})")
    out = model(torch.as_tensor(ids), output_attentions=True)
    return [a.float().numpy() for a in out.attentions]


def head_tv(model: Any, ids: Any,
            steer: Callable[[], AbstractContextManager[Any]]) -> np.ndarray:
    """``(layers, heads)`` mean TV between the attention under ``steer()`` and without.

    Parameters
    ----------
    model
        A transformers model with eager attention.
    ids
        Token ids ``(batch, length)``.
    steer
        A callable returning a fresh context manager, e.g.
        ``lambda: steering(model, layer, direction, c)``.
    """
    base = _attentions(model, ids)
    with steer():
        moved = _attentions(model, ids)
    return np.stack([attention_tv(p, q) for p, q in zip(base, moved, strict=True)])


@contextmanager
def ablate_heads(model: Any, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Remove the listed ``(layer, head)`` outputs: their slice of the attention output
    projection's input is set to zero (the head contributes nothing to the residual)."""
    layers = decoder_layers(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= layer < len(layers):
            raise InputError(f"layer {layer} is outside [0, {len(layers)})")
        by_layer.setdefault(int(layer), []).append(int(head))
    handles = []
    try:
        for layer, hs in by_layer.items():
            attn = layers[layer].self_attn
            n = model.config.num_attention_heads
            dim = getattr(attn, "head_dim", model.config.hidden_size // n)
            bad = [h for h in hs if not 0 <= h < n]
            if bad:
                raise InputError(f"head {bad[0]} is outside [0, {n})")

            def pre(module: Any, args: Any, hs: list[int] = hs, dim: int = dim) -> Any:
                x = args[0].clone()
                for h in hs:
                    x[..., h * dim:(h + 1) * dim] = 0
                return (x, *args[1:])

            handles.append(attn.o_proj.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
