"""certattn.steer: the steering hook, the SAE, feature ranking, head TV, the corpus reader.

Tiny random Llama models built in code (no downloads); the Debian Reference is replaced
by small generated HTML fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("langdetect")

from certattn.errors import InputError  # noqa: E402
from certattn.steer import (  # noqa: E402
    TopKSAE,
    ablate_heads,
    corpus,
    detect_language,
    feature_steering,
    head_tv,
    mean_difference,
    rank_features,
    run_grid,
    steering,
    train_sae,
)
from certattn.steer.heads import attention_tv  # noqa: E402
from certattn.steer.steering import decoder_layers  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: threads only add synchronisation (restored after each test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


class _Tok:
    def encode(self, text):
        return [1 + (ord(ch) % 60) for ch in text]

    def decode(self, ids):
        return "".join(chr(97 + (i % 26)) for i in ids)


IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8]])


def _layer_io(model, ids):
    """Inputs of every decoder layer (the residual each one reads)."""
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
        for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return seen, logits


def test_steering_moves_exactly_the_chosen_residual_by_the_chosen_amount():
    model = _model()
    d = torch.randn(32, generator=torch.Generator().manual_seed(3))
    base, base_logits = _layer_io(model, IDS)
    with steering(model, 1, d.numpy(), 0.5, norm=2.0):
        moved, logits = _layer_io(model, IDS)
    assert torch.equal(moved[0], base[0]) and torch.equal(moved[1], base[1])
    # layer 2 reads layer 1's output plus 0.5 * 2.0 * d at every position
    expected = _out_of(model, 1, base[1]) + 1.0 * d
    assert torch.allclose(moved[2], expected, atol=1e-6)
    assert not torch.equal(moved[2], base[2]) and not torch.equal(logits, base_logits)
    with steering(model, 1, d.numpy(), 0.0):
        _, zero_logits = _layer_io(model, IDS)
    assert torch.equal(zero_logits, base_logits)  # coefficient 0: bit-identical
    _, after = _layer_io(model, IDS)
    assert torch.equal(after, base_logits)  # the hook is gone on exit


def _out_of(model, layer, h):
    seen = {}
    hook = decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, o: seen.__setitem__("o", (o[0] if isinstance(o, tuple) else o).clone()))
    with torch.no_grad():
        model(IDS)
    hook.remove()
    return seen["o"]


def test_steering_refuses_bad_layers_and_shapes():
    model = _model()
    with pytest.raises(InputError, match="layer 3"), steering(model, 3, np.zeros(32), 1.0):
        pass
    with pytest.raises(InputError, match="shape"), steering(model, 0, np.zeros(31), 1.0):
        pass


def _planted(seed=0, n=3000, d=24, atoms=40):
    """Sparse sums of 3 of ``atoms`` unit directions; the target adds 3 u to each."""
    rng = np.random.default_rng(seed)
    dic = rng.standard_normal((atoms + 1, d))
    dic /= np.linalg.norm(dic, axis=1, keepdims=True)

    def draw(extra):
        idx = np.stack([rng.choice(atoms, 3, replace=False) for _ in range(n)])
        x = (rng.uniform(0.5, 2.0, (n, 3))[:, :, None] * dic[idx]).sum(1)
        return (x + extra * dic[-1] + 0.05 * rng.standard_normal((n, d))).astype(np.float32)

    return draw(0.0), draw(3.0), dic[-1]


def test_sae_training_reduces_error_and_round_trips(tmp_path):
    english, target, _ = _planted()
    acts = np.concatenate([english, target])
    sae, history = train_sae(acts, 64, 4, steps=300, meta={"model": "m1"})
    assert history[-1] < 0.8 * history[0]
    path = sae.save(tmp_path / "sae.safetensors")
    back = TopKSAE.load(path)
    x = torch.as_tensor(acts[:50])
    assert torch.equal(back.encode(x), sae.encode(x)) and back.meta == {"model": "m1"}
    with pytest.raises(InputError, match="trained on model m1"):
        TopKSAE.load(path, model=_model())
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(InputError, match=r"certattn SAE|cannot read"):
        TopKSAE.load(tmp_path / "bad.safetensors")


def test_feature_ranking_recovers_a_planted_language_direction():
    english, target, u = _planted()
    sae, _ = train_sae(np.concatenate([english, target]), 64, 4, steps=1000, lr=3e-3)
    ranked = rank_features(sae, target, english)
    assert float(sae.direction(int(ranked[0])).numpy() @ u) > 0.9
    # not an accident of the ranking: the median-ranked feature does not point along u
    assert abs(float(sae.direction(int(ranked[len(ranked) // 2])).numpy() @ u)) < 0.5
    assert float(mean_difference(target, english) @ u) > 0.99


class _Identity:
    """An "SAE" whose features are the inputs' coordinates (scale 1, unit basis rows)."""

    scale = 1.0

    def encode(self, x):
        return torch.relu(x)

    def direction(self, i):
        return torch.eye(32)[i]


