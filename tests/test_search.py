"""Theorem SEARCH-SOUND: every certified search certificate is sound.

``true tail of kept <= tail_upper <= eps`` against the exact softmax of the exact logits
``scale * q.k`` (mpmath on small cases, float64 on wide ones), with masks (causal),
grouped-query heads, ties and adversarial keys; costs: ours <= MC-Search by design.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from certattn import certify_topk
from certattn._array import to_numpy
from certattn.search import certified_search

from ._exact_scores import check_rows, lifted_key_case

METHODS = ("mc", "gap", "ours", "tree")


@mpmath.workdps(60)
def _exact_tail(
    q: np.ndarray,
    keys: np.ndarray,
    kept: np.ndarray,
    scale: float,
    visible: np.ndarray | None = None,
) -> mpmath.mpf:
    """Exact discarded mass 1 - P(kept) of one query (mpmath, exact logits)."""
    sc = mpmath.mpf(scale)
    s = [
        sc
        * mpmath.fsum(
            mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(q, k, strict=False)
        )
        for k in keys
    ]
    vis = np.ones(len(keys), bool) if visible is None else visible
    mx = max(si for si, v in zip(s, vis, strict=False) if v)
    w = [mpmath.exp(si - mx) if v else mpmath.mpf(0) for si, v in zip(s, vis, strict=False)]
    z = mpmath.fsum(w)
    return mpmath.fsum(wi for wi, k in zip(w, kept, strict=False) if not k) / z


def _f64_tails(q, keys, kept, scale, visible=None):
    s = np.matmul(q, np.swapaxes(keys, -1, -2)) * scale
    if visible is not None:
        s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return 1.0 - np.sum(np.where(kept, p, 0.0), axis=-1), p


@given(
    st.integers(2, 14),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 1e-3, 0.01, 0.1, 0.5]),
    st.sampled_from(METHODS),
    st.sampled_from([0.05, 1.0, 4.0, 30.0]),
)
def test_search_sound_exact(
    n: int, d: int, seed: int, eps: float, method: str, spread: float
) -> None:
    """SEARCH-SOUND: exact tail of kept <= tail_upper <= eps (mpmath, small rows)."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)) * spread
    if rng.random() < 0.3:
        keys[rng.integers(n)] = keys[0]  # a duplicate key
    q = rng.normal(size=(2, d))
    res = certified_search(q, keys, rng.normal(size=(n, 3)), eps, method=method, seed=seed % 7)
    scale = 1.0 / math.sqrt(d)
    kept = np.asarray(res.kept)
    for i in range(2):
        tail = _exact_tail(q[i], keys, kept[i], scale)
        assert tail <= mpmath.mpf(float(res.tail_upper[i]))
        assert float(res.tail_upper[i]) <= eps
        assert 0 < res.scored[i] <= n and kept[i].sum() <= res.scored[i]
        if eps == 0.0:
            assert kept[i].all() and res.tail_upper[i] == 0.0


