"""The whole experiment for one target language: SAE, feature, grid, heads, ablation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..hf._calibrate import fingerprint
from .corpus import corpus
from .experiment import meaning_reference, minilm_embedder, run_grid, wilson
from .heads import ablate_heads, head_tv
from .sae import TopKSAE, train_sae
from .steering import (
    collect_layers,
    decoder_layers,
    feature_steering,
    mean_difference,
    rank_features,
)

__all__ = ["best_setting", "language_study"]

MEANING_FLOOR = 0.3


def language_study(model: Any, tokenizer: Any, lang: str, layers: Sequence[int],
                   coefficients: Sequence[float], *, prompts: Sequence[str] | None = None,
                   texts: dict[str, list[str]] | None = None, n_prompts: int = 20,
                   prompt_tokens: int = 24, new_tokens: int = 30, train_tokens: int = 20_000,
                   width: int = 2048, k: int = 32, steps: int = 600, seed: int = 0,
                   ranking: str = "zscore", mode: str = "add",
                   saes: Mapping[int, TopKSAE] | None = None,
                   residuals: dict[tuple[str, int], np.ndarray] | None = None, ablate: int = 3,
                   ablation_prompts: int = 60, heads_meaning_floor: float = 0.0,
                   meaning: bool = True,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Steer ``model`` from English towards ``lang`` at each layer; measure everything.

    Per layer: residuals of English and ``lang`` paragraphs (the first two thirds of the
    aligned corpus), a TopK SAE trained on them (or ``saes[layer]``), the feature ranked
    first by ``ranking`` (see :func:`rank_features`), and three directions: that feature
    (``sae``, added or clamped by ``mode``), the normalised mean difference (``mean``) and
    a random feature from the lower three quarters of the ranking (``random``); each run
    over ``coefficients`` on English prompts (the last third, or ``prompts``).  For the
    best setting of ``sae`` and of ``mean`` over all layers (:func:`best_setting` with
    ``heads_meaning_floor``; 0 by default: the most successful setting, where an
    ablation can show a drop), in
    ``result["heads"][direction]``: the head TV table, and the success on
    ``ablation_prompts`` prompts with no head, the ``ablate`` highest-TV heads after the
    layer, or as many random heads after it removed (hits, count and a 95% Wilson
    interval each).
    """
    say = progress or (lambda s: None)
    if lang == "en":
        raise InputError("the target language must differ from English")
    texts = texts if texts is not None else corpus(("en", lang))
    n = len(texts["en"])
    if n < 6:
        raise InputError(f"only {n} aligned paragraphs for en/{lang}: too few")
    cut = 2 * n // 3
    held = [tokenizer.decode(tokenizer.encode(t)[:prompt_tokens]) for t in texts["en"][cut:]]
    if prompts is None:
        prompts = held[:n_prompts]
        abl_prompts = held[:max(ablation_prompts, 1)]
    else:
        abl_prompts = list(prompts)
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"lang": lang, "model": fingerprint(model), "layers": {},
                              "prompts": len(prompts), "new_tokens": new_tokens,
                              "ranking": ranking, "mode": mode,
                              "sae": {"width": width, "k": k, "steps": steps,
                                      "train_tokens": train_tokens}}
    embed = minilm_embedder() if meaning else None
    if embed is not None:
        result["meaning_reference"] = meaning_reference(
            embed, texts["en"][cut:cut + 40], texts[lang][cut:cut + 40])
    cache = residuals if residuals is not None else {}
    n_layers = len(decoder_layers(model))
    runs: dict[int, tuple[float, dict[str, Any], list[Any]]] = {}
    for layer in layers:
        say(f"layer {layer}: residuals")
        en, tg = (_residuals(model, tokenizer, texts[x][:cut], x, layers, train_tokens // 2,
                             cache)[layer] for x in ("en", lang))
        norm = float(np.linalg.norm(en, axis=1).mean())
        if saes is not None and layer in saes:
            sae, history = saes[layer], [saes[layer].unexplained(_tensor(en, tg))]
        else:
            say(f"layer {layer}: training the SAE")
            sae, history = train_sae(np.concatenate([en, tg]), width, k, steps=steps,
                                     seed=seed,
                                     meta={"model": fingerprint(model), "layer": layer})
        ranked = rank_features(sae, tg, en, by=ranking)
        feature = int(ranked[0])
        random_feature = int(rng.choice(ranked[sae.width // 4:]))  # not language-leaning

        def sae_steer(c: float, nm: float, layer: int = layer, sae: Any = sae,
                      feature: int = feature) -> Any:
            return feature_steering(model, layer, sae, feature, c, norm=nm, mode=mode)

        directions = {"sae": (layer, sae_steer), "mean": (layer, mean_difference(tg, en)),
                      "random": (layer, sae.direction(random_feature).numpy())}
        grid = run_grid(model, tokenizer, prompts, lang, directions, coefficients,
                        norms={layer: norm}, new_tokens=new_tokens, embed=embed,
                        progress=lambda s, layer=layer: say(f"layer {layer}: {s}"))
        result["layers"][str(layer)] = {
            "feature": feature, "random_feature": random_feature, "residual_norm": norm,
            "sae_unexplained": history, "grid": [g.as_dict() for g in grid],
        }
        runs[layer] = (norm, directions, grid)
    result["heads"] = {}
    for name in ("sae", "mean"):
        found = [(best, layer) for layer, (_, _, grid) in runs.items()
                 if (best := best_setting(grid, name,
                                          meaning_floor=heads_meaning_floor)) is not None]
        if not found or ablate <= 0:
            continue
        best = best_setting([b for b, _ in found], name, meaning_floor=heads_meaning_floor)
        layer = next(la for b, la in found if b is best)
        norm, directions, _ = runs[layer]
        say(f"heads of {name} at layer {layer}, c={best.coefficient:g}")
        result["heads"][name] = _heads(model, tokenizer, prompts, abl_prompts, lang, layer,
                                       norm, best, directions[name][1], ablate, n_layers,
                                       rng, new_tokens, embed)
    return result


def _residuals(model: Any, tokenizer: Any, texts: Sequence[str], lang: str,
               layers: Sequence[int], max_tokens: int,
               cache: dict[tuple[str, int], np.ndarray]) -> dict[int, np.ndarray]:
    missing = [layer for layer in layers if (lang, layer) not in cache]
    if missing:
        got = collect_layers(model, tokenizer, texts, missing, max_tokens=max_tokens)
        cache.update({(lang, layer): a for layer, a in got.items()})
    return {layer: cache[(lang, layer)] for layer in layers}


def _tensor(*arrays: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.concatenate(arrays).astype(np.float32))


def best_setting(grid: Sequence[Any], direction: str, *,
                 meaning_floor: float = MEANING_FLOOR) -> Any:
    """The most successful nonzero coefficient of ``direction`` among the cells whose
    meaning proxy is at least ``meaning_floor`` (the issue's goal), or of all its cells
    when none is; ties go to the better meaning.  ``None`` when nothing ever succeeds."""
    cells = [g for g in grid if g.direction == direction and g.coefficient != 0]
    if not cells:
        return None
    top = max(cells, key=lambda g: (g.meaning >= meaning_floor, g.success, g.meaning))
    if top.success == 0:
        top = max(cells, key=lambda g: (g.success, g.meaning))
    return top if top.success > 0 else None


def _heads(model: Any, tokenizer: Any, prompts: Sequence[str], abl_prompts: Sequence[str],
           lang: str, layer: int, norm: float, best: Any, direction: Any, ablate: int,
           n_layers: int, rng: np.random.Generator, new_tokens: int,
           embed: Any) -> dict[str, Any]:
    import torch

    from .experiment import _steer

    c = best.coefficient

    def steer() -> Any:
        return _steer(model, layer, direction, c, norm)

    tv = np.mean([head_tv(model, torch.tensor([tokenizer.encode(p)]), steer)
                  for p in prompts[:8]], axis=0)
    out: dict[str, Any] = {"layer": layer, "best": best.as_dict(), "head_tv": tv.tolist()}
    after = [(li, h) for li in range(layer + 1, n_layers) for h in range(tv.shape[1])]
    if not after:
        return out
    top = sorted(after, key=lambda lh: -tv[lh])[:ablate]
    rand = [after[i] for i in rng.choice(len(after), size=min(ablate, len(after)),
                                         replace=False)]
    out["top_heads"] = [[int(a), int(b), float(tv[a, b])] for a, b in top]
    for name, heads in (("none", []), ("top", top), ("random", rand)):
        with ablate_heads(model, heads):
            g = run_grid(model, tokenizer, abl_prompts, lang, {"x": (layer, direction)}, [c],
                         norms={layer: norm}, new_tokens=new_tokens, fluency=False,
                         embed=embed if not heads else None)
        hits = round(g[0].success * len(abl_prompts))
        out[f"ablate_{name}"] = {"heads": [list(map(int, h)) for h in heads],
                                 "success": g[0].success, "hits": hits,
                                 "n": len(abl_prompts), "meaning": g[0].meaning,
                                 "interval": list(wilson(hits, len(abl_prompts)))}
    return out
