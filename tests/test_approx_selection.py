"""window_sinks and quest (certattn.approx.selection) against their published definitions,
and every certificate (TV-TAIL, OUT-*, the certified fallback's box bound) against exact
arithmetic (mpmath)."""

from __future__ import annotations

import functools

import array_api_compat.numpy as xnp
import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from certattn._validate import InputError
from certattn.approx import ApproxResult
from certattn.approx.fallback import METADATA_PER_PAGE, box_tail_upper
from certattn.approx.selection import quest, window_sinks
from certattn.policies import Context

from ._exact import exact_tail_of_set, exact_weights


def _dense(q, k, v, mask=None):
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return s, p, p @ v


def _qkv(rng, h=2, n=40, d=6, dv=3, spread=1.0):
    q = rng.standard_normal((h, n, d)) * spread
    k = rng.standard_normal((h, n, d))
    v = rng.standard_normal((h, n, dv))
    return q, k, v


def _causal(n):
    return np.tril(np.ones((n, n), bool))


def _ws_reference(visible, window, sinks):
    """First `sinks` and last `window` visible keys, by a loop over positions."""
    out = np.zeros_like(visible)
    for idx in np.ndindex(visible.shape[:-1]):
        pos = np.flatnonzero(visible[idx])
        out[idx][pos[:sinks]] = True
        if window:
            out[idx][pos[-window:]] = True
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_window_sinks_keeps_the_published_set(causal):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, n=37)
    r = window_sinks(q, k, v, window=7, sinks=3, causal=causal)
    assert isinstance(r, ApproxResult) and r.method == "window_sinks"
    vis = np.broadcast_to(_causal(37) if causal else np.ones((37, 37), bool), r.kept.shape)
    np.testing.assert_array_equal(r.kept, _ws_reference(vis, 7, 3))
    np.testing.assert_array_equal(r.cost, r.kept.sum(-1))  # cost = keys kept
    assert r.params == {"window": 7, "sinks": 3}
    # output = softmax renormalised on the kept set
    s, _, _ = _dense(q, k, v, vis)
    t = np.where(r.kept, s, -np.inf)
    w = np.exp(t - t.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(r.weights, w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r.output, w @ v, rtol=1e-11, atol=1e-13)


def test_window_sinks_with_padding_mask_and_grouped_heads():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((4, 30, 5))
    k = rng.standard_normal((2, 30, 5))
    v = rng.standard_normal((2, 30, 2))
    mask = np.ones((30, 30), bool)
    mask[:, 25:] = False  # padding keys
    mask[:, 2] = False
    r = window_sinks(q, k, v, window=4, sinks=2, mask=mask)
    np.testing.assert_array_equal(r.kept, _ws_reference(np.broadcast_to(mask, (4, 30, 30)), 4, 2))
    rep = window_sinks(q, np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0), window=4, sinks=2,
                       mask=mask)
    np.testing.assert_allclose(r.output, rep.output, rtol=0, atol=0)


def test_window_covering_the_context_is_exact_attention():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, n=33, spread=2.0)
    for causal in (False, True):
        r = window_sinks(q, k, v, window=33, sinks=0, causal=causal)
        _, p, attn = _dense(q, k, v, _causal(33) if causal else None)
        assert np.all(r.kept == (p > 0))
        np.testing.assert_array_equal(r.tail_upper, 0.0)
        np.testing.assert_allclose(r.output, attn, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(r.weights, p, rtol=1e-12, atol=1e-16)
        assert np.all(r.error_bound >= np.linalg.norm(r.output - attn, axis=-1))


def test_quest_hand_checked_pages():
    # pages of 2 keys; q = (1, 1): box bounds 2 (page 0), -1 (page 1), 6 (page 2)
    k = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [-2.0, 0.0], [3.0, 3.0], [2.0, 2.0]])
    q = np.array([[1.0, 1.0]])
    v = np.arange(12.0).reshape(6, 2)
    r = quest(q, k, v, budget=4, page_size=2, scale=1.0)
    np.testing.assert_array_equal(r.kept[0], [True, True, False, False, True, True])
    assert r.cost[0] == 4 + METADATA_PER_PAGE * 3  # kept keys + two corners per page
    r1 = quest(q, k, v, budget=1, page_size=2, scale=1.0)  # one page: the best bound
    np.testing.assert_array_equal(r1.kept[0], [False, False, False, False, True, True])
    s = q @ k.T
    w = np.where(r1.kept, np.exp(s - s.max()), 0.0)
    np.testing.assert_allclose(r1.output, (w / w.sum()) @ v, rtol=1e-14)