def _clustered(n, m, d, seed, *, dominant=False):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(max(2, n // 16), d))
    keys = c[rng.integers(0, len(c), n)] + 0.35 * rng.normal(size=(n, d))
    q = 1.6 * c[rng.integers(0, len(c), m)] + rng.normal(size=(m, d))
    if dominant:
        keys[rng.integers(n)] += 12 * q.mean(axis=0) / np.linalg.norm(q.mean(axis=0))
    return q, keys, rng.normal(size=(n, 8))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [0.001, 0.05])
def test_search_sound_wide_rows(method: str, eps: float) -> None:
    """SEARCH-SOUND on n = 300 clustered keys with a dominant key (float64 reference)."""
    q, keys, vals = _clustered(300, 24, 32, 1, dominant=True)
    res = certified_search(q, keys, vals, eps, method=method)
    tails, p = _f64_tails(q, keys, np.asarray(res.kept), 1 / math.sqrt(32))
    assert np.all(tails <= np.asarray(res.tail_upper) * (1 + 1e-9) + 1e-15)
    assert np.all(np.asarray(res.tail_upper) <= eps)
    # no certified set keeps fewer than the floor k_eps
    floor = np.asarray(certify_topk(np.log(p), eps).k)
    assert np.all(np.asarray(res.kept).sum(axis=1) >= floor - 1)


@pytest.mark.parametrize("method", METHODS)
def test_search_causal_mask(method: str) -> None:
    """Masked keys are never scored or kept; the tail is w.r.t. the masked softmax."""
    q, keys, vals = _clustered(64, 64, 16, 2)
    mask = np.tril(np.ones((64, 64), dtype=bool))
    res = certified_search(q, keys, vals, 0.01, mask=mask, method=method)
    kept = np.asarray(res.kept)
    assert not np.any(kept & ~mask)
    assert np.all(np.asarray(res.scored) <= mask.sum(axis=1))
    assert np.array_equal(np.asarray(res.n_valid), mask.sum(axis=1))
    tails, _ = _f64_tails(q, keys, kept, 0.25, mask)
    assert np.all(tails <= np.asarray(res.tail_upper) * (1 + 1e-9) + 1e-15)
    for i in (0, 1, 5):  # exact check on short prefixes
        tail = _exact_tail(q[i], keys, kept[i], 0.25, mask[i])
        assert tail <= mpmath.mpf(float(res.tail_upper[i]))


def test_search_gqa_heads_searched_per_head() -> None:
    """Grouped-query heads: head h reads key head h // group; same as searching alone."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 10, 8))
    keys = rng.normal(size=(2, 40, 8))
    vals = rng.normal(size=(2, 40, 5))
    res = certified_search(q, keys, vals, 0.02)
    assert np.asarray(res.kept).shape == (4, 10, 40)
    for h in range(4):
        one = certified_search(q[h], keys[h // 2], vals[h // 2], 0.02)
        assert np.array_equal(np.asarray(one.kept), np.asarray(res.kept)[h])
        np.testing.assert_allclose(np.asarray(one.output), np.asarray(res.output)[h])


@pytest.mark.parametrize("method", METHODS)
def test_search_ties_and_equal_keys(method: str) -> None:
    """All keys equal (every logit ties): sound, keeps about (1 - eps) n keys."""
    keys = np.ones((50, 4))
    q = np.ones((3, 4))
    res = certified_search(q, keys, np.zeros((50, 2)), 0.1, method=method)
    kept = np.asarray(res.kept).sum(axis=1)
    assert np.all(kept >= 45)  # tail of k kept = (50 - k)/50 <= 0.1
    assert np.all(np.asarray(res.tail_upper) >= (50 - kept) / 50 * (1 - 1e-12))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mag", [1e-8, 1e4, 1e6])
def test_search_adversarial_magnitudes(method: str, mag: float) -> None:
    """Huge (and tiny) key norms, one dominant key: certificates stay sound."""
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(12, 3))
    keys[5] *= 50
    keys *= mag
    q = rng.normal(size=(3, 3))
    res = certified_search(q, keys, rng.normal(size=(12, 2)), 0.01, method=method)
    for i in range(3):
        tail = _exact_tail(q[i], keys, np.asarray(res.kept)[i], 1 / math.sqrt(3))
        assert tail <= mpmath.mpf(float(res.tail_upper[i])) <= 0.01


def test_search_deterministic_with_seed() -> None:
    q, keys, vals = _clustered(200, 16, 16, 5)
    a = certified_search(q, keys, vals, 0.01, seed=3, method="tree")
    b = certified_search(q, keys, vals, 0.01, seed=3, method="tree")
    assert np.array_equal(np.asarray(a.kept), np.asarray(b.kept))
    assert np.array_equal(np.asarray(a.cost), np.asarray(b.cost))


@pytest.mark.parametrize("eps", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("dominant", [False, True])
@pytest.mark.parametrize("n", [128, 256])
def test_search_ours_never_costs_more_than_mc(eps: float, dominant: bool, n: int) -> None:
    """Ours (same cells and order as MC-Search, tighter bounds) costs <= MC per query;
    the gap-stopped search (looser bound) costs >= MC."""
    q, keys, vals = _clustered(n, 32, 32, 6 + n, dominant=dominant)
    mc = np.asarray(certified_search(q, keys, vals, eps, method="mc").cost)
    ours = np.asarray(certified_search(q, keys, vals, eps, method="ours").cost)
    gap = np.asarray(certified_search(q, keys, vals, eps, method="gap").cost)
    assert np.all(ours <= mc) and np.all(gap >= mc)
    assert ours.mean() < mc.mean()


@pytest.mark.parametrize("method", ["mc", "ours", "tree"])
def test_search_output_and_error_bound(method: str) -> None:
    """|Attn - output| <= error_bound, and the head-tail identity
    Attn - Attn_A = tau (mu_tail - mu_head) holds for the returned kept set."""
    q, keys, vals = _clustered(120, 16, 16, 7, dominant=True)
    res = certified_search(q, keys, vals, 0.05, method=method)
    kept = np.asarray(res.kept)
    tails, p = _f64_tails(q, keys, kept, 0.25)
    attn = p @ vals
    err = np.linalg.norm(attn - np.asarray(res.output), axis=1)
    assert np.all(err <= np.asarray(res.error_bound))
    assert np.all(np.asarray(res.error_bound) > 0)
    for i in range(4):
        ph = np.where(kept[i], p[i], 0.0)
        pt = np.where(kept[i], 0.0, p[i])
        mu_h = ph @ vals / ph.sum()
        mu_t = pt @ vals / pt.sum() if pt.sum() > 0 else mu_h
        np.testing.assert_allclose(
            attn[i] - np.asarray(res.output)[i], tails[i] * (mu_t - mu_h), atol=1e-12
        )


def test_search_any_backend(backend) -> None:
    """Results in the input's namespace/device, equal to the NumPy run."""
    q, keys, vals = _clustered(60, 5, 8, 8)
    want = certified_search(q, keys, vals, 0.05)
    got = certified_search(backend.asarray(q), backend.asarray(keys), backend.asarray(vals), 0.05)
    assert type(got.kept) is type(backend.asarray(q))
    assert np.array_equal(to_numpy(got.kept), want.kept)
    np.testing.assert_allclose(to_numpy(got.tail_upper), want.tail_upper)


def test_search_float32_inputs() -> None:
    """float32 inputs: exact logits of the float32 values; output in float32."""
    q, keys, vals = _clustered(80, 6, 8, 9)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, keys, vals))
    res = certified_search(q32, k32, v32, 0.01)
    assert res.output.dtype == np.float32
    tails, p = _f64_tails(
        q32.astype(np.float64), k32.astype(np.float64), res.kept, 1 / math.sqrt(8)
    )
    assert np.all(tails <= res.tail_upper * (1 + 1e-9))
    err = np.linalg.norm(p @ v32.astype(np.float64) - res.output.astype(np.float64), axis=1)
    assert np.all(err <= res.error_bound)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 1.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"scale": -1.0}, "scale"),
        ({"mask": np.zeros((2, 6), dtype=bool)}, "masked"),
        ({"method": "nope"}, "method"),
    ],
)
def test_search_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"eps": 0.1}
    args.update(kwargs)
    eps = args.pop("eps")
    with pytest.raises(ValueError, match=match):
        certified_search(np.ones((2, 3)), np.ones((6, 3)), np.ones((6, 2)), eps, **args)


