"""Hybrid linear + sliding-window attention: eq. 7 by hand, limits, masks, GQA, the fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certattn._validate import InputError
from certattn.approx._prep import prepare, softmax_attention
from certattn.approx.hybrid import (
    WINDOW_FACTOR,
    FeatureMaps,
    fit_hedgehog,
    hedgehog_features,
    hybrid_linear,
    hybrid_usage,
    identity_maps,
    transfer_loss,
)


def _data(seed=0, n=9, d=4, dv=3, lead=()):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*lead, n, d)), rng.normal(size=(*lead, n, d)),
            rng.normal(size=(*lead, n, dv)))


def _maps(seed, d=4, f=3):
    rng = np.random.default_rng(seed)
    return FeatureMaps(rng.normal(size=(d, f)), rng.normal(size=(d, f)))


def _phi(x, w):
    u = x @ w
    a = np.exp(u) / np.exp(u).sum()
    b = np.exp(-u) / np.exp(-u).sum()
    return np.maximum(np.concatenate([a, b]), 1e-12)


def _eq7(q, k, v, maps, w, gamma, visible):
    """LoLCATs eq. 7 with explicit loops (query i at position i, Lq = Lk)."""
    n, d = q.shape
    out = np.zeros((n, v.shape[1]))
    for i in range(n):
        win = [j for j in range(n) if visible[i, j] and i - w < j <= i]
        lin = [j for j in range(n) if visible[i, j] and j not in win]
        s = {j: float(q[i] @ k[j]) / math.sqrt(d) for j in win}
        c = max(s.values()) if s else 0.0
        num = np.zeros(v.shape[1])
        den = 0.0
        for j in win:
            a = gamma * math.exp(s[j] - c)
            num += a * v[j]
            den += a
        for j in lin:
            a = float(_phi(q[i], maps.w_q) @ _phi(k[j], maps.w_k))
            num += a * v[j]
            den += a
        out[i] = num / den
    return out


def test_hedgehog_features_by_hand() -> None:
    x = np.array([[1.0, -2.0]])
    w = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    u = np.array([1.0, -2.0, 0.0])
    want = np.concatenate([np.exp(u) / np.exp(u).sum(), np.exp(-u) / np.exp(-u).sum()])
    np.testing.assert_allclose(hedgehog_features(x, w)[0], want, rtol=1e-15)
    assert identity_maps(4, heads=3).w_q.shape == (3, 4, 4)


@pytest.mark.parametrize("window", [0, 1, 3, 5])
def test_eq7_by_hand_causal(window: int) -> None:
    q, k, v = _data(1, n=8)
    maps = _maps(2)
    r = hybrid_linear(q, k, v, causal=True, feature_maps=maps, window=window)
    vis = np.tril(np.ones((8, 8), dtype=bool))
    np.testing.assert_allclose(r.output, _eq7(q, k, v, maps, window, 0.1, vis), rtol=1e-12)
    np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-13)
    assert np.all(r.weights[~vis] == 0)
    # window keys: the last min(w, i + 1) positions
    np.testing.assert_array_equal(r.kept.sum(-1), np.minimum(window, np.arange(1, 9)))
    np.testing.assert_allclose(r.cost, r.kept.sum(-1) + 6 * 4 / 7)


def test_minus_inf_mask_and_gamma() -> None:
    q, k, v = _data(3, n=7)
    maps = _maps(4)
    vis = np.tril(np.ones((7, 7), dtype=bool))
    vis[:, 1] = False  # a key hidden from the linear branch (and from row 1's window)
    vis[6, 5] = False  # a key hidden inside row 6's window
    vis[1, 1] = True  # row 1 must see something besides key 0
    add = np.where(vis, 0.0, -np.inf)
    for wf in (WINDOW_FACTOR, 1.5):
        g = 1 / (1 + math.exp(-wf))
        r = hybrid_linear(q, k, v, mask=add, feature_maps=maps, window=3, window_factor=wf)
        np.testing.assert_allclose(r.output, _eq7(q, k, v, maps, 3, g, vis), rtol=1e-12)


def test_window_covering_everything_is_softmax_attention() -> None:
    """Causal, w >= n: every visible key is in W, the linear branch is empty and gamma
    cancels in the ratio, so the hybrid equals exact softmax attention. (Bidirectional: the
    window is still the last w positions, later keys go to the linear branch.)"""
    q, k, v = _data(5, n=10, lead=(2,))
    r = hybrid_linear(q, k, v, window=10)
    np.testing.assert_array_equal(r.kept[0], np.tril(np.ones((10, 10), dtype=bool)))
    assert np.all(r.weights[0][np.triu_indices(10, 1)] > 0)
    causal = True
    pr = prepare(q, k, v, mask=None, causal=causal, scale=None, kv_heads=None)
    want, p = softmax_attention(pr)
    for wf in (WINDOW_FACTOR, -7.0, 3.0):
        r = hybrid_linear(q, k, v, causal=causal, window=10, window_factor=wf,
                          feature_maps=_maps(6))
        np.testing.assert_allclose(r.output, want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(r.weights, p, rtol=1e-12, atol=1e-15)
    u = hybrid_usage(q, k, v, causal=causal, window=10)
    np.testing.assert_allclose(u.window_share, 1.0)
    np.testing.assert_allclose(u.exact_outside, 0.0, atol=1e-15)
    np.testing.assert_allclose(u.tv_hybrid, 0.0, atol=1e-12)


def test_window_zero_is_normalised_linear_attention_bidirectional() -> None:
    q, k, v = _data(7, n=6)
    maps = _maps(8)
    r = hybrid_linear(q, k, v, feature_maps=maps, window=0)
    a = np.array([[_phi(q[i], maps.w_q) @ _phi(k[j], maps.w_k) for j in range(6)]
                  for i in range(6)])
    np.testing.assert_allclose(r.weights, a / a.sum(1, keepdims=True), rtol=1e-12)


def test_gqa_and_per_head_factors() -> None:
    rng = np.random.default_rng(9)
    q = rng.normal(size=(4, 7, 4))
    k = rng.normal(size=(2, 7, 4))
    v = rng.normal(size=(2, 7, 3))
    maps = FeatureMaps(rng.normal(size=(4, 4, 3)), rng.normal(size=(4, 4, 3)))
    wf = np.array([-2.0, -1.0, 0.0, 1.0])
    r = hybrid_linear(q, k, v, kv_heads=[0, 0, 1, 1], causal=True, feature_maps=maps,
                      window=2, window_factor=wf)
    for h in range(4):
        mh = FeatureMaps(maps.w_q[h], maps.w_k[h])
        one = hybrid_linear(q[h], k[h // 2], v[h // 2], causal=True, feature_maps=mh,
                            window=2, window_factor=wf[h])
        np.testing.assert_allclose(r.output[h], one.output, rtol=1e-12)
    with pytest.raises(InputError):
        hybrid_linear(q, k, v, kv_heads=2, window_factor=np.zeros(3))


def test_usage_identities() -> None:
    q, k, v = _data(10, n=12, lead=(3,))
    u = hybrid_usage(q, k, v, causal=True, window=4, feature_maps=_maps(11))
    # TV-TAIL: window-only attention is off by exactly the mass outside the window
    np.testing.assert_allclose(u.tv_window, u.exact_outside, rtol=1e-12, atol=1e-15)
    assert np.all((u.window_share > 0) & (u.window_share <= 1))
    np.testing.assert_allclose(u.window_share[..., :4], 1.0)  # nothing before the window yet
    # a larger gamma moves mass to the window
    u2 = hybrid_usage(q, k, v, causal=True, window=4, feature_maps=_maps(11), window_factor=2.0)
    assert np.all(u2.window_share[..., 4:] > u.window_share[..., 4:])
    for a in (u.tv_hybrid, u.tv_linear, u.err_hybrid, u.err_window, u.err_linear):
        assert a.shape == (3, 12) and np.all(a >= 0)


def test_transfer_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(12)
    q = rng.normal(size=(2, 5, 3))
    k = rng.normal(size=(2, 5, 3))
    vis = np.tril(np.ones((5, 5), dtype=bool))
    s = np.where(vis, q @ np.swapaxes(k, -1, -2), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    wq = rng.normal(size=(2, 3, 4))
    wk = rng.normal(size=(2, 3, 4))
    _, gq, gk = transfer_loss(q, k, p, vis, wq, wk)
    h = 1e-6
    for w, g, which in ((wq, gq, 0), (wk, gk, 1)):
        num = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            wp, wm = w.copy(), w.copy()
            wp[idx] += h
            wm[idx] -= h
            args_p = (wp, wk) if which == 0 else (wq, wp)
            args_m = (wm, wk) if which == 0 else (wq, wm)
            num[idx] = (transfer_loss(q, k, p, vis, *args_p, grad=False)[0]
                        - transfer_loss(q, k, p, vis, *args_m, grad=False)[0]) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


def test_transfer_loss_is_cross_entropy() -> None:
    q, k, _ = _data(13, n=4, d=3)
    vis = np.tril(np.ones((4, 4), dtype=bool))
    maps = _maps(14, d=3, f=2)
    p = np.where(vis, 1.0, 0.0) / np.arange(1, 5)[:, None]
    a = np.array([[_phi(q[i], maps.w_q) @ _phi(k[j], maps.w_k) for j in range(4)]
                  for i in range(4)])
    ph = np.where(vis, a, 0) / np.where(vis, a, 0).sum(1, keepdims=True)
    want = -np.mean([sum(p[i, j] * math.log(ph[i, j]) for j in range(i + 1)) for i in range(4)])
    got, _, _ = transfer_loss(q, k, p, vis, maps.w_q, maps.w_k, grad=False)
    assert got == pytest.approx(want, rel=1e-12)


def test_fit_lowers_the_loss_and_records_provenance() -> None:
    rng = np.random.default_rng(15)
    q = rng.normal(size=(2, 24, 4)) * 2
    k = rng.normal(size=(2, 24, 4)) * 2
    maps = fit_hedgehog(q, k, steps=60, lr=0.05, seed=3, provenance={"text": "random"})
    assert maps.w_q.shape == (2, 4, 4) and maps.n_features == 8
    assert maps.fit["loss_end"] < 0.9 * maps.fit["loss_start"]
    assert 0 < maps.fit["loss_floor"] < maps.fit["loss_end"]  # cross-entropy >= entropy
    assert maps.fit["seed"] == 3 and maps.fit["steps"] == 60 and maps.fit["text"] == "random"
    again = fit_hedgehog(q, k, steps=60, lr=0.05, seed=3)
    np.testing.assert_array_equal(again.w_q, maps.w_q)
    before = hybrid_usage(q, k, k, causal=True, window=0).tv_linear.mean()
    after = hybrid_usage(q, k, k, causal=True, window=0, feature_maps=maps).tv_linear.mean()
    assert after < before


def test_query_rows_aligned_at_the_end() -> None:
    """Lq < Lk with causal=True: query i sits at position i + Lk - Lq (a key/value cache)."""
    q, k, v = _data(16, n=10)
    maps = _maps(17)
    full = hybrid_linear(q, k, v, causal=True, feature_maps=maps, window=3)
    tail = hybrid_linear(q[6:], k, v, causal=True, feature_maps=maps, window=3)
    np.testing.assert_allclose(tail.output, full.output[6:], rtol=1e-13)
    np.testing.assert_array_equal(tail.kept, full.kept[6:])
    u = hybrid_usage(q[6:], k, v, causal=True, feature_maps=maps, window=3)
    uf = hybrid_usage(q, k, v, causal=True, feature_maps=maps, window=3)
    np.testing.assert_allclose(u.exact_outside, uf.exact_outside[6:], rtol=1e-13)


def test_exact_softmax_exactly_when_every_visible_key_is_in_the_window() -> None:
    """Issue 20: the docstring said "w >= Lk gives exact softmax attention"; that holds
    with causal=True or a mask hiding every key after the query, not for causal=False
    without one (later keys always go to the linear branch)."""
    q, k, v = _data(11, n=8)
    future_hidden = np.tril(np.ones((8, 8), dtype=bool))
    for causal, mask in ((True, None), (False, future_hidden)):
        pr = prepare(q, k, v, mask=mask, causal=causal, scale=None, kv_heads=None)
        want, _ = softmax_attention(pr)
        got = hybrid_linear(q, k, v, causal=causal, mask=mask, window=8)
        np.testing.assert_allclose(got.output, want, rtol=1e-12, atol=1e-14)
    pr = prepare(q, k, v, mask=None, causal=False, scale=None, kv_heads=None)
    want, _ = softmax_attention(pr)
    got = hybrid_linear(q, k, v, causal=False, window=8)
    gap = np.abs(got.output - want).max(axis=-1)
    assert gap[-1] < 1e-12  # the last query sees no later key
    assert np.all(gap[:-1] > 1e-3)  # every other row is not softmax attention


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "x", np.array([0.0, math.nan])])
def test_window_factor_must_be_finite(bad) -> None:
    q, k, v = _data(12, lead=(2,))
    with pytest.raises(InputError, match="window_factor"):
        hybrid_linear(q, k, v, window=2, window_factor=bad)
    with pytest.raises(InputError, match="window_factor"):
        hybrid_usage(q, k, v, window=2, window_factor=bad)


@pytest.mark.parametrize("name, bad", [("lr", math.nan), ("lr", 0.0), ("lr", -1.0),
                                       ("lr", math.inf), ("init_noise", math.nan),
                                       ("init_noise", -0.1), ("steps", -1)])
def test_fit_hedgehog_rejects_bad_parameters(name, bad) -> None:
    q, k, _ = _data(13)
    with pytest.raises(InputError, match=name):
        fit_hedgehog(q, k, **{"steps": 2, name: bad})
