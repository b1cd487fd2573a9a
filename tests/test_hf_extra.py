"""Without the [hf] extra, certattn.hf and `certattn evaluate` fail in one clear line."""

from __future__ import annotations

import sys

import pytest

from certattn.cli import main


@pytest.fixture
def no_torch(monkeypatch):
    for name in [m for m in sys.modules if m == "certattn.hf" or m.startswith("certattn.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_import_names_the_missing_extra(no_torch):
    with pytest.raises(ImportError, match=r"the \[hf\] extra is not installed"):
        import certattn.hf  # noqa: F401


def test_evaluate_command_says_so_in_one_line(no_torch, capsys):
    assert main(["evaluate", "--model", "smollm2", "--tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("certattn: error: the [hf] extra is not installed")


# --------------------------------------------------------------------------
# The nine tiny architectures (issue 21 item 4), beyond what test_hf.py checks
# --------------------------------------------------------------------------

try:  # the tiny configs of test_hf.py; skipped below where the [hf] extra is absent
    import numpy as np
    import torch

    from certattn.errors import InputError
    from certattn.hf import observe, sparse
    from certattn.policies import TopK
    from tests._exact import exact_tails
    from tests.test_hf import CAUSAL, _batch, _model, _out
except (ImportError, pytest.skip.Exception):
    torch = None
    CAUSAL = []

needs_hf = pytest.mark.skipif(torch is None, reason="the [hf] extra is not installed")
NINE = [*CAUSAL, "bert"]


@needs_hf
@pytest.mark.parametrize("arch", NINE)
def test_every_recorded_certificate_is_between_the_exact_mass_and_eps(arch):
    """Every row of every call (not a sample), at two budgets: the exact dropped mass of
    the certified k largest logits <= tail_upper <= eps; left-padded rows are skipped."""
    model = _model(arch)
    ids, mask = _batch()
    eps = (0.01, 0.2)
    with observe(model, eps=eps, keep_logits=True) as rec:
        _out(model, ids, mask)
    assert len(rec.calls) == 2
    for call in rec.calls:
        rows = np.argwhere(~call.masked)
        assert len(rows) == (2 * 4 * 12 if arch == "bert" else 4 * (12 + 7))
        for b, h, q in rows:
            exact = exact_tails(call.logits[b, h, q])  # exact[k]: mass outside the top k
            for e in eps:
                k, tail = int(call.k[e][b, h, q]), float(call.tail_upper[e][b, h, q])
                assert tail <= e and 1 <= k <= call.n_valid[b, h, q]
                assert tail >= exact[k], (arch, call.layer, b, h, q, e)


@needs_hf
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma3_text"])
def test_generate_under_observe_and_dense_sparse_gives_eager_tokens(arch):
    """The four causal architectures test_hf.py does not generate with; left padding."""
    model = _model(arch)
    ids, mask = _batch()
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
    ref = model.generate(ids, **kw)
    with observe(model) as rec:
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)
    assert len(rec.calls) == 2 * 4  # prefill + 3 decode steps, two layers
    with sparse(model, TopK(0.0)) as stats:
        dense = model.generate(ids, **kw)
    assert torch.equal(dense, ref) and stats.kept_fraction == 1.0


@needs_hf
def test_indexer_sparse_attention_is_refused_in_one_line():
    """DeepSeek-V3.2's indexer masks its top-k keys itself only under eager or sdpa; under
    certattn it passes ``indices`` instead, which eager ignores: observe ran the dense
    attention and silently differed from eager.  Now refused."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=1, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, index_topk=4, index_head_dim=16,
        index_n_heads=2, first_k_dense_replace=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids, mask = _batch()
    _out(model, ids, mask)  # builds and runs under eager
    with pytest.raises(InputError, match=r"^indexer-selected sparse attention") as err:
        with observe(model):
            _out(model, ids, mask)
    assert "\n" not in str(err.value)
    assert model.config._attn_implementation == "eager"


@needs_hf
def test_additive_position_bias_is_in_the_certified_logits():
    """Inkling adds a relative ``position_bias`` after the scaling (it used to be refused):
    observe equals eager, sparse(TopK(0)) too, and the certified logits move with it."""
    from transformers import InklingForCausalLM, InklingTextConfig

    cfg = InklingTextConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=8, d_rel=16,
        layer_types=["hybrid_sliding", "hybrid"], max_position_embeddings=64,
        mlp_layer_types=["sparse", "sparse"], intermediate_size=64,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=1,
        n_shared_experts=1)
    torch.manual_seed(0)
    model = InklingForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids, mask = _batch()
    ref = _out(model, ids, mask)
    with observe(model, eps=0.2, keep_logits=True) as rec, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert torch.equal(out.logits, ref) and len(rec.calls) == 2
    with sparse(model, TopK(0.0)):
        assert torch.equal(_out(model, ids, mask), ref)
    for call in rec.calls:
        rows = ~call.masked
        # the certified logits are eager's: their softmax is eager's attention weights
        logits = call.logits[rows]  # every row here has a visible key
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        weights = out.attentions[call.layer].double().numpy()[rows]
        assert np.abs(p - weights).max() < 1e-5
        for b, h, q in np.argwhere(rows):
            exact = exact_tails(call.logits[b, h, q])
            assert exact[int(call.k[0.2][b, h, q])] <= call.tail_upper[0.2][b, h, q] <= 0.2
