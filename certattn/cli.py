"""The ``certattn`` command line: a thin layer over the library.

Every failure the user can cause (bad numbers, bad files, bad options, an output that
cannot be written) prints one line ``certattn: error: ...`` on stderr and exits with
status 2; no traceback.  A closed pipe on stdout (``certattn ... | head``) ends the
command quietly with status 1.  Ctrl-C exits with 130 and SIGTERM (during ``verify``)
with 143, ``verify`` first printing the checks that finished.  Any other exception is a
bug: it keeps its traceback (status 1).

Which errors count as the user's: :class:`~certattn.errors.InputError` (the library's
input validation, a ``ValueError``), :class:`CLIError` (this module's), and, until every
validating function raises ``InputError``, a ``ValueError`` raised by a ``raise``
statement of certattn's own code (a deliberate check, not a failure deep in NumPy).
"""

from __future__ import annotations

import argparse
import json
import linecache
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np

from ._backends import verify_backends
from .errors import InputError

__all__ = ["CLIError", "main"]

EXIT_USAGE = 2
EXIT_PIPE = 1
EXIT_INTERRUPT = 130
EXIT_TERM = 143

_PACKAGE_DIR = Path(__file__).resolve().parent


class CLIError(InputError):
    """A problem to report in one line, with exit status 2."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Terminated(BaseException):
    """SIGTERM arrived (``verify`` turns it into a partial report and status 143)."""


class _StdoutError(Exception):
    """Writing to stdout failed (full disk, closed stream)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise CLIError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            _write_err(message.rstrip("\n"))
        raise _Exit(status)

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if message:
            if file is None or file is sys.stdout:
                _emit(message)
            else:
                _write_err(message.rstrip("\n"))


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _emit(text: str) -> None:
    """Write all of ``text`` to stdout; a write error becomes :class:`_StdoutError`.

    Goes through the binary layer when there is one and loops over short writes: with
    ``PYTHONUNBUFFERED=1`` the text layer sits on a raw file, and a short write (a pipe
    whose reader went away) would otherwise lose the rest silently instead of failing.
    """
    out = sys.stdout
    try:
        buf = getattr(out, "buffer", None)
        if buf is None:
            out.write(text)
            return
        out.flush()
        view = memoryview(text.encode(out.encoding or "utf-8", out.errors or "strict"))
        while view:
            n = buf.write(view)
            if n is None:  # a non-blocking stdout that is full
                raise BlockingIOError(11, "stdout would block")
            view = view[n:]
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: stdout already closed
        raise _StdoutError(exc) from None


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as exc:
        raise _StdoutError(exc) from None


