"""``certattn reproduce`` in quick mode: files, summary fields, identity checks, and
numbers consistent with :func:`certattn.certify_topk`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from certattn import certify_topk
from certattn.models import load_sample
from certattn.reproduce import EPS_GRID, PAPER, Section, reproduce

SECTIONS = ("identities", "bounds", "gaussian", "output", "budgets", "search", "skyformer",
            "hybrid", "fal", "delta")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("reproduce")
    summary = reproduce(out, quick=True, progress=False)
    return out, summary, json.loads((out / "summary.json").read_text())


def test_files_written(quick_run) -> None:
    out, summary, doc = quick_run
    assert (out / "summary.md").stat().st_size > 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 6
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.name
    for sec in doc["sections"].values():
        for f in sec["figures"]:
            assert (out / f).exists(), f
    assert set(summary.files) >= {"summary.md", "summary.json"}


def test_summary_fields(quick_run) -> None:
    _, summary, doc = quick_run
    assert doc["schema"] == "certattn.reproduce/1" and doc["quick"] is True
    assert set(doc["sections"]) == set(SECTIONS)
    for name, sec in doc["sections"].items():
        # only sections that need SmolLM2 at full length may be pending in quick mode
        assert sec["status"] == "ok" or "smollm2" in sec["reason"].lower(), (name, sec["reason"])
        assert {"title", "status", "reason", "seconds", "figures", "results"} <= set(sec)
    assert doc["paper"]["search_scored"] == {"128": 58.8, "256": 107.8}
    assert doc["models"]["minilm"]["status"] == "ok"
    assert doc["models"]["smollm2"]["status"] == "pending"  # quick mode
    assert "model/smollm2" in summary.pending
    assert doc["headline"]["search_n128"]["paper_scored"] == 58.8


def test_markdown_states_paper_numbers(quick_run) -> None:
    out, _, _ = quick_run
    md = (out / "summary.md").read_text()
    assert "58.8 / 128" in md and "107.8 / 256" in md
    assert PAPER["keps_rule"] in md
    for name in SECTIONS:
        assert f"| {name} |" in md


def test_identity_checks_pass(quick_run) -> None:
    """Theorems TV-TAIL and TV-KL on real rows, for Top-k and arbitrary kept sets."""
    _, _, doc = quick_run
    res = doc["sections"]["identities"]["results"]
    assert res["all_pass"] is True
    for kind in res["minilm"].values():
        assert kind["pass"] is True and kind["rows"] > 0
        assert kind["max_abs_tv_minus_tau"] < 1e-9


def test_budgets_match_certify_topk(quick_run) -> None:
    """Per-layer mean k_eps / n of the summary equals certify_topk on the same rows."""
    _, _, doc = quick_run
    res = doc["sections"]["budgets"]["results"]["minilm"]
    atts = load_sample()
    for j, layer in enumerate(atts[0].layers):
        for e in EPS_GRID:
            fr = np.concatenate([
                (np.asarray(certify_topk(a.logits[j], e).k) / a.n_tokens).ravel() for a in atts
            ])
            row = next(t for t in res["per_layer"] if t["layer"] == int(layer))
            assert row["mean_k_over_n"][str(e)] == pytest.approx(fr.mean(), rel=1e-12)
            assert row["reduction"][str(e)] >= 1.0
    # tighter budgets keep more keys
    o = res["overall"]
    fr = [o[str(e)]["mean_k_over_n"] for e in EPS_GRID]
    assert fr == sorted(fr, reverse=True)


def test_bounds_and_output_sound(quick_run) -> None:
    _, _, doc = quick_run
    for section in ("bounds", "output"):
        sec = doc["sections"][section]
        # in quick mode on the shipped sample every section runs: "pending" is a failure
        assert sec["status"] == "ok", (section, sec["reason"])
        for name, b in sec["results"]["minilm"]["bounds"].items():
            if name != "tightest_share":
                assert b["sound"] is True, (section, name)
    b = doc["sections"]["bounds"]["results"]["minilm"]
    assert all(v["mean_k_over_n"] >= b["exact_mean_k_over_n"] for v in b["bounds"].values())


def test_search_never_beats_exact_floor(quick_run) -> None:
    _, _, doc = quick_run
    sec = doc["sections"]["search"]
    assert sec["status"] == "ok", sec["reason"]
    for n, v in sec["results"]["minilm"]["by_n"].items():
        assert 1 <= v["exact_k_eps"] <= v["mc_scored"] <= int(n)
        assert v["exact_k_eps"] <= v["tree_scored"] <= int(n)
        assert v["exact_k_eps"] <= v["quant4_scored"] <= int(n)
        assert v["exact_k_eps"] <= v["quant8_scored"] <= v["quant4_scored"] + 1
        assert 0 < v["quant8_read"] and 0 < v["mc_read"]


def test_missing_module_is_pending_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    import certattn.reproduce as rp

    monkeypatch.setitem(sys.modules, "certattn.search", None)  # import raises ImportError

    def boom(*args, **kwargs) -> Section:
        raise RuntimeError("broken on purpose")

    keep = [s for s in rp._SECTIONS if s[0] == "search"] + [("identities", "x", boom)]
    monkeypatch.setattr(rp, "_SECTIONS", tuple(keep))
    s = reproduce(tmp_path, models=("minilm",), quick=True, progress=False)
    assert s.sections["search"].status == "pending"
    assert "certattn.search" in s.sections["search"].reason
    assert s.sections["identities"].status == "failed"
    assert "broken on purpose" in s.sections["identities"].reason
    assert "search" in s.pending
    assert "pending" in (tmp_path / "summary.md").read_text()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        reproduce(tmp_path, models=("gpt2",), quick=True, progress=False)
    with pytest.raises(ValueError, match="smollm2_tokens"):
        reproduce(tmp_path, smollm2_tokens=4, quick=True, progress=False)


def test_delta_section_measures_recovery(quick_run) -> None:
    """Issue 11: Delta's recovery in output-error terms, beside the paper's RULER numbers."""
    out, _, doc = quick_run
    sec = doc["sections"]["delta"]
    assert sec["status"] == "ok", sec["reason"]
    r = sec["results"]["minilm"]
    assert r["unsound"] == 0 and r["delta_bound_holds"] is True
    assert 0.0 <= r["window_rel_mean"] and r["delta_cost_frac"] >= r["window_cost_frac"]
    assert "96.54" in (out / "summary.md").read_text()


def test_closing_lines_show_the_quantized_search(quick_run) -> None:
    """Issue 24: the terminal report ends with the quantized search's keys scored (8-bit
    and 4-bit estimates), the floor k_eps and the paper's figure, not only summary.md."""
    _, summary, doc = quick_run
    report = summary.short_report()
    for n, v in doc["sections"]["search"]["results"]["minilm"]["by_n"].items():
        line = next(x for x in report.splitlines() if f"quantized search minilm n = {n}:" in x)
        assert f"8-bit {v['quant8_scored']:.1f}" in line
        assert f"4-bit {v['quant4_scored']:.1f}" in line
        assert f"floor k_eps {v['exact_k_eps']:.1f}" in line
    # they close the report, after the parts pending (quick mode has some)
    quant = [x for x in report.splitlines() if "quantized search" in x]
    assert quant and report.splitlines()[-len(quant):] == quant
    assert "pending" in report


