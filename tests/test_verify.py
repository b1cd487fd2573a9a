"""``certattn verify``: every registered theorem passes its batch check, and checks can fail.

Runs the whole verification at a small size on NumPy (seconds), a few checks on
``array-api-strict`` (the device-faithful path), the JSON output and exit codes of
``certattn verify`` (:func:`certattn.cli.main`), and deliberately broken implementations
(monkeypatched library functions) that must make their check fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import certattn.bounds
import certattn.distribution
import certattn.gaussian
import certattn.geometry.gating
import certattn.topk
from certattn.cli import main as cli_main
from certattn.theorems import THEOREMS
from certattn.verify import BASE_ROWS, CHECKS, format_table, rows_for, run_verify


def main(argv):
    return cli_main(["verify", *argv])

_FIELDS = ["id", "rows", "max_violation", "tolerance", "passed", "seconds"]


@pytest.fixture(scope="module")
def small_run():
    return run_verify(rows=2000, seed=1, progress=False)


def test_every_theorem_passes_at_a_small_size(small_run):
    assert [r.id for r in small_run] == [t.id for t in THEOREMS]
    failed = [(r.id, r.max_violation, r.tolerance) for r in small_run if not r.passed]
    assert not failed, format_table(small_run)
    for r in small_run:
        assert r.rows >= 1 and r.seconds >= 0
        assert 0 <= r.max_violation <= r.tolerance


def test_table_lists_every_result(small_run):
    table = format_table(small_run)
    for r in small_run:
        assert f"| {r.id} | {r.rows:,} |" in table
    assert f"{len(small_run)} passed, 0 failed" in table


STRICT_IDS = ["TV-TAIL", "TV-KL", "DIV-COROLLARIES", "TOPK-MINIMAL", "GAP-SINGLE",
              "BLOCK-BOUNDS", "OUT-HEAD-TAIL", "OUT-VAR-DECOMP", "GAUSS-THRESHOLD",
              "GAUSS-KEPS", "SEARCH-SOUND"]


def test_checks_pass_on_array_api_strict():
    pytest.importorskip("array_api_strict")
    res = run_verify(rows=600, backend="strict", ids=STRICT_IDS, progress=False)
    assert [r.id for r in res] == STRICT_IDS
    assert all(r.passed for r in res), format_table(res)


def test_seeded_runs_are_reproducible():
    a = run_verify(rows=300, seed=7, ids=["TV-TAIL", "GAUSS-FINITE-N"], progress=False)
    b = run_verify(rows=300, seed=7, ids=["TV-TAIL", "GAUSS-FINITE-N"], progress=False)
    assert [r.max_violation for r in a] == [r.max_violation for r in b]


def test_json_output_has_exactly_the_fields(capsys):
    assert main(["--rows", "200", "--only", "TV-TAIL", "GAUSS-TILT", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in out] == ["TV-TAIL", "GAUSS-TILT"]
    for d in out:
        assert list(d) == _FIELDS
        assert d["passed"] is True and d["rows"] == 200


def test_usage_errors_exit_2(capsys):
    assert main(["--only", "NO-SUCH-THEOREM"]) == 2
    assert main(["--rows", "0"]) == 2
    assert main(["--backend", "fortran"]) == 2
    with pytest.raises(ValueError, match="no verify check"):
        run_verify(rows=10, ids=["NO-SUCH-THEOREM"])


def test_rows_scale_row_based_and_other_checks():
    for tid, spec in CHECKS.items():
        assert rows_for(tid, None) == spec.default
        big = rows_for(tid, 100 * BASE_ROWS)
        assert big == (100 * BASE_ROWS if spec.row_based else 10 * spec.default)  # sqrt
        small = rows_for(tid, BASE_ROWS // 10)
        assert small == (BASE_ROWS // 10 if spec.row_based
                         else max(spec.minimum, -(-spec.default // 10)))  # proportional
        assert rows_for(tid, 1) >= 1


def test_progress_bar_goes_to_stderr(capsys, monkeypatch):
    monkeypatch.setenv("CERTATTN_PROGRESS", "1")
    run_verify(rows=300, ids=["TV-TAIL"])
    captured = capsys.readouterr()
    assert "TV-TAIL" in captured.err and captured.out == ""


def _half(f):
    return lambda *a, **k: 0.5 * np.asarray(f(*a, **k))


@pytest.mark.parametrize(
    ("tid", "module", "name", "wrap"),
    [
        ("GAP-SINGLE", certattn.bounds, "gap_bound", _half),
        ("TV-TAIL", certattn.distribution, "tail_mass",
         lambda f: lambda *a, **k: np.asarray(f(*a, **k)) * (1 + 1e-6)),
        ("GAUSS-KEPS", certattn.gaussian, "keps_fraction",
         lambda f: lambda *a, **k: np.asarray(f(*a, **k)) * (1 + 1e-4)),
        ("GEO-SPHERE-GATE", certattn.geometry.gating, "sphere_cap_curvature",
         lambda f: lambda *a, **k: f(*a, **k) * 1.001),
    ],
)
def test_a_broken_implementation_fails_its_check(monkeypatch, tid, module, name, wrap):
    monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    (res,) = run_verify(rows=400, ids=[tid], progress=False)
    assert not res.passed and res.max_violation > res.tolerance


def test_a_tail_head_bound_looser_than_its_margin_fails_out_diameter(monkeypatch):
    """tail_head may exceed the diameter only by its own rounding margin (about 3e-13 C per
    unit of tail on ordinary rows), not by sqrt(u) C: a bound raised by 1e-9 C tau fails."""
    import dataclasses

    real = certattn.output.output_bounds

    def looser(x, v, kept, **kw):
        ob = real(x, v, kept, **kw)
        c = float(np.max(np.linalg.norm(np.asarray(v), axis=-1)))
        return dataclasses.replace(ob, tail_head=ob.tail_head + 1e-9 * c * ob.tail_upper)

    monkeypatch.setattr(certattn.output, "output_bounds", looser)
    (res,) = run_verify(rows=400, ids=["OUT-DIAMETER"], progress=False)
    assert not res.passed and res.max_violation > res.tolerance


def test_a_non_minimal_certificate_fails(monkeypatch):
    real = certattn.topk.certify_topk

    class Looser:
        def __init__(self, cert, n):
            self._c, self.k = cert, np.minimum(np.asarray(cert.k) + 1, n)

        def __getattr__(self, name):
            return getattr(self._c, name)

    monkeypatch.setattr(certattn.topk, "certify_topk",
                        lambda x, eps, **kw: Looser(real(x, eps, **kw), np.shape(x)[-1]))
    (res,) = run_verify(rows=400, ids=["TOPK-MINIMAL"], progress=False)
    assert not res.passed


def test_a_crashing_check_is_a_failure_not_a_crash(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(certattn.distribution, "tail_mass", boom)
    assert main(["--rows", "50", "--only", "TV-TAIL"]) == 1
    assert "boom" in capsys.readouterr().err


def test_json_stays_standard_when_a_check_crashes(monkeypatch, capsys):
    monkeypatch.setattr(certattn.distribution, "tail_mass", lambda *a, **k: 1 / 0)
    assert main(["--rows", "50", "--only", "TV-TAIL", "--json"]) == 1
    (d,) = json.loads(capsys.readouterr().out)
    assert d["passed"] is False and d["max_violation"] is None


def test_checks_keep_arrays_on_a_second_strict_device():
    """array-api-strict's ``device1`` catches a forgotten ``device=`` in library or check."""
    xs = pytest.importorskip("array_api_strict")
    for tid in ("TOPK-MINIMAL", "GAP-EXACT-HEAD", "OUT-BOUNDED", "GAUSS-TILT"):
        viol, tol = CHECKS[tid].func(
            200, xp=xs, device=xs.Device("device1"), rng=np.random.default_rng(0), progress=None
        )
        assert viol <= tol, tid