def test_normalised_rankings_prefer_a_sparse_language_feature_to_a_dense_one():
    rng = np.random.default_rng(4)
    english = np.zeros((400, 3), np.float32)
    target = np.zeros((400, 3), np.float32)
    english[:, 0] = rng.uniform(5.0, 15.0, 400)  # dense, high norm, slightly larger in target
    target[:, 0] = english[:, 0] + 1.0
    target[::2, 1] = 0.5  # rare and small, but only ever in the target language
    english[:, 2] = target[:, 2] = rng.uniform(0.0, 1.0, 400)  # language-blind
    sae = _Identity()
    assert rank_features(sae, target, english, by="mean")[0] == 0
    assert rank_features(sae, target, english, by="zscore")[0] == 1
    assert rank_features(sae, target, english, by="frequency")[0] == 1
    assert rank_features(sae, target, english)[0] == 1  # zscore is the default
    with pytest.raises(InputError, match="ranking must be one of"):
        rank_features(sae, target, english, by="max")


def test_clamping_a_feature_replaces_its_contribution_by_the_coefficient():
    model = _model()
    sae = _Identity()
    base, _ = _layer_io(model, IDS)
    h = _out_of(model, 1, base[1])
    with feature_steering(model, 1, sae, 5, 0.5, norm=2.0, mode="clamp"):
        moved, _ = _layer_io(model, IDS)
    expected = h.clone()
    expected[..., 5] = 1.0  # relu(h_5) is replaced by 0.5 * 2.0; a negative h_5 stays
    expected[..., 5] += torch.clamp(h[..., 5], max=0.0)
    assert torch.allclose(moved[2], expected, atol=1e-6)
    with feature_steering(model, 1, sae, 5, 0.5, norm=2.0, mode="add"):
        added, _ = _layer_io(model, IDS)
    assert torch.allclose(added[2], h + torch.eye(32)[5], atol=1e-6)
    with pytest.raises(InputError, match="mode must be"), \
            feature_steering(model, 1, sae, 5, 0.5, mode="set"):
        pass


def test_attention_tv_is_half_the_l1_distance_averaged_over_queries():
    p = np.array([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]])  # (1, H=1, Lq=2, Lk=3)
    q = np.array([[[[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]]]])
    assert attention_tv(p, q).tolist() == [(0.5 + 1.0) / 2]


def test_head_tv_is_zero_up_to_the_steered_layer_and_matches_its_definition():
    model = _model()
    d = np.random.default_rng(1).standard_normal(32).astype(np.float32)

    def steer():
        return steering(model, 0, d, 3.0)

    tv = head_tv(model, IDS, steer)
    assert tv.shape == (3, 4)
    assert np.all(tv[0] == 0) and np.all(tv[1:] > 0)
    with torch.no_grad():
        p = model(IDS, output_attentions=True).attentions[2][0, 1].double()
        with steer():
            q = model(IDS, output_attentions=True).attentions[2][0, 1].double()
    assert tv[2, 1] == pytest.approx(float(0.5 * (p - q).abs().sum(-1).mean()), rel=1e-6)


def test_ablating_a_head_equals_zeroing_its_output_columns():
    model = _model()
    with torch.no_grad(), ablate_heads(model, [(1, 2)]):
        ablated = model(IDS).logits
    with torch.no_grad():
        full = model(IDS).logits
        w = decoder_layers(model)[1].self_attn.o_proj.weight
        saved = w[:, 16:24].clone()
        w[:, 16:24] = 0
        zeroed = model(IDS).logits
        w[:, 16:24] = saved
    assert torch.allclose(ablated, zeroed, atol=1e-6) and not torch.allclose(ablated, full)
    with pytest.raises(InputError, match="head 4"), ablate_heads(model, [(0, 4)]):
        pass


def test_run_grid_coefficient_zero_is_the_unsteered_model():
    model = _model()
    d = np.random.default_rng(2).standard_normal(32).astype(np.float32)
    rows = run_grid(model, _Tok(), ["abc def", "ghij"], "en", {"x": (1, d)}, [0.0, 5.0],
                    norms={1: 1.0}, new_tokens=4,
                    embed=lambda ts: np.eye(len(ts), 3)[: len(ts)])
    assert [r.coefficient for r in rows] == [0.0, 5.0]
    assert rows[0].meaning == pytest.approx(1.0)  # identical to the base continuations
    assert all(0.0 <= r.success <= 1.0 and r.fluency_nll > 0 for r in rows)


def _html(paragraphs):
    return "<html><body>" + "".join(f"<p>{p}</p>" for p in paragraphs) + "</body></html>"


def test_corpus_aligns_paragraphs_and_drops_untranslated_ones(tmp_path):
    en = ["The shell reads your commands and runs them one by one for you.",
          "Untranslated paragraph stays in English in every language file here.",
          "short"]
    fr = ["Le shell lit vos commandes et les exécute une par une pour vous.",
          en[1], "court"]
    (tmp_path / "ch01.en.html").write_text(_html(en), encoding="utf-8")
    (tmp_path / "ch01.fr.html").write_text(_html(fr), encoding="utf-8")
    out = corpus(("en", "fr"), root=tmp_path, min_chars=20)
    assert out == {"en": [en[0]], "fr": [fr[0]]}
    with pytest.raises(InputError, match="apt-get install debian-reference-de"):
        corpus(("en", "de"), root=tmp_path)