def test_only_runs_the_named_sections(tmp_path: Path) -> None:
    s = reproduce(tmp_path, models=("minilm",), quick=True, progress=False,
                  only=("identities", "gaussian"))
    assert set(s.sections) == set(SECTIONS)  # every section is still listed
    ran = {n for n, sec in s.sections.items() if sec.status != "skipped"}
    assert ran == {"identities", "gaussian"}
    assert s.sections["search"].reason == "not selected (--only)"
    assert "skipped" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="unknown section"):
        reproduce(tmp_path, quick=True, progress=False, only=("identities", "nope"))


def test_full_sizes_are_the_papers(tmp_path: Path) -> None:
    from certattn.reproduce import SIZES
    from certattn.reproduce.hybrid import FIT
    from certattn.reproduce.skyformer import SMOLLM2_NS

    try:
        SIZES.use(True)
        assert SIZES.skyformer_ns == SMOLLM2_NS and SIZES.hedgehog_steps == FIT["steps"]
        assert SIZES.output_layers is None and SIZES.delta_layers is None  # every layer
        SIZES.use(False)
        assert set(SIZES.skyformer_ns) < set(SMOLLM2_NS)
        assert SIZES.hedgehog_steps < FIT["steps"]
        assert SIZES.output_layers is not None and SIZES.output_layers >= 2
        assert SIZES.delta_layers is not None and SIZES.delta_layers >= 2
        reproduce(tmp_path, models=("minilm",), quick=True, progress=False, full=True,
                  only=("identities",))
        assert SIZES.full is True  # set by the run
    finally:
        SIZES.use(False)


