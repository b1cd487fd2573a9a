"""certify_attention against a dense NumPy reference (causal, additive and boolean masks).

The reference computes every score, the full softmax and the exact Top-k of each query;
the certified output must equal attention over those keys, its error bound must cover
the distance to dense attention, and the certificate must match certify_topk.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import certattn
from certattn._array import device_of, to_numpy
from certattn.attention import certify_attention, normalize_mask

from ._exact import exact_weights


def _reference(q, k, v, *, mask=None, causal=False, scale=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    d = q.shape[-1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    lq, lk = s.shape[-2], s.shape[-1]
    vis = np.ones(s.shape, bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype == bool:
            vis = vis & m
        else:
            vis = vis & (m > np.finfo(m.dtype).min / 2)
            s = s + np.where(vis, m.astype(np.float64), 0.0)
    if causal:
        vis = vis & (np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq)
    s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return s, p @ v


def _sparse(s, v, kk):
    """Attention over the kk top keys of every row (ties by position)."""
    order = np.argsort(-s, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1, kind="stable")
    kept = rank < kk[..., None]
    t = np.where(kept, s, -np.inf)
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v


def _check(cert, s, dense, v, eps):
    ref_cert = certattn.certify_topk(s, eps)
    np.testing.assert_array_equal(to_numpy(cert.k), ref_cert.k)
    np.testing.assert_allclose(to_numpy(cert.tail_upper), ref_cert.tail_upper, rtol=1e-12)
    assert np.all(to_numpy(cert.tail_upper) <= eps)
    out = to_numpy(cert.output)
    np.testing.assert_allclose(out, _sparse(s, v, ref_cert.k), rtol=1e-10, atol=1e-12)
    err = np.linalg.norm(dense - out, axis=-1)
    assert np.all(err <= to_numpy(cert.error_bound))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_reference(dtype, causal):
    rng = np.random.default_rng(0)
    q = (rng.normal(size=(2, 3, 6, 8)) * 2).astype(dtype)
    k = (rng.normal(size=(2, 3, 9, 8)) * 2).astype(dtype)
    v = rng.normal(size=(2, 3, 9, 5)).astype(dtype)
    for eps in (0.0, 1e-3, 0.1):
        cert = certify_attention(q, k, v, eps, causal=causal, chunk_elems=100)
        s, dense = _reference(q, k, v, causal=causal)
        _check(cert, s, dense, np.asarray(v, np.float64), eps)
        assert to_numpy(cert.output).dtype == np.float64
        np.testing.assert_array_equal(to_numpy(cert.n_valid), np.isfinite(s).sum(-1))


def test_additive_hf_mask_and_boolean_mask_agree():
    """A Hugging Face additive mask (finfo.min on padded keys) and its boolean form."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 4, 5, 16)).astype(np.float32)
    k = rng.normal(size=(2, 4, 7, 16)).astype(np.float32)
    v = rng.normal(size=(2, 4, 7, 3)).astype(np.float32)
    pad = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], bool)
    add = np.where(pad, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    c1 = certify_attention(q, k, v, 0.01, mask=add, causal=True)
    c2 = certify_attention(q, k, v, 0.01, mask=pad[:, None, None, :], causal=True)
    for f in ("output", "k"):
        np.testing.assert_array_equal(to_numpy(getattr(c1, f)), to_numpy(getattr(c2, f)))
    # rows that see a filled key also bound its (tiny, positive) exact mass; no other row
    sees_fill = np.broadcast_to((np.arange(5)[:, None] + 2 >= np.arange(7)) & ~pad[:, None],
                                (2, 5, 7)).any(-1)[:, None, :]
    for f in ("tail_upper", "error_bound"):
        a, b = to_numpy(getattr(c1, f)), to_numpy(getattr(c2, f))
        np.testing.assert_array_equal(np.broadcast_to(a == b, (2, 4, 5)),
                                      np.broadcast_to(~sees_fill, (2, 4, 5)))
        assert np.all(a >= b) and np.all(a <= b * (1 + 1e-15) + 1e-300)
    s, dense = _reference(q, k, v, mask=add, causal=True)
    _check(c2, s, dense, v.astype(np.float64), 0.01)  # c1: the same plus its hidden mass
    assert np.all(to_numpy(c1.n_valid)[0] <= 5)


def test_additive_bias_values_are_added():
    """Finite additive entries (e.g. ALiBi-like biases) shift the scores."""
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(3, 4)), rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    bias = -0.5 * np.abs(np.arange(3)[:, None] - np.arange(6)[None, :]).astype(np.float64)
    cert = certify_attention(q, k, v, 0.05, mask=bias)
    s, dense = _reference(q, k, v, mask=bias)
    _check(cert, s, dense, v, 0.05)