def test_quest_keeps_the_top_pages_by_box_bound():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, h=1, n=53, d=4)
    for causal in (False, True):
        r = quest(q, k, v, budget=20, page_size=8, causal=causal)
        vis = _causal(53) if causal else np.ones((53, 53), bool)
        n_pages = 7
        for i in range(53):
            bounds = []
            for b in range(n_pages):
                kb = k[0, b * 8 : (b + 1) * 8]
                qi = q[0, i]
                ub = np.sum(np.maximum(qi * kb.min(0), qi * kb.max(0)))
                bounds.append(ub if vis[i, b * 8 : (b + 1) * 8].any() else -np.inf)
            top = np.argsort(-np.array(bounds), kind="stable")[:3]
            want = np.zeros(53, bool)
            for b in top:
                if bounds[b] > -np.inf:
                    want[b * 8 : (b + 1) * 8] = True
            np.testing.assert_array_equal(r.kept[0, i], want & vis[i])
            n_vis_pages = sum(bd > -np.inf for bd in bounds)
            assert r.cost[0, i] == r.kept[0, i].sum() + 2 * n_vis_pages


@mpmath.workdps(60)
def _exact_out(row, kept, v):
    w = exact_weights(row)
    z = mpmath.fsum(w)
    zh = mpmath.fsum(wi for wi, kk in zip(w, kept, strict=True) if kk)
    attn = [mpmath.fsum(w[j] * mpmath.mpf(float(v[j, c])) for j in range(len(w))) / z
            for c in range(v.shape[1])]
    head = [mpmath.fsum(w[j] * mpmath.mpf(float(v[j, c])) for j in range(len(w)) if kept[j]) / zh
            for c in range(v.shape[1])]
    return attn, head


def _check_exact(r, q, k, v, causal, eps=None):
    """tail_upper >= exact tail, error_bound >= exact |Attn - output|, on every row."""
    s, _, _ = _dense(q, k, v, _causal(q.shape[-2]) if causal else None)
    for idx in np.ndindex(s.shape[:-1]):
        h = idx[0]
        tau = exact_tail_of_set(s[idx], r.kept[idx])
        assert r.tail_upper[idx] >= tau, (idx, float(tau), r.tail_upper[idx])
        if eps is not None:
            assert tau <= eps
        attn, _ = _exact_out(s[idx], r.kept[idx], v[h])
        err = mpmath.sqrt(mpmath.fsum((a - mpmath.mpf(float(o))) ** 2
                                      for a, o in zip(attn, r.output[idx], strict=True)))
        assert r.error_bound[idx] >= err, (idx, float(err), r.error_bound[idx])


@pytest.mark.parametrize("seed", [0, 1])
def test_certificates_are_sound_against_exact_arithmetic(seed):
    rng = np.random.default_rng(10 + seed)
    q, k, v = _qkv(rng, h=2, n=24, d=4, dv=2, spread=3.0)
    for causal in (False, True):
        _check_exact(window_sinks(q, k, v, window=4, sinks=2, causal=causal), q, k, v, causal)
        _check_exact(quest(q, k, v, budget=8, page_size=4, causal=causal), q, k, v, causal)


