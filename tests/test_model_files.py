"""Any Llama-family GGUF file and any BERT / Llama Hugging Face folder, written by the tests.

Tiny random-weight models (GGUFWriter; safetensors.numpy + config.json + a tokenizer.json
built with ``tokenizers``) exercise head counts, GQA groupings, RoPE bases and linear
scaling, q/k/v biases (Qwen2) and both architectures.  Each generic forward is checked
against an independent float64 reference written here from the architectures' published
equations (Hugging Face ``modeling_llama`` / ``modeling_bert``); a GGUF file holds the
q/k rows permuted as llama.cpp's converter writes them, the folder does not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from certattn.models import Bert, Llama, ModelFileError, load

VOCAB = ["<s>", "</s>", "a", "b", "c", "d", "e", "Ġ", "ab", "Ġa", "cd", "[PAD]", "[CLS]",
         "[SEP]", "[UNK]", "f"]
MERGES = ["a b", "Ġ a", "c d"]
SPM_VOCAB = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "<0x21>"]
SPM_SCORES = [0.0, 0.0, 0.0, -5.0, -6.0, -7.0, -1.0, -2.0, -0.5, 0.0]
SPM_TYPES = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6]


# ---------------------------------------------------------------- writers


def _llama_weights(rng, *, layers, heads, kv, d, width, ffn, vocab, bias, tied):
    """Random weights with Hugging Face names (q/k rows in half-split order)."""
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, width)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(width)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, width)) * 0.3
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(width)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(width)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((heads * d, width)) * 0.4
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((kv * d, width)) * 0.4
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((kv * d, width)) * 0.4
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((width, heads * d)) * 0.3
        if bias:
            w[p + "self_attn.q_proj.bias"] = rng.standard_normal(heads * d) * 0.5
            w[p + "self_attn.k_proj.bias"] = rng.standard_normal(kv * d) * 0.5
            w[p + "self_attn.v_proj.bias"] = rng.standard_normal(kv * d) * 0.5
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((ffn, width)) * 0.3
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((ffn, width)) * 0.3
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((width, ffn)) * 0.3
    return {k: v.astype(np.float32) for k, v in w.items()}


def _bpe_tokenizer_json(path: Path, *, bos: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(VOCAB)},
                               merges=[tuple(m.split()) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    tok.save(str(path / "tokenizer.json"))


def write_hf_llama(path: Path, weights: dict, cfg: dict) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    _bpe_tokenizer_json(path, bos=True)
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``, verbatim."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor(name: str, w: np.ndarray, heads: int, kv: int, *,
                permute: bool = True) -> tuple[str, np.ndarray]:
    """A Hugging Face Llama tensor as llama.cpp writes it: its GGUF name, and the q/k
    projections row-permuted (``permute``) for llama.cpp's RoPE layout."""
    top = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name], w
    i, _, rest = name[len("model.layers."):].partition(".")
    if permute and rest.startswith("self_attn.q_proj"):
        w = llama_cpp_permute(w, heads)
    elif permute and rest.startswith("self_attn.k_proj"):
        w = llama_cpp_permute(w, kv)
    return f"blk.{i}.{GGUF_NAMES[rest]}", w