def test_signals_are_shared_and_sliced(monkeypatch) -> None:
    """A causal model's forward of a prefix (fewer layers) is served from a kept one."""
    import certattn.approx.fal as fal
    from certattn.reproduce import _approx

    calls = []

    class Causal:
        causal = True

    def fake(model, ids, n_layers=None):
        calls.append((len(ids), n_layers))
        n, L = len(ids), n_layers or 3
        return fal.LayerSignals("llama", np.asarray(ids), np.zeros((L, n, 2)),
                                np.zeros((L, n, 2)), np.zeros((L, n, 2)),
                                [np.arange(n)[None, :, None] * (i + 1) for i in range(L)],
                                [np.zeros((1, n, 1))] * L, [np.zeros((1, n, 1))] * L)

    monkeypatch.setattr(fal, "layer_signals", fake)
    m = Causal()
    try:
        full = _approx.signals(m, [5, 6, 7, 8])
        part = _approx.signals(m, [5, 6], n_layers=2)
        again = _approx.signals(m, [5, 6, 7, 8])
        other = _approx.signals(m, [9, 9], n_layers=2)
    finally:
        _approx.forget_signals()
    assert calls == [(4, None), (2, 2)]  # the prefix and the repeat were served
    assert part.attn_out.shape == (2, 2, 2) and len(part.queries) == 2
    np.testing.assert_array_equal(part.queries[1], full.queries[1][:, :2])
    assert again is not None and other.token_ids.tolist() == [9, 9]


def test_output_layers_are_spread_and_capped() -> None:
    from certattn.reproduce.output import _layers

    assert _layers(6, 10) == list(range(6))
    assert _layers(30, None) == list(range(30))
    picked = _layers(30, 10)
    assert len(picked) == 10 and picked[0] == 0 and picked[-1] == 29
    assert picked == sorted(set(picked))


def test_skyformer_spectral_norm_matches_the_svd() -> None:
    from certattn.reproduce.skyformer import _spec

    rng = np.random.default_rng(1)
    for shape in ((512, 32), (40, 64)):
        for scale in (1.0, 1e-8, 1e6):
            x = rng.normal(size=shape) * scale
            assert abs(_spec(x) - np.linalg.norm(x, 2)) <= 1e-12 * np.linalg.norm(x, 2)
    assert _spec(np.zeros((8, 4))) == 0.0