def test_error_bound_against_exact_arithmetic():
    """The error bound covers the exact (mpmath) dense attention output."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 6)) * 3
    k = rng.normal(size=(10, 6))
    v = rng.normal(size=(10, 3)) + 5.0
    cert = certify_attention(q, k, v, 0.02, scale=0.7)
    s = q @ k.T * 0.7
    for i in range(4):
        w = exact_weights(s[i])
        z = mpmath.fsum(w)
        e2 = mpmath.mpf(0)
        for c in range(3):
            a = mpmath.fsum(wi * mpmath.mpf(float(vi)) for wi, vi in zip(w, v[:, c], strict=True))
            e2 += (a / z - mpmath.mpf(float(cert.output[i, c]))) ** 2
        assert mpmath.sqrt(e2) <= mpmath.mpf(float(cert.error_bound[i]))


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(4)
    q, k, v = rng.normal(size=(2, 7, 4)), rng.normal(size=(2, 11, 4)), rng.normal(size=(2, 11, 3))
    a = certify_attention(q, k, v, 0.01, causal=True, chunk_elems=1)
    b = certify_attention(q, k, v, 0.01, causal=True)
    np.testing.assert_array_equal(a.k, b.k)  # matmul blocking may differ in the last ulp
    for f in ("output", "tail_upper", "error_bound"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-13, atol=1e-15)


def test_backends(backend):
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 3))
    mask = rng.random((5, 8)) < 0.8
    mask[:, 0] = True
    ref = certify_attention(q, k, v, 0.05, mask=mask, causal=True)
    qb, kb, vb, mb = (backend.asarray(a) for a in (q, k, v, mask))
    got = certify_attention(qb, kb, vb, 0.05, mask=mb, causal=True, chunk_elems=50)
    assert device_of(got.output) == device_of(qb)
    for f in ("output", "k", "tail_upper", "error_bound"):
        np.testing.assert_allclose(to_numpy(getattr(got, f)), getattr(ref, f), rtol=1e-12)


def test_normalize_mask_threshold():
    """Half the dtype's most negative finite number is the cut (at or below = masked)."""
    lo = float(np.finfo(np.float16).min)
    m = np.array([0.0, lo / 2, lo / 2 * 0.99, lo, -np.inf, -3.0], np.float16)
    vis, bias = normalize_mask(m)
    np.testing.assert_array_equal(vis, [True, False, True, False, False, True])
    assert bias[5] == -3.0 and bias[1] == 0.0
    vis2, bias2, fill = normalize_mask(m, hidden=True)  # the finite fills, -inf elsewhere
    np.testing.assert_array_equal(vis2, vis)
    np.testing.assert_array_equal(bias2, bias)
    np.testing.assert_array_equal(fill, [-np.inf, lo / 2, -np.inf, lo, -np.inf, -np.inf])
    assert normalize_mask(np.array([0.0, -np.inf]), hidden=True)[2] is None
    assert normalize_mask(np.array([True, False]), hidden=True)[1:] == (None, None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask": np.zeros((3, 4), np.int64)}, "boolean"),
        ({"mask": np.zeros((3, 4), bool)}, "fully masked"),
        ({"mask": np.full((3, 4), np.nan)}, "NaN"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_bad_input(kwargs, match):
    rng = np.random.default_rng(6)
    q, k, v = rng.normal(size=(3, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    with pytest.raises(ValueError, match=match):
        certify_attention(q, k, v, 0.1, **kwargs)


def test_shape_errors():
    z = np.zeros
    with pytest.raises(ValueError, match="d ="):
        certify_attention(z((3, 2)), z((4, 3)), z((4, 2)), 0.1)
    with pytest.raises(ValueError, match="keys"):
        certify_attention(z((3, 2)), z((4, 2)), z((5, 2)), 0.1)
    with pytest.raises(ValueError, match="eps"):
        certify_attention(z((3, 2)), z((4, 2)), z((4, 2)), 1.5)


# --------------------------------------------------------------------------
# Keys hidden by a finite fill (the dtype's minimum): masked, but their exact mass counts
# --------------------------------------------------------------------------


@mpmath.workdps(80)
def _exact_full(s_row, bias_row, kept_row, v):
    """Exact tail of ``kept_row`` and exact output over ALL keys (mpmath).

    The logits are the float64 scores ``s_row`` plus the additive mask entries
    ``bias_row`` in exact arithmetic, fills included (only ``-inf`` entries are absent).
    """
    x = [mpmath.mpf(float(s)) + mpmath.mpf(float(b)) if b != -np.inf else None
         for s, b in zip(s_row, bias_row, strict=True)]
    mx = max(t for t in x if t is not None)
    w = [mpmath.exp(t - mx) if t is not None else mpmath.mpf(0) for t in x]
    z = mpmath.fsum(w)
    tail = mpmath.fsum(wi for wi, kp in zip(w, kept_row, strict=True) if not kp) / z
    out = [mpmath.fsum(wi * mpmath.mpf(float(vi)) for wi, vi in zip(w, v[:, c], strict=True)) / z
           for c in range(v.shape[1])]
    return tail, out


def _check_full(cert, q, k, v, mask, scale):
    """tail_upper and error_bound cover the exact softmax over every key, hidden ones too."""
    s = q @ np.swapaxes(k, -1, -2) * scale
    bias = np.broadcast_to(np.asarray(mask, np.float64), s.shape)
    kept = np.broadcast_to(to_numpy(cert.kept), s.shape)
    tail_up, err_up = to_numpy(cert.tail_upper), to_numpy(cert.error_bound)
    out = to_numpy(cert.output)
    vv = np.broadcast_to(v, (*s.shape[:-1][:-1], *v.shape[-2:]))
    for idx in np.ndindex(s.shape[:-1]):
        tail, exact_out = _exact_full(s[idx], bias[idx], kept[idx], vv[idx[:-1]])
        assert tail <= mpmath.mpf(float(tail_up[idx])), (idx, tail, tail_up[idx])
        e2 = mpmath.fsum((a - mpmath.mpf(float(o))) ** 2 for a, o in zip(exact_out, out[idx],
                                                                           strict=True))
        assert mpmath.sqrt(e2) <= mpmath.mpf(float(err_up[idx])), (idx, err_up[idx])


@pytest.mark.parametrize("offset", [10.0, -3.0, -40.0])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_float16_fill_with_a_huge_hidden_score(offset, eps):
    """A float16 mask filled with -65504 hides key 2, whose score is 65504 + offset above
    the best visible one: its exact mass is e^offset / (e^offset + ...), dominant for
    offset 10; the certificate must cover it (it used to certify a tail of 0)."""
    q = np.array([[1.0, 0.0]])
    k = np.array([[0.0, 0.0], [1.0, 0.0], [65504.0 + 1.0 + offset, 0.0]])
    v = np.array([[0.0, 1.0], [1.0, 0.0], [50.0, -50.0]])
    mask = np.array([0.0, 0.0, np.finfo(np.float16).min], np.float16)
    cert = certify_attention(q, k, v, eps, mask=mask, scale=1.0)
    assert np.asarray(cert.n_valid)[0] == 2 and not np.asarray(cert.kept)[0, 2]
    _check_full(cert, q, k, v, mask, 1.0)
    h = np.exp(offset)
    if offset < 0:  # not trivial: about the hidden mass e^offset on top of the visible tail
        assert float(cert.tail_upper[0]) <= h * (1 + 1e-9) + (0.3 if eps else 0.0)
        assert float(cert.tail_upper[0]) >= h / (1 + h) * (1 - 1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_float32_min_fills_keep_a_positive_tail(eps):
    """BERT-style padding (float32 minimum on padded keys): the hidden keys' exact mass is
    tiny but positive, so keeping every visible key certifies a tail > 0, >= the exact one."""
    rng = np.random.default_rng(11)
    q = rng.normal(size=(2, 3, 4, 8))
    k = rng.normal(size=(2, 3, 7, 8)) * 2
    v = rng.normal(size=(2, 3, 7, 3))
    pad = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]], bool)
    mask = np.where(pad, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    cert = certify_attention(q, k, v, eps, mask=mask)
    _check_full(cert, q, k, v, mask, 1 / np.sqrt(8))
    tail = to_numpy(cert.tail_upper)
    assert np.all(tail > 0)
    ref = certify_attention(q, k, v, eps, mask=pad[:, None, None, :])
    np.testing.assert_array_equal(to_numpy(cert.k), to_numpy(ref.k))
    np.testing.assert_array_equal(to_numpy(cert.output), to_numpy(ref.output))
    assert np.all(tail >= to_numpy(ref.tail_upper))
    assert np.all(tail <= to_numpy(ref.tail_upper) * (1 + 1e-15) + 1e-300)  # e^-3e38 is tiny
    assert np.all(to_numpy(cert.error_bound) >= to_numpy(ref.error_bound))
    sc = certattn.certify_scores(q, k, eps, mask=mask)
    np.testing.assert_array_equal(to_numpy(sc.tail_upper), tail)
    # a -inf fill hides the keys exactly: the boolean mask's certificate, bit for bit
    neg = certify_attention(q, k, v, eps, mask=np.where(mask == 0, 0.0, -np.inf))
    for f in ("tail_upper", "error_bound", "output"):
        np.testing.assert_array_equal(to_numpy(getattr(neg, f)), to_numpy(getattr(ref, f)))
    if eps == 0.0:
        assert np.all(to_numpy(neg.tail_upper) == 0.0)


def test_hidden_mass_fails_closed_on_overflow():
    """A hidden score e^800 above the visible ones overflows the bound: tail 1, not 0."""
    q = np.array([[1.0, 0.0]])
    k = np.array([[0.0, 0.0], [65504.0 + 800.0, 0.0]])
    v = np.array([[0.0, 1.0], [1.0, 0.0]])
    mask = np.array([0.0, np.finfo(np.float16).min], np.float16)
    cert = certify_attention(q, k, v, 0.0, mask=mask, scale=1.0)
    assert float(cert.tail_upper[0]) == 1.0
    assert float(cert.error_bound[0]) >= np.sqrt(2.0)  # |v_1 - v_0| at full weight
    _check_full(cert, q, k, v, mask, 1.0)


def test_causally_hidden_fill_keys_carry_no_mass():
    """A filled key that the causal mask hides anyway is not in the softmax at all."""
    rng = np.random.default_rng(12)
    q, k, v = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 2))
    fill = np.zeros(4, np.float32)
    fill[3] = np.finfo(np.float32).min
    c1 = certify_attention(q, k, v, 0.0, mask=fill, causal=True)
    c2 = certify_attention(q, k, v, 0.0, mask=np.arange(4) < 3, causal=True)
    t1, t2 = to_numpy(c1.tail_upper), to_numpy(c2.tail_upper)
    np.testing.assert_array_equal(t1[:3], t2[:3])  # rows 0-2 cannot see key 3
    assert t2[3] == 0.0 < t1[3]


def test_fill_masks_on_backends(backend):
    """The hidden mass is computed in the caller's namespace and device."""
    rng = np.random.default_rng(13)
    q, k, v = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 3))
    fill = np.zeros((5, 8), np.float32)
    fill[:, 6:] = np.finfo(np.float32).min
    ref = certify_attention(q, k, v, 0.0, mask=fill, causal=True)
    assert np.all(to_numpy(ref.tail_upper)[..., 4:] > 0)
    qb, kb, vb, mb = (backend.asarray(a) for a in (q, k, v, fill))
    got = certify_attention(qb, kb, vb, 0.0, mask=mb, causal=True, chunk_elems=50)
    for f in ("output", "k", "tail_upper", "error_bound"):
        np.testing.assert_allclose(to_numpy(getattr(got, f)), getattr(ref, f), rtol=1e-12)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 9),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    offset=st.sampled_from([-800.0, -745.0, -700.0, -40.0, -1.0, 0.0, 3.0, 700.0, 720.0]),
    eps=st.sampled_from([0.0, 0.01, 0.5]),
    causal=st.booleans(),
)
def test_hidden_mass_sound_on_random_and_extreme_fills(seed, n, dtype, offset, eps, causal):
    """MASK-HIDDEN against mpmath over all keys: fills of every float dtype on random keys,
    one hidden key placed ``offset`` above the best visible score (on both sides of the
    underflow and overflow thresholds), any budget, causal or not."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, 3))
    k = rng.normal(size=(n, 3)) * 2
    v = rng.normal(size=(n, 2)) * 10.0 ** rng.uniform(-2, 2)
    fill = float(np.finfo(dtype).min)
    hidden = rng.random(n) < 0.4
    hidden[0] = False
    j = n - 1
    if hidden[j] and dtype == np.float16:  # key j: fill + offset above query 1's best
        best = np.max(np.where(hidden, -np.inf, q[1] @ k.T))
        k[j] = q[1] / (q[1] @ q[1]) * (-fill + best + offset)
    mask = np.where(hidden, fill, 0.0).astype(dtype)
    cert = certify_attention(q, k, v, eps, mask=mask, causal=causal, scale=1.0)
    assert not np.any(np.asarray(cert.kept) & hidden)
    full = np.where(hidden, fill, 0.0)
    if causal:
        full = np.where(np.arange(n)[None, :] <= np.arange(2)[:, None] + n - 2, full, -np.inf)
    _check_full(cert, q, k, v, full, 1.0)


def test_mask_hidden_verify_check_passes_and_catches_a_dropped_term(monkeypatch):
    """``certattn verify --only MASK-HIDDEN`` passes, and fails once the hidden mass is
    left out of the tail, or out of the output error."""
    import certattn.attention as att
    from certattn.verify import run_verify

    ok = run_verify(rows=100_000, ids=["MASK-HIDDEN"], progress=False)[0]
    assert ok.passed and ok.max_violation <= ok.tolerance
    with monkeypatch.context() as mp:
        mp.setattr(att, "hidden_tail", lambda tail, h, xp: tail)
        assert not run_verify(rows=100_000, ids=["MASK-HIDDEN"], progress=False)[0].passed
    monkeypatch.setattr(att, "hidden_error", lambda err, h, hid, valid, v, xp: err)
    assert not run_verify(rows=100_000, ids=["MASK-HIDDEN"], progress=False)[0].passed


def test_bfloat16_additive_mask_is_read_in_its_own_dtype():
    """A bfloat16 additive mask (ml_dtypes) was a TypeError; its fill (bfloat16's most
    negative number) masks a key as in float32, and -10000 stays a bias."""
    import ml_dtypes

    from certattn.masks import normalize_mask

    bf = ml_dtypes.bfloat16
    m = np.array([[0.0, -10000.0, float(ml_dtypes.finfo(bf).min), -np.inf]], dtype=bf)
    visible, bias, fill = normalize_mask(m, hidden=True)
    np.testing.assert_array_equal(visible, [[True, True, False, False]])
    np.testing.assert_array_equal(bias, [[0.0, float(bf(-10000.0)), 0.0, 0.0]])
    assert float(fill[0, 2]) == float(ml_dtypes.finfo(bf).min) and fill[0, 3] == -np.inf
    q = np.eye(3, 4)
    a = certattn.certify_attention(q, np.eye(4), np.eye(4), 0.1, mask=m)
    b = certattn.certify_attention(q, np.eye(4), np.eye(4), 0.1, mask=m.astype(np.float32))
    np.testing.assert_array_equal(a.k, b.k)


def test_certificate_is_about_the_exact_scores_not_the_float64_ones():
    """Regression (soundness matrix): on GQA float64 inputs with scores up to ~3e4 the
    float64 rounding of ``scale q.k`` moved the tail past ``tail_upper`` (relative 1.8e-13);
    the certificate must hold for the exact ``scale q.k`` from the given inputs."""
    from certattn._soundness import Claim
    from certattn.policies import TopP

    from ._matrix import check, exact_rows, make_case

    case = make_case("gqa", "float64", "large_scores")
    rows = exact_rows(case)
    kw = dict(scale=case.scale, mask=case.mask, causal=True, kv_heads=2)
    cert = certify_attention(case.queries, case.keys, case.values, 0.05, **kw)
    bad = check(Claim(tail_upper=cert.tail_upper, kl_upper=cert.kl_upper,
                      error_bound=cert.error_bound, kept=cert.kept, output=cert.output), rows)
    assert bad == []
    sc = certattn.certify_scores(case.queries, case.keys, policy=TopP(0.95), return_kept=True,
                                 **kw)
    bad = check(Claim(tail_upper=sc.tail_upper, kl_upper=sc.kl_upper, error_bound=None,
                      kept=sc.kept, output=None), rows)
    assert bad == []
    assert np.all(cert.tail_upper <= 0.05) and np.all(sc.tail_upper <= 0.05 + 1e-15)


def test_widen_tail_bounds_the_exact_perturbed_tail_and_fails_closed():
    """``t / (t + (1 - t) e^{-2 delta})`` in exact arithmetic is below the widened bound."""
    from certattn._fp import widen_tail

    rng = np.random.default_rng(3)
    t = np.concatenate([rng.uniform(0, 1, 200), 10.0 ** rng.uniform(-300, -1, 200), [1.0]])
    d = np.concatenate([10.0 ** rng.uniform(-16, 1, 400), [1e-3]])
    w = widen_tail(t, d, np)
    assert np.all((w >= t) & (w <= 1))
    with mpmath.workdps(60):
        for ti, di, wi in zip(t, d, w, strict=True):
            ti, di = mpmath.mpf(float(ti)), mpmath.mpf(float(di))
            assert ti / (ti + (1 - ti) * mpmath.exp(-2 * di)) <= mpmath.mpf(float(wi))
    z = np.zeros(3)
    assert np.array_equal(widen_tail(z, np.array([1.0, np.inf, np.nan]), np), z)
    odd = widen_tail(np.array([np.nan, 0.1, 0.1, 2.0]), np.array([1e-9, np.inf, np.nan, 0.0]), np)
    assert np.array_equal(odd, [1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("eps", [0.0, 1e-300, 1e-9, 0.05, 0.5, 0.999])
def test_budget_under_slack_keeps_the_widened_bound_within_eps(eps):
    from certattn._fp import budget_under_slack, widen_tail

    for delta in (0.0, 1e-300, 1e-13, 1e-6, 0.3, 5.0):
        b = budget_under_slack(eps, delta)
        assert 0 <= b <= eps and widen_tail(np.array([b]), np.array([delta]), np)[0] <= eps
    assert budget_under_slack(0.05, np.inf) == 0.0 and budget_under_slack(0.05, np.nan) == 0.0


def test_slack_error_against_exact_arithmetic_and_on_overflow():
    """``sum |p_j - p'_j| max |v_j|`` for logits moved by at most delta, in exact arithmetic."""
    from certattn._fp import slack_error

    rng = np.random.default_rng(4)
    s = rng.normal(size=6) * 3
    v = rng.normal(size=(6, 3))
    delta = 1e-3
    moved = s + rng.uniform(-delta, delta, 6)
    with mpmath.workdps(50):
        def soft(x):
            e = [mpmath.exp(mpmath.mpf(float(a))) for a in x]
            return [a / mpmath.fsum(e) for a in e]
        p, p2 = soft(s), soft(moved)
        diff = [a - b for a, b in zip(p, p2, strict=True)]
        dist = mpmath.sqrt(mpmath.fsum(
            mpmath.fsum(w * float(v[j, c]) for j, w in enumerate(diff)) ** 2 for c in range(3)))
    valid = np.ones((1, 6), bool)
    bound = slack_error(np.zeros(1), np.array([delta]), v, valid, np)[0]
    assert dist <= bound < 1
    huge = slack_error(np.zeros(1), np.array([1.0]), np.full((6, 3), 1e308), valid, np)
    assert np.array_equal(huge, [np.inf])
    assert np.array_equal(slack_error(np.zeros(1), np.array([np.inf]), v, valid, np), [np.inf])


def test_policy_bounds_are_widened_unless_exact():
    """A policy's tail about the computed scores is widened by the score slack; one marked
    ``exact`` (built from queries and keys with margins) is taken as it is."""
    from certattn.policies import Selection

    class Given:
        name = "given"

        def __init__(self, exact):
            self.exact = exact

        def select(self, scores, valid, ctx):
            kept = np.zeros(scores.shape, bool)
            kept[..., 0] = True
            return Selection(kept=kept, tail_upper=np.full(scores.shape[:-1], 0.25),
                             exact=self.exact)

    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(3, 8, 4)) * 20 for _ in range(3))
    exact = certify_attention(q, k, v, policy=Given(True))
    widened = certify_attention(q, k, v, policy=Given(False))
    assert np.all(exact.tail_upper == 0.25)
    assert np.all(widened.tail_upper > 0.25) and np.all(widened.tail_upper < 0.25 * (1 + 1e-9))
