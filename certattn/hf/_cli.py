"""``certattn evaluate``: the dense-versus-sparse table of a Hugging Face model.

Policy specs (comma separated) are read through one table, :data:`SPECS` (family ->
:class:`Spec`): the part before the colon names the family, the part after is the
family's argument.

=====================  =============================================================="""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._validate import InputError
from ..approx.delta import delta_rows
from ..policies import FixedK, Pages, TopK, TopP, WindowSinks
from ._attention import Recorder, observe
from ._calibrate import Calibration
from ._delta import DeltaCorrection
from ._evaluate import evaluate, load_causal

__all__ = ["DEFAULT_POLICIES", "SPECS", "Matched", "Spec", "format_table", "matched_delta",
           "matched_quest", "matched_window", "parse_policies", "run_evaluate",
           "write_outputs"]

DEFAULT_POLICIES = "topk:0.01,topk:0.001,window:auto"
SINKS = 4
PAGE_SIZE = 16
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Matched:
    """A policy built per layer to keep as many keys as the first Top-k policy.

    ``build(record, eps)`` returns what :func:`certattn.hf.evaluate` takes (a mapping layer
    -> policy, or a :class:`~certattn.hf.DeltaCorrection`) from an :func:`observe` record of
    the dense model at that Top-k's ``eps``.
    """

    build: Callable[[Recorder, float], Any]


@dataclass(frozen=True)
class Spec:
    """One family of policy specs: how it is written and how it is built.

    ``build(spec, arg)`` gets the whole spec (for messages) and the text after the colon
    (``""`` when none) and returns a policy, a mapping layer -> policy or a :class:`Matched`.
    """

    usage: str
    build: Callable[[str, str], Any]


def _number(spec: str, value: str, cast: Any) -> Any:
    if not value:
        raise InputError(f"policy {spec!r} needs a value after the colon")
    try:
        return cast(value)
    except ValueError:
        raise InputError(f"policy {spec!r}: {value!r} is not a number") from None


def _window(spec: str, arg: str) -> Any:
    if arg == "auto":
        return Matched(matched_window)
    n = _number(spec, arg, int)
    return WindowSinks(window=max(n - SINKS, 0), sinks=min(SINKS, max(n, 0)))


def _quest(spec: str, arg: str) -> Any:
    if arg == "auto":
        return Matched(matched_quest)
    return Pages(budget=_number(spec, arg, int), page_size=PAGE_SIZE)


def _delta(spec: str, arg: str) -> Any:
    if arg:
        raise InputError(f"policy {spec!r}: delta takes no value (give delta)")
    return Matched(matched_delta)


def _calibration(spec: str, arg: str) -> Any:
    if not arg:
        raise InputError(f"policy {spec!r} needs a calibration file after the colon")
    return Calibration.load(arg)  # checked against the model once it is loaded


SPECS: dict[str, Spec] = {
    "topk": Spec("topk:EPS", lambda spec, arg: TopK(_number(spec, arg, float))),
    "topp": Spec("topp:P", lambda spec, arg: TopP(_number(spec, arg, float))),
    "fixed": Spec("fixed:K", lambda spec, arg: FixedK(_number(spec, arg, int))),
    "window": Spec("window:N|auto", _window),
    "quest": Spec("quest:N|auto", _quest),
    "delta": Spec("delta", _delta),
    "cal": Spec("cal:FILE", _calibration),
}
"""Policy family -> :class:`Spec` (module docstring); one entry adds a family."""


def family(spec: str) -> str:
    """The family of a spec: the text before its colon."""
    return spec.partition(":")[0].strip()


def parse_policies(text: str) -> list[tuple[str, Any]]:
    """``[(spec, policy or Matched), ...]`` from a comma list of specs (:data:`SPECS`)."""
    out: list[tuple[str, Any]] = []
    for spec in (s.strip() for s in text.split(",")):
        kind, _, arg = spec.partition(":")
        entry = SPECS.get(kind.strip())
        if entry is None:
            raise InputError(f"unknown policy {spec!r}: give "
                             f"{', '.join(s.usage for s in SPECS.values())}")
        out.append((spec, entry.build(spec, arg.strip())))
    if len({s for s, _ in out}) < len(out):
        raise InputError(f"a policy is given twice in {text!r}")
    matched = [s for s, p in out if isinstance(p, Matched)]
    if matched and not any(isinstance(p, TopK) for _, p in out):
        raise InputError(f"{matched[0]} matches the kept keys of a topk policy: give one "
                         "(e.g. topk:0.01)")
    return out


# --------------------------------------------------------------------------
# Matching Top-k's kept keys
# --------------------------------------------------------------------------


def _layer_calls(rec: Recorder, layer: int, eps: float) -> tuple[list[np.ndarray], int]:
    """The layer's visible-key counts per call ((B, H, Lq), 0 on masked rows) and the
    total certified ``k`` at ``eps``."""
    calls = [c for c in rec.calls if c.layer == layer]
    nvs = [np.where(c.masked, 0, c.n_valid).astype(np.int64) for c in calls]
    return nvs, sum(int(c.k[eps].sum()) for c in calls)


