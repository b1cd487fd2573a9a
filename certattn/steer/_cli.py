"""``certattn steer``: steer a causal LM's output language and measure it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["format_table", "run_steer", "write_outputs"]


def _read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    prompts = [s.strip() for s in lines if s.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts (one per line)")
    return prompts


def run_steer(model_name: str, lang: str, layers: list[int], coefficients: list[float], *,
              prompts_file: str | None, new_tokens: int, corpus_root: str | None,
              ranking: str = "zscore", mode: str = "add",
              progress: Any = None) -> dict[str, Any]:
    from ..hf import load
    from .corpus import DEFAULT_ROOT, LANGS, corpus
    from .study import language_study

    if lang not in LANGS or lang == "en":
        raise InputError(f"--lang must be one of {', '.join(x for x in LANGS if x != 'en')}")
    texts = corpus(("en", lang), root=corpus_root or DEFAULT_ROOT)
    prompts = _read_prompts(prompts_file) if prompts_file is not None else None
    model, tok = load(model_name)
    return language_study(model, tok, lang, layers, coefficients, prompts=prompts,
                          texts=texts, new_tokens=new_tokens, ranking=ranking, mode=mode,
                          progress=progress)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"steering English -> {result['lang']} ({result['prompts']} prompts, "
             f"{result['new_tokens']} new tokens)",
             f"{'layer':>5} {'direction':9} {'coef':>5} {'success':>7} {'meaning':>7} "
             f"{'nll':>6}"]
    for layer, entry in result["layers"].items():
        for g in entry["grid"]:
            lines.append(f"{layer:>5} {g['direction']:9} {g['coefficient']:>5g} "
                         f"{g['success']:>7.2f} {g['meaning']:>7.2f} {g['fluency_nll']:>6.2f}")
    for name, h in result.get("heads", {}).items():
        if "ablate_top" in h:
            heads = ", ".join(f"{a}.{b} ({tv:.3f})" for a, b, tv in h["top_heads"])
            lines.append(f"{name} layer {h['layer']} c={h['best']['coefficient']:g}: top-TV heads "
                         f"{heads}; success {_rate(h['ablate_none'])} with all heads, "
                         f"{_rate(h['ablate_top'])} without them, "
                         f"{_rate(h['ablate_random'])} without random ones")
    return "\n".join(lines)


def _rate(cell: dict[str, Any]) -> str:
    lo, hi = cell["interval"]
    return f"{cell['hits']}/{cell['n']} [{lo:.2f}, {hi:.2f}]"


def write_outputs(result: dict[str, Any], out: str) -> list[Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "steer.json"]
    paths[0].write_text(json.dumps(result, indent=1), encoding="utf-8")
    try:
        from ..plots.steer import plot_head_tv, plot_tradeoff
    except ImportError:  # matplotlib is optional
        return paths
    paths.append(folder / "steer-tradeoff.png")
    plot_tradeoff(result).savefig(paths[-1], dpi=120)
    for name, h in result.get("heads", {}).items():
        paths.append(folder / f"steer-heads-{name}-layer{h['layer']}.png")
        plot_head_tv(h["head_tv"], layer=int(h["layer"]),
                     lang=result["lang"]).savefig(paths[-1], dpi=120)
    return paths