@pytest.mark.parametrize("method", [window_sinks, quest])
def test_certified_fallback_is_within_eps_on_every_query(method):
    rng = np.random.default_rng(5)
    # attention sinks: four keys aligned with every query dominate (certified without
    # scoring the rest), noisier rows fall back
    u = np.array([1.0, 0.0, 0.0, 0.0])
    q = 3 * u + 0.5 * rng.standard_normal((2, 32, 4))
    k = 0.5 * rng.standard_normal((2, 32, 4))
    v = rng.standard_normal((2, 32, 2))
    k[:, :4] = 6 * u
    k[1, :4] = 1.5 * u  # the second head's sinks are weak: its queries fall back
    eps = 0.05
    kw = {"window": 6, "sinks": 4} if method is window_sinks else {"budget": 8}
    for causal in (False, True):
        base = method(q, k, v, causal=causal, page_size=4, **kw) if method is quest else \
            method(q, k, v, causal=causal, **kw)
        r = method(q, k, v, causal=causal, fallback="certified", eps=eps, page_size=4, **kw)
        fell = r.params["fell_back"]
        assert fell[0].mean() < 0.5 and fell[1].mean() > 0.5  # both branches exercised
        assert r.params["fallback_rate"] == pytest.approx(fell.mean())
        assert np.all(r.tail_upper <= eps)
        # queries that did not fall back serve the base kept set, scoring only it
        np.testing.assert_array_equal(r.kept[~fell], base.kept[~fell])
        assert np.all(r.cost[~fell] <= base.kept[~fell].sum(-1) + 2 * 8 + 1e-12)
        # queries that fell back scored every visible key
        nv = (_causal(32) if causal else np.ones((32, 32), bool)).sum(-1)
        assert np.all(r.cost[fell] >= np.broadcast_to(nv, fell.shape)[fell])
        _check_exact(r, q, k, v, causal, eps=eps)


def test_box_bound_never_reads_an_unkept_score():
    rng = np.random.default_rng(6)
    q, k, _ = _qkv(rng, h=1, n=20, d=3)
    s = q @ k[0].T[None] / np.sqrt(3)
    valid = np.ones(s.shape, bool)
    kept = np.zeros(s.shape, bool)
    kept[..., :5] = True
    import array_api_compat.numpy as xnp

    ctx = Context(queries=q, keys=k, scale=1 / np.sqrt(3), start=0, xp=xnp)
    hi, pages = box_tail_upper(s, valid, kept, ctx, 4)
    garbage = np.where(kept, s, 1e300)
    hi2, _ = box_tail_upper(garbage, valid, kept, Context(q, k, 1 / np.sqrt(3), 0, xnp), 4)
    np.testing.assert_array_equal(hi, hi2)
    np.testing.assert_array_equal(pages, 4)  # keys 5..19 lie in pages 1..4
    for i in range(20):
        assert hi[0, i] >= exact_tail_of_set(s[0, i], kept[0, i])


def test_fallback_rejects_additive_masks_and_missing_eps():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, h=1, n=8)
    bias = np.zeros((8, 8))
    bias[:, 0] = 0.5
    with pytest.raises(InputError, match="boolean mask"):
        window_sinks(q, k, v, mask=bias, fallback="certified", eps=0.1)
    with pytest.raises(InputError, match="needs eps"):
        quest(q, k, v, fallback="certified")
    with pytest.raises(InputError, match="fallback"):
        quest(q, k, v, fallback="always", eps=0.1)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 24),
    d=st.integers(1, 5),
    page=st.integers(1, 6),
    log_scale=st.floats(-2.0, 3.0),
    masked=st.floats(0.0, 0.5),
)
def test_box_bound_is_sound_on_random_and_extreme_inputs(seed, n, d, page, log_scale, masked):
    import array_api_compat.numpy as xnp

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 3, d)) * 10**log_scale
    k = rng.standard_normal((1, n, d)) * rng.choice([1e-3, 1.0, 30.0])
    if rng.random() < 0.3:
        k[0, rng.integers(n)] = k[0, 0]  # ties
    s = q @ np.swapaxes(k, -1, -2)
    valid = rng.random(s.shape) >= masked
    valid[..., 0] = True
    kept = valid & (rng.random(s.shape) < 0.5)
    s = np.where(valid, s, -np.inf)
    hi, _ = box_tail_upper(s, valid, kept, Context(q, k, 1.0, 0, xnp), page)
    for i in range(3):
        if kept[0, i].any():
            assert hi[0, i] >= exact_tail_of_set(s[0, i], kept[0, i]), (i, hi[0, i])
        else:
            assert hi[0, i] == 1.0
        assert 0.0 <= hi[0, i] <= 1.0