def _smallest_width(nv: np.ndarray, target: int, fixed: int = 0, step: int = 1) -> int:
    """Smallest ``T = step * j`` (``j >= 1``) with ``fixed + sum(min(nv, T)) >= target``.

    When no ``T`` reaches ``target`` the smallest ``T`` covering every row is returned
    (a larger one keeps no more).
    """
    lo, hi = 1, max(1, -(-int(nv.max(initial=0)) // step))
    while lo < hi:
        mid = (lo + hi) // 2
        if fixed + int(np.minimum(nv, mid * step).sum()) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo * step


def _window_sinks(width: int, sinks: int = SINKS) -> WindowSinks:
    s = min(sinks, width)
    return WindowSinks(window=width - s, sinks=s)


def matched_window(rec: Recorder, eps: float, sinks: int = SINKS) -> dict[int, WindowSinks]:
    """Per layer, the narrowest window + ``sinks`` keeping at least Top-k's kept keys.

    With ``T = window + sinks`` a row with ``m`` visible keys keeps ``min(m, T)``; the
    smallest ``T`` whose total over the layer's rows reaches the total certified ``k`` at
    ``eps`` (from an :func:`observe` record) is chosen.
    """
    out = {}
    for layer in rec.layers():
        nvs, target = _layer_calls(rec, layer, eps)
        nv = np.concatenate([a.ravel() for a in nvs])
        out[layer] = _window_sinks(_smallest_width(nv, target), sinks)
    return out


def matched_quest(rec: Recorder, eps: float, page_size: int = PAGE_SIZE) -> dict[int, Pages]:
    """Per layer, the smallest Quest budget (whole pages) keeping up to Top-k's kept keys.

    A row with ``m`` visible keys keeps at most ``min(m, T)`` keys with a budget of ``T``
    keys (``T / page_size`` pages; fewer when a chosen page is partly masked, as the last
    page of a causal row is); the smallest ``T`` whose total of these counts reaches the
    total certified ``k`` at ``eps`` is chosen.  The kept fraction measured under the
    policy is what :func:`evaluate` reports.
    """
    out = {}
    for layer in rec.layers():
        nvs, target = _layer_calls(rec, layer, eps)
        nv = np.concatenate([a.ravel() for a in nvs])
        out[layer] = Pages(budget=_smallest_width(nv, target, step=page_size),
                           page_size=page_size)
    return out


def matched_delta(rec: Recorder, eps: float, gamma: int = 64, min_tail: int = 128,
                  sinks: int = SINKS) -> DeltaCorrection:
    """Delta over a window + ``sinks`` base whose total cost matches Top-k's kept keys.

    Per layer and call of ``Lq`` query rows (:func:`certattn.approx.delta.delta_rows`),
    Delta's cost is the base's ``min(m, T)`` on each row below ``s_p`` plus every visible
    key of each dense row (anchors and rows from ``s_p`` on); the smallest ``T`` whose
    total reaches the total certified ``k`` at ``eps`` is chosen (``T = 1`` when the dense
    rows alone exceed it: Delta then costs more than Top-k, and the measured kept
    fraction says so).
    """
    base = {}
    for layer in rec.layers():
        nvs, target = _layer_calls(rec, layer, eps)
        fixed, parts = 0, []
        for nv in nvs:
            s_p, _, dense = delta_rows(int(nv.shape[-1]), gamma, min_tail)
            fixed += int(nv[..., dense].sum())
            parts.append(nv[..., :s_p].ravel())
        base[layer] = _window_sinks(_smallest_width(np.concatenate(parts), target, fixed),
                                    sinks)
    return DeltaCorrection(base=base, gamma=gamma, min_tail=min_tail)


def _resolve(model: Any, ids: list[int], specs: list[tuple[str, Any]],
             progress: Progress | None) -> dict[str, Any]:
    """Every :class:`Matched` spec built from one :func:`observe` run of the dense model."""
    table = {k: v.for_model(model) if isinstance(v, Calibration) else v for k, v in specs}
    if not any(isinstance(p, Matched) for p in table.values()):
        return table
    import torch

    eps = next(p.eps for p in table.values() if isinstance(p, TopK))
    with observe(model, eps=eps) as rec, torch.no_grad():
        model(input_ids=torch.tensor([ids], device=model.device))
    if progress is not None:
        progress(1, 1)
    return {k: v.build(rec, eps) if isinstance(v, Matched) else v for k, v in table.items()}


def run_evaluate(model_name: str, text: str, tokens: int | None, policies: str,
                 progress: Callable[[str, int], Progress | None] | None = None
                 ) -> dict[str, Any]:
    """Load, tokenize, evaluate: ``{"model", "tokens", "rows"}``.

    Each row of :func:`certattn.hf.evaluate` gains ``family`` (its spec's family;
    ``"dense"`` for the dense row).  ``progress(label, total)``, when given, returns a
    ``(done, total)`` callback for each stage (or None).
    """
    specs = parse_policies(policies)
    model, _, ids = load_causal(model_name, text, tokens)
    stage = progress or (lambda label, total: None)
    table = _resolve(model, ids, specs, stage("matching top-k", 1))
    rows = evaluate(model, ids, table, progress=stage("evaluate", 1 + len(table)))
    for r in rows:
        r["family"] = "dense" if r["name"] == "dense" else family(r["name"])
    return {"model": model_name, "tokens": len(ids), "rows": rows}


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


def write_outputs(result: dict[str, Any], out: str) -> list[Path]:
    """Write ``evaluate.json`` and, with matplotlib, ``evaluate.png`` into ``out`` (created).

    The figure (:func:`certattn.plots.evaluate.plot_evaluate`): KL mean and top-1 agreement
    against the kept fraction, one curve per policy family.
    """
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "evaluate.json"
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        paths = [path]
        try:
            from ..plots.evaluate import plot_evaluate
        except ImportError:  # matplotlib absent: the JSON alone
            return paths
        fig = plot_evaluate(result["rows"],
                            title=f"{result['model']}, {result['tokens']} tokens")
        fig.savefig(folder / "evaluate.png", dpi=110)
        paths.append(folder / "evaluate.png")
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return paths

