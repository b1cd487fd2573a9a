"""One certificate for any kept set, the selection policies on top, and the attention loop.

Every kept set is checked against its direct definition, every certificate against the
exact softmax (mpmath), and the error bound against the exact output error.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import certattn
from certattn._array import device_of, to_numpy
from certattn.policies import (
    CertifiedBlocks,
    FixedK,
    Pages,
    Search,
    TopK,
    TopP,
    WindowSinks,
    window_sinks_mask,
)

from ._exact import exact_tail_of_set
from ._exact_scores import check_rows
from .test_output import _exact_error


@st.composite
def rows_and_sets(draw, max_n: int = 12):
    """(logits (r, n), kept (r, n)) with masks, ties, wide ranges and empty kept sets."""
    n = draw(st.integers(1, max_n))
    r = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(0, draw(st.sampled_from([0.5, 3.0, 40.0])), (r, n))
    if draw(st.booleans()):
        x = np.round(x)
    x[rng.random((r, n)) < draw(st.sampled_from([0.0, 0.4]))] = -np.inf
    x[:, 0] = np.where(np.isfinite(x).any(axis=1), x[:, 0], 1.0)
    x = x + draw(st.sampled_from([0.0, 1e6, -7e4]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    x = x.astype(dtype)
    kept = rng.random((r, n)) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    return x, kept


@given(case=rows_and_sets())
def test_certify_kept_is_sound_and_counts(case):
    """TV-TAIL (any kept set): exact tail <= tail_upper; kl_upper >= -log(1 - exact)."""
    x, kept = case
    cert = certattn.certify_kept(x, kept)
    valid = np.isfinite(x)
    np.testing.assert_array_equal(cert.kept, kept & valid)
    np.testing.assert_array_equal(cert.n_kept, (kept & valid).sum(-1))
    np.testing.assert_array_equal(cert.n_valid, valid.sum(-1))
    for i in range(x.shape[0]):
        exact = exact_tail_of_set(x[i], cert.kept[i])
        assert exact <= mpmath.mpf(float(cert.tail_upper[i]))
        assert 0.0 <= float(cert.tail_upper[i]) <= 1.0
        with mpmath.workdps(80):
            kl = -mpmath.log(1 - exact) if exact < 1 else mpmath.inf
        assert kl <= mpmath.mpf(float(cert.kl_upper[i]))
        if not cert.kept[i].any():
            assert float(cert.tail_upper[i]) == 1.0
        if (cert.kept[i] == valid[i]).all():
            assert float(cert.tail_upper[i]) == 0.0


def test_certify_kept_agrees_with_topk_and_axis():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (3, 40, 2))
    cert_k = certattn.certify_topk(x, 0.05, axis=1)
    kept = cert_k.kept_mask()
    cert = certattn.certify_kept(x, kept, axis=1)
    assert cert.kept.shape == x.shape
    np.testing.assert_array_equal(cert.n_kept, cert_k.k)
    # both sound; the any-set bound is the exact tail rounded up: at most Top-k's bound
    assert np.all(cert.tail_upper <= cert_k.tail_upper * (1 + 1e-9) + 1e-300)


def test_certify_kept_bad_input():
    with pytest.raises(ValueError, match="boolean"):
        certattn.certify_kept(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="does not match"):
        certattn.certify_kept(np.zeros((2, 3)), np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="fully masked"):
        certattn.certify_kept(np.full((1, 3), -np.inf), np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="NaN"):
        certattn.certify_kept(np.array([0.0, np.nan]), np.ones(2, bool))


def test_certify_kept_backends(backend):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (4, 9))
    x[0, :3] = -np.inf
    kept = rng.random((4, 9)) < 0.5
    ref = certattn.certify_kept(x, kept)
    got = certattn.certify_kept(backend.asarray(x), backend.asarray(kept))
    assert device_of(got.tail_upper) == device_of(backend.asarray(x))
    np.testing.assert_allclose(to_numpy(got.tail_upper), ref.tail_upper, rtol=1e-12)


# --------------------------------------------------------------------------- policies


def _qkv(seed=0, lead=(2,), lq=7, lk=11, d=5, dv=3, sigma=2.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(0, sigma, (*lead, lq, d))
    k = rng.normal(0, 1, (*lead, lk, d))
    v = rng.normal(0, 1, (*lead, lk, dv))
    return q, k, v


def _scores(q, k, *, causal=False, scale=None):
    d = q.shape[-1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        vis = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
        s = np.where(vis, s, -np.inf)
    return s


def _check_sound(cert, q, k, v, causal):
    """tail_upper >= exact tail of the kept set; error_bound >= exact output error."""
    s = _scores(q, k, causal=causal)
    kept = to_numpy(cert.kept)
    rows = s.reshape(-1, s.shape[-1])
    kr = kept.reshape(-1, s.shape[-1])
    tails = to_numpy(cert.tail_upper).ravel()
    errs = to_numpy(cert.error_bound).reshape(-1)
    vv = np.broadcast_to(v, (*s.shape[:-2], *v.shape[-2:])).reshape(-1, *v.shape[-2:])
    per = s.shape[-2]
    for i in range(rows.shape[0]):
        assert kr[i].any()
        assert exact_tail_of_set(rows[i], kr[i]) <= mpmath.mpf(float(tails[i]))
        exact = _exact_error(rows[i], vv[i // per], kr[i])
        assert exact <= mpmath.mpf(float(errs[i]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "policy",
    [TopK(0.05), TopP(0.9), FixedK(3), WindowSinks(3, 1), Pages(4, page_size=3),
     CertifiedBlocks(0.1, block_size=4), Search(0.05)],
    ids=lambda p: p.name,
)
def test_every_policy_is_certified_soundly(policy, causal):
    q, k, v = _qkv()
    cert = certattn.certify_attention(q, k, v, policy=policy, causal=causal)
    assert cert.policy == policy.name
    _check_sound(cert, q, k, v, causal)
    eps = getattr(policy, "eps", None)
    if eps is not None:
        assert np.all(cert.tail_upper <= eps)
    np.testing.assert_array_equal(cert.k, cert.kept.sum(-1))


def test_topk_policy_equals_certify_topk():
    q, k, v = _qkv(3, lq=9, lk=30)
    s = _scores(q, k, causal=True)
    ref = certattn.certify_topk(s, 0.01)
    att = certattn.certify_attention(q, k, v, 0.01, causal=True, chunk_elems=64)
    sc = certattn.certify_scores(q, k, 0.01, causal=True, chunk_elems=64, return_kept=True)
    for got in (att, sc):
        # k and the kept set exactly; the bounds to rounding, because BLAS forms a score
        # in a chunk of queries (a matrix-vector product for one query) and in the whole
        # matrix with different kernels, which may differ in the last bit
        np.testing.assert_array_equal(got.k, ref.k)
        np.testing.assert_allclose(got.tail_upper, ref.tail_upper, rtol=1e-12)
        np.testing.assert_allclose(got.kl_upper, ref.kl_upper, rtol=1e-12)
        np.testing.assert_array_equal(got.kept, ref.kept_mask())
    assert sc.kept is not None and certattn.certify_scores(q, k, 0.01).kept is None


def test_window_sinks_definition():
    """The first `sinks` and the last `window` visible keys, with a causal mask."""
    lq = lk = 9
    vis = np.arange(lk)[None, :] <= np.arange(lq)[:, None]
    kept = window_sinks_mask(vis, 3, 2, np)
    for i in range(lq):
        visible = np.flatnonzero(vis[i])
        want = set(visible[:2]) | set(visible[-3:])
        assert set(np.flatnonzero(kept[i])) == want


def test_window_covering_the_context_is_exact_attention():
    q, k, v = _qkv(4)
    cert = certattn.certify_attention(q, k, v, policy=WindowSinks(window=11), causal=True)
    dense = certattn.certify_attention(q, k, v, 0.0, causal=True)
    np.testing.assert_allclose(cert.output, dense.output, rtol=1e-13, atol=1e-15)
    assert np.all(cert.tail_upper == 0.0)


def test_pages_keep_whole_pages_by_box_bound():
    q, k, v = _qkv(5, lead=(), lq=4, lk=12, d=3)
    cert = certattn.certify_attention(q, k, v, policy=Pages(budget=6, page_size=3))
    kept = cert.kept.reshape(4, 4, 3)
    # whole pages: every page is all-kept or all-dropped, and 2 pages are kept
    assert np.all(kept.all(-1) | ~kept.any(-1))
    np.testing.assert_array_equal(kept.all(-1).sum(-1), 2)
    # the kept pages are those with the largest box bounds (Quest)
    kb = k.reshape(4, 3, 3)
    lo, hi = kb.min(1), kb.max(1)
    ub = (np.maximum(q[:, None, :] * lo[None], q[:, None, :] * hi[None])).sum(-1)
    for i in range(4):
        top = set(np.argsort(-ub[i], kind="stable")[:2])
        assert set(np.flatnonzero(kept[i].all(-1))) == top


def test_gqa_heads_read_their_kv_head():
    rng = np.random.default_rng(6)
    q = rng.normal(size=(6, 5, 4))
    k = rng.normal(size=(2, 8, 4))
    v = rng.normal(size=(2, 8, 3))
    got = certattn.certify_attention(q, k, v, 0.02)
    rep = certattn.certify_attention(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0), 0.02)
    np.testing.assert_array_equal(got.k, rep.k)
    np.testing.assert_allclose(got.output, rep.output)
    mapped = certattn.certify_attention(q, k, v, 0.02, kv_heads=[1, 1, 1, 0, 0, 0])
    swapped = certattn.certify_attention(q, k[::-1], v[::-1], 0.02)
    np.testing.assert_allclose(mapped.output, swapped.output)
    with pytest.raises(ValueError, match="share"):
        certattn.certify_attention(q, k[:, :, :][:1].repeat(4, 0), v[:1].repeat(4, 0), 0.02)
    with pytest.raises(ValueError, match="map"):
        certattn.certify_attention(q, k, v, 0.02, kv_heads=[0, 1, 2, 0, 0, 0])


def test_search_policy_matches_certified_search():
    q, k, v = _qkv(7, lead=(), lq=6, lk=40, d=4)
    a = certattn.certify_attention(q, k, v, policy=Search(0.02, method="mc"))
    b = certattn.certified_search(q, k, v, 0.02, method="mc")
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.tail_upper, b.tail_upper)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "window"}, "unknown policy"),
        ({"policy": object()}, "select"),
        ({}, "eps"),
    ],
)
def test_bad_policies(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        certattn.certify_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: WindowSinks(0, 0), "at least one"),
        (lambda: WindowSinks(-1), "window"),
        (lambda: Pages(0), "budget"),
        (lambda: FixedK(0), "k must"),
        (lambda: TopK(1.0), "eps"),
        (lambda: TopP(0.0), "p must"),
        (lambda: Search(0.1, method="x"), "method"),
        (lambda: CertifiedBlocks(0.1, kind="x"), "kind"),
    ],
)
def test_policy_parameters_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_empty_and_degenerate_inputs_are_one_line_errors():
    z = np.zeros
    with pytest.raises(ValueError, match="at least one query"):
        certattn.certify_attention(z((0, 2)), z((3, 2)), z((3, 2)), 0.1)
    with pytest.raises(ValueError, match="d >= 1"):
        certattn.certify_attention(z((2, 0)), z((3, 0)), z((3, 2)), 0.1)
    with pytest.raises(ValueError, match="overflow"):
        certattn.certify_attention(np.full((1, 2), 1e300), np.full((2, 2), 1e300), z((2, 2)), 0.1)


# --------------------------------------------------------------------------- fail closed


def test_search_fails_closed_when_its_margin_overflows():
    """Issue 16 item 1: exp(delta) overflowed, 0 * inf became NaN, NaN became tail 0."""
    q = np.array([[1.0, 1.0]])
    k = np.array([[1e19, 1023.0], [1e19, 1025.0]])
    v = np.array([[0.0], [1.0]])
    for method in ("ours", "mc", "tree", "gap"):
        res = certattn.certified_search(q, k, v, 0.01, scale=1.0, method=method)
        s = (q @ k.T)[0]
        exact = exact_tail_of_set(s, res.kept[0])
        assert exact <= mpmath.mpf(float(res.tail_upper[0])) <= 0.01
        exact_err = _exact_error(s, v, res.kept[0])
        assert exact_err <= mpmath.mpf(float(res.error_bound[0]))


@given(
    mag=st.sampled_from([1e150, 1e200, 1e300, 1.7e308]),
    seed=st.integers(0, 2**16),
)
def test_bounds_near_the_float_range_fail_closed(mag, seed):
    """Every tail bound either holds against exact arithmetic or is trivial, never small
    and wrong, for logits and values near the edges of the float range."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-mag, -mag / 2, 0.0, mag / 3, mag], size=(2, 6))
    x[:, 0] = mag
    kept = rng.random((2, 6)) < 0.5
    kept[:, 0] = True
    cert = certattn.certify_kept(x, kept)
    for i in range(2):
        assert exact_tail_of_set(x[i], cert.kept[i]) <= mpmath.mpf(float(cert.tail_upper[i]))
    v = rng.normal(0, 1, (6, 2)) * rng.choice([1.0, 1e150, 1e300])
    ob = certattn.output_bounds(x, v, kept)
    for i in range(2):
        b = float(ob.best[i])
        assert not np.isnan(b)
        exact = _exact_error(x[i], v, kept[i] & np.isfinite(x[i]))
        assert exact <= mpmath.mpf(b)