def test_search_rejects_nan_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        certified_search(np.full((1, 3), np.nan), np.ones((4, 3)), np.ones((4, 2)), 0.1)
    with pytest.raises(ValueError, match="dimension"):
        certified_search(np.ones((1, 3)), np.ones((4, 2)), np.ones((4, 2)), 0.1)
    with pytest.raises(ValueError, match="query heads"):
        certified_search(np.ones((3, 1, 2)), np.ones((2, 4, 2)), np.ones((2, 4, 2)), 0.1)


def test_search_real_attention_sound() -> None:
    """Real MiniLM heads nobody tuned for: every certificate sound, ours <= MC."""
    from certattn.models import load_sample

    att = load_sample()[1]
    for method in ("mc", "ours", "tree"):
        res = certified_search(
            att.queries[1], att.keys[1], att.values[1], 0.01, scale=att.scale, method=method
        )
        tails, _ = _f64_tails(
            att.queries[1].astype(np.float64),
            att.keys[1].astype(np.float64),
            np.asarray(res.kept),
            att.scale,
        )
        assert np.all(tails <= np.asarray(res.tail_upper) * (1 + 1e-9))
        assert np.all(np.asarray(res.tail_upper) <= 0.01)
    mc = certified_search(
        att.queries[1], att.keys[1], att.values[1], 0.01, scale=att.scale, method="mc"
    ).cost
    ours = certified_search(att.queries[1], att.keys[1], att.values[1], 0.01, scale=att.scale).cost
    assert np.all(ours <= mc)


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_search_tree_cheaper_on_clustered_keys(eps: float) -> None:
    """The hierarchical search costs less than MC-Search on clustered keys (measured)."""
    q, keys, vals = _clustered(512, 32, 32, 11)
    mc = np.asarray(certified_search(q, keys, vals, eps, method="mc").cost)
    tree = np.asarray(certified_search(q, keys, vals, eps, method="tree").cost)
    assert tree.mean() < mc.mean()


