"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step on the CPU at tiny sizes,
so the one command a lent GPU session runs cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_a_passing_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["ok"] and report["dry_run"]
    steps = report["steps"]
    assert list(steps) == ["env", "tests", "verify", "agreement", "speed", "evaluate"]
    assert all(s["status"] in ("ok", "skipped") for s in steps.values()), steps
    assert steps["evaluate"]["status"] == "skipped"
    agree = steps["agreement"]["result"]
    assert "array-numpy" in agree["paths"]
    assert all(p["k_mismatches"] == 0 and p["sound_vs_eps"] for p in agree["paths"].values())
    assert steps["verify"]["result"]["results"][0]["passed"]
    assert steps["speed"]["result"]["cases"]
    for case in steps["speed"]["result"]["cases"].values():
        assert case["certify_s"] > 0 and case["floor_s"] > 0


def test_a_failing_step_fails_the_report(tmp_path, monkeypatch):
    """The status logic: a k mismatch or an exp bit mismatch is a failure."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    ok = {"paths": {"a": {"k_mismatches": 0}}, "exp_poly_bits": {"bit_mismatches": 0}}
    assert gpu_check.status(ok) == "ok"
    assert gpu_check.status({"paths": {"a": {"k_mismatches": 2}}}) == "failed"
    assert gpu_check.status({"exp_poly_bits": {"bit_mismatches": 1}}) == "failed"
    assert gpu_check.status({"rc": 1}) == "failed"
    assert gpu_check.status({"skipped": "no GPU"}) == "skipped"
