"""certattn evaluate's policy table (quest, delta, matched budgets), its figure, and
certattn budget / audit on Hugging Face folders (issue 21, items 2 and 3)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from certattn.cli import main  # noqa: E402
from certattn.hf import DeltaCorrection, delta_sparse, observe, sparse  # noqa: E402
from certattn.policies import Pages, TopK, WindowSinks  # noqa: E402

from .test_hf import _model, _out, _tiny_folder  # noqa: E402


def _ids(n: int, seed: int = 4):
    return torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def test_sparse_runs_quest_pages_on_numpy_scores():
    # regression: the policy got plain NumPy as its namespace (no argsort(descending=))
    model, ids = _model("llama"), _ids(40)
    with sparse(model, Pages(budget=8, page_size=4)) as stats:
        _out(model, ids, torch.ones_like(ids))
    assert 0.0 < stats.kept_fraction < 1.0
    assert stats.tail_upper_max > 0.0


def _one_layer_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def test_delta_keeping_every_key_is_eager_and_counts_its_dense_rows():
    from certattn.approx.delta import delta_rows

    model, ids = _model("llama"), _ids(40)
    ones = torch.ones_like(ids)
    dense = _out(model, ids, ones)
    with delta_sparse(model, DeltaCorrection(TopK(0.0), gamma=4, min_tail=4)) as stats:
        got = _out(model, ids, ones)
    assert model.config._attn_implementation == "eager"  # restored
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5)
    s_p, _, rows = delta_rows(40, 4, 4)
    nv = np.arange(1, 41)  # causal: row i sees i + 1 keys
    cost = nv.sum() + nv[rows[rows < s_p]].sum()  # every row once, anchors twice
    assert s_p == 36 and stats.kept_fraction == pytest.approx(cost / nv.sum(), rel=1e-12)


def test_delta_rows_are_exact_and_other_rows_corrected():
    # one layer: a position's logits depend on its own attention row only
    model, ids = _one_layer_llama(), _ids(40, seed=5)
    ones = torch.ones_like(ids)
    dense = _out(model, ids, ones)[0]
    base = WindowSinks(window=2, sinks=1)
    with sparse(model, base):
        window = _out(model, ids, ones)[0]
    with delta_sparse(model, DeltaCorrection(base, gamma=4, min_tail=4)) as stats:
        delta = _out(model, ids, ones)[0]
    exact = [0, 4, 8, 32, *range(36, 40)]  # anchors and the dense tail
    torch.testing.assert_close(delta[exact], dense[exact], rtol=0, atol=1e-5)
    other = [i for i in range(8, 36) if i % 4]
    assert not torch.allclose(delta[other], window[other], atol=1e-4)  # corrected
    assert not torch.allclose(delta[other], dense[other], atol=1e-4)  # but not dense
    assert 0.0 < stats.kept_fraction < 1.0


def test_delta_decode_steps_are_dense():
    model, ids = _model("llama"), _ids(6)
    kw = {"max_new_tokens": 3, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with delta_sparse(model, DeltaCorrection(WindowSinks(1))) as stats:
            got = model.generate(ids, **kw)
    assert torch.equal(got, dense) and stats.kept_fraction == 1.0


def test_delta_refuses_what_is_not_a_correction():
    with pytest.raises(ValueError, match="DeltaCorrection"):
        with delta_sparse(_model("llama"), TopK(0.1)):
            pass
    with pytest.raises(ValueError, match="gamma"):
        DeltaCorrection(TopK(0.1), gamma=0)


def _record(arch: str = "llama", n: int = 60, eps: float = 0.3):
    model, ids = _model(arch), _ids(n)
    with observe(model, eps=eps) as rec:
        _out(model, ids, torch.ones_like(ids))
    return rec


def test_matched_quest_is_the_smallest_page_budget_reaching_topk():
    from certattn.hf._cli import matched_quest

    rec = _record()
    for layer, pol in matched_quest(rec, 0.3, page_size=4).items():
        call = rec.calls[layer]
        target = call.k[0.3].sum()
        assert isinstance(pol, Pages) and pol.page_size == 4 and pol.budget % 4 == 0
        assert np.minimum(call.n_valid, pol.budget).sum() >= target
        assert np.minimum(call.n_valid, pol.budget - 4).sum() < target


def test_matched_delta_cost_reaches_topk_with_the_narrowest_base():
    from certattn.approx.delta import delta_rows
    from certattn.hf._cli import matched_delta

    rec = _record(n=60)
    corr = matched_delta(rec, 0.3, gamma=4, min_tail=4)
    assert (corr.gamma, corr.min_tail) == (4, 4)
    s_p, _, dense = delta_rows(60, 4, 4)
    for layer, base in corr.base.items():
        call = rec.calls[layer]
        nv, target = call.n_valid, call.k[0.3].sum()
        fixed = nv[..., dense].sum()
        width = base.window + base.sinks
        assert base.sinks == min(4, width)
        assert fixed + np.minimum(nv[..., :s_p], width).sum() >= target
        if width > 1:
            assert fixed + np.minimum(nv[..., :s_p], width - 1).sum() < target


def test_cli_evaluate_quest_delta_and_the_figure(tmp_path, capsys):
    folder, text = _tiny_folder(tmp_path)
    capsys.readouterr()  # the save's own progress bars
    out = tmp_path / "o"
    argv = ["evaluate", "--model", str(folder), "--text-file", str(text), "--tokens", "32",
            "--policies", "topk:0.3,quest:auto,quest:8,delta,window:auto", "--json",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    res = json.loads(cap.out)
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "topk:0.3", "quest:auto", "quest:8", "delta", "window:auto"]
    assert [r["family"] for r in res["rows"]] == ["dense", "topk", "quest", "quest", "delta",
                                                  "window"]
    assert 0.0 < rows["quest:auto"]["kept_fraction"] < 1.0
    assert rows["quest:8"]["kept_fraction"] < rows["quest:auto"]["kept_fraction"] + 1.0
    # 32 tokens are fewer than Delta's dense tail (gamma 64, min_tail 128): all rows dense
    assert rows["delta"]["kept_fraction"] == 1.0 and rows["delta"]["kl_max"] == 0.0
    assert json.loads((out / "evaluate.json").read_text()) == res
    pytest.importorskip("matplotlib")
    assert (out / "evaluate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluate_progress_goes_to_stderr_and_is_erased(tmp_path, capsys):
    folder, text = _tiny_folder(tmp_path)
    capsys.readouterr()  # the save's own progress bars
    assert main(["evaluate", "--model", str(folder), "--text-file", str(text), "--tokens",
                 "16", "--policies", "topk:0.3,window:auto", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "evaluate [" in err and "matching top-k [" in err and err.endswith("\r\x1b[K")


@pytest.mark.parametrize(("policies", "message"), [
    ("topk", "needs a value"),
    ("quest:x", "not a number"),
    ("quest:0", "budget"),
    ("delta:3", "delta takes no value"),
    ("quest:auto", "matches the kept keys of a topk"),
    ("delta", "matches the kept keys of a topk"),
    ("topk:0.1,topk:0.1", "twice"),
    ("cal", "policy 'cal' needs a calibration file"),
    ("nope:1", "unknown policy 'nope:1'.*topk:EPS.*quest:N\\|auto.*delta.*cal:FILE"),
])
def test_cli_evaluate_bad_specs_are_one_line(tmp_path, capsys, policies, message):
    assert main(["evaluate", "--model", str(tmp_path), "--policies", policies]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("certattn: error:")
    assert re.search(message, err), err


def test_policy_specs_are_one_table():
    from certattn.hf._cli import SPECS, Spec, parse_policies

    assert set(SPECS) == {"topk", "topp", "fixed", "window", "quest", "delta", "cal"}
    SPECS["half"] = Spec("half", lambda spec, arg: WindowSinks(window=1))
    try:
        assert parse_policies("half") == [("half", WindowSinks(window=1))]
    finally:
        del SPECS["half"]


def test_plot_evaluate_draws_one_curve_per_family():
    pytest.importorskip("matplotlib")
    from certattn.plots.evaluate import KL_FLOOR, plot_evaluate

    rows = [{"name": "dense", "family": "dense", "kept_fraction": 1.0, "kl_mean": 0.0,
             "top1": 1.0},
            {"name": "topk:0.1", "family": "topk", "kept_fraction": 0.3, "kl_mean": 0.02,
             "top1": 0.9},
            {"name": "topk:0", "family": "topk", "kept_fraction": 0.9, "kl_mean": 0.0,
             "top1": 1.0},
            {"name": "window:auto", "family": "window", "kept_fraction": 0.3,
             "kl_mean": 0.2, "top1": 0.7}]
    fig = plot_evaluate(rows, title="t")
    ax_kl, ax_top = fig.axes
    assert [ln.get_label() for ln in ax_kl.lines] == ["topk", "window"]
    np.testing.assert_array_equal(ax_kl.lines[0].get_xdata(), [0.3, 0.9])
    np.testing.assert_array_equal(ax_kl.lines[0].get_ydata(), [0.02, KL_FLOOR])
    np.testing.assert_array_equal(ax_top.lines[1].get_ydata(), [0.7])


def _budget_json(capsys, folder, text, *extra):
    capsys.readouterr()
    assert main(["budget", "--model", str(folder), "--text-file", str(text), "--tokens", "24",
                 "--coverage", "1", "--json", "--quiet", *extra]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    return json.loads(cap.out)


def test_cli_budget_reads_any_architecture_through_hf(tmp_path, capsys):
    from certattn.hf import load

    folder, text = _tiny_folder(tmp_path, "qwen3")  # not a NumPy family
    table = _budget_json(capsys, folder, text)
    assert "certattn.hf.observe" in table["source"] and table["layers"] == [0, 1]
    model, tok = load(str(folder))
    ids = tok.encode(text.read_text())[:24]
    with observe(model, eps=0.01) as rec, torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    # coverage 1: the fixed k is the largest certified k of the second half's queries
    want = [[int(rec.calls[layer].k[0.01][0, h, 12:].max()) for h in range(4)]
            for layer in (0, 1)]
    assert table["k_fixed"] == want


def test_cli_budget_keeps_numpy_forwards_for_their_families(tmp_path, capsys):
    folder, text = _tiny_folder(tmp_path, "llama")
    table = _budget_json(capsys, folder, text)
    assert "certattn.hf" not in table["source"]


def test_cli_budget_on_an_hf_only_folder_without_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    for name in [m for m in sys.modules if m == "certattn.hf" or m.startswith("certattn.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["budget", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a BERT or Llama-family folder" in err
    assert "[hf] extra" in err
    assert main(["budget", "--model", str(tmp_path), "--texts", str(tmp_path)]) == 2
    assert "--texts runs certattn's NumPy forwards" in capsys.readouterr().err


def test_hf_audit_records_reproduce_the_models_attention(tmp_path):
    from certattn.hf import load
    from certattn.hf._audit import attention_records

    folder, text = _tiny_folder(tmp_path, "qwen3")
    (rec,) = attention_records(str(folder), text.read_text(), tokens=20)
    model, tok = load(str(folder))
    ids = tok.encode(text.read_text())[:20]
    with torch.no_grad():
        att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    assert rec.causal and list(rec.layers) == [0, 1] and rec.queries.shape == (2, 4, 20, 8)
    for li in range(2):
        logits = rec.scale * rec.queries[li] @ rec.keys[li][rec.kv_head].swapaxes(-1, -2)
        logits = np.where(rec.mask, logits.astype(np.float64), -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(p, att[li][0].double().numpy(), rtol=0, atol=1e-6)


def test_cli_audit_on_an_hf_folder(tmp_path, capsys):
    folder, _ = _tiny_folder(tmp_path, "qwen3")
    capsys.readouterr()
    assert main(["audit", "--model", str(folder), "--tokens", "16", "--methods",
                 "window_sinks,quest,delta", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rep["rows"]} == {"window_sinks", "quest", "delta"}
    assert rep["unsound"] == 0 and rep["tokens"] == 16


def _gemma2_without_softcap():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        head_dim=8, sliding_window=4, attn_logit_softcapping=None, query_pre_attn_scalar=8)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize(("arch", "message"), [
    ("gemma2", "softcapping"),
    ("gemma2-sliding", "mask different keys"),  # one sliding layer, one full
])
def test_cli_audit_refuses_what_it_cannot_compare_in_one_line(tmp_path, capsys, arch,
                                                              message):
    model = _gemma2_without_softcap() if arch == "gemma2-sliding" else None
    folder, _ = _tiny_folder(tmp_path, "gemma2", model)
    capsys.readouterr()
    assert main(["audit", "--model", str(folder), "--tokens", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_delta_sparse_equals_certattn_approx_delta_correct():
    # one layer with o_proj = identity: the attention module's output is the heads' output
    from certattn.approx import delta_correct
    from certattn.hf._audit import _capturing

    model, ids = _one_layer_llama(), _ids(40, seed=6)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.o_proj.weight.copy_(torch.eye(32))
    seen = []
    hook = attn.register_forward_hook(lambda m, a, out: seen.append(out[0][0].double()))
    try:
        with _capturing(model) as calls, torch.no_grad():
            model(input_ids=ids)
        base = WindowSinks(window=3, sinks=1)
        with delta_sparse(model, DeltaCorrection(base, gamma=4, min_tail=4)), torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    c = calls[0]
    ref = delta_correct(c["q"].astype(np.float64), c["k"].astype(np.float64),
                        c["v"].astype(np.float64), gamma=4, min_tail=4, base=base,
                        causal=True, scale=c["scale"], kv_heads=2)
    want = np.asarray(ref.output).transpose(1, 0, 2).reshape(40, 32)  # (L, H * dv)
    np.testing.assert_allclose(seen[1].numpy(), want, rtol=0, atol=2e-5)
    assert not np.allclose(seen[0].numpy(), want, atol=1e-3)  # not the dense output