def test_certified_fallback_policy_adds_the_bias_to_its_box_bound():
    """Issue 20.2 for the box bound of CertifiedFallback used as a policy directly: a +30
    bias on the lowest-scoring key, which a window does not keep, is 97% of the mass."""
    import certattn
    from certattn.approx.fallback import CertifiedFallback
    from certattn.policies import WindowSinks

    from ._exact_scores import check_rows, lifted_key_case

    q, k, v, b = lifted_key_case(64)
    pol = CertifiedFallback(WindowSinks(window=0, sinks=32), 0.05, page_size=8)
    a = certattn.certify_attention(q, k, v, policy=pol, mask=b, scale=1.0)
    check_rows(q, k, v, 1.0, np.asarray(a.kept), a.tail_upper, a.error_bound, bias=b)


@pytest.mark.parametrize("method", [window_sinks, quest])
def test_quant_fallback_grows_the_kept_set_by_a_quantized_search(method):
    """Issue 24: fallback="quant" certifies the kept set from per-key estimate bounds;
    a query falls back only where needed (every query whose set truly drops more than eps
    falls back, by soundness), grows its set by scoring the best-bounded keys instead of
    every key, and stays within eps against exact arithmetic."""
    q, k, v = _strong_keys_case()  # head 1: strong keys outside the window, for the search
    eps = 0.05
    kw = {"window": 6, "sinks": 4} if method is window_sinks else {"budget": 8, "page_size": 4}
    for causal in (False, True):
        base = method(q, k, v, causal=causal, **kw)
        _, p, _ = _dense(q, k, v, _causal(32) if causal else None)
        truly = 1.0 - np.sum(np.where(base.kept, p, 0.0), -1) > eps
        box = method(q, k, v, causal=causal, fallback="certified", eps=eps, **kw)
        for bits in (4, 8):
            r = method(q, k, v, causal=causal, fallback="quant", eps=eps, bits=bits, **kw)
            fell = r.params["fell_back"]
            assert r.params["fallback_to"] == "search" and r.params["bits"] == bits
            assert np.all(fell[truly]) and fell.mean() <= box.params["fell_back"].mean()
            assert np.all(r.tail_upper <= eps)
            np.testing.assert_array_equal(r.kept[~fell], base.kept[~fell])
            assert np.all(r.kept >= base.kept)  # grown, never shrunk
            nv = np.broadcast_to((_causal(32) if causal else np.ones((32, 32), bool)).sum(-1),
                                 fell.shape)
            # the search scores fewer keys than every visible one on some fallen queries
            assert np.any(r.kept[fell].sum(-1) < nv[fell])
            _check_exact(r, q, k, v, causal, eps=eps)