def test_kept_policy_protocol_is_open():
    """A user's own policy: one small class with a select method."""

    class EveryOther:
        name = "every_other"

        def select(self, scores, valid, ctx):
            from certattn.policies import Selection

            keep = np.zeros(scores.shape, bool)
            keep[..., ::2] = True
            return Selection(kept=keep)

    q, k, v = _qkv(8)
    cert = certattn.certify_attention(q, k, v, policy=EveryOther())
    assert cert.policy == "every_other"
    np.testing.assert_array_equal(cert.k, 6)
    _check_sound(cert, q, k, v, False)


def test_deprecated_names_warn_and_agree():
    x = np.random.default_rng(9).normal(0, 2, (3, 20))
    cert = certattn.certify_topk(x, 0.1)
    with pytest.warns(DeprecationWarning, match="tail_upper"):
        old = cert.tail_mass
    np.testing.assert_array_equal(old, cert.tail_upper)
    with pytest.warns(DeprecationWarning, match="kl_upper"):
        np.testing.assert_array_equal(cert.kl, cert.kl_upper)
    q, k, v = _qkv(10)
    att = certattn.certify_attention(q, k, v, 0.1)
    with pytest.warns(DeprecationWarning, match="tightest"):
        np.testing.assert_array_equal(att.bound, att.tightest)
    res = certattn.certified_search(q[0], k[0], v[0], 0.1)
    with pytest.warns(DeprecationWarning, match="tail_upper"):
        np.testing.assert_array_equal(res.tail_bound, res.tail_upper)


