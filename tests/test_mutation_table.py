"""The mutation script's table stays applicable: every mutant's line is in its file once.

A mutant whose line no longer exists (the code was rewritten) is silently never applied;
``benchmarks/mutation.py`` would then report nothing for it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("certattn_mutation",
                                                  ROOT / "benchmarks" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod.MUTANTS


@pytest.mark.parametrize("mutant", _mutants(), ids=lambda m: m.name)
def test_every_mutant_changes_exactly_one_line_of_its_file(mutant):
    text = (ROOT / mutant.path).read_text(encoding="utf-8")
    assert text.count(mutant.old) == 1, f"{mutant.name}: line not found once in {mutant.path}"
    assert mutant.new != mutant.old