def _write_err(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr gone too: nothing left to tell
        pass


def _drop_stdout() -> None:
    """Point stdout at the null device, so that exit-time flushing stays quiet."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real descriptor (e.g. capsys)
        pass


def _check_out_file(text: str, option: str = "--out") -> Path:
    """The output file named by ``option``, checked before any long computation."""
    if not text:
        raise CLIError(f"{option} needs a file name, got ''")
    p = Path(text)
    if p.is_dir():
        raise CLIError(f"cannot write {p}: is a directory")
    _check_out_parent(p)
    return p


def _check_out_folder(text: str, option: str = "--out") -> Path:
    """The output folder named by ``option``: the command creates it, not its parents."""
    if not text:
        raise CLIError(f"{option} needs a folder name, got ''")
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise CLIError(f"cannot write {p}: it exists and is not a folder")
    _check_out_parent(p)
    return p


def _check_out_parent(p: Path) -> None:
    """Every ``--out`` of every command: its parent folder must exist (one line, exit 2)."""
    parent = p.parent
    if not parent.exists():
        raise CLIError(f"cannot write {p}: no such directory {parent}")
    if not parent.is_dir():
        raise CLIError(f"cannot write {p}: {parent} is not a directory")


def _write_file(p: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write exactly the file ``p`` (no suffix added); OSError becomes one line."""
    try:
        with p.open("wb") as fh:
            write(fh)
    except OSError as exc:
        raise CLIError(f"cannot write {p}: {exc.strerror or exc}") from None


@contextmanager
def _progress_bar(
    label: str, total: int, flag: bool | None, *, auto: bool = True, unit: str = "rows"
) -> Iterator[Any]:
    """A :class:`~certattn._progress.Progress` (or None when off), erased at the end."""
    from ._progress import Progress, progress_enabled

    bar = Progress(label, total, unit=unit) if auto and progress_enabled(flag) else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _parse_eps(text: str) -> float:
    try:
        eps = float(text)
    except ValueError:
        eps = math.nan
    if not 0.0 <= eps < 1.0:
        raise CLIError(f"--eps must be a number in [0, 1), got {text!r}")
    return eps + 0.0  # -0 is 0


def _number_list(text: str, option: str, cast: Callable[[str], Any]) -> list[Any]:
    """A comma list of numbers (``cast``), or one line naming ``option``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise CLIError(f"{option}: expected a comma list of numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise CLIError(f"{option}: expected a comma list of finite numbers, got {text!r}")
    return values


def _int_option(name: str, lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]``, else one clear line."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {lo:,} to {hi:,}, got {text!r}")
        return value

    return parse


def _cmd_certify(args: argparse.Namespace) -> int:
    from .io import load_logits, sample_logits
    from .topk import certify_topk

    eps = _parse_eps(args.eps)
    if args.file is not None and Path(args.file).is_dir():  # .npy shards or zarr: lazily
        return _certify_store(args, eps)
    out = _check_out_file(args.out) if args.out is not None else None
    if args.file is None:
        if args.key is not None:
            raise CLIError("--key needs a FILE")
        src = sample_logits()
        logits, description, labels = src.logits, src.description, src.row_labels
    else:
        logits = load_logits(args.file, args.key)
        description, labels = f"file {args.file}" + (f" [{args.key}]" if args.key else ""), None
    where = "built-in sample" if args.file is None else (
        str(args.file) + (f" [{args.key}]" if args.key else ""))
    if logits.ndim == 0:
        raise CLIError(f"{where}: a scalar has no key axis")
    _check_float64_range(logits, where)
    n = int(logits.shape[-1])
    rows = math.prod(logits.shape[:-1])
    big = args.progress is not None or rows * max(n, 1) >= 20_000_000
    try:
        with _progress_bar("certifying", rows, args.progress, auto=big) as bar:
            cert = certify_topk(logits, eps, masked_rows=args.masked_rows,
                                progress=None if bar is None else bar.update)
    except ValueError as exc:  # the library's input checks: say which file, and the way out
        if not (isinstance(exc, InputError) or _raised_by_certattn_check(exc)):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else "invalid logits"
        if "fully masked" in msg and args.masked_rows == "error":
            msg += " (--masked-rows skip gives such rows k = 0)"
        raise CLIError(f"{where}: {msg}") from None
    k = np.asarray(cert.k)
    tail = np.asarray(cert.tail_upper)
    kl = np.asarray(cert.kl_upper)
    if out is not None:
        arrays = {
            "k": k, "tail_upper": tail, "kl_upper": kl, "n_valid": np.asarray(cert.n_valid),
            "masked": np.asarray(cert.masked), "eps": np.float64(eps), "n": np.int64(n),
        }
        _write_file(out, lambda fh: np.savez(fh, **arrays))
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
        _emit(json.dumps(doc) + "\n")
        return 0
    _emit(_format_certify(description, cert, eps, labels))
    return 0


def _check_float64_range(logits: np.ndarray, where: str) -> None:
    """Refuse extended-precision logits beyond the float64 range.

    The certificate is computed in float64; a long double beyond it would become
    infinite there (the certificate stays sound but is no longer minimal, and NumPy warns).
    """
    if logits.dtype.kind != "f" or logits.dtype.itemsize <= 8 or logits.size == 0:
        return
    big = np.abs(logits[np.isfinite(logits)])
    if big.size and big.max() > np.finfo(np.float64).max:
        top = np.format_float_scientific(big.max(), precision=2)
        raise CLIError(f"{where}: long double logits beyond the float64 range (largest |x| "
                       f"= {top}) cannot be certified; certattn computes in float64")


def _summary_row(label: str, k: np.ndarray, nv: np.ndarray, tail: np.ndarray) -> str:
    if k.size == 0:
        return f"| {label} | 0 | - | - | - | - | - |"
    k64, nv64 = k.astype(np.float64), nv.astype(np.float64)
    ratio = k64 / nv64
    return (
        f"| {label} | {k.size} | {nv64.mean():.1f} | {k64.mean():.2f} | {ratio.mean():.3f} "
        f"| {(nv64.sum() / k64.sum()):.2f}x | {float(tail.max()):.3g} |"
    )


def _format_certify(description: str, cert: Any, eps: float, labels: np.ndarray | None) -> str:
    k = np.asarray(cert.k).ravel()
    nv = np.asarray(cert.n_valid).ravel()
    tail = np.asarray(cert.tail_upper).ravel()
    keep = ~np.asarray(cert.masked).ravel()
    lines = [
        f"certattn certify: {description}",
        f"eps = {eps:g} (TV budget; KL(P_hat||P) <= {-math.log1p(-eps):.4g}), key axis n = "
        f"{cert.n}; k is the certified minimal Top-k per row (sound in exact arithmetic)",
    ]
    if (~keep).any():
        lines.append(f"{int((~keep).sum())} fully masked rows skipped")
    lines += [
        "",
        "| rows | count | mean n | mean k | mean k/n | reduction n/k | max tail bound |",
        "|---|---|---|---|---|---|---|",
    ]
    if labels is not None:
        lab = np.asarray(labels).ravel()
        for value in np.unique(lab):
            sel = keep & (lab == value)
            lines.append(_summary_row(f"layer {value}", k[sel], nv[sel], tail[sel]))
    lines.append(_summary_row("all", k[keep], nv[keep], tail[keep]))
    return "\n".join(lines) + "\n"


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`_Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _certify_store(args: argparse.Namespace, eps: float) -> int:
    """``certify DIR``: a directory of .npy shards or a zarr store, lazily on dask."""
    from ._dask import certify_store

    out = _check_out_folder(args.out) if args.out is not None else None
    return certify_store(args.file, eps, key=args.key, out=out, as_json=args.json,
                         masked_rows=args.masked_rows, progress=args.progress)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .theorems import THEOREMS
    from .verify import format_table, iter_verify, to_json

    known = {t.id for t in THEOREMS}
    unknown = [i for i in args.only or () if i not in known]
    if unknown:
        raise CLIError(f"unknown theorem id {', '.join(unknown)} (see docs/theorems.md)")
    if args.backend == "cupy":
        try:
            import cupy  # noqa: F401
        except Exception as exc:  # ImportError, or a CUDA error at import time
            raise CLIError(f"--backend cupy needs CuPy and a CUDA GPU ({exc})") from None
    wanted = list(args.only) if args.only else [t.id for t in THEOREMS]
    if args.power:
        return _verify_power(args, wanted)
    results = []
    status = None
    with _sigterm_raises():
        try:
            for r in iter_verify(args.rows, backend=args.backend, seed=args.seed,
                                 ids=wanted, progress=args.progress, jobs=args.jobs):
                results.append(r)
        except KeyboardInterrupt:
            status = EXIT_INTERRUPT
        except _Terminated:
            status = EXIT_TERM
    if args.json:
        _emit(json.dumps(to_json(results), indent=1) + "\n")
    else:
        _emit(format_table(results))
    if status is not None:
        if not args.json:
            _emit(f"interrupted: {len(results)} of {len(wanted)} checks finished\n")
        _flush_stdout()
        _write_err(f"certattn: interrupted after {len(results)} of {len(wanted)} checks")
        return status
    return 0 if all(r.passed for r in results) else 1


def _verify_power(args: argparse.Namespace, wanted: list[str]) -> int:
    """``verify --power``: every check against its counterfeit (status 1 if one passes)."""
    from dataclasses import asdict

    from .verify._power import format_power, power

    results = []
    with _sigterm_raises():
        try:
            for tid in wanted:
                results.append(power(tid, args.rows, seed=args.seed))
        except (KeyboardInterrupt, _Terminated):
            _write_err(f"certattn: interrupted after {len(results)} of {len(wanted)} checks")
            return EXIT_INTERRUPT
    if args.json:
        _emit(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    else:
        _emit(format_power(results))
    return 0 if all(r.rejected for r in results) else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    out = _check_out_folder(args.out)
    if args.what == "gaussian":
        from .plots.gaussian import save_gaussian_figures

        paths = save_gaussian_figures(out, quick=args.quick)
    else:  # pragma: no cover - argparse restricts choices
        raise CLIError(f"unknown plot {args.what!r}")
    _emit("".join(f"{p}\n" for p in paths))
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from .budget import budget_for_model

    eps = _parse_eps(args.eps)
    out = _check_out_file(args.out) if args.out is not None else None
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
        coverage = math.nan
    if not 0.0 < coverage <= 1.0:
        raise CLIError(f"--coverage must be a number in (0, 1], got {args.coverage!r}")
    if args.dask is not None and args.texts is None:
        raise CLIError("--dask needs --texts (a corpus)")
    if args.texts is not None:  # a corpus: one task per document on dask.distributed
        if text is not None:
            raise CLIError("give --texts or --text/--text-file, not both")
        if _hf_only(args.model):
            raise CLIError(f"--texts runs certattn's NumPy forwards (BERT, Llama, Mistral, "
                           f"Qwen2); {args.model} needs certattn.hf: give one --text-file")
        table = _budget_texts(args, eps, coverage)
    elif _through_hf(args.model, "budget"):
        from .hf._budget import budget_table

        with _progress_bar("budget", 1, args.progress, unit="sequences") as bar:
            table = budget_table(args.model, text, tokens=args.tokens, eps=eps,
                                 coverage=coverage, progress=None if bar is None else bar.update)
    else:
        with _progress_bar("budget", 1, args.progress) as bar:
            table = budget_for_model(
                args.model, text, tokens=args.tokens, eps=eps, coverage=coverage,
                progress=None if bar is None else bar.update,
            )
    doc = table.to_json()
    if out is not None:
        _write_file(out, lambda fh: fh.write((doc + "\n").encode("utf-8")))
    _emit((doc if args.json else table.to_markdown()) + "\n")
    return 0


def _hf_only(model: str) -> bool:
    """Whether ``model`` is a Hugging Face folder that only certattn.hf reads (an
    architecture other than certattn's NumPy BERT and Llama families)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    from .models._llama import HF_LLAMA_TYPES

    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False  # the NumPy loader reports the unreadable file in one line
    return kind not in ("bert", *HF_LLAMA_TYPES)


def _through_hf(model: str, command: str) -> bool:
    """Whether ``certattn COMMAND --model MODEL`` runs through certattn.hf; one line when
    it should but the [hf] extra is missing."""
    if not _hf_only(model):
        return False
    try:
        import certattn.hf  # noqa: F401
    except ImportError as exc:
        raise CLIError(f"{model}: not a BERT or Llama-family folder (certattn's NumPy "
                       f"forwards); {command} reads other architectures through "
                       f"certattn.hf: {exc}") from None
    return True


def _budget_texts(args: argparse.Namespace, eps: float, coverage: float) -> Any:
    """``budget --texts``: the corpus table, one dask task per document, with progress."""
    from .corpus import budget_corpus, read_texts

    docs = read_texts(args.texts)
    with _progress_bar("budget", len(docs), args.progress, unit="documents") as bar:
        return budget_corpus(
            docs, model=args.model, eps=eps, tokens=args.tokens, coverage=coverage,
            client=args.dask or "local", source=f"corpus {args.texts}",
            progress=None if bar is None else bar.update,
        )


_REPRODUCE_MAX_JOBS = 16
"""``certattn.reproduce.MAX_JOBS`` (not imported to build the parser: a test checks them)."""


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in ("minilm", "smollm2")]
    if unknown or not models:
        raise CLIError(f"--models takes minilm and/or smollm2, got {args.models!r}")
    if args.tokens < 16:
        raise CLIError(f"--tokens must be at least 16, got {args.tokens}")
    only = None
    if args.only is not None:
        from .reproduce import SECTIONS

        only = tuple(x.strip() for x in args.only.split(",") if x.strip())
        bad = [x for x in only if x not in SECTIONS]
        if bad or not only:
            raise CLIError(f"--only takes a comma list of {', '.join(SECTIONS)}; got "
                           f"{args.only!r}")
    out = _check_out_folder(args.out)
    summary = reproduce(out, models=models, smollm2_tokens=args.tokens, quick=args.quick,
                        only=only, full=args.full, jobs=args.jobs)
    _emit(summary.short_report() + "\n")
    return 0


def _add_progress_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const=True,
                   default=None, help=f"show a progress bar on stderr ({what})")
    g.add_argument("--quiet", dest="progress", action="store_const", const=False,
                   help="no progress bar")