def test_search_reuses_given_cells() -> None:
    """A precomputed partition gives the same search as building it inside."""
    from certattn.cells import kmeans_cells

    q, keys, vals = _clustered(100, 8, 8, 12)
    cells = kmeans_cells(keys, seed=5)
    a = certified_search(q, keys, vals, 0.02, method="mc", seed=5)
    b = certified_search(q, keys, vals, 0.02, method="mc", cells=cells)
    assert np.array_equal(np.asarray(a.kept), np.asarray(b.kept))
    assert np.array_equal(np.asarray(a.cost), np.asarray(b.cost))
    with pytest.raises(ValueError, match="cells"):
        certified_search(q, keys[:50], vals[:50], 0.02, cells=cells)


ALL_METHODS = ("ours", "mc", "tree", "gap", "quant", "paged")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_search_takes_an_additive_bias_exactly(method: str) -> None:
    """Issue 20.2: a +30 bias on the lowest-scoring key (97% of the mass); every score
    bound adds the bias, so the key is kept and the certificate is sound."""
    q, k, v, b = lifted_key_case(256)
    res = certified_search(q, k, v, 0.01, mask=b, scale=1.0, method=method)
    check_rows(q, k, v, 1.0, np.asarray(res.kept), res.tail_upper, res.error_bound, bias=b)
    assert bool(np.asarray(res.kept)[0, -1])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_search_with_padding_and_mixed_biases(method: str) -> None:
    """BERT-style padding (-10000 on the last keys), per-query positive and negative
    biases and -inf entries, several heads: exact tail and error within the bounds."""
    rng = np.random.default_rng(3)
    h, m, n, d = 2, 4, 40, 3
    q = rng.normal(0, 2.0, (h, m, d))
    k = rng.normal(0, 1, (h, n, d))
    v = rng.normal(0, 1, (h, n, 2))
    b = rng.choice(np.array([0.0, 0.0, 5.0, -2.0, 12.0]), size=(h, m, n))
    b[..., -8:] = -10000.0
    b[0, 1, 3] = -np.inf
    res = certified_search(q, k, v, 0.02, mask=b, scale=0.8, method=method)
    for j in range(h):
        check_rows(q[j], k[j], v[j], 0.8, np.asarray(res.kept)[j], res.tail_upper[j],
                   res.error_bound[j], bias=np.where(np.isfinite(b[j]), b[j], 0.0),
                   visible=np.isfinite(b[j]))
    assert np.all(np.asarray(res.tail_upper) <= 0.02)


