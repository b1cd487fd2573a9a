"""Every symbolic check in proofs/ passes (each is also runnable as ``python -m proofs``)."""

from __future__ import annotations

import pytest

from proofs import load_all

_PROOFS = load_all()


@pytest.mark.parametrize("p", _PROOFS, ids=[f"{p.theorem}:{p.func.__name__}" for p in _PROOFS])
def test_symbolic_check(p):
    p.func()