def _verify_row() -> str:
    """What a row is (the row model of ``verify._common.row_shares``)."""
    from .verify._common import LONG_KEYS, LONG_ROWS

    return (
        f"A row is one query's logits. Short rows (at most {LONG_KEYS} keys) carry the many "
        "cases (ties, -inf, dtype-minimum and -10000 masks, extreme ranges, float16) and "
        f"take all of --rows; long rows (more than {LONG_KEYS} keys, up to 2048, for rounding "
        f"growth) are a fixed set of at most {LONG_ROWS:,} per kind, dtype and length, "
        "whatever --rows. Checks of other objects (key blocks, queries, Monte Carlo rows, "
        "geometry points) scale their own units in proportion."
    )


def _clock_words(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _verify_timing() -> str:
    """The help's time estimate, from the per-check cost model (``estimated_seconds``)."""
    from .verify import MAX_ROWS, estimated_seconds

    return (
        "On one idle CPU core (NumPy, measured per check; an estimate): the default sizes take "
        f"about {_clock_words(estimated_seconds())}; --rows 100,000 about "
        f"{_clock_words(estimated_seconds(100_000))}, 1,000,000 about "
        f"{_clock_words(estimated_seconds(1_000_000))}, {MAX_ROWS:,} (the most) about "
        f"{_clock_words(estimated_seconds(MAX_ROWS))}, or about "
        f"{_clock_words(estimated_seconds(MAX_ROWS, jobs=2))} with --jobs 2 on two free "
        "cores (--jobs N runs the checks in N processes)."
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    from .approx.audit import run_cli

    if args.out is not None:
        _check_out_folder(args.out)
    if _through_hf(args.model, "audit"):
        from .hf._audit import attention_records

        return run_cli(args, attention_records)
    return run_cli(args)


def _add_evaluate(sub: Any) -> None:
    """``certattn evaluate``: dense vs sparse next-token table of a transformers model."""

    def run(args: argparse.Namespace) -> int:
        from .hf._cli import DEFAULT_POLICIES, format_table, run_evaluate, write_outputs

        text = None
        if args.text_file is not None:
            try:
                text = Path(args.text_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CLIError(f"cannot read {args.text_file}: {exc}") from None
        if text is None:
            from ._corpus import corpus_text

            text = corpus_text()
        if args.tokens is not None and args.tokens < 2:
            raise CLIError(f"--tokens must be at least 2, got {args.tokens}")
        if args.out is not None:
            _check_out_folder(args.out)
        with _stages(args.progress) as stage:
            result = run_evaluate(args.model, text, args.tokens,
                                  args.policies or DEFAULT_POLICIES, progress=stage)
        if args.out is not None:
            write_outputs(result, args.out)
        _emit((json.dumps(result, indent=1) if args.json else format_table(result)) + "\n")
        return 0

    e = sub.add_parser(
        "evaluate",
        help="what sparse attention does to a Hugging Face model's next-token distribution",
        description="Run a transformers causal LM dense (eager) and under each sparse-attention "
        "policy, and print per policy: kept keys over visible keys, KL(dense || sparse) of "
        "the next-token distribution (mean, p99, max), top-1 agreement, perplexity and the "
        "forward time relative to eager. Needs the [hf] extra (torch, transformers).",
    )
    e.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="smollm2 (needs the model package), a Hugging Face folder or a .gguf file")
    e.add_argument("--text-file", help="text to run on (default: built-in prose)")
    e.add_argument("--tokens", type=int, metavar="N", help="cut the text to N tokens")
    e.add_argument("--policies", metavar="LIST", help="comma list of topk:EPS, topp:P, "
                   "fixed:K, window:N, quest:N (Quest pages of 16 keys, budget N keys), "
                   "window:auto and quest:auto (kept keys matched per layer to the first "
                   "topk's), delta (Delta Attention over a window + 4 sinks base, its cost "
                   "matched the same way), cal:FILE (certattn calibrate's JSON); default "
                   "topk:0.01,topk:0.001,window:auto")
    e.add_argument("--json", action="store_true", help="print JSON instead of the table")
    e.add_argument("--out", metavar="DIR", help="also write DIR/evaluate.json and, with "
                   "matplotlib, DIR/evaluate.png (KL and top-1 against kept, per family)")
    _add_progress_options(e, "default: on a terminal; one forward per policy")
    e.set_defaults(func=run)


@contextmanager
def _stages(flag: bool | None) -> Iterator[Callable[[str, int], Any]]:
    """``stage(label, total) -> update callback or None``: one progress bar per stage,
    the previous one erased; all erased at the end."""
    from ._progress import Progress, progress_enabled

    bars: list[Any] = []

    def close() -> None:
        while bars:
            bars.pop().close()

    def stage(label: str, total: int) -> Any:
        close()
        if not progress_enabled(flag):
            return None
        bar = Progress(label, total, unit="forwards")
        bar.draw()
        bars.append(bar)
        return bar.update

    try:
        yield stage
    finally:
        close()


def _add_steer(sub: Any) -> None:
    """``certattn steer``: steer a causal LM's output language with one SAE feature."""

    def run(args: argparse.Namespace) -> int:
        from .steer._cli import format_table, run_steer, write_outputs

        layers = _number_list(args.layer, "--layer", int)
        coefs = _number_list(args.coefficients, "--coefficients", float)
        if args.new_tokens < 1:
            raise CLIError(f"--new-tokens must be at least 1, got {args.new_tokens}")
        if args.out is not None:
            _check_out_folder(args.out)
        result = run_steer(args.model, args.lang, layers, coefs, prompts_file=args.prompts,
                           new_tokens=args.new_tokens, corpus_root=args.corpus_root,
                           ranking=args.ranking, mode=args.mode,
                           progress=lambda s: print(f"certattn: {s}", file=sys.stderr,
                                                    flush=True))
        if args.out is not None:
            write_outputs(result, args.out)
        _emit((json.dumps(result, indent=1) if args.json else format_table(result)) + "\n")
        return 0

    e = sub.add_parser(
        "steer",
        help="steer a causal LM's output language with one SAE feature; heads it moves",
        description="Train a TopK sparse autoencoder on the residual stream after each "
        "--layer (English and target-language paragraphs of the Debian Reference), pick "
        "the feature whose activation differs most from English (over its pooled standard "
        "deviation by default), add it to the residual at several coefficients, and report "
        "per setting: success (share of continuations detected as the target language), "
        "meaning (MiniLM embedding cosine to the unsteered continuation), fluency (NLL "
        "under the unsteered model); the "
        "mean-difference direction and a random feature as controls; and, for the best "
        "setting of the feature and of the mean difference, the attention TV per (layer, "
        "head) and what ablating the top heads does (against random heads). "
        "Needs the [steer] extra and apt-get install debian-reference-en "
        "debian-reference-LANG.",
    )
    e.add_argument("--lang", required=True, help="target language: fr, es, de or zh-cn")
    e.add_argument("--layer", required=True, metavar="L[,L...]",
                   help="decoder layer(s) whose output is steered")
    e.add_argument("--model", default="smollm2", metavar="NAME_OR_PATH",
                   help="smollm2 (default), a Hugging Face folder or a .gguf file")
    e.add_argument("--prompts", metavar="FILE", help="English prompts, one per line "
                   "(default: 20 held-out Debian Reference paragraphs, first 24 tokens)")
    e.add_argument("--coefficients", default="0,0.2,0.35,0.5", metavar="LIST",
                   help="multiples of the layer's mean residual norm (default %(default)s)")
    e.add_argument("--ranking", choices=("zscore", "frequency", "mean"), default="zscore",
                   help="how features are ranked: activation difference over its pooled "
                   "standard deviation (default), active-share difference, or raw mean "
                   "difference")
    e.add_argument("--mode", choices=("add", "clamp"), default="add",
                   help="add the feature's direction, or clamp the feature to the "
                   "coefficient (the same on text where it is inactive)")
    e.add_argument("--new-tokens", type=int, default=30, metavar="N")
    e.add_argument("--corpus-root", metavar="DIR",
                   help="where the Debian Reference HTML is (default /usr/share/debian-reference)")
    e.add_argument("--json", action="store_true", help="print JSON instead of the table")
    e.add_argument("--out", metavar="DIR", help="also write DIR/steer.json and the figures")
    e.set_defaults(func=run)


def _add_calibrate(sub: Any) -> None:
    """``certattn calibrate``: the eps meeting a next-token KL target on a text."""

    def run(args: argparse.Namespace) -> int:
        from .hf._calibrate import calibrate, format_calibration, load_text_ids

        if not args.target_kl > 0 or not args.safety >= 1:
            raise CLIError("--target-kl must be > 0 and --safety >= 1")
        if not Path(args.out).parent.is_dir():
            raise CLIError(f"--out {args.out}: no folder {Path(args.out).parent}")
        model, _, ids = load_text_ids(args.model, args.text_file, args.tokens)
        if not args.quiet:
            _write_err(f"calibrating {args.policy} on {len(ids)} tokens")
        cal = calibrate(model, ids, args.target_kl, policy=args.policy, safety=args.safety,
                        progress=None if args.quiet else _write_err)
        cal.save(args.out)
        _emit(format_calibration(cal) + f"\nwritten to {args.out}\n")
        return 0

    c = sub.add_parser(
        "calibrate",
        help="the largest eps whose measured next-token KL meets a target on a text",
        description="Bisect one uniform eps (one sparse forward per step) so that the mean "
        "next-token KL(dense || sparse) measured on the text is at most TARGET / SAFETY, "
        "and write it as JSON for certattn evaluate --policies cal:FILE. The KL is a "
        "measurement on this text, not a bound. Needs the [hf] extra.",
    )
    c.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="smollm2 (needs the model package), a Hugging Face folder or a .gguf file")
    c.add_argument("--text-file", help="text to calibrate on (default: built-in prose)")
    c.add_argument("--tokens", type=int, metavar="N", help="cut the text to N tokens")
    c.add_argument("--target-kl", type=float, default=1e-3, metavar="KL",
                   help="mean next-token KL target, nats (default 1e-3)")
    c.add_argument("--policy", choices=["topk", "topp", "search"], default="topk",
                   help="certified Top-k at eps, top-p at p = 1 - eps, or certified search "
                   "on 4-bit key estimates at eps (default topk)")
    c.add_argument("--safety", type=float, default=1.5,
                   help="allowance for other text: aim at TARGET / SAFETY (default 1.5, "
                   "certattn.hf.calibrate's measured default)")
    c.add_argument("--out", required=True, metavar="FILE", help="calibration JSON to write")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=run)