@mpmath.workdps(80)
def _exact_full(q, keys, kept, scale, bias, values):
    """Exact tail of ``kept`` and exact output over ALL keys: logits ``scale q.k + bias``
    in exact arithmetic, keys hidden by a finite fill included (``-inf`` ones absent)."""
    sc = mpmath.mpf(scale)
    x = [sc * mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(q, k,
                                                                                     strict=True))
         + mpmath.mpf(float(bi)) if bi != -np.inf else None for k, bi in zip(keys, bias,
                                                                           strict=True)]
    mx = max(t for t in x if t is not None)
    w = [mpmath.exp(t - mx) if t is not None else mpmath.mpf(0) for t in x]
    z = mpmath.fsum(w)
    tail = mpmath.fsum(wi for wi, kp in zip(w, kept, strict=True) if not kp) / z
    out = [mpmath.fsum(wi * mpmath.mpf(float(vi)) for wi, vi in zip(w, values[:, c],
                                                                   strict=True)) / z
           for c in range(values.shape[1])]
    return tail, out


def _check_full(res, q, keys, values, bias, scale):
    kept = np.asarray(res.kept)
    for i in range(q.shape[0]):
        tail, out = _exact_full(q[i], keys, kept[i], scale, bias[i], values)
        assert tail <= mpmath.mpf(float(res.tail_upper[i])), (i, tail, res.tail_upper[i])
        e2 = mpmath.fsum((a - mpmath.mpf(float(o))) ** 2
                         for a, o in zip(out, np.asarray(res.output)[i], strict=True))
        assert mpmath.sqrt(e2) <= mpmath.mpf(float(res.error_bound[i]))


@pytest.mark.parametrize("method", [*METHODS, "quant"])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_search_float32_min_fills_keep_a_positive_tail(method: str, eps: float) -> None:
    """Padding filled with the float32 minimum: masked (never scored or kept), but the
    exact softmax still gives those keys a tiny positive mass, which the tail covers."""
    rng = np.random.default_rng(21)
    q, keys, vals = rng.normal(size=(3, 4)), rng.normal(size=(10, 4)) * 2, rng.normal(size=(10, 2))
    fill = np.zeros((3, 10), np.float32)
    fill[:, 7:] = np.finfo(np.float32).min
    res = certified_search(q, keys, vals, eps, mask=fill, method=method)
    kept = np.asarray(res.kept)
    assert not kept[:, 7:].any() and np.all(np.asarray(res.n_valid) == 7)
    assert np.all(np.asarray(res.tail_upper) > 0)
    _check_full(res, q, keys, vals, fill.astype(np.float64), 0.5)
    ref = certified_search(q, keys, vals, eps, mask=fill == 0, method=method)
    assert np.all(np.asarray(res.tail_upper) <= np.asarray(ref.tail_upper) * (1 + 1e-15) + 1e-300)


@pytest.mark.parametrize("offset", [10.0, -3.0])
def test_search_float16_fill_with_a_huge_hidden_score(offset: float) -> None:
    """A float16 fill (-65504) on a key scoring 65504 + offset above the visible ones:
    for offset 10 its exact mass dominates, and the certificate must say so."""
    q = np.array([[1.0, 0.0]])
    keys = np.array([[0.0, 0.0], [1.0, 0.0], [65504.0 + 1.0 + offset, 0.0]])
    vals = np.array([[0.0, 1.0], [1.0, 0.0], [50.0, -50.0]])
    fill = np.array([[0.0, 0.0, np.finfo(np.float16).min]], np.float16)
    res = certified_search(q, keys, vals, 0.0, mask=fill, scale=1.0)
    assert not np.asarray(res.kept)[0, 2]
    _check_full(res, q, keys, vals, fill.astype(np.float64), 1.0)
    if offset > 0:
        assert float(res.tail_upper[0]) == 1.0
