"""The certattn command line: outputs, file formats and one-line errors with status 2."""

from __future__ import annotations

import json
import subprocess
import sys

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
