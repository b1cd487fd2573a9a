"""``certattn verify --power``: every check rejects a counterfeit of its theorem.

:data:`certattn.verify._power.COUNTERFEITS` holds one counterfeit per registered theorem
(its statement made slightly false); the table is checked against the registry, the
substitution is checked to restore the library, and every check must fail on its
counterfeit at its default size (slow: one run of every check).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import certattn.bounds
import certattn.verify.bounds
from certattn.cli import main as cli_main
from certattn.theorems import THEOREMS
from certattn.verify import run_verify
from certattn.verify._power import COUNTERFEITS, _resolve, counterfeit, format_power, power


def test_one_counterfeit_per_registered_theorem():
    assert sorted(COUNTERFEITS) == sorted(t.id for t in THEOREMS)
    for tid, cf in COUNTERFEITS.items():
        assert cf.targets and cf.what, tid
        assert 0 < cf.delta < 0.5, tid
        for target in cf.targets:
            assert callable(_resolve(target)[2]), target


def test_counterfeit_substitutes_and_restores():
    orig = certattn.bounds.gap_bound
    x = np.array([[3.0, 1.0, 0.0, -1.0]])
    k = np.array([1])
    with counterfeit("GAP-SINGLE", 0.25):
        assert certattn.bounds.gap_bound is not orig
        assert float(certattn.bounds.gap_bound(x, k)[0]) == pytest.approx(
            0.75 * float(orig(x, k)[0]), rel=1e-15)
    assert certattn.bounds.gap_bound is orig
    assert "gap_bound" not in vars(certattn.verify.bounds) or (
        certattn.verify.bounds.gap_bound is orig)


def test_class_method_counterfeit_is_restored():
    from certattn.quant import QuantKeys

    orig = QuantKeys.__dict__["error_bound"]
    with counterfeit("QUANT-SCORE", 0.5):
        assert QuantKeys.__dict__["error_bound"] is not orig
    assert QuantKeys.__dict__["error_bound"] is orig


def test_a_check_passes_and_its_counterfeit_fails():
    assert run_verify(rows=300, ids=["GAP-UNIFORM"], progress=False)[0].passed
    with counterfeit("GAP-UNIFORM", 1e-6):
        assert not run_verify(rows=300, ids=["GAP-UNIFORM"], progress=False)[0].passed
    assert run_verify(rows=300, ids=["GAP-UNIFORM"], progress=False)[0].passed


def test_power_reports_sharpness_below_the_counterfeit():
    r = power("TV-TAIL", rows=200, steps=3)
    assert r.rejected and r.sharpness is not None and r.sharpness <= 1e-6
    assert "| TV-TAIL | 200 |" in format_power([r])


def test_cli_power_json(capsys):
    assert cli_main(["verify", "--power", "--only", "GAP-SINGLE", "--rows", "200",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["id"] == "GAP-SINGLE" and out[0]["rejected"] is True
    assert out[0]["sharpness"] <= out[0]["delta"]


@pytest.mark.slow
@pytest.mark.parametrize("tid", [t.id for t in THEOREMS])
def test_every_check_rejects_its_counterfeit_at_the_default_rows(tid):
    with counterfeit(tid):
        res = run_verify(ids=[tid], progress=False)[0]
    assert not res.passed, (tid, res.max_violation, res.tolerance)