def _add_compare(sub: Any) -> None:
    """``certattn compare``: the equal-KL table of policy families."""

    def run(args: argparse.Namespace) -> int:
        from .hf._ladder import format_at_kl, run_compare

        result = run_compare(args.model, args.text_file, args.tokens, args.families,
                             args.at_kl, args.budget_text_file,
                             progress=None if args.quiet or args.json else _write_err)
        if args.json:
            _emit(json.dumps(result, indent=1) + "\n")
        else:
            _emit(f"{args.model}, {result['tokens']} tokens: kept fraction, top-1 and bytes "
                  "each family needs for a mean next-token KL(dense || sparse) (measured, "
                  "interpolated on log KL)\n\n" + format_at_kl(result["at_kl"]) + "\n")
        return 0

    c = sub.add_parser(
        "compare",
        help="the kept keys and bytes each sparse-attention family needs for a given KL",
        description="Run a ladder of each family's parameter (one sparse forward per point) "
        "and interpolate on log KL the kept fraction, top-1 agreement and bytes read each "
        "needs to reach each --at-kl mean next-token KL(dense || sparse) on the text. "
        "Needs the [hf] extra.",
    )
    c.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="smollm2 (needs the model package), a Hugging Face folder or a .gguf file")
    c.add_argument("--text-file", help="text to run on (default: built-in prose)")
    c.add_argument("--tokens", type=int, metavar="N", help="cut the text to N tokens")
    c.add_argument("--families", default="topk,window,quest", metavar="LIST",
                   help="comma list of topk, window, quest, headk, headmean, pyramid, "
                   "twilight, search (default topk,window,quest)")
    c.add_argument("--at-kl", default="1e-4,1e-3,1e-2", metavar="LIST",
                   help="target KLs, nats (default 1e-4,1e-3,1e-2)")
    c.add_argument("--budget-text-file",
                   help="other text for the per-head k of headk and headmean")
    c.add_argument("--json", action="store_true", help="print JSON instead of the table")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=run)


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .verify import MAX_JOBS, MAX_ROWS

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
                   "-inf = masked key; or a directory of .npy shards (rows concatenated in "
                   "name order) or a .zarr store, read lazily on dask")
    c.add_argument("--eps", default="0.01", help="TV budget in [0, 1) (default 0.01)")
    c.add_argument("--key", help="array name inside an .npz or .safetensors file (or the "
                   "array path inside a zarr group)")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument("--out", help="also write k, tail_upper, kl_upper, ... to exactly this file "
                   "(NumPy .npz format; no suffix is added); for a directory input: a "
                   "directory of .npy files or a .zarr store, written block by block")
    c.add_argument("--masked-rows", choices=["error", "skip"], default="error",
                   help="fully masked rows: fail (default) or give them k = 0")
    _add_progress_options(c, "default: on a terminal, for a directory or zarr input (dask "
                          "tasks) or a file of 20M logits or more")
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
    b.add_argument("--eps", default="0.01", help="TV budget in [0, 1) (default 0.01)")
    b.add_argument("--coverage", default="0.9", help="fraction of queries the fixed k covers")
    b.add_argument("--json", action="store_true", help="print JSON for an inference engine")
    b.add_argument("--out", help="also write the JSON to exactly this file")
    b.add_argument("--texts", metavar="FILE_OR_DIR", help="a corpus: one document per line of "
                   "FILE or per file of DIR; one dask task per document, pooled into one table")
    b.add_argument("--dask", metavar="ADDRESS", help="with --texts: 'local' (default: a local "
                   "cluster of this machine's cores) or a scheduler address, tcp://host:8786")
    _add_progress_options(b, "default: on a terminal; with --texts: documents done")
    b.set_defaults(func=_cmd_budget)

    r = sub.add_parser(
        "reproduce",
        help="reproduce the paper's experiments on real attention (figures + summary)",
    )
    r.add_argument("--out", default="reproduce", help="output folder (default ./reproduce)")
    r.add_argument("--models", default="minilm,smollm2", help="comma list: minilm,smollm2")
    r.add_argument("--tokens", type=int, default=1024, help="SmolLM2 context (default 1024)")
    r.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    r.add_argument("--only", metavar="SECTION[,SECTION]",
                   help="run these sections only (identities, bounds, gaussian, output, "
                   "budgets, search, skyformer, hybrid, fal, delta); the others are skipped")
    r.add_argument("--full", action="store_true",
                   help="paper-sized runs (Skyformer's SmolLM2 lengths up to 4096 tokens, "
                   "150 Hedgehog steps, every layer in output and delta, every MiniLM "
                   "search row); the default keeps the smallest sizes that show each effect")
    r.add_argument("--jobs", type=_int_option("--jobs", 1, _REPRODUCE_MAX_JOBS), metavar="N",
                   help="processes that share the sections after the models are loaded, 1 to "
                   f"{_REPRODUCE_MAX_JOBS} (default: 2, or 1 on a one-core machine; Linux "
                   "only, elsewhere 1); results agree up to BLAS summation order")
    r.set_defaults(func=_cmd_reproduce)

    v = sub.add_parser(
        "verify",
        help="check every registered theorem numerically on large random batches",
        description="For every theorem of the registry (docs/theorems.md), draw large batches "
        "of instances (ties, masks, extreme ranges, float16 included) and report the largest "
        "violation against its tolerance. Exit status 1 if any check fails; Ctrl-C (130) or "
        "SIGTERM (143) prints the checks finished so far. " + _verify_row() + " "
        + _verify_timing(),
    )
    v.add_argument("--rows", type=_int_option("--rows", 1, MAX_ROWS), metavar="N",
                   help=f"rows per row-based check, 1 to {MAX_ROWS:,} (default: each check's "
                   "own size; other checks scale in proportion up to 100,000 and by the "
                   "square root beyond: 10 times their own size at 10,000,000)")
    v.add_argument("--jobs", type=_int_option("--jobs", 1, MAX_JOBS), metavar="N", default=1,
                   help=f"worker processes, 1 to {MAX_JOBS} (default 1), one check per task; "
                   "the results are those of --jobs 1")
    v.add_argument("--backend", default="numpy", choices=verify_backends(),
                   help="array library to run on (cupy: on the GPU)")
    v.add_argument("--seed", type=_int_option("--seed", 0, 2**63 - 1), default=0,
                   help="random seed (default 0)")
    v.add_argument("--json", action="store_true", help="print a JSON list of results")
    v.add_argument("--only", nargs="+", metavar="ID", help="check only these theorem ids")
    v.add_argument("--power", action="store_true",
                   help="run every check against a counterfeit of its theorem (a bound scaled "
                   "by 1 - delta, an identity by 1 + delta) and report whether it was "
                   "rejected and the smallest delta it rejects (sharpness, by bisection: "
                   "about 6 runs of each check); exit status 1 if a counterfeit passes")
    _add_progress_options(v, "default: on a terminal; shows the estimated time left")
    v.set_defaults(func=_cmd_verify)

    a = sub.add_parser(
        "audit",
        help="audit attention approximations on real attention (TV, error, certificates, cost)",
        description="Run attention approximations (window_sinks, quest, their certified "
        "fallbacks, delta, and any other registered method) on every layer of a model's "
        "attention and print, per method and layer: mean and p99 TV and relative output "
        "error to exact attention, the fraction of queries certified within eps, the cost "
        "in keys per query, and the count of unsound certificates (must be 0).",
    )
    a.add_argument("--model", default="minilm-sample", metavar="NAME_OR_PATH",
                   help="minilm-sample (shipped, default), minilm or smollm2, a Llama-family "
                   ".gguf file, or a Hugging Face folder (BERT and Llama-family folders run "
                   "certattn's NumPy forwards; other architectures need the [hf] extra)")
    a.add_argument("--tokens", type=int, help="context length (smollm2 default 1024)")
    a.add_argument("--methods", help="comma list of methods, each run once (default: every "
                   "available one; skyformer and hybrid, which form (heads, n, n) arrays, only "
                   "while one such float64 array is at most 256 MiB)")
    a.add_argument("--eps", default="0.01", help="budget in [0, 1) of the certified columns")
    a.add_argument("--layers", help="comma list of model layers, 0 to the model's layer count "
                   "- 1 (default: all recorded)")
    a.add_argument("--summary", action="store_true", help="table of all layers pooled only")
    a.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a.add_argument("--out", help="write audit.json and figures to this folder")
    a.set_defaults(func=_cmd_audit)

    _add_evaluate(sub)
    _add_steer(sub)
    _add_calibrate(sub)
    _add_compare(sub)

    p = sub.add_parser("plot", help="save the theory's figures as PNG files")
    p.add_argument("what", choices=["gaussian"], help="which family of figures")
    p.add_argument("--out", default="figures", help="output folder (default ./figures)")
    p.add_argument("--quick", action="store_true", help="fewer Monte Carlo rows")
    p.set_defaults(func=_cmd_plot)
    return parser


