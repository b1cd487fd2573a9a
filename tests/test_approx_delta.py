"""Delta Attention (certattn.approx.delta) against its published definition, and Theorem
DELTA-ERROR (identity and sound bound) against exact arithmetic (mpmath)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from certattn._validate import InputError
from certattn.approx.delta import delta_correct, delta_rows, dense_rows
from certattn.approx.selection import window_sinks
from certattn.attention import _prepare
from certattn.policies import CertifiedBlocks, Pages, Search, WindowSinks

from ._exact import exact_weights
from ._exact_scores import exact_logits, exact_output_distance


def _qkv(rng, h=2, n=40, d=6, dv=3, spread=1.5):
    return (rng.standard_normal((h, n, d)) * spread, rng.standard_normal((h, n, d)),
            rng.standard_normal((h, n, dv)))


def _dense(q, k, v, causal=True):
    n = q.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return s, p @ v


def test_row_plan_is_the_published_one():
    s_p, anchor, dense = delta_rows(300, 64)  # cut = 44 + 128
    assert s_p == 128
    np.testing.assert_array_equal(dense, [0, 64, *range(128, 300)])
    np.testing.assert_array_equal(anchor[:128], 64 * (np.arange(128) // 64))
    np.testing.assert_array_equal(anchor[128:], np.arange(128, 300))
    s_p, anchor, dense = delta_rows(1024, 64)  # cut = 0 + 128
    assert s_p == 896 and list(dense[:14]) == list(range(0, 896, 64))
    assert delta_rows(100, 64)[0] == 0  # short prompts: every row dense
    assert delta_rows(1000, 256)[0] == 1000 - (1000 % 256) - 256
    with pytest.raises(InputError):
        delta_rows(10, 0)


def test_anchor_rows_and_the_tail_equal_dense_exactly():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, n=70)
    base = WindowSinks(window=6, sinks=2)
    r = delta_correct(q, k, v, gamma=8, min_tail=16, base=base, causal=True)
    s_p, _, dense = delta_rows(70, 8, 16)
    assert r.params["s_p"] == s_p == 70 - 6 - 16
    pr = _prepare(q, k, v, scale=None, mask=None, causal=True, kv_heads=None)
    d_out, _, _ = dense_rows(pr, dense)
    np.testing.assert_array_equal(r.output[..., dense, :], d_out)
    _, attn = _dense(q, k, v)
    np.testing.assert_allclose(r.output[..., dense, :], attn[..., dense, :], rtol=1e-12,
                               atol=1e-13)
    np.testing.assert_array_equal(r.params["dense_rows"], np.isin(np.arange(70), dense))


def test_sparse_rows_follow_the_formula():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, n=60)
    r = delta_correct(q, k, v, gamma=8, min_tail=8, base=WindowSinks(5, 2), causal=True)
    S = window_sinks(q, k, v, window=5, sinks=2, causal=True).output
    s_p = r.params["s_p"]
    for i in range(s_p):
        a = 8 * (i // 8)
        if i == a:
            continue
        want = S[..., i, :] + (r.output[..., a, :] - S[..., a, :])
        np.testing.assert_allclose(r.output[..., i, :], want, rtol=1e-13, atol=1e-14)
    # the correction helps when neighbouring queries err alike (the method's premise):
    # slowly varying queries over one kept set; on independent random queries it need not
    q2 = 1.5 * rng.standard_normal((2, 1, 6)) + 0.05 * rng.standard_normal((2, 60, 6))
    r2 = delta_correct(q2, k, v, gamma=8, min_tail=8, base=WindowSinks(0, 8))
    S2 = window_sinks(q2, k, v, window=0, sinks=8).output
    _, attn2 = _dense(q2, k, v, causal=False)
    err_delta = np.linalg.norm(r2.output - attn2, axis=-1)[..., 8:s_p].mean()
    err_sparse = np.linalg.norm(S2 - attn2, axis=-1)[..., 8:s_p].mean()
    assert err_delta < 0.5 * err_sparse


def test_gamma_one_is_dense_everywhere():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, n=150)
    r = delta_correct(q, k, v, gamma=1, causal=True)
    assert r.params["dense_rows"].all()
    _, attn = _dense(q, k, v)
    np.testing.assert_allclose(r.output, attn, rtol=1e-12, atol=1e-13)
    assert np.all(r.error_bound < 1e-10)


def test_window_covering_the_context_gives_dense():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, n=64)
    r = delta_correct(q, k, v, gamma=4, min_tail=4, base=WindowSinks(64, 0), causal=True)
    assert r.params["s_p"] > 0
    _, attn = _dense(q, k, v)
    np.testing.assert_allclose(r.output, attn, rtol=1e-12, atol=1e-13)
    assert np.all(r.error_bound < 1e-10)


@mpmath.workdps(60)
def _exact_terms(row, kept, vals):
    """Exact tau, Attn, mu_H, mu_T of one row (lists of mpf per value coordinate)."""
    w = exact_weights(row)
    z = mpmath.fsum(w)
    zh = mpmath.fsum(wi for wi, kk in zip(w, kept, strict=True) if kk)
    zt = z - zh
    dv = vals.shape[1]

    def mean(sel, norm):
        return [mpmath.fsum(w[j] * mpmath.mpf(float(vals[j, c])) for j in range(len(w))
                            if sel(j)) / norm for c in range(dv)]

    attn = mean(lambda j: True, z)
    mu_h = mean(lambda j: kept[j], zh)
    mu_t = mean(lambda j: not kept[j] and w[j] > 0, zt) if zt > 0 else mu_h
    return zt / z, attn, mu_h, mu_t


@pytest.mark.parametrize("causal", [True, False])
def test_delta_error_is_sound_against_exact_arithmetic(causal):
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, h=2, n=26, d=4, dv=2, spread=2.5)
    base = WindowSinks(window=3, sinks=1)
    r = delta_correct(q, k, v, gamma=4, min_tail=4, base=base, causal=causal)
    S = window_sinks(q, k, v, window=3, sinks=1, causal=causal)
    s, _ = _dense(q, k, v, causal)
    s_p = r.params["s_p"]
    assert s_p >= 16
    with mpmath.workdps(60):
        for h in range(2):
            terms = [_exact_terms(s[h, i], S.kept[h, i], v[h]) for i in range(26)]
            for i in range(26):
                attn = terms[i][1]
                err = mpmath.sqrt(mpmath.fsum((x - mpmath.mpf(float(o))) ** 2
                                              for x, o in zip(attn, r.output[h, i], strict=True)))
                assert r.error_bound[h, i] >= err, (h, i)
                if i < s_p and i % 4:
                    # DELTA-ERROR: O_i - Attn_i = tau_a (mu_T,a - mu_H,a) - tau_i (mu_T,i - mu_H,i)
                    a = 4 * (i // 4)
                    ta, _, ha, tla = terms[a]
                    ti, _, hi, tli = terms[i]
                    for c in range(2):
                        rhs = ta * (tla[c] - ha[c]) - ti * (tli[c] - hi[c])
                        lhs = mpmath.mpf(float(r.output[h, i, c])) - attn[c]
                        assert abs(lhs - rhs) <= 1e-12, (h, i, c)


def test_delta_error_bound_holds_with_pages_base_and_grouped_heads():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, 90, 8)) * 2
    k = rng.standard_normal((2, 90, 8))
    v = rng.standard_normal((2, 90, 3))
    r = delta_correct(q, k, v, gamma=8, min_tail=8, base=Pages(budget=16, page_size=8),
                      causal=True)
    _, attn = _dense(q, np.repeat(k, 2, 0), np.repeat(v, 2, 0))
    err = np.linalg.norm(r.output - attn, axis=-1)
    assert np.all(err <= r.error_bound)
    assert r.params["base"]["name"] == "pages"


def test_certificate_triggered_dense_rows():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, n=120, spread=2.0)
    base = WindowSinks(8, 2)
    plain = delta_correct(q, k, v, gamma=8, min_tail=8, base=base, causal=True)
    budget = float(np.quantile(plain.error_bound, 0.6))
    r = delta_correct(q, k, v, gamma=8, min_tail=8, base=base, causal=True, budget=budget)
    extra = r.params["extra_dense"]
    np.testing.assert_array_equal(extra, plain.error_bound > budget)
    assert extra.any() and not extra.all()
    assert np.all(r.error_bound <= budget)
    _, attn = _dense(q, k, v)
    np.testing.assert_allclose(r.output[extra], attn[extra], rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(r.output[~extra], plain.output[~extra])
    assert np.all(np.linalg.norm(r.output - attn, axis=-1) <= r.error_bound)
    # an extra dense row pays for every visible key on top of the base
    nv = np.broadcast_to(np.arange(1, 121), extra.shape)
    np.testing.assert_allclose(r.cost[extra], plain.cost[extra] + nv[extra])


def test_cost_accounting():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, h=1, n=48)
    r = delta_correct(q, k, v, gamma=8, min_tail=8, base=WindowSinks(4, 0), causal=True)
    s_p = r.params["s_p"]
    nv = np.arange(1, 49)
    base_cost = np.minimum(nv, 4)
    want = np.where(np.arange(48) >= s_p, nv,
                    base_cost + np.where(np.arange(48) % 8 == 0, nv, 0))
    np.testing.assert_array_equal(r.cost[0], want)
    assert r.weights is None and r.kept is None and r.tail_upper is None


def test_verify_check_passes_and_catches_a_broken_bound(monkeypatch):
    import certattn.approx.delta as delta_mod
    from certattn.verify import run_verify

    ok = run_verify(rows=600, ids=["DELTA-ERROR"], progress=False)[0]
    assert ok.passed and ok.max_violation <= ok.tolerance
    # drop the anchor's term (keep only the row's own): the bound must fail somewhere
    monkeypatch.setattr(delta_mod, "_round_up_sum", lambda e_i, e_a, e_d, r: e_i)
    bad = run_verify(rows=600, ids=["DELTA-ERROR"], progress=False)[0]
    assert not bad.passed


@pytest.mark.parametrize(
    ("base", "seed"),
    [(Search(0.05), 8), (Search(0.05, method="quant"), 8),
     (CertifiedBlocks(0.5, block_size=4), 5)],
    ids=["search", "search-quant", "certified-blocks"],
)
def test_delta_error_holds_under_an_additive_bias(base, seed):
    """Issue 20.2: a base certified with the bias left out broke DELTA-ERROR on padded
    inputs (each case here did); with BERT's -10000 padding and positive biases every
    bound holds (mpmath)."""
    rng = np.random.default_rng(seed)
    n = 40
    q = rng.standard_normal((1, n, 4)) * 2.0
    k = rng.standard_normal((1, n, 4))
    v = rng.standard_normal((1, n, 2))
    b = np.zeros((1, 1, n))
    b[..., -8:] = -10000.0  # padding
    b[..., rng.integers(0, n - 8, 4)] = 9.0  # low scores lifted by the bias
    r = delta_correct(q, k, v, gamma=4, min_tail=4, base=base, mask=b, scale=0.5)
    for i in range(n):
        err = exact_output_distance(exact_logits(q[0, i], k[0], 0.5, b[0, 0]), v[0],
                                    r.output[0, i])
        assert err <= mpmath.mpf(float(r.error_bound[0, i])), i


@mpmath.workdps(80)
def _exact_output_all_keys(s_row, bias_row, v):
    """Exact attention output over every key: float64 scores + mask entries (mpmath),
    keys hidden by a finite fill included."""
    x = [mpmath.mpf(float(a)) + mpmath.mpf(float(b)) for a, b in zip(s_row, bias_row,
                                                                      strict=True)]
    mx = max(x)
    w = [mpmath.exp(t - mx) for t in x]
    z = mpmath.fsum(w)
    return [mpmath.fsum(wi * mpmath.mpf(float(vi)) for wi, vi in zip(w, v[:, c], strict=True))
            / z for c in range(v.shape[1])]


def test_dense_rows_and_delta_cover_keys_hidden_by_a_float16_fill():
    """A key hidden by float16's minimum (-65504) whose score is 65504 + 8 above the rest
    carries almost all the exact mass: the dense rows' bound (and Delta's) must cover it."""
    rng = np.random.default_rng(9)
    n = 6
    q = np.zeros((1, n, 2))
    q[0, :, 0] = 1.0
    k = np.concatenate([rng.standard_normal((1, n - 1, 2)) * 0.1,
                        [[[65504.0 + 8.0, 0.0]]]], axis=1)
    v = rng.standard_normal((1, n, 2))
    v[0, -1] = [40.0, -40.0]
    fill = np.zeros(n, np.float16)
    fill[-1] = np.finfo(np.float16).min
    pr = _prepare(q, k, v, scale=1.0, mask=fill, causal=False, kv_heads=None)
    d_out, e_d, nv = dense_rows(pr, np.arange(n))
    np.testing.assert_array_equal(nv, n - 1)
    r = delta_correct(q, k, v, gamma=2, min_tail=2, base=WindowSinks(1, 1), mask=fill,
                      scale=1.0)
    s = q[0] @ k[0].T
    for i in range(n):
        ex = _exact_output_all_keys(s[i], fill.astype(np.float64), v[0])
        for out, bound in ((d_out[0, i], e_d[0, i]), (r.output[0, i], r.error_bound[0, i])):
            e2 = mpmath.fsum((a - mpmath.mpf(float(o))) ** 2 for a, o in zip(ex, out,
                                                                               strict=True))
            assert mpmath.sqrt(e2) <= mpmath.mpf(float(bound)), (i, bound)


def test_dense_rows_by_chunks_equal_the_unchunked_rows():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, h=3, n=70)
    pr = _prepare(q, k, v, scale=None, mask=None, causal=True, kv_heads=None)
    rows = np.array([0, 3, 4, 17, 40, 41, 69])
    whole = dense_rows(pr, rows, chunk_elems=1 << 30)  # one chunk: the former computation
    # the same row formulas; BLAS may round a product of another shape differently (ulps)
    for elems in (1, 3 * 70 * 4 * 2, 3 * 70 * 4 * 5):  # 1, 2 and 5 rows per chunk
        d, err, nv = dense_rows(pr, rows, chunk_elems=elems)
        np.testing.assert_allclose(d, whole[0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(err, whole[1], rtol=1e-13, atol=0)
        np.testing.assert_array_equal(nv, whole[2])
    r_small = delta_correct(q, k, v, gamma=8, min_tail=8, base=WindowSinks(8, 2), causal=True,
                            budget=0.0, chunk_elems=1)
    r_big = delta_correct(q, k, v, gamma=8, min_tail=8, base=WindowSinks(8, 2), causal=True,
                          budget=0.0, chunk_elems=1 << 30)
    np.testing.assert_array_equal(r_small.params["extra_dense"], r_big.params["extra_dense"])
    np.testing.assert_array_equal(r_small.cost, r_big.cost)
    for name in ("output", "error_bound"):
        np.testing.assert_allclose(getattr(r_small, name), getattr(r_big, name), rtol=1e-13,
                                   atol=1e-15)  # |v| ~ 1: ulps of cancelling components
    _, attn = _dense(q, k, v)
    assert np.all(np.linalg.norm(r_small.output - attn, axis=-1) <= r_small.error_bound)


def test_budget_dense_rows_memory_is_bounded_by_the_chunk():
    """Regression: ``budget=`` made every row dense at once, ``(H, n, n)`` float64 scores and
    their temporaries (2.16 GB at n = 4096, H = 2); now a chunk of rows at a time."""
    import tracemalloc

    rng = np.random.default_rng(8)
    h, n = 2, 1024
    q, k, v = _qkv(rng, h=h, n=n, d=16, dv=16)
    tracemalloc.start()
    try:
        r = delta_correct(q, k, v, causal=True, budget=0.0, chunk_elems=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.params["extra_dense"].sum() > n  # the budget made most rows dense
    # one (H, n, n) float64 array is 16.8 MB; unchunked, the peak was several of them
    assert peak < h * n * n * 8, peak
