"""Without the [hf] extra, certattn.hf and `certattn evaluate` fail in one clear line."""

from __future__ import annotations

import sys

import pytest

from certattn.cli import main


@pytest.fixture
def no_torch(monkeypatch):
    for name in [m for m in sys.modules if m == "certattn.hf" or m.startswith("certattn.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_import_names_the_missing_extra(no_torch):
    with pytest.raises(ImportError, match=r"the \[hf\] extra is not installed"):
        import certattn.hf  # noqa: F401


def test_evaluate_command_says_so_in_one_line(no_torch, capsys):
    assert main(["evaluate", "--model", "smollm2", "--tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("certattn: error: the [hf] extra is not installed")
