"""Fuzzing the command line in-process: random files and options on every subcommand.

The contract (issue 16): every run ends with a result (exit 0, output on stdout, nothing
on stderr) or with exactly one line ``certattn: error: ...`` on stderr and exit 2; never
a traceback (an exception escaping :func:`certattn.cli.main`).  A successful ``certify``
is checked against the exact tail mass (mpmath), so a wrong answer fails too.

Sizes: a few dozen examples per test in the default ``ci`` profile (seconds), the
profile's count (1000) with ``CERTATTN_HYPOTHESIS=thorough``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import certattn.plots.gaussian as plots_gaussian
from certattn.cli import main

_CI = os.environ.get("CERTATTN_HYPOTHESIS", "ci") == "ci"
N_EXAMPLES = 30 if _CI else settings.default.max_examples
# capsys is read afresh by every example (_run), so sharing it across examples is safe.
FUZZ = settings(max_examples=N_EXAMPLES, suppress_health_check=[
    *settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])

try:
    import ml_dtypes

    _ML = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _ML = {}

DTYPES = ["float64", "float32", "float16", "longdouble", "int32", "bool", "complex128",
          *_ML]
SHAPES = [(), (0,), (3, 0), (1,), (1, 1), (4,), (2, 5), (3, 8), (1, 2, 6), (2, 1, 1, 3)]
SPECIAL = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e308, -1e308, 1.7e308, 5e-324,
           -745.2, 700.0, 1e-300]


def _as_dtype(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):  # casting 1e308 to float16 overflows on purpose
        return _cast(x, name)


def _cast(x: np.ndarray, name: str) -> np.ndarray:
    if name in _ML:
        return x.astype(_ML[name])
    if name == "bool":
        return x > 0
    if name == "int32":
        return np.nan_to_num(x, nan=0.0, posinf=1e9, neginf=-1e9).clip(-1e9, 1e9).astype(
            np.int32)
    return x.astype(name)


@st.composite
def arrays(draw):
    shape = draw(st.sampled_from(SHAPES))
    size = int(np.prod(shape))
    values = draw(st.lists(
        st.one_of(st.sampled_from(SPECIAL), st.floats(-50, 50, allow_nan=False)),
        min_size=size, max_size=size))
    x = np.asarray(values, dtype=np.float64).reshape(shape)
    if size and draw(st.integers(0, 3)) > 0:  # mostly clean rows: exercise the success path
        x = np.where(np.isnan(x) | (x == np.inf), 0.0, x)
    return _as_dtype(x, draw(st.sampled_from(DTYPES)))


def _npy_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    if x.dtype.kind == "V" or x.dtype.name in _ML:  # ml_dtypes: stored as raw bytes
        np.lib.format.write_array(buf, x.view(np.uint8 if x.itemsize == 1 else np.uint16))
    else:
        np.save(buf, x)
    return buf.getvalue()


def _safetensors_bytes(arrs: dict[str, np.ndarray]) -> bytes:
    names = {"float64": "F64", "float32": "F32", "float16": "F16", "int32": "I32",
             "bool": "BOOL", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
             "complex128": "C128", "longdouble": "F128"}
    header, blobs, off = {}, [], 0
    for k, a in arrs.items():
        data = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": names.get(a.dtype.name, "F64"), "shape": list(a.shape),
                     "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


@st.composite
def input_files(draw):
    """(file name, bytes, key or None)."""
    fmt = draw(st.sampled_from(["npy", "npz", "safetensors", "garbage", "empty", "txt"]))
    x = draw(arrays())
    if draw(st.integers(0, 2)) > 0:  # mostly float arrays with at least one key
        x = _as_dtype(np.atleast_1d(x).real.astype(np.float64),
                      draw(st.sampled_from(["float64", "float32", "float16"])))
        x = x if x.size else np.zeros((2, 3), x.dtype)
    key = None
    if fmt == "npy":
        data, name = _npy_bytes(x), "x.npy"
    elif fmt == "npz":
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("a.npy", _npy_bytes(x))
            if draw(st.booleans()):
                zf.writestr("b.npy", _npy_bytes(np.zeros(3)))
        data, name = buf.getvalue(), "x.npz"
        key = draw(st.sampled_from([None, "a", "b", "zz"]))
    elif fmt == "safetensors":
        data, name = _safetensors_bytes({"a": x}), "x.safetensors"
        key = draw(st.sampled_from([None, "a", "zz"]))
    elif fmt == "garbage":
        data = draw(st.binary(max_size=200))
        name = draw(st.sampled_from(["g.npy", "g.npz", "g.safetensors"]))
    elif fmt == "txt":
        data, name = b"0 1 2\n", "x.txt"
    else:
        data, name = b"", draw(st.sampled_from(["e.npy", "e.npz", "e.safetensors"]))
    if data and draw(st.integers(0, 3)) == 0:  # corrupt: truncate or flip bytes
        cut = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data = data[:cut]
        else:
            data = data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:]
    if fmt == "npy" and draw(st.integers(0, 5)) == 0:  # a header promising a huge shape
        data = data.replace(b"'shape': (", b"'shape': (123456789012, ", 1)
    return name, data, key


OUT_KINDS = ["none", "new", "existing_file", "dir", "missing_parent", "file_parent", "empty"]


def _out_path(kind: str, tmp: Path) -> str | None:
    (tmp / "existing").write_bytes(b"old")
    return {
        "none": None, "new": str(tmp / "out.res"), "existing_file": str(tmp / "existing"),
        "dir": str(tmp), "missing_parent": str(tmp / "no" / "such" / "out"),
        "file_parent": str(tmp / "existing" / "out"), "empty": "",
    }[kind]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)  # an exception here is the traceback the contract forbids
    out, err = capsys.readouterr()
    # The one known warning is the core's (topk._exp_terms near the float maximum,
    # reported to the lead); nothing else may warn.
    stray = [f"{w.filename}: {w.message}" for w in caught if not w.filename.endswith("topk.py")]
    assert not stray, stray
    return code, out, err


def _check_contract(code: int, out: str, err: str, argv: list[str]) -> None:
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("certattn: error: "), (argv, err)
        assert out == "", (argv, out)
    else:
        assert code == 0, (argv, code, err)
        assert err == "", (argv, err)
        assert out.strip(), argv


def _exact_tails(row: np.ndarray, k: int) -> mpmath.mpf:
    vals = sorted((mpmath.mpf(float(v)) for v in row if v > -np.inf), reverse=True)
    top = vals[0]
    w = [mpmath.exp(v - top) for v in vals]
    return mpmath.fsum(w[k:]) / mpmath.fsum(w)


def _check_certificate(path: Path, key: str | None, doc: dict) -> None:
    """The certificate is sound: tail(k) <= eps, and k - 1 keys would not do."""
    from certattn.io import load_logits

    x = np.asarray(load_logits(path, key)).astype(np.float64)
    rows = x.reshape(-1, x.shape[-1])
    eps = doc["eps"]
    with mpmath.workdps(60):
        for r, k, masked in zip(rows, doc["k"], doc["masked"], strict=True):
            if masked:
                continue
            assert 1 <= k <= int(np.sum(r > -np.inf))
            assert _exact_tails(r, k) <= eps * (1 + 1e-9)
            if k > 1:  # minimal up to rounding: k - 1 keeps too little
                assert _exact_tails(r, k - 1) > eps * (1 - 1e-6)


def _certify(capsys, tmp: Path, name: str, data: bytes, key: str | None, eps: str,
             out_kind: str, as_json: bool, masked: str | None) -> int:
    path = tmp / name
    path.write_bytes(data)
    argv = ["certify", str(path), "--eps", eps]
    out = _out_path(out_kind, tmp)
    if out is not None:
        argv += ["--out", out]
    if key is not None:
        argv += ["--key", key]
    if as_json:
        argv.append("--json")
    if masked is not None:
        argv += ["--masked-rows", masked]
    code, stdout, err = _run(argv, capsys)
    _check_contract(code, stdout, err, argv)
    event(f"exit {code}" if code else f"exit 0, {'json checked' if as_json else 'table'}")
    if code == 0:
        if as_json:
            _check_certificate(path, key, json.loads(stdout))
        if out_kind in ("new", "existing_file"):
            with np.load(out) as z:
                assert float(z["eps"]) == float(eps)
    elif out_kind == "existing_file":
        assert (tmp / "existing").read_bytes() == b"old"
    return code


@FUZZ
@given(f=input_files(), eps=st.sampled_from(["0.01", "0.5", "0", "0.9", "1e-300"]),
       out_kind=st.sampled_from(["none", "new"]), masked=st.sampled_from([None, "skip"]))
def test_certify_fuzz_files(capsys, f, eps, out_kind, masked):
    """Random files with valid options: read, certify soundly, or refuse in one line."""
    with tempfile.TemporaryDirectory() as d:
        _certify(capsys, Path(d), *f, eps, out_kind, True, masked)


@FUZZ
@given(
    f=input_files(),
    eps=st.sampled_from(["0.01", "0.5", "0", "0.999999", "1", "-0.1", "nan", "inf", "abc",
                         "1e-300", ""]),
    out_kind=st.sampled_from(OUT_KINDS),
    as_json=st.booleans(),
    masked=st.sampled_from([None, "skip", "error", "bogus"]),
    key_override=st.sampled_from([None, None, "zz"]),
)
def test_certify_fuzz_options(capsys, f, eps, out_kind, as_json, masked, key_override):
    """Every option, valid or not, on random files."""
    name, data, key = f
    with tempfile.TemporaryDirectory() as d:
        _certify(capsys, Path(d), name, data, key_override or key, eps, out_kind, as_json,
                 masked)


@FUZZ
@given(
    rows=st.sampled_from(["3", "1", "0", "-1", "1e20", "10000001", "x", "2.5"]),
    only=st.lists(st.sampled_from(["TV-TAIL", "GAUSS-KEPS", "GEO-SCOPE", "NOPE"]),
                  min_size=1, max_size=2, unique=True),
    seed=st.sampled_from(["0", "7", "-1", "x", str(2**70)]),
    as_json=st.booleans(),
    backend=st.sampled_from(["numpy", "strict", "fortran"]),
    progress=st.sampled_from([[], ["--quiet"], ["--progress", "--quiet"]]),
)
def test_verify_fuzz(capsys, rows, only, seed, as_json, backend, progress):
    argv = ["verify", "--rows", rows, "--seed", seed, "--backend", backend, "--only", *only,
            *progress]
    if as_json:
        argv.append("--json")
    code, out, err = _run(argv, capsys)
    _check_contract(code, out, err, argv)
    if code == 0 and as_json:
        assert [d["id"] for d in json.loads(out)] == only


@FUZZ
@given(
    eps=st.sampled_from(["0.01", "0.2", "1", "nan", "x"]),
    coverage=st.sampled_from(["0.9", "1", "0", "1.5", "nan", "x"]),
    out_kind=st.sampled_from(OUT_KINDS),
    as_json=st.booleans(),
    extra=st.sampled_from([[], ["--tokens", "5"], ["--text", "hello"], ["--text-file", "/no"],
                           ["--model", "nope"]]),
)
def test_budget_fuzz(capsys, eps, coverage, out_kind, as_json, extra):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        argv = ["budget", "--eps", eps, "--coverage", coverage, *extra]
        out = _out_path(out_kind, tmp)
        if out is not None:
            argv += ["--out", out]
        if as_json:
            argv.append("--json")
        code, stdout, err = _run(argv, capsys)
        _check_contract(code, stdout, err, argv)
        if code == 0 and out_kind in ("new", "existing_file"):
            assert json.loads(Path(out).read_text())["eps"] == float(eps)


@pytest.fixture
def cheap_figures(monkeypatch):
    """The figures are empty: the fuzz is about the output folder, not Monte Carlo."""
    from matplotlib.figure import Figure

    for name in ("plot_keps_vs_sigma", "plot_tail_vs_kept", "plot_predicted_vs_exact",
                 "plot_single_gap_overshoot"):
        monkeypatch.setattr(plots_gaussian, name, lambda **k: Figure(figsize=(1, 1)))


@FUZZ
@given(out_kind=st.sampled_from(OUT_KINDS[1:]), quick=st.booleans())
def test_plot_fuzz(capsys, cheap_figures, out_kind, quick):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        argv = ["plot", "gaussian", "--out", _out_path(out_kind, tmp), *(["--quick"] * quick)]
        code, out, err = _run(argv, capsys)
        _check_contract(code, out, err, argv)
        if code == 0:
            assert all(Path(p).is_file() for p in out.split())
        assert (tmp / "existing").read_bytes() == b"old"


@contextlib.contextmanager
def _cwd(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture
def tiny_verify(monkeypatch):
    """``verify`` without ``--rows`` runs each check at its minimum size (not a minute)."""
    import certattn.verify._runner as runner

    monkeypatch.setattr(runner, "rows_for", lambda tid, rows: runner.CHECKS[tid].minimum)


@FUZZ
@given(argv=st.lists(st.sampled_from(["certify", "verify", "budget", "plot", "reproduce",
                                      "gaussian", "--json", "--out", "--rows", "--eps",
                                      "--help", "--version", "-x", "", "--quiet"]),
                     max_size=4))
def test_random_argument_lists(capsys, argv, cheap_figures, tiny_verify):
    if "reproduce" in argv and not {"--help", "-x", ""} & set(argv):
        argv = [*argv, "--models", "none"]  # a real reproduce run takes minutes
    with tempfile.TemporaryDirectory() as d, _cwd(d):
        code, out, err = _run(list(argv), capsys)
    if code == 0:
        assert err == "" and out.strip()
    else:
        assert code in (1, 2), (argv, code)
        _check_contract(2, out, err, argv)
