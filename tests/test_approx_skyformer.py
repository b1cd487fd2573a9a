"""Skyformer: the formula against a direct dense evaluation, landmarks, masks, GQA."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certattn._validate import InputError
from certattn.approx._prep import prepare, softmax_attention
from certattn.approx.skyformer import (
    gaussian_kernel,
    kernel_attention,
    landmark_indices,
    schulz_inverse,
    skyformer,
)


def _data(seed: int = 0, n: int = 12, d: int = 4, dv: int = 3, lead: tuple = ()):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*lead, n, d)), rng.normal(size=(*lead, n, d)),
            rng.normal(size=(*lead, n, dv)))


def _direct(q, k, v, idx, ridge=0.1, n_iter=6, scale=None):
    """The Skyformer formula evaluated entry by entry (loops, -|x - y|^2 / 2 directly)."""
    d = q.shape[-1]
    sig = 1 / math.sqrt(d) if scale is None else scale
    z = np.concatenate([q, k]) * math.sqrt(sig)
    lq = q.shape[0]
    zs = z[idx]
    m = len(idx)

    def kap(a, b):
        return math.exp(-0.5 * float(np.sum((a - b) ** 2)))

    a = np.array([[kap(zs[r], zs[c]) + (ridge if r == c else 0.0) for c in range(m)]
                  for r in range(m)])
    dd = np.diag(1 / np.sqrt(a.sum(axis=1)))
    mm = dd @ a @ dd
    vv = mm.T / mm.sum(axis=0).max()
    eye = np.eye(m)
    for _ in range(n_iter):
        kv = mm @ vv
        vv = 0.25 * vv @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    kq = np.array([[kap(z[i], zs[c]) for c in range(m)] for i in range(lq)])
    kk = np.array([[kap(z[lq + j], zs[c]) for c in range(m)] for j in range(k.shape[0])])
    return kq @ (dd @ vv @ dd).T @ kk.T @ v


def test_fixed_landmarks_match_direct_formula() -> None:
    q, k, v = _data(1, n=10, d=6)
    idx = np.array([0, 3, 3, 7, 10, 12, 19, 15])  # 4 query rows (one repeated), 4 key rows
    r = skyformer(q, k, v, landmark_idx=idx)
    np.testing.assert_allclose(r.output, _direct(q, k, v, idx), rtol=1e-10, atol=1e-12)
    assert r.weights is None and r.kept is None and r.error_bound is None
    assert r.method == "skyformer" and r.params["ridge"] == 0.1 and r.params["n_iter"] == 6
    assert r.cost.shape == (10,)
    np.testing.assert_allclose(r.cost, 8 + (8 * 10 + 64) / 10)


def test_direct_formula_with_scale_and_ridge() -> None:
    q, k, v = _data(2, n=7, d=5)
    idx = np.array([1, 2, 8, 9, 13])
    r = skyformer(q, k, v, landmark_idx=idx, scale=0.3, ridge=0.5, n_iter=3)
    np.testing.assert_allclose(r.output, _direct(q, k, v, idx, 0.5, 3, 0.3), rtol=1e-10)


def test_gaussian_kernel_values() -> None:
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    y = np.array([[1.0, 0.0], [1.0, 2.0], [-1.0, -1.0]])
    want = np.exp(-0.5 * np.array([[1, 5, 2], [4, 0, 13]], dtype=float))
    np.testing.assert_allclose(gaussian_kernel(x, y), want, rtol=1e-15)


def test_schulz_converges_to_inverse() -> None:
    rng = np.random.default_rng(3)
    b = rng.normal(size=(6, 6))
    a = b @ b.T + 6 * np.eye(6)
    dinv = 1 / np.sqrt(np.abs(a).sum(axis=1))
    m = dinv[:, None] * a * dinv[None, :]
    np.testing.assert_allclose(schulz_inverse(m, 30) @ m, np.eye(6), atol=1e-10)
    # fewer iterations: an approximation that improves with the count
    e = [np.abs(schulz_inverse(m, t) @ m - np.eye(6)).max() for t in (1, 2, 3)]
    assert e[0] > e[1] > e[2]


@pytest.mark.parametrize("normalize", ["none", "rows", "softmax"])
def test_all_points_as_landmarks_give_the_dense_kernel(normalize: str) -> None:
    """Z_S = [Q; K], no ridge, converged inverse: kappa(Q,Z) kappa(Z,Z)^-1 kappa(Z,K) = C."""
    q, k, v = _data(4, n=8, d=16)  # spread points: kappa(Z, Z) well conditioned
    q, k = 3 * q, 3 * k
    idx = np.arange(16)
    r = skyformer(q, k, v, landmark_idx=idx, ridge=0.0, n_iter=60, normalize=normalize)
    dense = kernel_attention(q, k, v, normalize=normalize)
    np.testing.assert_allclose(r.output, dense, rtol=1e-8, atol=1e-10)
    if normalize != "none":
        np.testing.assert_allclose(r.weights.sum(axis=-1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(r.weights @ v, r.output, rtol=1e-9, atol=1e-12)


def test_softmax_identity_of_the_dense_kernel() -> None:
    """(C diag(w) V) / (C w) with w = e^{|k|^2 sigma / 2} is exactly softmax attention."""
    q, k, v = _data(5, n=9, d=8, lead=(2,))
    pr = prepare(q, k, v, mask=None, causal=False, scale=None, kv_heads=None)
    want, _ = softmax_attention(pr)
    np.testing.assert_allclose(kernel_attention(q, k, v, normalize="softmax"), want,
                               rtol=1e-12, atol=1e-14)
    c = np.exp(-0.5 * ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1) / np.sqrt(8))
    np.testing.assert_allclose(kernel_attention(q, k, v), c @ v, rtol=1e-12)


def test_landmark_draw_half_queries_half_keys_within_pool() -> None:
    kp = np.array([[True] * 5 + [False] * 3, [True] * 8])
    idx = landmark_indices(kp, kp, 64, seed=7)
    assert idx.shape == (2, 64)
    assert np.all(idx[:, :32] < 8) and np.all(idx[:, 32:] >= 8)
    assert np.all(idx[0, :32] < 5) and np.all(idx[0, 32:] < 13)  # never a padded position
    assert set(idx[1, :32].tolist()) == set(range(8))  # uniform with replacement: all hit
    assert len(set(idx[1, 32:].tolist())) < 32  # repeats
    np.testing.assert_array_equal(idx, landmark_indices(kp, kp, 64, seed=7))
    assert not np.array_equal(idx, landmark_indices(kp, kp, 64, seed=8))
    r1 = skyformer(*_data(6, n=8), landmarks=10, seed=3)
    r2 = skyformer(*_data(6, n=8), landmarks=10, seed=3)
    np.testing.assert_array_equal(r1.output, r2.output)


def test_padding_mask_equals_truncated_input() -> None:
    q, k, v = _data(8, n=10)
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :7] = True
    idx = np.array([0, 2, 6, 10, 11, 16])  # rows of [Q; K] with Lq = 10
    r = skyformer(q, k, v, mask=mask, landmark_idx=idx)
    k2, v2 = k[:7], v[:7]
    idx2 = np.array([0, 2, 6, 10, 11, 16])  # the same points in [Q; K[:7]] (Lq still 10)
    r2 = skyformer(q, k2, v2, landmark_idx=idx2)
    np.testing.assert_allclose(r.output, r2.output, rtol=1e-12)
    drawn = skyformer(q, k, v, mask=mask, landmarks=40, seed=1)
    assert np.isfinite(drawn.output).all()
    add = np.where(mask, 0.0, -np.inf)
    np.testing.assert_allclose(skyformer(q, k, v, mask=add, landmark_idx=idx).output, r.output)


def test_gqa_equals_repeated_heads() -> None:
    rng = np.random.default_rng(9)
    q = rng.normal(size=(4, 6, 4))
    k = rng.normal(size=(2, 6, 4))
    v = rng.normal(size=(2, 6, 3))
    idx = np.array([0, 5, 7, 11])
    r = skyformer(q, k, v, kv_heads=2, landmark_idx=idx)
    rep = skyformer(q, np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0), landmark_idx=idx)
    np.testing.assert_allclose(r.output, rep.output, rtol=1e-13)
    np.testing.assert_allclose(r.output[3], skyformer(q[3], k[1], v[1], landmark_idx=idx).output)


def test_causal_and_per_query_masks_mask_the_dense_nystrom_matrix() -> None:
    """No factorised form: O = (C_hat * M) V, C_hat read off with V = I."""
    q, k, v = _data(10, n=6)
    idx = np.array([0, 4, 7, 9])
    chat = skyformer(q, k, np.eye(6), landmark_idx=idx).output  # C_hat itself
    tril = np.tril(np.ones((6, 6), dtype=bool))
    r = skyformer(q, k, v, causal=True, landmark_idx=idx)
    np.testing.assert_allclose(r.output, np.tril(chat) @ v, rtol=1e-10, atol=1e-13)
    assert r.params["dense_masked"] and not skyformer(q, k, v).params["dense_masked"]
    np.testing.assert_allclose(skyformer(q, k, v, mask=tril, landmark_idx=idx).output,
                               r.output, rtol=1e-13)
    rows = skyformer(q, k, v, causal=True, landmark_idx=idx, normalize="rows")
    want = np.tril(chat) / np.tril(chat).sum(1, keepdims=True)
    np.testing.assert_allclose(rows.weights, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rows.output, want @ v, rtol=1e-9, atol=1e-12)
    assert np.all(r.cost == 4 + (4 * 6 + 16) / 6 + np.arange(1, 7) * 4 / 4)
    # all points as landmarks, converged: the masked dense kernel (causal softmax identity)
    q3, k3 = 3 * q, 3 * k
    full = skyformer(q3, k3, v, causal=True, landmark_idx=np.arange(12), ridge=0.0,
                     n_iter=60, normalize="softmax")
    pr = prepare(q3, k3, v, mask=None, causal=True, scale=None, kv_heads=None)
    np.testing.assert_allclose(full.output, softmax_attention(pr)[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(kernel_attention(q3, k3, v, causal=True, normalize="softmax"),
                               softmax_attention(pr)[0], rtol=1e-12, atol=1e-14)


def test_rejects_bad_arguments() -> None:
    q, k, v = _data(10, n=6)
    with pytest.raises(InputError):
        skyformer(q, k, v, mask=np.where(np.eye(6) > 0, 0.5, 0.0))  # a finite bias
    with pytest.raises(InputError):
        skyformer(q, k, v, normalize="softmax2")
    with pytest.raises(InputError):
        skyformer(q, k, v, landmark_idx=np.array([0, 12]))
    with pytest.raises(InputError):
        skyformer(q, k, v, landmarks=1)


def test_reproduce_section_quick(tmp_path) -> None:
    """The quick Skyformer section on the shipped sample: consistent norms and files."""
    from certattn.reproduce.skyformer import _md_skyformer, _skyformer

    sec = _skyformer([], tmp_path, True, lambda *a: None)
    r = sec.results["minilm"]
    (_n, v), = r["by_n"].items()
    assert len(v["nystrom"]) == len(r["landmarks"]) == 3
    attn, cv = v["norm_softmax_output"][0], v["norm_kernel_output"][0]
    for e_cv, e_sm in zip(v["nystrom"], v["code_vs_softmax"], strict=True):
        # triangle inequality: |O - Attn| <= |O - CV| + |CV| + |Attn| (per head, so in mean)
        assert 0 <= e_sm <= e_cv + cv + attn + 1e-9
    assert 1 <= r["spectrum_heads"]["mean_rank_90"] <= r["spectrum_heads"]["mean_rank_99"] <= 32
    assert sec.results["smollm2"]["status"] == "pending"
    assert (tmp_path / "skyformer.png").read_bytes()[:4] == b"\x89PNG"
    assert any("2.15" in line for line in _md_skyformer(sec, None))


# Issue 20: far queries underflow every kernel entry of a row (0 / 0 = NaN before).


def test_kernel_attention_softmax_is_exact_softmax_for_far_queries() -> None:
    """The reported case (exact answer 2 - e^-30 ... = 2.0) and random queries x30."""
    out = kernel_attention(np.array([[30.0, 0.0]]), np.array([[0.0, 44.7], [1.0, 0.0]]),
                           np.array([[1.0], [2.0]]), scale=1.0, normalize="softmax")
    assert out[0, 0] == pytest.approx(2.0, rel=1e-12)
    q, k, v = _data(3)
    for mag in (30.0, 1e3, 1e100):
        pr = prepare(q * mag, k, v, mask=None, causal=False, scale=None, kv_heads=None)
        want, _ = softmax_attention(pr)
        got = kernel_attention(q * mag, k, v, normalize="softmax")
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mag", [30.0, 1e3, 1e100, 1e200])
def test_row_normalised_kernel_attention_for_far_queries(mag: float) -> None:
    """D_C^-1 C V = softmax_j(-|x - y_j|^2 / 2) V: finite, rows of weights sum to 1."""
    q, k, v = _data(6, n=8)
    x, y = q * mag * math.sqrt(0.5), k * math.sqrt(0.5)  # scale 1/sqrt(d), d = 4
    logw = x @ y.T - 0.5 * np.sum(y * y, axis=-1)  # -|x - y|^2 / 2 up to a row constant
    w = np.exp(logw - logw.max(axis=-1, keepdims=True))
    want = (w @ v) / w.sum(axis=-1, keepdims=True)
    got = kernel_attention(q * mag, k, v, normalize="rows")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalize", ["rows", "softmax"])
@pytest.mark.parametrize("mag", [30.0, 1e3, 1e100])
def test_skyformer_with_far_queries_matches_the_dense_kernel(normalize: str, mag: float) -> None:
    """Key landmarks, no ridge, converged inverse: Nystrom = C exactly (in exact
    arithmetic), so the normalised outputs equal the dense ones, even where every kernel
    entry of a query row underflows."""
    q, k, v = _data(4, n=8, d=16)
    q, k = mag * q, 3 * k  # keys spread: kappa(K, K) well conditioned
    r = skyformer(q, k, v, landmark_idx=8 + np.arange(8), ridge=0.0, n_iter=60,
                  normalize=normalize)
    dense = kernel_attention(q, k, v, normalize=normalize)
    assert np.isfinite(r.output).all()
    np.testing.assert_allclose(r.output, dense, rtol=1e-6, atol=1e-8)


def test_gaussian_kernel_of_huge_points_is_zero_or_one() -> None:
    """|x|^2 overflows: the kernel is e^-|x - y|^2/2 all the same (0 far away, 1 at x)."""
    x = np.array([[1e200, 0.0], [0.0, 1.0]])
    got = gaussian_kernel(x, x)
    np.testing.assert_array_equal(got, [[1.0, 0.0], [0.0, 1.0]])


def test_scores_beyond_the_float_range_are_refused() -> None:
    q, k, v = _data(2, n=4)
    for fn in (kernel_attention, skyformer):
        with pytest.raises(InputError, match="overflow"):
            fn(q * 1e160, k * 1e160, v, normalize="softmax")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1, "x"])
def test_ridge_must_be_a_finite_number_at_least_zero(bad) -> None:
    q, k, v = _data(11, n=6)
    with pytest.raises(InputError, match="ridge"):
        skyformer(q, k, v, landmarks=4, ridge=bad)


def test_n_iter_must_be_a_count() -> None:
    q, k, v = _data(11, n=6)
    with pytest.raises(InputError, match="n_iter"):
        skyformer(q, k, v, landmarks=4, n_iter=-1)


@pytest.mark.parametrize("normalize", ["rows", "softmax"])
def test_zero_nystrom_row_sum_is_refused_not_nan(normalize: str) -> None:
    """A query far from the keys and landmarked itself: its Nystrom row sum underflows to
    0 in float64 (0 / 0 = NaN before); one clear InputError instead."""
    q, k, v = _data(0, n=12, d=4)
    with pytest.raises(InputError, match="row sum"):
        skyformer(30 * q, k, v, landmarks=8, normalize=normalize)
    for mask in (None, np.tril(np.ones((12, 12), dtype=bool))):  # factorised and dense
        r = skyformer(q, k, v, landmarks=8, normalize=normalize, mask=mask)
        assert np.isfinite(r.output).all()