def write_gguf(path: Path, weights: dict, cfg: dict, *, arch: str = "llama",
               skip: tuple[str, ...] = (), rope_type: str | None = None,
               spm: bool = False) -> Path:
    import gguf

    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permute = arch in ("llama", "mistral")
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name("tiny-" + arch)
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv)
    wr.add_rope_freq_base(cfg["rope_theta"])
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rs = cfg.get("rope_scaling")
    if rope_type is not None:
        wr.add_rope_scaling_type(gguf.RopeScalingType(rope_type))
        wr.add_rope_scaling_factor(2.0)
    elif rs:
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(rs["factor"])
    if spm:  # SentencePiece vocabulary with scores and byte fallback, BOS added
        wr.add_tokenizer_model("llama")
        wr.add_token_list(SPM_VOCAB)
        wr.add_token_scores(SPM_SCORES)
        wr.add_token_types(SPM_TYPES)
        wr.add_bos_token_id(1)
        wr.add_add_bos_token(True)
        wr.add_unk_token_id(0)
    else:
        wr.add_tokenizer_model("gpt2")
        wr.add_token_list(VOCAB)
        wr.add_token_merges(MERGES)
        wr.add_token_types([3 if t.startswith(("<", "[")) else 1 for t in VOCAB])
    wr.add_eos_token_id(1)
    for name, w in weights.items():
        gname, w = gguf_tensor(name, w, heads, kv, permute=permute)
        if gname in skip:
            continue
        wr.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def llama_config(*, layers=2, heads=4, kv=2, d=8, ffn=24, vocab=16, theta=1e4,
                 scaling=None, model_type="llama", tied=False, ctx=64) -> dict:
    cfg = {
        "model_type": model_type, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "hidden_size": heads * d, "intermediate_size": ffn,
        "rms_norm_eps": 1e-5, "rope_theta": theta, "max_position_embeddings": ctx,
        "vocab_size": vocab, "tie_word_embeddings": tied, "hidden_act": "silu",
    }
    if scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": scaling}
    return cfg


# ---------------------------------------------------------------- references (float64)


