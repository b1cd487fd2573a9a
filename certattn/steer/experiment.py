"""Steering measured: success (target language), meaning and fluency, over a grid.

success   share of continuations the detector (``langdetect``, seeded) labels as the
          target language
meaning   mean cosine similarity of sentence embeddings (MiniLM, mean-pooled) between each
          steered continuation and the unsteered one of the same prompt: a proxy for
          "says the same thing"; an English-trained embedder scores translations low, so
          compare settings with each other, not with 1
fluency   mean negative log-likelihood per new token of the steered continuation under the
          unsteered model (lower reads as more fluent to the model itself)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .steering import steering

__all__ = ["Setting", "continuations", "detect_language", "fluency_nll", "meaning_reference",
           "minilm_embedder", "run_grid", "wilson"]


def detect_language(text: str) -> str:
    """ISO code of ``text``'s language by ``langdetect`` (seeded: deterministic);
    ``"unknown"`` when it has no letters."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return "unknown"


@torch.no_grad()
def continuations(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                  new_tokens: int) -> list[list[int]]:
    """Greedy continuations (new token ids only) of each prompt, one left-padded batch."""
    if not prompts:
        raise InputError("no prompts")
    width = max(len(p) for p in prompts)
    pad = _pad_id(model)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return [row[width:].tolist() for row in out]


def _pad_id(model: Any) -> int:
    cfg = model.generation_config
    for cand in (cfg.pad_token_id, cfg.eos_token_id, model.config.eos_token_id, 0):
        if isinstance(cand, list):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


@torch.no_grad()
def fluency_nll(model: Any, prompts: Sequence[Sequence[int]],
                conts: Sequence[Sequence[int]]) -> float:
    """Mean NLL per continuation token under ``model`` (call it unsteered)."""
    total, count = 0.0, 0
    for p, c in zip(prompts, conts, strict=True):
        if not c:
            continue
        ids = torch.tensor([list(p) + list(c)])
        logp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].double(), -1)
        total -= float(logp.gather(-1, torch.tensor(list(c))[:, None]).sum())
        count += len(c)
    return total / max(count, 1)


def minilm_embedder() -> Callable[[Sequence[str]], np.ndarray]:
    """Unit sentence embeddings from the MiniLM package (mean pooling)."""
    from ..hf import load

    enc, tok = load("minilm")

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> np.ndarray:
        rows = []
        for t in texts:
            ids = tok.encode(t)[:256]
            h = enc(torch.tensor([ids])).last_hidden_state[0].double().mean(0)
            rows.append((h / h.norm().clamp_min(1e-12)).numpy())
        return np.stack(rows)

    return embed


@dataclass
class Setting:
    """One cell of the grid."""

    direction: str
    layer: int
    coefficient: float
    success: float
    meaning: float
    fluency_nll: float
    examples: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_grid(model: Any, tokenizer: Any, prompts: Sequence[str], lang: str,
             directions: Mapping[str, tuple[int, Any]], coefficients: Sequence[float], *,
             norms: Mapping[int, float], new_tokens: int = 30,
             embed: Callable[[Sequence[str]], np.ndarray] | None = None,
             fluency: bool = True,
             progress: Callable[[str], None] | None = None) -> list[Setting]:
    """Success, meaning and fluency of each direction at each coefficient.

    Parameters
    ----------
    directions
        ``name -> (layer, unit direction)``: the SAE feature, the mean difference, a random
        feature...; instead of a direction, a callable ``steer(c, norm)`` returning a
        context manager (e.g. an SAE feature clamped by :func:`feature_steering`).
    coefficients
        Multiples of the layer's mean residual norm ``norms[layer]``; 0 is the unsteered
        model, run once.
    embed, fluency
        Without an embedder the meaning is NaN; ``fluency=False`` skips the NLL (NaN),
        which costs as much as the generation itself.
    """
    ids = [tokenizer.encode(p) for p in prompts]
    base = continuations(model, tokenizer, ids, new_tokens)
    base_text = [tokenizer.decode(c) for c in base]
    base_emb = embed(base_text) if embed is not None else None
    out = []
    cells = [(name, layer, d, c) for name, (layer, d) in directions.items()
             for c in coefficients]
    for i, (name, layer, d, c) in enumerate(cells):
        if progress is not None:
            progress(f"{name} layer {layer} c={c:g} ({i + 1}/{len(cells)})")
        if c == 0:
            conts = base
        else:
            with _steer(model, layer, d, c, norms[layer]):
                conts = continuations(model, tokenizer, ids, new_tokens)
        texts = [tokenizer.decode(t) for t in conts]
        hits = [detect_language(t) == lang for t in texts]
        meaning = float("nan")
        if base_emb is not None:
            meaning = float(np.mean(np.sum(embed(texts) * base_emb, axis=1)))
        out.append(Setting(direction=name, layer=layer, coefficient=float(c),
                           success=float(np.mean(hits)), meaning=meaning,
                           fluency_nll=fluency_nll(model, ids, conts) if fluency else float("nan"),
                           examples=texts[:3]))
    return out


def _steer(model: Any, layer: int, direction: Any, c: float,
           norm: float) -> AbstractContextManager[Any]:
    if callable(direction):
        return direction(c, norm)
    return steering(model, layer, direction, c, norm=norm)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for ``z = 1.96``)."""
    if n <= 0 or not 0 <= hits <= n:
        raise InputError(f"need 0 <= hits <= n and n > 0, got {hits}/{n}")
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, float(mid - half)), min(1.0, float(mid + half))


def meaning_reference(embed: Callable[[Sequence[str]], np.ndarray], english: Sequence[str],
                      target: Sequence[str]) -> dict[str, float]:
    """What the meaning proxy gives a faithful translation, and an unrelated one.

    ``translation``: mean cosine between each English text and its aligned translation;
    ``unrelated``: between each English text and the translation of the next one (same
    domain, other content).  Steered text scoring near ``unrelated`` kept no meaning the
    proxy can see; near ``translation``, all of it.
    """
    if len(english) != len(target) or len(english) < 2:
        raise InputError("need at least two aligned English/target texts")
    e, t = embed(list(english)), embed(list(target))
    return {"translation": float(np.mean(np.sum(e * t, axis=1))),
            "unrelated": float(np.mean(np.sum(np.roll(e, 1, axis=0) * t, axis=1)))}