def _pids_seen(path: Path):
    """A progress callback that records the id of the process calling it in ``path``."""
    import os

    def note(stage: str, done: int, total: int) -> None:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    return note


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers: Linux only")
def test_jobs_give_the_same_results(tmp_path: Path) -> None:
    """Issue 24: sections shared among 2 forked processes give what 1 process gives."""
    import os

    from threadpoolctl import threadpool_info

    only = ("identities", "gaussian", "output", "search", "delta")
    docs, pids = {}, {}
    blas = {p["filepath"]: p["num_threads"] for p in threadpool_info()
            if p["user_api"] == "blas"}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        seen = tmp_path / f"pids{jobs}"
        reproduce(out, models=("minilm",), quick=True, progress=_pids_seen(seen), only=only,
                  jobs=jobs)
        docs[jobs] = json.loads((out / "summary.json").read_text())["sections"]
        pids[jobs] = set(seen.read_text().split())
    assert pids[1] == {str(os.getpid())}
    assert len(pids[2]) == 2 and str(os.getpid()) in pids[2]  # one worker was forked
    for name in SECTIONS:
        a, b = docs[1][name], docs[2][name]
        assert (a["status"], a["figures"], a["results"]) == (b["status"], b["figures"],
                                                             b["results"]), name
    assert {n for n, s in docs[2].items() if s["status"] == "ok"} == set(only)
    # the BLAS pools, limited while the sections share the cores, are given back
    after = {p["filepath"]: p["num_threads"] for p in threadpool_info()
             if p["user_api"] == "blas"}
    assert blas and {f: after[f] for f in blas} == blas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers: Linux only")
def test_a_worker_that_dies_fails_its_sections_only(tmp_path: Path, monkeypatch) -> None:
    import os

    import certattn.reproduce as rp

    def die(*args, **kwargs) -> Section:
        os._exit(3)

    assert rp._split(["identities", "gaussian"], 2) == [["gaussian"], ["identities"]]
    monkeypatch.setattr(rp, "_SECTIONS", tuple((n, t, die if n == "identities" else f)
                                               for n, t, f in rp._SECTIONS))
    s = reproduce(tmp_path, models=("minilm",), quick=True, progress=False,
                  only=("identities", "gaussian"), jobs=2)
    assert s.sections["gaussian"].status == "ok"
    assert s.sections["identities"].status == "failed"
    assert "exit code 3" in s.sections["identities"].reason


def test_split_balances_the_sections() -> None:
    from certattn.reproduce import _COST, _split, default_jobs
    from certattn.reproduce import SECTIONS as ALL

    groups = _split(ALL, 2)
    assert sorted(n for g in groups for n in g) == sorted(ALL)
    assert all(g == sorted(g, key=ALL.index) for g in groups)
    loads = [sum(_COST[n] for n in g) for g in groups]
    assert max(loads) <= 0.55 * sum(loads)  # about even: the wall time is the heavier one
    assert _split(["identities"], 2) == [["identities"]]  # never an empty group
    assert _split(ALL, 1) == [list(ALL)]
    assert 1 <= default_jobs() <= 2
    with pytest.raises(ValueError, match="jobs"):
        reproduce("unused", quick=True, progress=False, jobs=0)


def test_smollm2_record_from_the_kept_forward_is_the_models() -> None:
    """The run's SmolLM2 record is built from the layer signals' forward (one forward for
    the sections): it equals the model's own ``attention`` record."""
    from certattn._corpus import corpus_text
    from certattn.approx.fal import layer_signals
    from certattn.reproduce._approx import _smollm2

    try:
        m = _smollm2()
    except ImportError as exc:
        pytest.skip(f"SmolLM2 not installed: {exc}")
    ids = m.encode(corpus_text())[:40]
    sig = layer_signals(m, ids)
    rec = m._record(sig.token_ids, range(m.n_layers), sig.queries, sig.keys, sig.values)
    ref = m.attention(ids)
    for name in ("queries", "keys", "values", "layers", "token_ids", "kv_head"):
        np.testing.assert_array_equal(getattr(rec, name), getattr(ref, name), err_msg=name)
    assert (rec.model, rec.tokens, rec.scale, rec.causal, rec.metadata) == (
        ref.model, ref.tokens, ref.scale, ref.causal, ref.metadata)
