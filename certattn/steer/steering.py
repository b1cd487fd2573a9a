"""Residual activations, language directions, and a steering hook at one layer.

The residual stream after decoder layer ``L`` is what layer ``L + 1`` reads.  Steering
adds ``c * r_L * u`` to it at every position, where ``u`` is a unit direction (an SAE
feature's decoder row, or the normalised mean difference between target-language and
English residuals) and ``r_L`` the mean residual norm at that layer, so the coefficient
``c`` is in units of a typical residual and comparable across directions and layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["collect_residuals", "decoder_layers", "mean_difference", "rank_features",
           "steering"]


def decoder_layers(model: Any) -> Any:
    """The model's list of decoder layers (``model.model.layers`` for Llama and kin)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise InputError(f"{type(model).__name__}: no decoder layer list to steer")
    return layers


def _check_layer(model: Any, layer: int) -> int:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise InputError(f"layer {layer} is outside [0, {n}) for this model")
    return int(layer)


@torch.no_grad()
def collect_residuals(model: Any, tokenizer: Any, texts: Sequence[str], layer: int, *,
                      max_tokens: int = 20_000, max_len: int = 128,
                      skip_first: int = 1) -> np.ndarray:
    """Residual activations after decoder layer ``layer``, ``(N, hidden)`` float32.

    Each text is cut to ``max_len`` tokens; its first ``skip_first`` positions (the
    attention sink, whose residual is an outlier) are left out; collection stops after
    ``max_tokens`` rows.
    """
    _check_layer(model, layer)
    rows: list[np.ndarray] = []
    total = 0
    for text in texts:
        ids = tokenizer.encode(text)[:max_len]
        if len(ids) <= skip_first:
            continue
        out = model(torch.tensor([ids]), output_hidden_states=True)
        h = out.hidden_states[layer + 1][0, skip_first:].float().numpy()
        rows.append(h)
        total += h.shape[0]
        if total >= max_tokens:
            break
    if not rows:
        raise InputError("no text long enough to collect residuals from")
    return np.concatenate(rows)[:max_tokens]


def mean_difference(target: np.ndarray, english: np.ndarray) -> np.ndarray:
    """Unit direction of ``mean(target) - mean(english)`` (the plain steering control)."""
    diff = np.asarray(target, np.float64).mean(0) - np.asarray(english, np.float64).mean(0)
    norm = float(np.linalg.norm(diff))
    if not norm > 0:
        raise InputError("the two sets of activations have the same mean")
    return (diff / norm).astype(np.float32)


@torch.no_grad()
def rank_features(sae: Any, target: np.ndarray, english: np.ndarray) -> np.ndarray:
    """Feature indices by ``mean f_i(target) - mean f_i(english)``, largest first."""
    ft = sae.encode(torch.as_tensor(np.asarray(target, np.float32))).mean(0)
    fe = sae.encode(torch.as_tensor(np.asarray(english, np.float32))).mean(0)
    return torch.argsort(ft - fe, descending=True, stable=True).numpy()


@contextmanager
def steering(model: Any, layer: int, direction: Any, coefficient: float, *,
             norm: float = 1.0) -> Iterator[None]:
    """Add ``coefficient * norm * direction`` to the residual after decoder layer ``layer``.

    Every position, prompt and generated tokens alike; the hook is removed on exit.
    ``direction`` need not be unit: it is used as given.
    """
    _check_layer(model, layer)
    d = torch.as_tensor(np.asarray(direction, np.float32))
    if d.ndim != 1 or d.shape[0] != model.config.hidden_size:
        raise InputError(f"direction must have shape ({model.config.hidden_size},), "
                         f"got {tuple(d.shape)}")
    delta = float(coefficient) * float(norm) * d

    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
