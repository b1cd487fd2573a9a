"""The ``certattn`` command line: a thin layer over the library.

Every failure the user can cause (bad numbers, bad files, bad options) prints one line
``certattn: error: ...`` on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

__all__ = ["main"]

EXIT_USAGE = 2


class CLIError(Exception):
    """A problem to report in one line, with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _progress(total_rows: int, n: int) -> Callable[[int, int], None] | None:
    """A progress bar on stderr for long inputs on a terminal (or CERTATTN_PROGRESS=1)."""
    forced = os.environ.get("CERTATTN_PROGRESS", "") == "1"
    if total_rows * n < 20_000_000 and not forced:
        return None
    if not (sys.stderr.isatty() or forced):
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else ""
        print(f"\rcertifying [{bar}] {done}/{total} rows", end=end, file=sys.stderr, flush=True)

    return show


def _parse_eps(text: str) -> float:
    from ._validate import check_eps

    try:
        return check_eps(float(text))
    except ValueError:
        raise CLIError(f"--eps must be a number in [0, 1), got {text!r}") from None


def _cmd_certify(args: argparse.Namespace) -> int:
    from .io import load_logits, sample_logits
    from .topk import certify_topk

    eps = _parse_eps(args.eps)
    if args.file is None:
        if args.key is not None:
            raise CLIError("--key needs a FILE")
        src = sample_logits()
        logits, description, labels = src.logits, src.description, src.row_labels
    else:
        logits = load_logits(args.file, args.key)
        description, labels = f"file {args.file}" + (f" [{args.key}]" if args.key else ""), None
    if logits.ndim == 0:
        raise CLIError(f"{description}: a scalar has no key axis")
    n = int(logits.shape[-1]) if logits.ndim else 0
    rows = math.prod(logits.shape[:-1])
    cert = certify_topk(
        logits, eps, masked_rows=args.masked_rows, progress=_progress(rows, max(n, 1))
    )
    k = np.asarray(cert.k)
    tail = np.asarray(cert.tail_upper)
    kl = np.asarray(cert.kl_upper)
    if args.out is not None:
        out = Path(args.out)
        try:
            np.savez(
                out, k=k, tail_upper=tail, kl_upper=kl, n_valid=np.asarray(cert.n_valid),
                masked=np.asarray(cert.masked), eps=np.float64(eps), n=np.int64(n),
            )
        except OSError as exc:
            raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from None
    if args.json:
        doc = {
            "source": description,
            "batch_shape": list(k.shape),
            "n": n,
            "eps": eps,
            "k": k.ravel().tolist(),
            "tail_upper": tail.ravel().tolist(),
            "kl_upper": kl.ravel().tolist(),
            "n_valid": np.asarray(cert.n_valid).ravel().tolist(),
            "masked": np.asarray(cert.masked).ravel().tolist(),
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
        return 0
    _print_table(description, cert, eps, labels)
    return 0


def _summary_row(label: str, k: np.ndarray, nv: np.ndarray, tail: np.ndarray) -> str:
    if k.size == 0:
        return f"| {label} | 0 | - | - | - | - | - |"
    ratio = k / nv
    return (
        f"| {label} | {k.size} | {nv.mean():.1f} | {k.mean():.2f} | {ratio.mean():.3f} "
        f"| {(nv.sum() / k.sum()):.2f}x | {tail.max():.3g} |"
    )


def _print_table(description: str, cert: Any, eps: float, labels: np.ndarray | None) -> None:
    k = np.asarray(cert.k).ravel()
    nv = np.asarray(cert.n_valid).ravel()
    tail = np.asarray(cert.tail_upper).ravel()
    keep = ~np.asarray(cert.masked).ravel()
    print(f"certattn certify: {description}")
    print(f"eps = {eps:g} (TV budget; KL(P_hat||P) <= {-math.log1p(-eps):.4g}), key axis n = "
          f"{cert.n}; k is the certified minimal Top-k per row (sound in exact arithmetic)")
    if (~keep).any():
        print(f"{int((~keep).sum())} fully masked rows skipped")
    print()
    print("| rows | count | mean n | mean k | mean k/n | reduction n/k | max tail mass |")
    print("|---|---|---|---|---|---|---|")
    if labels is not None:
        lab = np.asarray(labels).ravel()
        for value in np.unique(lab):
            sel = keep & (lab == value)
            print(_summary_row(f"layer {value}", k[sel], nv[sel], tail[sel]))
    print(_summary_row("all", k[keep], nv[keep], tail[keep]))


def _cmd_verify(args: argparse.Namespace) -> int:
    from .theorems import THEOREMS
    from .verify import format_table, run_verify, to_json

    known = {t.id for t in THEOREMS}
    unknown = [i for i in args.only or () if i not in known]
    if unknown:
        raise CLIError(f"unknown theorem id {', '.join(unknown)} (see docs/theorems.md)")
    if args.rows is not None and args.rows < 1:
        raise CLIError(f"--rows must be at least 1, got {args.rows}")
    if args.backend == "cupy":
        try:
            import cupy  # noqa: F401
        except Exception as exc:  # ImportError, or a CUDA error at import time
            raise CLIError(f"--backend cupy needs CuPy and a CUDA GPU ({exc})") from None
    results = run_verify(args.rows, backend=args.backend, seed=args.seed, ids=args.only)
    if args.json:
        json.dump(to_json(results), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(results))
    return 0 if all(r.passed for r in results) else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.what == "gaussian":
        from .plots.gaussian import save_gaussian_figures

        paths = save_gaussian_figures(out, quick=args.quick)
    else:  # pragma: no cover - argparse restricts choices
        raise CLIError(f"unknown plot {args.what!r}")
    for p in paths:
        print(p)
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from .budget import budget_for_model

    eps = _parse_eps(args.eps)
    text = args.text
    if args.text_file is not None:
        if text is not None:
            raise CLIError("give --text or --text-file, not both")
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"cannot read {args.text_file}: {exc}") from None
    try:
        coverage = float(args.coverage)
    except ValueError:
        raise CLIError(f"--coverage must be a number in (0, 1], got {args.coverage!r}") from None
    from .budget import progress_bar

    bar = progress_bar("certifying layers", enabled=not args.quiet)
    try:
        table = budget_for_model(
            args.model, text, tokens=args.tokens, eps=eps, coverage=coverage, progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.out is not None:
        try:
            table.write_json(args.out)
        except OSError as exc:
            raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(table.to_json() if args.json else table.to_markdown())
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in ("minilm", "smollm2")]
    if unknown or not models:
        raise CLIError(f"--models takes minilm and/or smollm2, got {args.models!r}")
    if args.tokens < 16:
        raise CLIError(f"--tokens must be at least 16, got {args.tokens}")
    summary = reproduce(args.out, models=models, smollm2_tokens=args.tokens, quick=args.quick)
    print(summary.short_report())
    return 0


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="certattn",
        description="Certified Top-k sparse attention: sound per-query budgets.",
    )
    parser.add_argument("--version", action="version", version=f"certattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser(
        "certify",
        help="certified minimal Top-k per row of a logits array",
        description="Certified minimal Top-k per row: the smallest k whose discarded softmax "
        "mass (= TV distance) is at most eps, sound for the exact softmax. "
        "Without FILE, runs on the built-in sample of real attention.",
    )
    c.add_argument("file", nargs="?", help=".npy, .npz or .safetensors; last axis = keys, "
                   "-inf = masked key")
    c.add_argument("--eps", default="0.01", help="TV budget in [0, 1) (default 0.01)")
    c.add_argument("--key", help="array name inside an .npz or .safetensors file")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument("--out", help="also write k, tail_upper, kl_upper, ... to this .npz")
    c.add_argument("--masked-rows", choices=["error", "skip"], default="error",
                   help="fully masked rows: fail (default) or give them k = 0")
    c.set_defaults(func=_cmd_certify)

    b = sub.add_parser(
        "budget",
        help="per-layer, per-head Top-k budget table of a model's attention",
        description="Certify every query of a model's attention and summarise per layer and "
        "head: quantiles of k and k/n, and the fixed k covering a fraction of the queries "
        "(a statistical budget for serving, not a per-query certificate).",
    )
    b.add_argument("--model", default="minilm-sample", metavar="NAME_OR_PATH",
                   help="minilm-sample (shipped, default), minilm or smollm2 (need the model "
                   "packages, see README), a Llama-family .gguf file (llama, mistral, qwen2) "
                   "or a Hugging Face folder (BERT or Llama: config.json, model.safetensors, "
                   "tokenizer.json)")
    b.add_argument("--text", help="text to run the model on (default: built-in prose)")
    b.add_argument("--text-file", help="read the text from this file")
    b.add_argument("--tokens", type=int, metavar="N",
                   help="context length: a given text is cut to N tokens (error if shorter); "
                   "the built-in prose is cut, or repeated to reach N; at most the model's "
                   "context (MiniLM: 512 positions)")
    b.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    b.add_argument("--eps", default="0.01", help="TV budget in [0, 1) (default 0.01)")
    b.add_argument("--coverage", default="0.9", help="fraction of queries the fixed k covers")
    b.add_argument("--json", action="store_true", help="print JSON for an inference engine")
    b.add_argument("--out", help="also write the JSON to this file")
    b.set_defaults(func=_cmd_budget)

    r = sub.add_parser(
        "reproduce",
        help="reproduce the paper's experiments on real attention (figures + summary)",
    )
    r.add_argument("--out", default="reproduce", help="output folder (default ./reproduce)")
    r.add_argument("--models", default="minilm,smollm2", help="comma list: minilm,smollm2")
    r.add_argument("--tokens", type=int, default=1024, help="SmolLM2 context (default 1024)")
    r.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    r.set_defaults(func=_cmd_reproduce)

    v = sub.add_parser(
        "verify",
        help="check every registered theorem numerically on large random batches",
        description="For every theorem of the registry (docs/theorems.md), draw large batches "
        "of instances (ties, masks, extreme ranges, float16 included) and report the largest "
        "violation against its tolerance. Exit status 1 if any check fails.",
    )
    v.add_argument("--rows", type=int, help="rows per row-based check (default: about a minute "
                   "in all; other checks scale proportionally)")
    v.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "strict"],
                   help="array library to run on (cupy: on the GPU)")
    v.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    v.add_argument("--json", action="store_true", help="print a JSON list of results")
    v.add_argument("--only", nargs="+", metavar="ID", help="check only these theorem ids")
    v.set_defaults(func=_cmd_verify)

    p = sub.add_parser("plot", help="save the theory's figures as PNG files")
    p.add_argument("what", choices=["gaussian"], help="which family of figures")
    p.add_argument("--out", default="figures", help="output folder (default ./figures)")
    p.add_argument("--quick", action="store_true", help="fewer Monte Carlo rows")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certattn`` console script."""
    try:
        parser = _build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args))
    except (CLIError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"certattn: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        print(f"certattn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("certattn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