@pytest.mark.parametrize(
    "policy",
    [TopK(0.05), TopP(0.9), FixedK(3), WindowSinks(3, 1), Pages(4, page_size=3),
     CertifiedBlocks(0.1, block_size=4), Search(0.05)],
    ids=lambda p: p.name,
)
def test_every_policy_on_every_backend(policy, backend):
    """Results in the input's namespace and on its device (array-api-strict's second device
    catches arrays made elsewhere), equal to the NumPy run."""
    q, k, v = _qkv(11)
    ref = certattn.certify_attention(q, k, v, policy=policy, causal=True)
    qb, kb, vb = (backend.asarray(a) for a in (q, k, v))
    got = certattn.certify_attention(qb, kb, vb, policy=policy, causal=True)
    for name in ("output", "tail_upper", "error_bound", "kept"):
        arr = getattr(got, name)
        assert device_of(arr) == device_of(qb), name
        np.testing.assert_allclose(to_numpy(arr), getattr(ref, name), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------ masks inside blocks, additive biases


def _issue20_blocks():
    k = np.array([0.0, 0, 0, 0, 1, 1, 1, 1])[:, None]
    return np.ones((8, 1)), k, 1.0 - k


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
def test_certified_blocks_counts_only_visible_keys_of_a_kept_block(mask_kind):
    """Issue 20.1: a block the query sees only partly is not head mass it cannot see.

    Query 4 sees keys 0..4: block 0 (four keys at score 0) and one key of block 1 (score
    1); the block of key 4 was counted with its full size (4 e^1) as head mass, giving
    tail_upper = 0.269 where the exact tail is 0.595."""
    q, k, v = _issue20_blocks()
    tril = np.tril(np.ones((8, 8), bool))
    kw = {"causal": {"causal": True}, "bool": {"mask": tril},
          "additive": {"mask": np.where(tril, 0.0, -np.inf)}}[mask_kind]
    a = certattn.certify_attention(q, k, v, policy=CertifiedBlocks(0.3, block_size=4),
                                   scale=1.0, **kw)
    check_rows(q, k, v, 1.0, to_numpy(a.kept), a.tail_upper, a.error_bound, visible=tril)
    assert np.all(to_numpy(a.tail_upper) <= 0.3)


def _issue20_search():
    from ._exact_scores import lifted_key_case

    return lifted_key_case(256)


@pytest.mark.parametrize(
    "policy",
    [CertifiedBlocks(0.01), *(Search(0.01, method=m) for m in
                              ("ours", "mc", "tree", "gap", "quant", "paged"))],
    ids=lambda p: f"{p.name}-{getattr(p, 'method', '')}",
)
def test_policies_add_the_additive_bias_to_their_score_bounds(policy):
    """Issue 20.2: a +30 bias on the lowest-scoring key makes it carry 97% of the mass;
    bounds of scale q.k alone certified a tail of 0.0092."""
    q, k, v, b = _issue20_search()
    a = certattn.certify_attention(q, k, v, policy=policy, mask=b, scale=1.0)
    check_rows(q, k, v, 1.0, to_numpy(a.kept), a.tail_upper, a.error_bound, bias=b)
    assert bool(to_numpy(a.kept)[0, -1])
    s = certattn.certify_scores(q, k, policy=policy, mask=b, scale=1.0, return_kept=True)
    check_rows(q, k, v, 1.0, to_numpy(s.kept), s.tail_upper, bias=b)


_BIAS_POLICIES = [
    *(CertifiedBlocks(e, block_size=bs, kind=kind) for e, bs, kind in
      ((0.05, 3, "box"), (0.2, 2, "both"), (0.01, 4, "ball"))),
    *(Search(e, method=m, bits=bits) for e, (m, bits) in zip(
        (0.05, 0.2, 0.01, 0.1, 0.05, 0.02),
        (("ours", None), ("mc", None), ("tree", None), ("gap", None), ("quant", 2),
         ("paged", 4)), strict=True)),
]


@st.composite
def biased_cases(draw):
    n = draw(st.integers(2, 12))
    d = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q = rng.normal(0, draw(st.sampled_from([0.5, 2.0, 6.0])), (3, d))
    k = rng.normal(0, 1, (n, d))
    v = rng.normal(0, 1, (n, 2))
    kind = draw(st.sampled_from(["pad", "big", "normal", "mixed", "per_query"]))
    shape = (3, n) if kind in ("mixed", "per_query") else (1, n)
    choices = {"pad": [0.0, -10000.0], "big": [0.0, 30.0, 200.0],
               "normal": None, "mixed": [0.0, -10000.0, 25.0, -3.0, -np.inf]}.get(kind)
    if choices is None:
        b = rng.normal(0, 5, shape)
    else:
        b = rng.choice(np.array(choices), size=shape)
    causal = draw(st.booleans()) and kind != "mixed" and n >= 3
    b[:, rng.integers(n - 2 if causal else n)] = 0.0  # every query sees a key
    policy = draw(st.sampled_from(_BIAS_POLICIES))
    return q, k, v, b, policy, causal


@given(case=biased_cases())
def test_bias_policies_are_sound_against_exact_arithmetic(case):
    """Random additive biases (-10000 padding, large positive, mixed, -inf) x certified
    blocks and every search method: exact tail <= tail_upper, exact error <= error_bound."""
    q, k, v, b, policy, causal = case
    a = certattn.certify_attention(q, k, v, policy=policy, mask=b, causal=causal, scale=0.7)
    vis = np.isfinite(b) & (np.arange(k.shape[0])[None, :] <= np.arange(3)[:, None] + k.shape[0] - 3
                            if causal else np.isfinite(b))
    bias = np.where(np.isfinite(b), b, 0.0)
    check_rows(q, k, v, 0.7, to_numpy(a.kept), a.tail_upper, a.error_bound, bias=bias,
               visible=vis)
    assert np.all(to_numpy(a.tail_upper) <= policy.eps)


@pytest.mark.parametrize("policy", [CertifiedBlocks(0.1, block_size=4), Search(0.05)],
                         ids=lambda p: p.name)
def test_bias_policies_on_every_backend(policy, backend):
    """The additive bias reaches the policies' bounds on every namespace and device."""
    q, k, v = _qkv(12)
    b = np.where(np.arange(11) >= 8, -10000.0, 0.0)
    b[2] = 6.0
    ref = certattn.certify_attention(q, k, v, policy=policy, mask=b)
    got = certattn.certify_attention(*(backend.asarray(a) for a in (q, k, v)), policy=policy,
                                     mask=backend.asarray(b))
    for name in ("output", "tail_upper", "error_bound", "kept"):
        np.testing.assert_allclose(to_numpy(getattr(got, name)), getattr(ref, name),
                                   rtol=1e-12, atol=1e-15)
    assert not np.any(to_numpy(ref.kept)[..., 8:])