def llama_reference(weights: dict, cfg: dict, ids: list[int]) -> dict:
    """Hugging Face Llama equations in float64: q/k per layer (after RoPE), logits."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    width = cfg["hidden_size"]
    d = width // heads
    n = len(ids)
    factor = (cfg.get("rope_scaling") or {}).get("factor", 1.0)
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, d, 2) / d)
    ang = (np.arange(n) / factor)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rms(x, g):
        return g * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg["rms_norm_eps"])

    def rope(x):
        rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][ids]
    qs, ks = [], []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").reshape(n, heads, d).transpose(1, 0, 2))
        k = rope(lin(h, p + "self_attn.k_proj").reshape(n, kv, d).transpose(1, 0, 2))
        v = lin(h, p + "self_attn.v_proj").reshape(n, kv, d).transpose(1, 0, 2)
        qs.append(q)
        ks.append(k)
        rep = heads // kv
        s = q @ np.repeat(k, rep, 0).transpose(0, 2, 1) / math.sqrt(d)
        s[:, ~np.tril(np.ones((n, n), bool))] = -np.inf
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ np.repeat(v, rep, 0)).transpose(1, 0, 2).reshape(n, width)
        x = x + ctx @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[
            p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    out = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return {"q": np.stack(qs), "k": np.stack(ks), "logits": x @ out.T}


def _check_llama(model: Llama, weights: dict, cfg: dict, ids: list[int]) -> None:
    ref = llama_reference(weights, cfg, ids)
    out = model.forward(ids, all_vocab_logits=True)
    att = out["attention"]
    assert att.causal and att.kv_head.tolist() == list(
        np.arange(cfg["num_attention_heads"])
        // (cfg["num_attention_heads"] // cfg["num_key_value_heads"]))
    np.testing.assert_allclose(att.queries, ref["q"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(att.keys, ref["k"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["vocab_logits"], ref["logits"], rtol=1e-4, atol=1e-4)


LLAMA_CASES = [
    pytest.param(dict(heads=4, kv=2, d=8, theta=1e4), id="4q-2kv-base1e4"),
    pytest.param(dict(heads=6, kv=1, d=4, theta=1e5), id="6q-1kv-base1e5"),
    pytest.param(dict(heads=3, kv=3, d=8, theta=1e4, scaling=4.0, tied=True),
                 id="mha-linear4-tied"),
]


@pytest.mark.parametrize("kw", LLAMA_CASES)
def test_llama_folder_and_gguf_match_reference(tmp_path: Path, kw: dict) -> None:
    rng = np.random.default_rng(0)
    tied = kw.pop("tied", False)
    cfg = llama_config(**kw, tied=tied)
    weights = _llama_weights(rng, layers=2, heads=kw["heads"], kv=kw["kv"], d=kw["d"],
                             width=kw["heads"] * kw["d"], ffn=24, vocab=len(VOCAB),
                             bias=False, tied=tied)
    ids = [int(t) for t in rng.integers(0, len(VOCAB), 11)]
    folder = load(write_hf_llama(tmp_path / "hf", weights, cfg))
    gguf_model = load(write_gguf(tmp_path / "m.gguf", weights, cfg))
    for m in (folder, gguf_model):
        assert isinstance(m, Llama)
        assert (m.n_heads, m.n_kv_heads, m.head_dim) == (kw["heads"], kw["kv"], kw["d"])
        assert m.config.rope_base == kw["theta"]
        assert m.config.rope_linear == kw.get("scaling", 1.0)
        _check_llama(m, weights, cfg, ids)
    # The folder's tokenizer adds BOS (its post-processor); the GGUF's follows its metadata.
    assert folder.encode("ab cd") == [0, 8, 7, 10]
    assert gguf_model.encode("ab cd") == [8, 7, 10]


def test_gguf_without_unpermuting_would_differ(tmp_path: Path) -> None:
    """The permutation matters: a file read without undoing it gives other queries."""
    rng = np.random.default_rng(1)
    cfg = llama_config()
    weights = _llama_weights(rng, layers=1, heads=4, kv=2, d=8, width=32, ffn=24,
                             vocab=len(VOCAB), bias=False, tied=False)
    cfg["num_hidden_layers"] = 1
    m = load(write_gguf(tmp_path / "m.gguf", weights, cfg))
    np.testing.assert_array_equal(m.weights["blk.0.attn_q.weight"],
                                  weights["model.layers.0.self_attn.q_proj.weight"])
    permuted = llama_cpp_permute(weights["model.layers.0.self_attn.q_proj.weight"], 4)
    assert not np.array_equal(permuted, weights["model.layers.0.self_attn.q_proj.weight"])


def test_qwen2_biases_gguf_and_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cfg = llama_config(heads=4, kv=2, d=8, theta=1e6, model_type="qwen2")
    weights = _llama_weights(rng, layers=2, heads=4, kv=2, d=8, width=32, ffn=24,
                             vocab=len(VOCAB), bias=True, tied=False)
    ids = [3, 5, 2, 9, 9, 1, 4]
    for m in (load(write_hf_llama(tmp_path / "hf", weights, cfg)),
              load(write_gguf(tmp_path / "q.gguf", weights, cfg, arch="qwen2"))):
        assert m.config.qkv_bias and m.config.arch == "qwen2"
        _check_llama(m, weights, cfg, ids)


def test_bfloat16_folder_equals_its_float32_widening(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(9)
    cfg = llama_config(heads=4, kv=2, d=8)
    weights = _llama_weights(rng, layers=2, heads=4, kv=2, d=8, width=32, ffn=24,
                             vocab=len(VOCAB), bias=False, tied=False)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    widened = {k: v.astype(np.float32) for k, v in bf16.items()}
    m = load(write_hf_llama(tmp_path / "bf16", bf16, cfg))
    for k, v in widened.items():
        assert any(np.array_equal(v, w) for w in m.weights.values()), k
    _check_llama(m, widened, cfg, [2, 3, 4, 5, 6])


def test_chunked_forward_equals_one_chunk(tmp_path: Path) -> None:
    """Attention by query chunks is the model's own attention, to float32 rounding
    (summation order of the softmax and the value product differs by chunk)."""
    rng = np.random.default_rng(3)
    cfg = llama_config(heads=4, kv=2, d=8)
    weights = _llama_weights(rng, layers=2, heads=4, kv=2, d=8, width=32, ffn=24,
                             vocab=len(VOCAB), bias=False, tied=False)
    m = load(write_hf_llama(tmp_path / "hf", weights, cfg))
    ids = [int(t) for t in rng.integers(0, len(VOCAB), 40)]
    whole = m.forward(ids, chunk_elems=1 << 30, all_vocab_logits=True)
    small = m.forward(ids, chunk_elems=40 * 3, all_vocab_logits=True)  # 3 rows a chunk
    for a, b in ((small["vocab_logits"], whole["vocab_logits"]),
                 (small["attention"].keys, whole["attention"].keys)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    # The first layer's queries and keys precede any attention: identical.
    np.testing.assert_array_equal(small["attention"].queries[0], whole["attention"].queries[0])


# ---------------------------------------------------------------- BERT folder


def write_hf_bert(path: Path, rng, *, layers=2, heads=3, d=4, ffn=20, positions=16) -> tuple:
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    width = heads * d
    vocab = len(VOCAB)
    w = {"embeddings.word_embeddings.weight": rng.standard_normal((vocab, width)),
         "embeddings.position_embeddings.weight": rng.standard_normal((positions, width)),
         "embeddings.token_type_embeddings.weight": rng.standard_normal((2, width)),
         "embeddings.LayerNorm.weight": 1 + 0.1 * rng.standard_normal(width),
         "embeddings.LayerNorm.bias": 0.1 * rng.standard_normal(width)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (width, width)),
                            ("attention.self.key", (width, width)),
                            ("attention.self.value", (width, width)),
                            ("attention.output.dense", (width, width)),
                            ("intermediate.dense", (ffn, width)),
                            ("output.dense", (width, ffn))):
            w[p + name + ".weight"] = rng.standard_normal(shape) * 0.4
            w[p + name + ".bias"] = rng.standard_normal(shape[0]) * 0.1
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + name + ".weight"] = 1 + 0.1 * rng.standard_normal(width)
            w[p + name + ".bias"] = 0.1 * rng.standard_normal(width)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file({"bert." + k: v for k, v in w.items()}, str(path / "model.safetensors"))
    cfg = {"model_type": "bert", "num_hidden_layers": layers, "num_attention_heads": heads,
           "hidden_size": width, "intermediate_size": ffn, "max_position_embeddings": positions,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 11,
           "vocab_size": vocab}
    (path / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 12), ("[SEP]", 13)]
    )
    tok.save(str(path / "tokenizer.json"))
    return w, cfg


def bert_reference(w: dict, cfg: dict, ids: list[int], n_real: int) -> np.ndarray:
    from scipy.special import erf

    w = {k: v.astype(np.float64) for k, v in w.items()}
    heads, width = cfg["num_attention_heads"], cfg["hidden_size"]
    d, n = width // heads, len(ids)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    e = "embeddings."
    x = ln(w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:n]
           + w[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + s).reshape(n, heads, d).transpose(1, 0, 2)
                   for s in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s[..., n_real:] = -np.inf
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(1, 0, 2).reshape(n, width)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm")
    return x


def test_bert_folder_matches_reference_with_padding(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    w, cfg = write_hf_bert(tmp_path / "bert", rng)
    m = load(tmp_path / "bert")
    assert isinstance(m, Bert) and not m.causal and m.max_positions == 16
    ids = m.encode("a b c d e")
    assert ids == [12, 2, 3, 4, 5, 6, 13]
    att, hidden, _ = m.forward(ids, pad_to=10, keep_probs=False)
    ref = bert_reference(w, cfg, [*ids, 11, 11, 11], len(ids))
    np.testing.assert_allclose(hidden[-1], ref, rtol=1e-4, atol=1e-4)
    assert att.key_valid is not None and att.key_valid.tolist() == [True] * 7 + [False] * 3
    assert np.isneginf(att.logits[..., 7:]).all()
    with pytest.raises(ValueError, match="position table has 16 rows"):
        m.attention(list(range(2, 8)) * 3)


# ---------------------------------------------------------------- one-line errors


def _tiny(tmp_path: Path, **kw) -> tuple[dict, dict]:
    rng = np.random.default_rng(5)
    cfg = llama_config(layers=1, **kw)
    weights = _llama_weights(rng, layers=1, heads=cfg["num_attention_heads"],
                             kv=cfg["num_key_value_heads"], d=8,
                             width=cfg["hidden_size"], ffn=24, vocab=len(VOCAB), bias=False,
                             tied=False)
    return weights, cfg


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    from certattn.cli import main

    weights, cfg = _tiny(tmp_path)
    cases = {
        "missing tensor blk.0.attn_k.weight": write_gguf(
            tmp_path / "a.gguf", weights, cfg, skip=("blk.0.attn_k.weight",)),
        "RoPE scaling type 'yarn' is not supported": write_gguf(
            tmp_path / "b.gguf", weights, cfg, rope_type="yarn"),
        "unsupported GGUF architecture 'gpt2'": write_gguf(
            tmp_path / "c.gguf", weights, cfg, arch="gpt2"),
    }
    bad_cfg = dict(cfg, model_type="t5")
    cases["model_type 't5'"] = write_hf_llama(tmp_path / "t5", weights, bad_cfg)
    yarn = dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    cases["RoPE scaling type 'yarn'"] = write_hf_llama(tmp_path / "yarn", weights, yarn)
    partial = {k: v for k, v in weights.items() if "o_proj" not in k}
    cases["missing tensor blk.0.attn_output.weight"] = write_hf_llama(
        tmp_path / "partial", partial, cfg)
    (tmp_path / "not.gguf").write_bytes(b"NOPE" + bytes(20))
    cases["not a GGUF file"] = tmp_path / "not.gguf"
    cases["no such file"] = tmp_path / "absent.gguf"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["missing config.json"] = empty
    for message, path in cases.items():
        with pytest.raises(ModelFileError, match=message) as info:
            load(path)
        assert "\n" not in str(info.value)
        assert main(["budget", "--model", str(path), "--quiet"]) == 2, message


def test_cli_budget_on_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from certattn.cli import main

    rng = np.random.default_rng(6)
    cfg = llama_config(heads=6, kv=1, d=4, ctx=300)
    weights = _llama_weights(rng, layers=2, heads=6, kv=1, d=4, width=24, ffn=24,
                             vocab=len(VOCAB), bias=False, tied=True)
    path = write_gguf(tmp_path / "tiny.gguf", weights, cfg)
    ids = [int(t) for t in rng.integers(0, len(VOCAB), 40)]
    text = "ab cd ab a b c d e " * 5
    assert main(["budget", "--model", str(path), "--text", text, "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_heads"] == 6 and doc["layers"] == [0, 1]
    assert np.array(doc["k_fixed"]).shape == (2, 6)
    # A text shorter than --tokens is refused in one line; the built-in prose is repeated.
    assert main(["budget", "--model", str(path), "--text", "ab", "--tokens", "64"]) == 2
    assert "fewer than the 64 requested" in capsys.readouterr().err
    assert main(["budget", "--model", str(path), "--tokens", "301"]) == 2
    assert "at most 300 tokens" in capsys.readouterr().err
    del ids


def test_gguf_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """A llama-tokenizer GGUF: pieces merge by score, unknown characters fall back to
    bytes, BOS comes from the metadata (as llama.cpp's SPM tokenizer)."""
    weights, cfg = _tiny(tmp_path)
    m = load(write_gguf(tmp_path / "spm.gguf", weights, cfg, spm=True))
    assert m.encode("ab ab") == [1, 8, 8]  # <s> ▁ab ▁ab
    assert m.encode("a!") == [1, 6, 9]  # <s> ▁a <0x21>
    assert m.decode([8, 8, 9]) == "ab ab!"


def test_mistral_gguf_and_sliding_window_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    cfg = llama_config(heads=4, kv=2, d=8, model_type="mistral")
    weights = _llama_weights(rng, layers=2, heads=4, kv=2, d=8, width=32, ffn=24,
                             vocab=len(VOCAB), bias=False, tied=False)
    ids = [2, 3, 4, 5, 6, 7, 8, 9, 10]
    m = load(write_gguf(tmp_path / "m.gguf", weights, cfg, arch="mistral"))
    assert m.config.arch == "mistral"
    _check_llama(m, weights, cfg, ids)
    # A sliding window shorter than the input would change the attention: refused.
    windowed = load(write_hf_llama(tmp_path / "hf", weights, dict(cfg, sliding_window=8)))
    with pytest.raises(ValueError, match="sliding-window attention"):
        windowed.attention(ids)
    _check_llama(windowed, weights, cfg, ids[:8])