def test_detect_language_is_deterministic_and_knows_the_four_targets():
    samples = {"fr": "Le chat dort sur le canapé pendant que la pluie tombe dehors.",
               "es": "El gato duerme en el sofá mientras la lluvia cae afuera.",
               "de": "Die Katze schläft auf dem Sofa, während draußen der Regen fällt.",
               "zh-cn": "猫在沙发上睡觉，外面正在下雨。", "en": "The cat sleeps on the sofa."}
    assert {k: detect_language(v) for k, v in samples.items()} == {k: k for k in samples}
    assert detect_language("123 456") == "unknown"


def test_cli_refuses_in_one_line(tmp_path, capsys):
    from certattn.cli import main

    assert main(["steer", "--lang", "fr", "--layer", "3", "--corpus-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install debian-reference-en debian-reference-fr" in err[0]
    assert main(["steer", "--lang", "xx", "--layer", "3"]) == 2
    assert "--lang must be one of" in capsys.readouterr().err
    assert main(["steer", "--lang", "fr", "--layer", "a,b"]) == 2
    assert "--layer" in capsys.readouterr().err


def test_language_study_runs_end_to_end_on_a_tiny_model(monkeypatch):
    from certattn.steer import experiment
    from certattn.steer.study import language_study

    # the tiny model writes letter soup: call every steered text French so that both
    # directions have a best setting whose heads are measured
    monkeypatch.setattr(experiment, "detect_language", lambda text: "fr")
    model = _model()
    texts = {"en": [f"english text number {i} about shells" for i in range(9)],
             "fr": [f"texte francais numero {i} sur les shells" for i in range(9)]}
    res = language_study(model, _Tok(), "fr", [1], [0.0, 2.0], texts=texts, new_tokens=3,
                         train_tokens=200, width=16, k=2, steps=5, meaning=False, ablate=2)
    entry = res["layers"]["1"]
    assert {g["direction"] for g in entry["grid"]} == {"sae", "mean", "random"}
    assert entry["feature"] != entry["random_feature"]
    assert set(res["heads"]) == {"sae", "mean"}
    for h in res["heads"].values():
        assert h["layer"] == 1
        assert np.asarray(h["head_tv"]).shape == (3, 4)
        assert all(layer > 1 for layer, _ in h["ablate_top"]["heads"])
        for name in ("none", "top", "random"):
            cell = h[f"ablate_{name}"]
            lo, hi = cell["interval"]
            assert cell["n"] == 3 and lo <= cell["success"] <= hi
    assert res["prompts"] == 3  # the held-out third of the aligned paragraphs


def test_best_setting_prefers_success_above_the_meaning_floor():
    from certattn.steer.experiment import Setting
    from certattn.steer.study import best_setting

    def cell(c, success, meaning, direction="sae"):
        return Setting(direction, 5, c, success, meaning, 1.0, [])

    grid = [cell(0.0, 0.0, 1.0), cell(0.5, 0.4, 0.6), cell(1.0, 0.9, 0.1),
            cell(2.0, 1.0, 0.05), cell(1.0, 1.0, 0.9, "mean")]
    assert best_setting(grid, "sae").coefficient == 0.5  # 0.9 and 1.0 lost the meaning
    assert best_setting(grid, "sae", meaning_floor=0.0).coefficient == 2.0
    assert best_setting(grid, "mean").success == 1.0
    assert best_setting([cell(1.0, 0.0, 0.9), cell(2.0, 0.0, 0.5)], "sae") is None
    assert best_setting([cell(1.0, 0.0, 0.9), cell(2.0, 0.2, 0.1)], "sae").coefficient == 2.0


def test_wilson_interval_matches_the_closed_form():
    from certattn.steer.experiment import wilson

    z2 = 1.96**2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # closed form at 0 hits
    assert wilson(60, 60) == pytest.approx((60 / (60 + z2), 1.0))
    lo, hi = wilson(5, 10)
    half = 1.96 * (0.25 / 10 + z2 / 400) ** 0.5 / (1 + z2 / 10)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    with pytest.raises(InputError, match="hits"):
        wilson(3, 2)


def test_meaning_reference_pairs_aligned_and_shifted_texts():
    from certattn.steer.experiment import meaning_reference

    def embed(texts):  # one-hot by the number in the text: translations coincide
        return np.eye(4)[[int(t.split()[-1]) for t in texts]]

    ref = meaning_reference(embed, ["en 0", "en 1", "en 2"], ["fr 0", "fr 1", "fr 2"])
    assert ref == {"translation": 1.0, "unrelated": 0.0}
    with pytest.raises(InputError, match="aligned"):
        meaning_reference(embed, ["en 0"], ["fr 0"])
