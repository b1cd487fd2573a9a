"""The certattn command line: outputs, file formats and one-line errors with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import certattn
from certattn.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_certify_builtin_sample_table(capsys):
    code, out, err = run(capsys, "certify")
    assert code == 0, err
    assert "built-in sample" in out and "MiniLM" in out
    assert "| all |" in out and "reduction" in out


def test_certify_json_matches_library(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (2, 3, 40)).astype(np.float32)
    x[1, 2, :10] = -np.inf
    f = tmp_path / "l.npy"
    np.save(f, x)
    code, out, err = run(capsys, "certify", str(f), "--eps", "0.05", "--json")
    assert code == 0, err
    doc = json.loads(out)
    cert = certattn.certify_topk(x, 0.05)
    assert doc["batch_shape"] == [2, 3] and doc["n"] == 40 and doc["eps"] == 0.05
    assert doc["k"] == cert.k.ravel().tolist()
    assert doc["tail_upper"] == cert.tail_upper.ravel().tolist()
    assert doc["kl_upper"] == cert.kl_upper.ravel().tolist()
    assert max(doc["tail_upper"]) <= 0.05


def test_certify_npz_key_safetensors_and_out(tmp_path, capsys):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 16)), rng.normal(0, 5, size=(3, 16))
    np.savez(tmp_path / "two.npz", a=a, b=b)
    np.savez(tmp_path / "one.npz", only=b)
    save_file({"b": b.astype(np.float32)}, str(tmp_path / "t.safetensors"))
    out_file = tmp_path / "res.npz"
    code, _, err = run(capsys, "certify", str(tmp_path / "two.npz"), "--key", "b",
                       "--out", str(out_file))
    assert code == 0, err
    with np.load(out_file) as z:
        np.testing.assert_array_equal(z["k"], certattn.certify_topk(b, 0.01).k)
        assert float(z["eps"]) == 0.01
    code, out, _ = run(capsys, "certify", str(tmp_path / "one.npz"), "--json")
    assert code == 0 and json.loads(out)["batch_shape"] == [3]
    code, out, _ = run(capsys, "certify", str(tmp_path / "t.safetensors"), "--json")
    assert code == 0 and json.loads(out)["n"] == 16


def test_masked_rows_skip(tmp_path, capsys):
    x = np.array([[0.0, 1.0], [-np.inf, -np.inf]])
    np.save(tmp_path / "m.npy", x)
    code, _, err = run(capsys, "certify", str(tmp_path / "m.npy"))
    assert code == 2 and "fully masked" in err and "row 1" in err
    code, out, _ = run(capsys, "certify", str(tmp_path / "m.npy"), "--masked-rows", "skip",
                       "--json")
    assert code == 0 and json.loads(out)["k"] == [2, 0]


def _bad_files(tmp):
    np.save(tmp / "nan.npy", np.array([[0.0, 1.0], [2.0, np.nan]]))
    np.save(tmp / "inf.npy", np.array([0.0, np.inf]))
    np.save(tmp / "empty.npy", np.zeros((3, 0)))
    np.save(tmp / "int.npy", np.arange(4))
    np.save(tmp / "str.npy", np.array(["a", "b"]))
    np.save(tmp / "scalar.npy", np.float64(1.0))
    np.savez(tmp / "two.npz", a=np.zeros(2), b=np.zeros(2))
    (tmp / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    (tmp / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    (tmp / "x.txt").write_text("0 1 2")
    return {
        "nan.npy": "NaN in row 1 at key 1",
        "inf.npy": "+inf at key 1",
        "empty.npy": "empty key axis",
        "int.npy": "floating-point",
        "str.npy": "floating-point",
        "scalar.npy": "key axis",
        "two.npz": "--key",
        "corrupt.npy": "cannot read",
        "corrupt.npz": "cannot read",
        "corrupt.safetensors": "cannot read",
        "x.txt": "unknown format",
        "missing.npy": "no such file",
    }


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    for name, needle in _bad_files(tmp_path).items():
        code, out, err = run(capsys, "certify", str(tmp_path / name))
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("certattn: error:"), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert out == "", name


@pytest.mark.parametrize("eps", ["1", "-0.5", "nan", "abc", "1e400", ""])
def test_bad_eps_one_line_exit_2(eps, capsys):
    code, _, err = run(capsys, "certify", "--eps", eps)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--eps" in err


def test_unknown_command_and_option(capsys):
    for argv in (["frobnicate"], ["certify", "--nope"], []):
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1


def test_console_script_runs_as_a_process(tmp_path):
    """The installed entry point: no traceback, status 2 on a bad file."""
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    proc = subprocess.run(
        [sys.executable, "-m", "certattn.cli", "certify", str(bad)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_verify_command_json_and_failure(capsys, monkeypatch):
    code, out, err = run(capsys, "verify", "--rows", "200", "--only", "TV-TAIL", "GAP-SINGLE",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [d["id"] for d in doc] == ["TV-TAIL", "GAP-SINGLE"]
    assert all(set(d) == {"id", "rows", "max_violation", "tolerance", "passed", "seconds"}
               for d in doc)
    import certattn.bounds

    real = certattn.bounds.gap_bound
    monkeypatch.setattr(certattn.bounds, "gap_bound", lambda *a, **k: real(*a, **k) / 2)
    code, out, _ = run(capsys, "verify", "--rows", "200", "--only", "GAP-SINGLE")
    assert code == 1 and "FAIL" in out.upper()
    code, _, err = run(capsys, "verify", "--only", "NO-SUCH-ID")
    assert code == 2 and "NO-SUCH-ID" in err


def test_budget_command(capsys, tmp_path):
    out_file = tmp_path / "b.json"
    code, out, err = run(capsys, "budget", "--eps", "0.05", "--json", "--out", str(out_file))
    assert code == 0, err
    doc = json.loads(out)
    assert doc == json.loads(out_file.read_text())
    assert doc["eps"] == 0.05
    code, _, err = run(capsys, "budget", "--coverage", "abc")
    assert code == 2 and "--coverage" in err


# --------------------------------------------------------------------------
# Issue 16: fail closed on every command
# --------------------------------------------------------------------------


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certattn: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _rows(tmp_path):
    f = tmp_path / "x.npy"
    np.save(f, np.random.default_rng(0).normal(size=(3, 8)))
    return str(f)


def test_out_writes_exactly_the_path_given(tmp_path, capsys):
    """16.4: ``--out results`` wrote ``results.npz``; ``--out ""`` wrote ``..npz``."""
    src = _rows(tmp_path)
    for name in ("results", "r.dat", "r.npz"):
        target = tmp_path / name
        code, _, err = run(capsys, "certify", src, "--out", str(target))
        assert code == 0, err
        assert target.is_file() and not (tmp_path / f"{name}.npz").exists()
        with np.load(target) as z:
            assert z["k"].shape == (3,) and int(z["n"]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.dat", "r.npz", "results", "x.npy"]


def test_out_to_dev_null_writes_no_sibling(tmp_path, capsys):
    code, _, err = run(capsys, "certify", _rows(tmp_path), "--out", os.devnull)
    assert code == 0, err
    assert not Path(os.devnull + ".npz").exists()


@pytest.mark.parametrize("kind", ["empty", "dir", "missing_parent", "file_parent"])
def test_out_unwritable_is_one_line_before_any_work(tmp_path, capsys, kind, monkeypatch):
    src = _rows(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = {"empty": "", "dir": str(tmp_path), "missing_parent": str(tmp_path / "no" / "r"),
           "file_parent": str(tmp_path / "afile" / "r")}[kind]
    import certattn.topk

    monkeypatch.setattr(certattn.topk, "certify_topk", lambda *a, **k: pytest.fail("ran"))
    code, out_text, err = run(capsys, "certify", src, "--out", out)
    assert code == 2 and out_text == ""
    line = _one_error_line(err)
    assert "--out" in line or "cannot write" in line
    assert not any(p.name.endswith(".npz") for p in tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["file", "file_parent", "empty"])
def test_plot_out_unusable_is_one_line(tmp_path, capsys, kind, monkeypatch):
    """16.3: ``plot gaussian --out FILE`` gave a traceback."""
    import certattn.plots.gaussian as pg

    monkeypatch.setattr(pg, "plot_keps_vs_sigma", lambda **k: pytest.fail("computed"))
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "file_parent": tmp_path / "afile" / "sub", "empty": ""}
    code, _, err = run(capsys, "plot", "gaussian", "--out", str(out[kind]), "--quick")
    assert code == 2
    _one_error_line(err)
    assert (tmp_path / "afile").read_text() == "x"


def test_plot_savefig_failure_is_one_line(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    import certattn.plots.gaussian as pg

    for name in ("plot_keps_vs_sigma", "plot_tail_vs_kept", "plot_predicted_vs_exact",
                 "plot_single_gap_overshoot"):
        monkeypatch.setattr(pg, name, lambda **k: Figure())

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    code, _, err = run(capsys, "plot", "gaussian", "--out", str(tmp_path / "f"))
    assert code == 2 and "No space left" in _one_error_line(err)


class _Failing:
    """A stdout whose writes fail like a full disk or a closed pipe."""

    def __init__(self, exc):
        self.exc = exc

    def write(self, text):
        raise self.exc

    def flush(self):
        raise self.exc


@pytest.mark.parametrize("argv", [["certify"], ["certify", "--json"],
                                  ["verify", "--rows", "5", "--only", "TV-TAIL", "--json"],
                                  ["budget", "--json"]])
def test_full_stdout_is_one_line_exit_2(argv, capsys, monkeypatch):
    """16.5: a write error on stdout gave a traceback."""
    monkeypatch.setattr(sys, "stdout", _Failing(OSError(28, "No space left on device")))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot write to stdout: No space left on device" in _one_error_line(err)


@pytest.mark.parametrize("argv", [["certify", "--json"], ["budget"]])
def test_broken_pipe_is_quiet(argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Failing(BrokenPipeError(32, "Broken pipe")))
    assert main(argv) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_dev_full_as_a_process():
    """The real thing once (the in-process test above covers every command)."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "certattn", "certify"], stdout=full,
                              stderr=subprocess.PIPE, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_closed_pipe_as_a_process(unbuffered):
    """``certattn certify --json | head -c 1``: no traceback, status 1 (the docs' EPIPE),
    buffered or not (``PYTHONUNBUFFERED=1`` used to lose the rest silently, status 0)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen([sys.executable, "-m", "certattn", "certify", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(1)
    proc.stdout.close()  # the reader goes away with ~290 kB still to come
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait() == 1
    assert err == ""


def test_bfloat16_safetensors(tmp_path, capsys):
    """16.6: bfloat16 tensors could not be read ("data type 'bfloat16' not understood")."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from safetensors.numpy import save_file

    x = np.random.default_rng(3).normal(0, 3, (4, 32)).astype(ml_dtypes.bfloat16)
    save_file({"logits": x}, str(tmp_path / "b.safetensors"))
    code, out, err = run(capsys, "certify", str(tmp_path / "b.safetensors"), "--json")
    assert code == 0, err
    want = certattn.certify_topk(x.astype(np.float32), 0.01)
    assert json.loads(out)["k"] == np.asarray(want.k).tolist()