def test_quant_fallback_cost_counts_estimates_and_keys_scored():
    """The cost of a query served its base set: kept keys + (d bits / 8) / (2 d) per
    unkept visible key (+ 2 / (2 d) for its residual norm with ``residual=True``) +
    4 d / (2 d) = 2 per quantization group holding one."""
    from certattn.approx.fallback import CertifiedFallback
    from certattn.approx.selection import run_policy
    from certattn.policies import WindowSinks

    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, h=1, n=64, d=8)
    k[0, :2] *= 0.0
    q[..., :] = 0.0  # uniform attention: one key's mass is 1/64
    r = window_sinks(q, k, v, window=62, sinks=1, fallback="quant", eps=0.05, bits=4)
    assert not r.params["fell_back"].any()  # tail 1/64 <= 0.05 certified
    kept = r.kept.sum(-1)
    unkept = 64 - kept
    groups = np.array([len({j // 32 for j in np.flatnonzero(~r.kept[0, i])})
                       for i in range(64)])
    want = kept + (unkept * (8 * 4 / 8) + groups * 2 * 8 * 2) / 16.0
    np.testing.assert_allclose(r.cost[0], want[0])
    pol = CertifiedFallback(WindowSinks(62, 1), 0.05, bound="quant", to="search", bits=4,
                            residual=True)
    rn = run_policy(q, k, v, pol, method="window_sinks", params={}, return_weights=False)
    np.testing.assert_array_equal(rn.kept, r.kept)
    np.testing.assert_allclose(rn.cost[0], want[0] + unkept[0] * 2 / 16.0)
    with pytest.raises(InputError, match="search"):
        CertifiedFallback(None, 0.1, to="search")  # page boxes give no per-key bounds
    with pytest.raises(InputError, match="bits"):
        window_sinks(q, k, v, fallback="quant", eps=0.1, bits=3)
    with pytest.raises(InputError, match="needs eps"):
        quest(q, k, v, fallback="quant")


@pytest.mark.parametrize("to", ["search", "topk"])
def test_quant_fallback_adds_the_bias_to_every_key_bound(to):
    """The per-key bounds of fallback="quant" bound ``scale q.k + b``: a +30 bias on the
    lowest-scoring key, which the window does not keep, holds 97% of the mass."""
    import certattn
    from certattn.approx.fallback import CertifiedFallback
    from certattn.policies import WindowSinks

    from ._exact_scores import check_rows, lifted_key_case

    q, k, v, b = lifted_key_case(64)
    pol = CertifiedFallback(WindowSinks(window=0, sinks=32), 0.05, bound="quant", to=to)
    a = certattn.certify_attention(q, k, v, policy=pol, mask=b, scale=1.0)
    check_rows(q, k, v, 1.0, np.asarray(a.kept), a.tail_upper, a.error_bound, bias=b)


def _strong_keys_case():
    """Two heads of 32 keys, queries along ``u``, strong keys in the sinks (head 0) or
    outside the window (head 1): the search must find them."""
    rng = np.random.default_rng(5)
    u = np.array([1.0, 0.0, 0.0, 0.0])
    q = 3 * u + 0.5 * rng.standard_normal((2, 32, 4))
    k = 0.5 * rng.standard_normal((2, 32, 4))
    v = rng.standard_normal((2, 32, 2))
    k[:, :4] = 6 * u
    k[1, :4] = 1.5 * u
    k[1, 20:23] = 4 * u
    return q, k, v


def _coarse_only(monkeypatch, method, *args, **kw):
    """``method`` with tiered estimates whose finer tiers are never read: the first tier's
    estimates (on the finest width's grid, nested) alone."""
    from certattn.approx.fallback import CertifiedFallback

    with monkeypatch.context() as m:
        m.setattr(CertifiedFallback, "_to_refine",
                  lambda self, scores, valid, kept, *a: np.zeros(kept.shape, dtype=bool))
        return method(*args, **kw)


@pytest.mark.parametrize("method", [window_sinks, quest])
@pytest.mark.parametrize("tiers", [(2, 8), (2, 4, 8)])
def test_quant_fallback_tiers_read_finer_estimates_only_where_needed(method, tiers,
                                                                     monkeypatch):
    """Issue 24.3: ``bits=(2, 8)`` certifies from 2-bit estimates and reads 8-bit ones only
    on the queries the 2-bit bound does not certify.  Where the coarse bound certifies, the
    set and the cost are the coarse ones; some queries it does not certify are certified by
    a finer tier (served their base set, paying for the finer estimates); every query
    stays within eps against exact arithmetic."""
    q, k, v = _strong_keys_case()
    eps = 0.05
    kw = {"window": 6, "sinks": 4} if method is window_sinks else {"budget": 8, "page_size": 4}
    won = 0
    for causal in (False, True):
        base = method(q, k, v, causal=causal, **kw)
        coarse = _coarse_only(monkeypatch, method, q, k, v, causal=causal, fallback="quant",
                              eps=eps, bits=list(tiers), **kw)
        r = method(q, k, v, causal=causal, fallback="quant", eps=eps, bits=list(tiers), **kw)
        assert r.params["bits"] == tiers
        fc, ft = coarse.params["fell_back"], r.params["fell_back"]
        assert np.all(fc | ~ft)  # a tier never loses a query the coarse bound certifies
        np.testing.assert_array_equal(r.kept[~fc], coarse.kept[~fc])
        np.testing.assert_allclose(r.cost[~fc], coarse.cost[~fc])
        up = fc & ~ft  # certified by a finer tier
        won += int(up.sum())
        np.testing.assert_array_equal(r.kept[up], base.kept[up])
        n_kept = r.kept[up].sum(-1)
        # kept keys + at least the 2-bit codes of every unkept key (1 byte of 8 per key)
        # + at least one key's finer extra bits (1 byte of 8 or more)
        unkept = (_causal(32) if causal else np.ones((32, 32), bool)).sum(-1)
        unkept = np.broadcast_to(unkept, fc.shape)[up] - n_kept
        assert np.all(r.cost[up] > n_kept + unkept * 1 / 8 + 1 / 8)
        assert np.all(r.tail_upper <= eps)
        _check_exact(r, q, k, v, causal, eps=eps)
    assert won > 0


@pytest.mark.parametrize("tiers", [(2, 8), (2, 4)])
def test_quant_fallback_tiers_add_the_bias_to_the_finer_bounds(tiers, monkeypatch):
    """The finer tier's bounds bound ``scale q.k + b`` too: a +8 bias lifts a weak key the
    window drops to about 4-5% of the mass; the 2-bit bound does not certify those
    queries, the finer one does, and each certificate holds the exact dropped mass (a
    finer bound without the bias would put that key e^8 too low)."""
    from ._exact_scores import check_rows

    rng = np.random.default_rng(5)
    u = np.array([1.0, 0.0, 0.0, 0.0])
    q = 3 * u + 0.5 * rng.standard_normal((1, 32, 4))
    k = 0.5 * rng.standard_normal((1, 32, 4))
    v = rng.standard_normal((1, 32, 2))
    k[:, :4] = 6 * u
    k[:, 12] = -2 * u
    b = np.zeros((32, 32))
    b[:, 12] = 8.0
    kw = {"window": 6, "sinks": 4, "mask": b, "fallback": "quant", "eps": 0.1}
    coarse = _coarse_only(monkeypatch, window_sinks, q, k, v, bits=tiers, **kw)
    r = window_sinks(q, k, v, bits=tiers, **kw)
    assert np.any(coarse.params["fell_back"] & ~r.params["fell_back"])  # the tier is used
    assert np.all(r.tail_upper <= 0.1)
    check_rows(q[0], k[0], v[0], 0.5, r.kept[0], r.tail_upper[0], r.error_bound[0], bias=b)


@pytest.mark.parametrize("tiers", [(2, 8), (2, 4)])
def test_quant_fallback_tiers_read_only_the_extra_bits(tiers, monkeypatch):
    """Nested tiers: a key refined from ``b`` to ``b'`` bits costs its ``(b' - b) d / 8``
    extra code bytes (and, with residual norms, its 2-byte norm), and no second group
    metadata.  With every unkept key refined, a query the finer tier certifies costs its
    kept keys + (every unkept key's ``b' d / 8`` code bytes + ``4 d`` bytes for the one
    group) / (2 d)."""
    from certattn.approx.fallback import CertifiedFallback

    q, k, v = _strong_keys_case()
    d = q.shape[-1]
    kw = {"window": 6, "sinks": 4, "fallback": "quant", "eps": 0.05, "bits": tiers,
          "causal": True}
    coarse = _coarse_only(monkeypatch, window_sinks, q, k, v, **kw)
    monkeypatch.setattr(CertifiedFallback, "_to_refine",
                        lambda self, scores, valid, kept, *a: valid & ~kept)
    r = window_sinks(q, k, v, **kw)
    up = coarse.params["fell_back"] & ~r.params["fell_back"]
    assert np.any(up)
    n_kept = r.kept.sum(-1)
    unkept = np.arange(1, 33) - n_kept  # causal; one group: 32 keys, groups of 64
    want = n_kept + (unkept * (d * tiers[-1] / 8) + 4 * d) / (2 * d)
    np.testing.assert_allclose(r.cost[up], want[up])
    # with residual norms: two more bytes per key and tier read
    from certattn.approx.selection import run_policy
    from certattn.policies import WindowSinks

    pol = CertifiedFallback(WindowSinks(6, 4), 0.05, bound="quant", to="search",
                            bits=tiers, residual=True)
    run = functools.partial(run_policy, method="window_sinks", params={}, causal=True,
                            return_weights=False)
    coarse_n = _coarse_only(monkeypatch, run, q, k, v, pol)
    rn = run(q, k, v, pol)
    up_n = coarse_n.params["fell_back"] & ~rn.params["fell_back"]
    assert np.any(up_n)
    n_kept = rn.kept.sum(-1)
    unkept = np.arange(1, 33) - n_kept
    want = n_kept + (unkept * (d * tiers[-1] / 8 + 2 * 2) + 4 * d) / (2 * d)
    np.testing.assert_allclose(rn.cost[up_n], want[up_n])


def test_quant_fallback_tiers_refuse_bad_widths():
    q, k, v = _qkv(np.random.default_rng(0), n=8, d=4)
    for bad in ((8, 4), (4, 4), (), (4, 3), (4.0, 8)):
        with pytest.raises(InputError, match="bits"):
            window_sinks(q, k, v, fallback="quant", eps=0.1, bits=bad)


def test_quest_ranks_pages_by_estimated_mass(monkeypatch):
    """``rank="estimates"``: Quest's pages ranked by the mass their keys' first-tier
    estimates give over the ``d / 4`` channels of largest ``|q_j|`` (sum of
    ``e^{scale sum_J q_j khat_ij}``), not by page boxes; those channels of every visible
    key's code are read, the others for the unkept keys, and no box: a query served its
    pages costs its kept keys + (every visible key's ``2 d / 8`` code bytes less the kept
    keys' unread ``2 (d - d / 4) / 8`` + ``4 d`` bytes per group) / (2 d); every query
    stays within eps against exact arithmetic."""
    from certattn.approx.fallback import CertifiedFallback
    from certattn.approx.selection import run_policy
    from certattn.policies import Context, Pages
    from certattn.quant import quantize_keys

    def ranked(q, k, valid, r):
        """The kept set of the two pages of largest estimated mass over ``r`` channels."""
        est = np.empty(valid.shape)
        for h in range(q.shape[0]):
            khat = quantize_keys(k[h], 2, group=128, grid_bits=8, residual=False).reconstruct()
            top = np.argsort(-np.abs(q[h]), axis=-1, kind="stable")[:, :r]
            qr = np.zeros_like(q[h])
            np.put_along_axis(qr, top, np.take_along_axis(q[h], top, -1), -1)
            est[h] = 0.5 * qr @ khat.T
        mass = np.where(valid, np.exp(est), 0.0).reshape(*valid.shape[:-1], 8, 4).sum(-1)
        top = np.argsort(-mass, axis=-1, kind="stable")[..., :2]
        pages = np.zeros(mass.shape, bool)
        np.put_along_axis(pages, top, True, axis=-1)
        return np.repeat(pages, 4, axis=-1) & valid

    q, k, v = _strong_keys_case()
    d = q.shape[-1]
    kw = {"budget": 8, "page_size": 4, "fallback": "quant", "eps": 0.05, "bits": (2, 8)}
    for causal in (False, True):
        r = quest(q, k, v, causal=causal, rank="estimates", **kw)
        box = quest(q, k, v, causal=causal, **kw)
        assert r.params["rank"] == "estimates" and box.params["rank"] == "box"
        assert np.all(r.tail_upper <= 0.05)
        _check_exact(r, q, k, v, causal, eps=0.05)
        # the served pages are the two of largest estimated mass, over d / 4 = 1 channel
        valid = np.broadcast_to(_causal(32) if causal else np.ones((32, 32), bool),
                                (2, 32, 32))
        served = ~r.params["fell_back"]
        assert np.any(served)
        np.testing.assert_array_equal(r.kept[served], ranked(q, k, valid, 1)[served])
        # every channel: rank_channels=d
        pol = CertifiedFallback(Pages(8, page_size=4), 0.05, page_size=4, bound="quant",
                                to="search", bits=(2, 8), page_rank="estimates",
                                rank_channels=4)
        ctx = Context(queries=q, keys=k, scale=0.5, start=0, xp=xnp)
        kept, _ = pol.base_kept(np.zeros(valid.shape), valid, ctx)
        np.testing.assert_array_equal(kept, ranked(q, k, valid, 4))
        full = run_policy(q, k, v, pol, method="quest", params={}, causal=causal,
                          return_weights=False)
        assert np.all(full.tail_upper <= 0.05)
        # cost, first tier only (a refined key adds its extra bits, tested above)
        c = _coarse_only(monkeypatch, quest, q, k, v, causal=causal, rank="estimates", **kw)
        served = ~c.params["fell_back"]
        assert np.any(served)
        nv = valid.sum(-1)
        n_kept = c.kept.sum(-1)
        want_cost = n_kept + (nv * (2 * d / 8) - n_kept * 2 * (d - 1) / 8 + 4 * d) / (2 * d)
        np.testing.assert_allclose(c.cost[served], want_cost[served])
    # a page whose box is wide (keys 3 e1 and 3 e2: box bound 5.7, scores 3 and 2.7) and
    # one whose keys all score 3.5 (box 3.5): the boxes keep the first, the estimates (on
    # channel 0, where the query is largest) the second
    q1 = np.array([[[1.0, 0.9, 0.0, 0.0]]])
    k1 = np.zeros((1, 16, 4))
    k1[0, 0:4:2, 0] = k1[0, 1:4:2, 1] = 3.0
    k1[0, 4:8, 0] = 3.5
    v1 = np.random.default_rng(1).standard_normal((1, 16, 2))
    kw1 = {"budget": 4, "page_size": 4, "fallback": "quant", "eps": 0.9, "bits": (2, 8),
           "scale": 1.0}
    est, box = quest(q1, k1, v1, rank="estimates", **kw1), quest(q1, k1, v1, **kw1)
    assert not est.params["fell_back"].any() and not box.params["fell_back"].any()
    np.testing.assert_array_equal(np.flatnonzero(est.kept[0, 0]), [4, 5, 6, 7])
    np.testing.assert_array_equal(np.flatnonzero(box.kept[0, 0]), [0, 1, 2, 3])
    assert est.tail_upper[0, 0] < box.tail_upper[0, 0]
    # keys 2 e1 + 2 e2 (score 3.8) against 3 e1 (score 3): channel 0 alone ranks the
    # second page first, every channel the first
    k2 = np.zeros((1, 16, 4))
    k2[0, 0:4, :2] = 2.0
    k2[0, 4:8, 0] = 3.0
    ctx = Context(queries=q1, keys=k2, scale=1.0, start=0, xp=xnp)
    vis = np.ones((1, 1, 16), bool)
    for r, want in ((1, [4, 5, 6, 7]), (4, [0, 1, 2, 3]), (None, [4, 5, 6, 7])):
        pol = CertifiedFallback(Pages(4, page_size=4), 0.5, page_size=4, bound="quant",
                                to="search", bits=(2, 8), page_rank="estimates",
                                rank_channels=r)
        kept, _ = pol.base_kept(np.zeros(vis.shape), vis, ctx)
        np.testing.assert_array_equal(np.flatnonzero(kept[0, 0]), want)


def test_quest_rank_estimates_is_refused_without_estimates():
    from certattn.approx.fallback import CertifiedFallback
    from certattn.policies import Pages, WindowSinks

    q, k, v = _qkv(np.random.default_rng(0), n=8, d=4)
    with pytest.raises(InputError, match="fallback='quant'"):
        quest(q, k, v, budget=4, page_size=2, rank="estimates")
    with pytest.raises(InputError, match="fallback='quant'"):
        quest(q, k, v, budget=4, page_size=2, rank="estimates", fallback="certified",
              eps=0.1)
    with pytest.raises(InputError, match="page_rank"):
        quest(q, k, v, budget=4, page_size=2, rank="mass", fallback="quant", eps=0.1)
    with pytest.raises(InputError, match="Pages base"):
        CertifiedFallback(WindowSinks(3, 1), 0.1, bound="quant", to="search",
                          page_rank="estimates")
    with pytest.raises(InputError, match="Pages base"):
        CertifiedFallback(Pages(4, page_size=2), 0.1, page_rank="estimates")
    with pytest.raises(InputError, match="residual"):
        CertifiedFallback(WindowSinks(3, 1), 0.1, bound="quant", residual=1)
    for bad in (0, 2.0, True):
        with pytest.raises(InputError, match="rank_channels"):
            CertifiedFallback(Pages(4, page_size=2), 0.1, bound="quant",
                              page_rank="estimates", rank_channels=bad)