def _raised_by_certattn_check(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a ``raise`` statement in certattn's own code.

    Transitional: such a ValueError is a deliberate input check of the library (until
    every one raises :class:`~certattn.errors.InputError`); a ValueError raised inside
    NumPy or the standard library is a bug and keeps its traceback.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    if not inside:
        return False
    lines = [linecache.getline(filename, tb.tb_lineno - i) for i in range(4)]
    return any(line.lstrip().startswith("raise ") for line in lines)


def _fail(message: str) -> int:
    first = message.splitlines()[0] if message.strip() else "invalid input"
    _write_err(f"certattn: error: {first}")
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certattn`` console script; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).
    """
    try:
        try:
            args = _build_parser().parse_args(argv)
            status = int(args.func(args))
        except _Exit as exc:
            status = exc.status
        _flush_stdout()
        return status
    except BrokenPipeError:  # the reader went away (``certattn ... | head``): quietly
        _drop_stdout()
        return EXIT_PIPE
    except _StdoutError as exc:
        _drop_stdout()
        cause = exc.args[0] if exc.args else exc
        return _fail(f"cannot write to stdout: {getattr(cause, 'strerror', None) or cause}")
    except InputError as exc:
        return _fail(str(exc))
    except ValueError as exc:
        if not _raised_by_certattn_check(exc):
            raise
        return _fail(str(exc))
    except ImportError as exc:  # an optional package that is not installed
        return _fail(str(exc))
    except KeyboardInterrupt:
        _write_err("certattn: interrupted")
        return EXIT_INTERRUPT
    except _Terminated:
        _write_err("certattn: terminated")
        return EXIT_TERM


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
