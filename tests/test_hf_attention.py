"""certattn.hf's attention path: policy maps per head, output-error bounds, gpt-oss sinks,
T5's position_bias and query chunks, on tiny random models built in code (no downloads)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from certattn.errors import InputError  # noqa: E402
from certattn.hf import _attention as att  # noqa: E402
from certattn.hf import observe, sparse  # noqa: E402
from certattn.policies import FixedK, TopK, WindowSinks  # noqa: E402
from tests.test_hf import _batch, _model, _out  # noqa: E402


@pytest.fixture
def layer0_outputs(monkeypatch):
    """Record the attention output (before the output projection) of layer 0's eager
    function, per run inside observe or sparse: ``runs[i]`` is a (B, Lq, H, dv) float64
    array.  :func:`_dense` runs the model dense through the same function."""
    runs: list[np.ndarray] = []

    def wrap(model):
        cls = type(_attention_modules(model)[0])
        real = att._eager_of(_attention_modules(model)[0])

        def eager(module, *args, **kwargs):
            out = real(module, *args, **kwargs)
            if module is _attention_modules(model)[0]:
                runs.append(out[0].detach().to(torch.float64).numpy())
            return out

        monkeypatch.setitem(att._EAGER, cls, eager)
        return runs

    return wrap


def _dense(model, ids, mask):
    with sparse(model, {}):  # every layer dense, through certattn's attention function
        return _out(model, ids, mask)


def _attention_modules(model):
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and "Layer" not in type(m).__name__]


def _gpt_oss(sink: float = 2.0):
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
        num_experts_per_tok=1, max_position_embeddings=128, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for i, m in enumerate(_attention_modules(model)):  # sinks large enough to matter
            m.sinks.copy_(torch.tensor([sink, -1.0, 0.5, sink + 1.0]) + i)
    return model.eval()


def test_a_layer_head_map_changes_only_that_head(layer0_outputs):
    model = _model("llama")
    ids, mask = _batch()
    runs = layer0_outputs(model)
    _dense(model, ids, mask)
    with sparse(model, {(0, 2): FixedK(1)}) as stats:
        _out(model, ids, mask)
    dense, one = runs
    assert np.array_equal(np.delete(dense, 2, axis=2), np.delete(one, 2, axis=2))
    assert not np.array_equal(dense[:, :, 2], one[:, :, 2])
    lens = [*range(1, 13), *range(1, 8)]  # visible keys per causal row, one head
    assert stats.visible == {0: sum(lens)} and stats.kept == {0: len(lens)}
    with sparse(model, {0: FixedK(1), (0, 2): TopK(0.0)}):  # the head entry overrides
        _out(model, ids, mask)
    assert np.array_equal(runs[-1][:, :, 2], dense[:, :, 2])
    assert not np.array_equal(runs[-1][:, :, 1], dense[:, :, 1])


@pytest.mark.parametrize("key", [(0, 9), "0", (0, 1, 2)])
def test_bad_policy_map_keys_are_refused_in_one_line(key):
    model = _model("llama")
    ids, mask = _batch()
    with pytest.raises(InputError, match=r"head 9 of layer 0|layer index or a"):
        with sparse(model, {key: TopK(0.1)}):
            _out(model, ids, mask)


@pytest.mark.parametrize("policy", [TopK(0.3), WindowSinks(window=2, sinks=1)])
def test_output_bound_is_at_least_the_exact_output_error(layer0_outputs, policy):
    model = _model("llama").double()  # float64: the computed outputs are the exact ones
    ids, mask = _batch()              # to about 1e-15, far below the bounds
    runs = layer0_outputs(model)
    _dense(model, ids, mask)
    with sparse(model, {0: policy}, output_bound=True) as stats:
        _out(model, ids, mask)
    dense, approx = runs
    rows = mask.numpy().astype(bool)  # (B, Lq): rows with a visible key
    err = np.linalg.norm(dense - approx, axis=-1)[rows]  # (rows, H)
    assert list(stats.output_bound_max) == [0]
    assert err.max() > 1e-3  # keys were dropped
    assert stats.output_bound_max[0] >= err.max()
    with sparse(model, TopK(0.3)) as plain:
        _out(model, ids, mask)
    assert plain.output_bound_max == {}


def test_gpt_oss_sinks_observe_is_eager_and_certificates_count_the_sink():
    model = _gpt_oss()
    ids, mask = _batch()
    ref = _out(model, ids, mask)
    eps = 0.05
    with observe(model, eps=eps, keep_logits=True) as rec:
        got = _out(model, ids, mask)
    assert torch.equal(got, ref)
    sinks = [m.sinks.detach().numpy().astype(np.float64) for m in _attention_modules(model)]
    over_without_sink = 0
    for call in rec.calls:
        for b, h, q in np.argwhere(~call.masked):
            row = call.logits[b, h, q]
            k, tail = int(call.k[eps][b, h, q]), float(call.tail_upper[eps][b, h, q])
            assert call.n_valid[b, h, q] == np.isfinite(row).sum()  # k = 0: the sink alone
            fin = sorted((float(v) for v in row[np.isfinite(row)]), reverse=True)
            with mpmath.workdps(50):
                e = [mpmath.exp(v) for v in fin]
                z = mpmath.fsum(e) + mpmath.exp(sinks[call.layer][h])
                exact = mpmath.fsum(e[k:]) / z
                keys_only = mpmath.fsum(e[k:]) / mpmath.fsum(e)
            assert exact <= mpmath.mpf(tail) <= eps
            over_without_sink += keys_only > eps
    assert over_without_sink > 0  # the sink's share let fewer keys certify eps


def test_gpt_oss_sparse_keeps_the_sink(layer0_outputs):
    model = _gpt_oss()
    ids, mask = _batch()
    runs = layer0_outputs(model)
    ref = _out(model, ids, mask)
    with sparse(model, TopK(0.0)) as stats:
        assert torch.equal(_out(model, ids, mask), ref)
    assert stats.kept_fraction == 1.0
    _dense(model, ids, mask)  # float32 (the experts refuse float64): the outputs carry
    with sparse(model, {0: TopK(0.3)}, output_bound=True) as stats:  # ~1e-7 of rounding,
        _out(model, ids, mask)  # far below the bound's slack over the error
    dense, approx = runs[-2:]
    err = np.linalg.norm(dense - approx, axis=-1)[mask.numpy().astype(bool)]
    assert stats.kept_fraction < 1.0 and 0.0 < stats.tail_upper_max <= 0.3
    assert err.max() > 1e-3 and stats.output_bound_max[0] >= 1.01 * err.max()


def test_sinks_not_passed_as_s_aux_are_refused_in_one_line():
    model = _model("llama")
    ids, mask = _batch()
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(InputError, match="sinks but does not pass them as s_aux"):
        with observe(model):
            _out(model, ids, mask)


def test_t5_position_bias_is_in_the_certified_logits(layer0_outputs):
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, relative_attention_num_buckets=8)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():  # a bias large enough to dominate the logits
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(50.0)
    ids, mask = _batch()
    ref = _out(model, ids, mask)
    with observe(model, eps=0.01, keep_logits=True) as rec:
        assert torch.equal(_out(model, ids, mask), ref)
    with sparse(model, TopK(0.0)):
        assert torch.equal(_out(model, ids, mask), ref)
    call = rec.calls[0]
    # the recorded logits' softmax is eager's attention (returned by eager: B, H, Lq, Lk)
    weights = []
    real = att._eager_of(_attention_modules(model)[0])

    def keep_weights(module, *args, **kwargs):
        out = real(module, *args, **kwargs)
        weights.append(out[1].detach().numpy())
        return out

    att._EAGER[type(_attention_modules(model)[0])] = keep_weights
    try:
        _dense(model, ids, mask)
    finally:
        att._EAGER[type(_attention_modules(model)[0])] = real
    x = call.logits
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.abs(p - weights[0]).max() < 1e-5
    assert (call.k[0.01][0] < call.n_valid[0]).mean() > 0.5  # the bias makes it sparse


def test_query_chunks_give_the_same_certificates(monkeypatch):
    model = _model("mistral")
    ids, mask = _batch()
    with observe(model, eps=0.1) as whole:
        ref = _out(model, ids, mask)
    with sparse(model, TopK(0.2), output_bound=True) as s_whole:
        sparse_ref = _out(model, ids, mask)
    monkeypatch.setattr(att, "CHUNK_ELEMS", 2 * 4 * 12 * 5)  # 5 query rows a chunk
    with observe(model, eps=0.1) as chunked:
        assert torch.equal(_out(model, ids, mask), ref)
    with sparse(model, TopK(0.2), output_bound=True) as s_chunked:
        assert torch.equal(_out(model, ids, mask), sparse_ref)
    for a, b in zip(whole.calls, chunked.calls, strict=True):
        assert np.array_equal(a.k[0.1], b.k[0.1]) and np.array_equal(a.n_valid, b.n_valid)
        assert np.array_equal(a.tail_upper[0.1], b.tail_upper[0.1])
        assert np.array_equal(a.masked, b.masked)
    assert s_whole.kept == s_chunked.kept and s_whole.tail_upper_max == s_chunked.tail_upper_max
    assert s_whole.output_bound_max == s_chunked.output_bound_max
