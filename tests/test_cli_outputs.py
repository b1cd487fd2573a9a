"""Issue 20 (items 9, 11): one rule for every ``--out``, progress on lazy inputs, ``-0``.

The rule (README, "Errors"): ``--out`` names a file or a folder whose parent folder
exists; a missing parent folder is one line on stderr and exit status 2, checked before
any work, and nothing is created.  A folder output itself is created when missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from certattn.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certattn: error:"), err
    return lines[0]


@pytest.fixture
def shards(tmp_path):
    pytest.importorskip("dask.array")
    d = tmp_path / "shards"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "a.npy", rng.normal(0, 3, (30, 64)))
    np.save(d / "b.npy", rng.normal(0, 3, (20, 64)))
    return d


def _forbid(monkeypatch, module: str, name: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail(f"{name} ran"))


def _argv(kind: str, out: str, tmp_path, shards_dir) -> list[str]:
    return {
        "certify": ["certify", "--out", out],
        "certify_dir": ["certify", str(shards_dir), "--out", out],
        "certify_zarr": ["certify", str(shards_dir), "--out", out + ".zarr"],
        "budget": ["budget", "--out", out],
        "plot": ["plot", "gaussian", "--quick", "--out", out],
        "reproduce": ["reproduce", "--quick", "--models", "minilm", "--out", out],
        "audit": ["audit", "--out", out],
    }[kind]


_WORK = {
    "certify": ("certattn.topk", "certify_topk"),
    "certify_dir": ("certattn.topk", "certify_topk"),
    "certify_zarr": ("certattn.topk", "certify_topk"),
    "budget": ("certattn.budget", "budget_for_model"),
    "plot": ("certattn.plots.gaussian", "save_gaussian_figures"),
    "reproduce": ("certattn.reproduce", "reproduce"),
    "audit": ("certattn.approx.audit", "audit_model"),
}


@pytest.mark.parametrize("kind", sorted(_WORK))
def test_every_out_in_a_missing_folder_is_one_line_exit_2(kind, tmp_path, capsys, monkeypatch):
    """Issue 20.11: ``certify DIR --out`` and ``audit --out`` created missing parents."""
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "a.npy", np.zeros((2, 8)))
    _forbid(monkeypatch, *_WORK[kind])
    target = tmp_path / "missing" / "deeper" / "result"
    code, out, err = run(capsys, *_argv(kind, str(target), tmp_path, d))
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "no such directory" in line and str(tmp_path / "missing" / "deeper") in line
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("kind", sorted(_WORK))
def test_every_out_under_a_file_is_one_line_exit_2(kind, tmp_path, capsys, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "a.npy", np.zeros((2, 8)))
    (tmp_path / "afile").write_text("x")
    _forbid(monkeypatch, *_WORK[kind])
    code, _, err = run(capsys, *_argv(kind, str(tmp_path / "afile" / "r"), tmp_path, d))
    assert code == 2
    assert "is not a directory" in _one_error_line(err)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("suffix", ["", ".zarr"])
def test_certify_dir_out_folder_is_created_when_its_parent_exists(shards, tmp_path, capsys,
                                                                  suffix):
    if suffix:
        pytest.importorskip("zarr")
    target = tmp_path / f"result{suffix}"
    code, _, err = run(capsys, "certify", shards, "--out", target, "--quiet")
    assert code == 0, err
    assert target.is_dir() and err == ""


def test_certify_dir_progress_and_quiet(shards, capsys, monkeypatch):
    """Issue 20.9: ``--progress`` was ignored for a directory (or zarr) input."""
    code, out_bar, err = run(capsys, "certify", shards, "--progress")
    assert code == 0 and "\r" in err and "certifying [" in err
    assert "\r" not in out_bar
    assert err.endswith("\r\x1b[K")  # the bar leaves nothing behind
    monkeypatch.setenv("CERTATTN_PROGRESS", "1")
    code, out_quiet, err = run(capsys, "certify", shards, "--quiet")
    assert code == 0 and err == ""
    assert out_quiet == out_bar


def test_certify_store_progress_counts_tasks(shards, capsys):
    from certattn._dask import certify_store

    assert certify_store(shards, 0.01, progress=True) == 0
    err = capsys.readouterr().err
    last = err.split("\r")[-2]  # the final drawing, before the erase
    done, total = last.split("] ")[1].split(" tasks")[0].split("/")
    assert done == total and int(total) > 0


@pytest.mark.parametrize("cmd", [["budget"], ["certify"]])
def test_eps_minus_zero_prints_zero(cmd, capsys):
    """Issue 20.11: ``--eps -0`` printed "eps = -0"."""
    code, out, err = run(capsys, *cmd, "--eps", "-0")
    assert code == 0, err
    assert "eps = 0 " in out and "-0" not in out.split("\n\n")[0]


def test_check_eps_normalises_minus_zero():
    import math

    from certattn._validate import check_eps

    assert math.copysign(1.0, check_eps(-0.0)) == 1.0
