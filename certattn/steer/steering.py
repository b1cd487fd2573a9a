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

__all__ = ["RANKINGS", "collect_layers", "collect_residuals", "decoder_layers", "feature_steering",
           "mean_difference", "rank_features", "steering"]


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


def collect_residuals(model: Any, tokenizer: Any, texts: Sequence[str], layer: int, *,
                      max_tokens: int = 20_000, max_len: int = 128,
                      skip_first: int = 1) -> np.ndarray:
    """Residual activations after decoder layer ``layer``, ``(N, hidden)`` float32.

    Each text is cut to ``max_len`` tokens; its first ``skip_first`` positions (the
    attention sink, whose residual is an outlier) are left out; collection stops after
    ``max_tokens`` rows.
    """
    return collect_layers(model, tokenizer, texts, [layer], max_tokens=max_tokens,
                          max_len=max_len, skip_first=skip_first)[layer]


@torch.no_grad()
def collect_layers(model: Any, tokenizer: Any, texts: Sequence[str], layers: Sequence[int],
                   *, max_tokens: int = 20_000, max_len: int = 128,
                   skip_first: int = 1) -> dict[int, np.ndarray]:
    """:func:`collect_residuals` for several layers from the same forward passes."""
    layers = [_check_layer(model, layer) for layer in layers]
    rows: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    total = 0
    for text in texts:
        ids = tokenizer.encode(text)[:max_len]
        if len(ids) <= skip_first:
            continue
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in layers:
            rows[layer].append(hidden[layer + 1][0, skip_first:].float().numpy())
        total += len(ids) - skip_first
        if total >= max_tokens:
            break
    if total == 0:
        raise InputError("no text long enough to collect residuals from")
    return {layer: np.concatenate(r)[:max_tokens] for layer, r in rows.items()}


def mean_difference(target: np.ndarray, english: np.ndarray) -> np.ndarray:
    """Unit direction of ``mean(target) - mean(english)`` (the plain steering control)."""
    diff = np.asarray(target, np.float64).mean(0) - np.asarray(english, np.float64).mean(0)
    norm = float(np.linalg.norm(diff))
    if not norm > 0:
        raise InputError("the two sets of activations have the same mean")
    return (diff / norm).astype(np.float32)


RANKINGS = ("zscore", "frequency", "mean")


@torch.no_grad()
def rank_features(sae: Any, target: np.ndarray, english: np.ndarray, *,
                  by: str = "zscore") -> np.ndarray:
    """Feature indices, most target-leaning first.

    Parameters
    ----------
    by
        ``"zscore"``: ``(mean_t - mean_e) / sqrt((var_t + var_e) / 2)``, the activation
        difference over its pooled standard deviation (features never active score 0);
        ``"frequency"``: the share of target rows where the feature is active minus the
        share of English rows; ``"mean"``: the raw difference of mean activations, which
        favours dense, high-norm features.
    """
    if by not in RANKINGS:
        raise InputError(f"ranking must be one of {', '.join(RANKINGS)}, got {by!r}")
    ft = sae.encode(torch.as_tensor(np.asarray(target, np.float32))).double()
    fe = sae.encode(torch.as_tensor(np.asarray(english, np.float32))).double()
    if by == "frequency":
        score = (ft > 0).double().mean(0) - (fe > 0).double().mean(0)
    else:
        score = ft.mean(0) - fe.mean(0)
        if by == "zscore":
            pooled = ((ft.var(0, unbiased=False) + fe.var(0, unbiased=False)) / 2).sqrt()
            score = torch.where(pooled > 0, score / pooled.clamp_min(1e-30),
                                torch.zeros_like(score))
    return torch.argsort(score, descending=True, stable=True).numpy()


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


@contextmanager
def feature_steering(model: Any, layer: int, sae: Any, feature: int, coefficient: float, *,
                     norm: float = 1.0, mode: str = "add") -> Iterator[None]:
    """Steer with one SAE feature's unit decoder direction ``u`` at decoder layer ``layer``.

    ``mode="add"`` adds ``coefficient * norm * u`` (as :func:`steering`);
    ``mode="clamp"`` replaces the feature's own contribution ``f_i(h) * s * u`` (its SAE
    activation times the SAE's input scale) by ``coefficient * norm * u``, so the
    feature reads the same everywhere whatever it read before.
    """
    if mode not in ("add", "clamp"):
        raise InputError(f"mode must be 'add' or 'clamp', got {mode!r}")
    u = sae.direction(feature)
    if mode == "add":
        with steering(model, layer, u.numpy(), coefficient, norm=norm):
            yield
        return
    _check_layer(model, layer)
    if u.shape[0] != model.config.hidden_size:
        raise InputError(f"the SAE is {u.shape[0]} wide, the model {model.config.hidden_size}")
    target = float(coefficient) * float(norm)

    def hook(module: Any, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            f = sae.encode(h.float())[..., feature] * sae.scale
        h = h + ((target - f)[..., None] * u).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