def test_bfloat16_without_ml_dtypes_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import certattn.io

    head = b'{"a":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]}}'
    (tmp_path / "b.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * 4)

    def missing():
        raise ImportError("No module named 'ml_dtypes'")

    monkeypatch.setattr(certattn.io, "_import_ml_dtypes", missing)
    code, _, err = run(capsys, "certify", str(tmp_path / "b.safetensors"))
    assert code == 2 and "pip install ml_dtypes" in _one_error_line(err)


def test_certify_near_float_max_prints_no_warning_from_the_cli(tmp_path, capsys):
    """16.7: the CLI's own summary arithmetic stays quiet on extreme values."""
    import warnings

    x = np.array([[1.7e308, -1.7e308, 1e308, 0.0], [1.79e308, 1.79e308, -np.inf, 1e300]])
    np.save(tmp_path / "big.npy", x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(capsys, "certify", str(tmp_path / "big.npy"))
    assert code == 0, err
    assert "| all | 2 |" in out
    ours = [w for w in caught if "topk.py" not in w.filename]
    assert not ours, [str(w.message) for w in ours]


def test_certify_topk_near_float_max_emits_no_runtime_warning():
    import warnings

    x = np.array([[1.7e308, -1.7e308, 1e308, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        certattn.certify_topk(x, 0.01)


def test_internal_value_error_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    """Issue 14: only input validation is a one-line usage error; a bug is not."""
    import certattn.topk

    def bug(*a, **k):
        return np.reshape(np.arange(3), (2, 2))  # NumPy's ValueError: a bug, not input

    monkeypatch.setattr(certattn.topk, "certify_topk", bug)
    with pytest.raises(ValueError, match="reshape"):
        main(["certify", _rows(tmp_path)])


def test_input_error_is_a_value_error():
    from certattn.errors import InputError

    assert issubclass(InputError, ValueError)
    from certattn.cli import CLIError

    assert issubclass(CLIError, InputError)


@pytest.mark.parametrize("rows", ["0", "-5", "1e20", "100000000000000000000", "abc", "2.5",
                                  "10000001"])
def test_verify_rows_out_of_range(rows, capsys):
    """16.10: ``--rows 1e20`` was accepted (a run of ages)."""
    code, _, err = run(capsys, "verify", "--rows", rows, "--only", "TV-TAIL")
    assert code == 2
    assert "--rows" in _one_error_line(err) and "10,000,000" in err


def test_verify_rows_range_in_the_library():
    from certattn.verify import MAX_ROWS, run_verify

    for bad in (0, MAX_ROWS + 1, 2.5, True, 10**20):
        with pytest.raises(ValueError, match="rows must be an integer"):
            run_verify(bad, ids=["TV-TAIL"], progress=False)


def test_verify_help_states_the_measured_time(capsys):
    """The help's timing figures are the per-check cost model's (estimated_seconds), and
    it says what a row is."""
    from certattn.cli import _clock_words
    from certattn.verify import MAX_ROWS, estimated_seconds

    code, out, _ = run(capsys, "verify", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert f"the default sizes take about {_clock_words(estimated_seconds())};" in text
    assert f"--rows 100,000 about {_clock_words(estimated_seconds(100_000))}," in text
    assert f"{MAX_ROWS:,} (the most) about {_clock_words(estimated_seconds(MAX_ROWS))}" in text
    assert f"about {_clock_words(estimated_seconds(MAX_ROWS, jobs=2))} with --jobs 2" in text
    assert "A row is one query's logits" in text and "--jobs N" in text
    assert 20 <= estimated_seconds() <= 60  # the goal: the default run within 60 s


def _verify_stub(monkeypatch, action):
    """TV-TAIL passes at once; GAP-SINGLE runs ``action`` (an interruption)."""
    from certattn.verify import CHECKS

    real = CHECKS["TV-TAIL"]
    monkeypatch.setitem(CHECKS, "TV-TAIL", real.__class__(
        lambda rows, **k: (0.0, 1.0), real.default, real.rate))
    spec = CHECKS["GAP-SINGLE"]
    monkeypatch.setitem(CHECKS, "GAP-SINGLE", spec.__class__(
        lambda rows, **k: action(), spec.default, spec.rate))


def test_verify_ctrl_c_prints_the_finished_checks(monkeypatch, capsys):
    """16.10: a killed run printed nothing."""

    def interrupt():
        raise KeyboardInterrupt

    _verify_stub(monkeypatch, interrupt)
    code, out, err = run(capsys, "verify", "--rows", "10", "--only", "TV-TAIL", "GAP-SINGLE",
                         "OUT-BOUNDED")
    assert code == 130
    assert "| TV-TAIL |" in out and "GAP-SINGLE" not in out
    assert "interrupted: 1 of 3 checks finished" in out
    assert err.strip() == "certattn: interrupted after 1 of 3 checks"


def test_verify_sigterm_prints_the_finished_checks_as_json(monkeypatch, capsys):
    import signal

    def term():
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not interrupt")

    _verify_stub(monkeypatch, term)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run(capsys, "verify", "--rows", "10", "--only", "TV-TAIL", "GAP-SINGLE",
                         "--json")
    assert code == 143
    assert [d["id"] for d in json.loads(out)] == ["TV-TAIL"]
    assert "Traceback" not in err and err.count("\n") == 1
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("cmd", [["verify", "--rows", "300", "--only", "TV-TAIL"],
                                 ["certify"]])
def test_progress_and_quiet(cmd, capsys, monkeypatch):
    """One progress helper for every command: --progress forces it, --quiet wins over
    CERTATTN_PROGRESS=1, and it never touches stdout."""
    code, out_plain, err = run(capsys, *cmd, "--progress")
    assert code == 0 and "[" in err and "\r" in err
    assert "\r" not in out_plain
    monkeypatch.setenv("CERTATTN_PROGRESS", "1")
    code, out_quiet, err = run(capsys, *cmd, "--quiet")
    assert code == 0 and err == ""
    assert out_quiet.splitlines()[:2] == out_plain.splitlines()[:2]
    code, _, err = run(capsys, *cmd, "--progress", "--quiet")
    assert code == 2 and "not allowed with" in _one_error_line(err)


def test_one_progress_helper():
    import certattn.cli
    import certattn.verify._runner as runner
    from certattn._progress import Progress

    assert not hasattr(runner, "_Bar")
    assert issubclass(runner._CheckBar, Progress)
    assert not hasattr(certattn.cli, "_progress")


def test_progress_bar_reports_time_left_from_the_cost_model():
    import io

    from certattn.verify._runner import _CheckBar

    stream = io.StringIO()
    bar = _CheckBar("verify 1/2 TV-TAIL", 100, 0.0, 10.0, 20.0, 0.0)
    bar.stream = stream
    bar.update(50)
    assert "50/100 rows" in stream.getvalue() and "left" in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_one_entry_point_and_python_dash_m():
    """Issue 14: no ``verify.main``; ``python -m certattn`` and ``-m certattn.verify`` run the
    CLI."""
    import certattn.verify

    assert not hasattr(certattn.verify, "main") and "main" not in certattn.verify.__all__
    proc = subprocess.run([sys.executable, "-m", "certattn", "--version"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("certattn ")
    proc = subprocess.run([sys.executable, "-m", "certattn.verify", "--rows", "0"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--rows" in proc.stderr and "Traceback" not in proc.stderr


def test_long_double_beyond_float64_is_refused(tmp_path, capsys):
    """Cast to float64 such logits become infinite: a sound but non-minimal k and NumPy
    warnings.  Refused in one line; long doubles inside the range are certified."""
    ld = np.longdouble
    if np.finfo(ld).max <= np.finfo(np.float64).max:
        pytest.skip("long double is float64 on this platform")
    np.save(tmp_path / "far.npy", np.array([[ld("1e4000"), ld(0)]], dtype=ld))
    code, _, err = run(capsys, "certify", str(tmp_path / "far.npy"))
    assert code == 2 and "beyond the float64 range" in _one_error_line(err)
    np.save(tmp_path / "near.npy", np.array([[ld(30), ld(0), ld(-1)]], dtype=ld))
    code, out, err = run(capsys, "certify", str(tmp_path / "near.npy"), "--json")
    assert code == 0, err
    assert json.loads(out)["k"] == [1]


def test_library_errors_name_the_file_and_the_way_out(tmp_path, capsys):
    np.save(tmp_path / "m.npy", np.array([[0.0, 1.0], [-np.inf, -np.inf]]))
    code, _, err = run(capsys, "certify", str(tmp_path / "m.npy"))
    line = _one_error_line(err)
    assert code == 2 and str(tmp_path / "m.npy") in line and "--masked-rows skip" in line


@pytest.mark.parametrize("only", ["nope", "identities,nope", ",", ""])
def test_reproduce_only_takes_section_names(only, tmp_path, capsys):
    code, out, err = run(capsys, "reproduce", "--quick", "--only", only, "--out",
                         str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--only" in err and "identities" in err
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.parametrize("jobs", ["0", "17", "two", "-1"])
def test_reproduce_jobs_takes_1_to_max_jobs(jobs, tmp_path, capsys):
    from certattn.cli import _REPRODUCE_MAX_JOBS
    from certattn.reproduce import MAX_JOBS

    assert _REPRODUCE_MAX_JOBS == MAX_JOBS  # the parser's bound is the library's
    code, out, err = run(capsys, "reproduce", "--quick", "--jobs", jobs, "--out",
                         str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--jobs" in err
    assert not (tmp_path / "r").exists()
