"""``certattn evaluate``: the dense-versus-sparse table of a Hugging Face model.

Policy specs (comma separated): ``topk:EPS``, ``topp:P``, ``fixed:K``, ``window:N``
(the last ``N - 4`` visible keys and 4 sinks), ``window:auto`` (window + 4 sinks whose
width, per layer, keeps as many keys in total as the first Top-k policy's certified
budgets on the dense model) and ``cal:FILE`` (the policy of a ``certattn calibrate``
JSON file, refused for another model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._validate import InputError
from ..policies import FixedK, TopK, TopP, WindowSinks
from ._attention import Recorder, observe
from ._calibrate import Calibration
from ._evaluate import evaluate, load

__all__ = ["DEFAULT_POLICIES", "format_table", "matched_window", "parse_policies",
           "run_evaluate"]

DEFAULT_POLICIES = "topk:0.01,topk:0.001,window:auto"
SINKS = 4


def _number(spec: str, value: str, cast: Any) -> Any:
    try:
        return cast(value)
    except ValueError:
        raise InputError(f"policy {spec!r}: {value!r} is not a number") from None


def parse_policies(text: str) -> list[tuple[str, Any]]:
    """``[(name, policy or "window:auto"), ...]`` from a comma list of specs."""
    out: list[tuple[str, Any]] = []
    for spec in (s.strip() for s in text.split(",")):
        kind, _, arg = spec.partition(":")
        if kind == "topk" and arg:
            pol: Any = TopK(_number(spec, arg, float))
        elif kind == "topp" and arg:
            pol = TopP(_number(spec, arg, float))
        elif kind == "fixed" and arg:
            pol = FixedK(_number(spec, arg, int))
        elif kind == "cal" and arg:
            pol = Calibration.load(arg)  # checked against the model once it is loaded
        elif kind == "window" and arg == "auto":
            pol = "window:auto"
        elif kind == "window" and arg:
            n = _number(spec, arg, int)
            pol = WindowSinks(window=max(n - SINKS, 0), sinks=min(SINKS, n))
        else:
            raise InputError(f"unknown policy {spec!r}: give topk:EPS, topp:P, fixed:K, "
                             "window:N, window:auto or cal:FILE")
        out.append((spec, pol))
    if any(p == "window:auto" for _, p in out) and not any(isinstance(p, TopK) for _, p in out):
        raise InputError("window:auto matches the kept keys of a topk policy: give one")
    return out


def matched_window(rec: Recorder, eps: float, sinks: int = SINKS) -> dict[int, WindowSinks]:
    """Per layer, the narrowest window + ``sinks`` keeping at least Top-k's kept keys.

    With ``T = window + sinks`` a row with ``m`` visible keys keeps ``min(m, T)``; the
    smallest ``T`` whose total over the layer's rows reaches the total certified ``k`` at
    ``eps`` (from an :func:`observe` record) is chosen.
    """
    out = {}
    for layer in rec.layers():
        calls = [c for c in rec.calls if c.layer == layer]
        nv = np.concatenate([c.n_valid[~c.masked].ravel() for c in calls])
        target = sum(int(c.k[eps].sum()) for c in calls)
        lo, hi = 1, int(nv.max())
        while lo < hi:  # smallest T with sum(min(nv, T)) >= target
            mid = (lo + hi) // 2
            if int(np.minimum(nv, mid).sum()) >= target:
                hi = mid
            else:
                lo = mid + 1
        s = min(sinks, lo)
        out[layer] = WindowSinks(window=lo - s, sinks=s)
    return out


def run_evaluate(model_name: str, text: str, tokens: int | None,
                 policies: str) -> dict[str, Any]:
    """Load, tokenize, evaluate: ``{"model", "tokens", "rows"}``."""
    specs = parse_policies(policies)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the command prints its table, not the loaders' chatter
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own progress bar
    model, tok = load(model_name)
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise InputError(f"{model_name}: evaluate needs a causal language model "
                         "(next-token logits)")
    ids = tok.encode(text)
    if tokens is not None:
        if len(ids) < tokens:
            raise InputError(f"the text has {len(ids)} tokens, fewer than --tokens {tokens}")
        ids = ids[:tokens]
    if len(ids) < 2:
        raise InputError("the text must have at least 2 tokens")
    table = {k: v.for_model(model) if isinstance(v, Calibration) else v for k, v in specs}
    if "window:auto" in table.values():
        eps = next(p.eps for p in table.values() if isinstance(p, TopK))
        import torch

        with observe(model, eps=eps) as rec, torch.no_grad():
            model(input_ids=torch.tensor([ids], device=model.device))
        table = {k: matched_window(rec, eps) if v == "window:auto" else v
                 for k, v in table.items()}
    return {"model": model_name, "tokens": len(ids), "rows": evaluate(model, ids, table)}


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    head = ("| policy | kept | KL mean | KL p99 | KL max | top-1 same | ppl | time ratio |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [f"{result['model']}, {result['tokens']} tokens "
             "(KL = KL(dense || sparse) of the next-token distribution, nats)", "", head]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['kept_fraction']:.3f} | {r['kl_mean']:.2e} | "
            f"{r['kl_p99']:.2e} | {r['kl_max']:.2e} | {r['top1']:.3f} | {r['ppl']:.3f} | "
            f"{r['time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], out: str) -> Path:
    """Write ``evaluate.json`` into the folder ``out`` (created)."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "evaluate.json"
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return path
