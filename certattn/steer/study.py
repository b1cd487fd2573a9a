"""The whole experiment for one target language: SAE, feature, grid, heads, ablation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..hf._calibrate import fingerprint
from .corpus import corpus
from .experiment import minilm_embedder, run_grid
from .heads import ablate_heads, head_tv
from .sae import train_sae
from .steering import (
    collect_residuals,
    decoder_layers,
    mean_difference,
        rank_features,
    steering,
)

__all__ = ["language_study"]


def language_study(model: Any, tokenizer: Any, lang: str, layers: Sequence[int],
                   coefficients: Sequence[float], *, prompts: Sequence[str] | None = None,
                   texts: dict[str, list[str]] | None = None, n_prompts: int = 20,
                   prompt_tokens: int = 24, new_tokens: int = 30, train_tokens: int = 20_000,
                   width: int = 2048, k: int = 32, steps: int = 600, seed: int = 0,
                   ablate: int = 3, meaning: bool = True,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Steer ``model`` from English towards ``lang`` at each layer; measure everything.

    Per layer: residuals of English and ``lang`` paragraphs (the first two thirds of the
    aligned corpus), a TopK SAE trained on them, the feature with the largest mean
    activation difference, and three directions: that feature (``sae``), the
    normalised mean difference (``mean``) and a random feature (``random``); each run
    over ``coefficients`` on English prompts (the last third, or ``prompts``).  For the
    best setting (the SAE feature's, or the mean difference's when the feature never
    switches the language), the head TV table and the success with the ``ablate``
    highest-TV heads after the layer removed, against as many random heads after it.
    """
    say = progress or (lambda s: None)
    if lang == "en":
        raise InputError("the target language must differ from English")
    texts = texts if texts is not None else corpus(("en", lang))
    n = len(texts["en"])
    if n < 6:
        raise InputError(f"only {n} aligned paragraphs for en/{lang}: too few")
    cut = 2 * n // 3
    if prompts is None:
        prompts = [tokenizer.decode(tokenizer.encode(t)[:prompt_tokens])
                   for t in texts["en"][cut:cut + n_prompts]]
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"lang": lang, "model": fingerprint(model), "layers": {},
                              "prompts": len(prompts), "new_tokens": new_tokens,
                              "sae": {"width": width, "k": k, "steps": steps,
                                      "train_tokens": train_tokens}}
    embed = minilm_embedder() if meaning else None
    n_layers = len(decoder_layers(model))
    for layer in layers:
        say(f"layer {layer}: residuals")
        en = collect_residuals(model, tokenizer, texts["en"][:cut], layer,
                               max_tokens=train_tokens // 2)
        tg = collect_residuals(model, tokenizer, texts[lang][:cut], layer,
                               max_tokens=train_tokens // 2)
        norm = float(np.linalg.norm(en, axis=1).mean())
        say(f"layer {layer}: training the SAE")
        sae, history = train_sae(np.concatenate([en, tg]), width, k, steps=steps, seed=seed,
                                 meta={"model": fingerprint(model), "layer": layer})
        ranked = rank_features(sae, tg, en)
        feature = int(ranked[0])
        random_feature = int(rng.choice(ranked[width // 4:]))  # not language-leaning
        directions = {
            "sae": (layer, sae.direction(feature).numpy()),
            "mean": (layer, mean_difference(tg, en)),
            "random": (layer, sae.direction(random_feature).numpy()),
        }
        grid = run_grid(model, tokenizer, prompts, lang, directions, coefficients,
                        norms={layer: norm}, new_tokens=new_tokens, embed=embed,
                        progress=lambda s, layer=layer: say(f"layer {layer}: {s}"))
        best = _best(grid)
        entry: dict[str, Any] = {
            "feature": feature, "random_feature": random_feature, "residual_norm": norm,
            "sae_unexplained": history, "grid": [g.as_dict() for g in grid],
        }
        if best is not None and ablate > 0:
            entry.update(_heads(model, tokenizer, prompts, lang, layer, norm, best,
                                directions[best.direction][1], ablate, n_layers, rng,
                                new_tokens, say))
        result["layers"][str(layer)] = entry
    return result


def _best(grid: Sequence[Any]) -> Any:
    """The setting whose heads are measured: the SAE feature's most successful nonzero
    coefficient, or the mean difference's when the feature never succeeds."""
    for name in ("sae", "mean"):
        cells = [g for g in grid if g.direction == name and g.coefficient != 0]
        if cells:
            top = max(cells, key=lambda g: (g.success, g.meaning))
            if top.success > 0 or name == "mean":
                return top
    return None


def _heads(model: Any, tokenizer: Any, prompts: Sequence[str], lang: str, layer: int,
           norm: float, best: Any, direction: np.ndarray, ablate: int, n_layers: int,
           rng: np.random.Generator, new_tokens: int,
           say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    say(f"layer {layer}: head TV")
    c = best.coefficient

    def steer() -> Any:
        return steering(model, layer, direction, c, norm=norm)

    tv = np.mean([head_tv(model, torch.tensor([tokenizer.encode(p)]), steer)
                  for p in prompts[:8]], axis=0)
    after = [(li, h) for li in range(layer + 1, n_layers) for h in range(tv.shape[1])]
    if not after:
        return {"head_tv": tv.tolist()}
    order = sorted(after, key=lambda lh: -tv[lh])
    top = order[:ablate]
    rand = [after[i] for i in rng.choice(len(after), size=min(ablate, len(after)),
                                         replace=False)]
    out = {"head_tv": tv.tolist(), "best": best.as_dict(),
           "top_heads": [[int(a), int(b), float(tv[a, b])] for a, b in top]}
    for name, heads in (("top", top), ("random", rand)):
        say(f"layer {layer}: ablating {name} heads")
        with ablate_heads(model, heads):
            g = run_grid(model, tokenizer, prompts, lang, {best.direction: (layer, direction)}, [c],
                         norms={layer: norm}, new_tokens=new_tokens)
        out[f"ablate_{name}"] = {"heads": [list(map(int, h)) for h in heads],
                                 "success": g[0].success}
    return out

