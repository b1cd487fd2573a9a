"""Which architectures of the installed transformers certattn.hf handles (issue 21).

Every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and (encoders) of
``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` whose modeling code routes attention through
transformers' registry (``ALL_ATTENTION_FUNCTIONS``) is built as a tiny random model from
its config class's defaults, shrunk (no downloads), and checked on a left-padded batch:

* ``observe`` gives eager's logits bit for bit, and at least one call went through it,
* ``sparse(TopK(0))`` gives eager's logits bit for bit,
* every certificate ``observe`` recorded at eps 0.2 is at least the exact (float64)
  dropped mass of its row and at most 0.2, and ``sparse(TopK(0.2))`` keeps every tail
  within 0.2.

Shrinking is generic (:func:`shrink`): widths, head counts (query and key/value heads
kept consistent), head and rope dimensions, expert counts, vocabulary, positions and
windows, recursively in nested configs (text / vision / audio sub-configs of multimodal
wrappers, ``attn_config``, ``rope_parameters``); the layers are cut to one of each
distinct ``layer_types`` entry, every per-layer list, string or ``per_layer_config``
cut the same way.  When that model does not build or records no attention call (a
hybrid whose attention layers were cut), the layer count is kept instead.

Statuses: ``ok``; ``refused`` (certattn.hf refuses it in one line, with the reason);
``fail`` (a wrong result: a bug); ``no-build`` (the tiny model could not be built or
run with eager offline, with transformers' own error); ``not-routed`` (its modeling code
does not use the attention registry: out of scope, not counted).

Run (needs the [hf] extra; a few minutes on 2 cores)::

    PYTHONPATH=. python benchmarks/hf_coverage.py [--only llama,gpt2] [--json]
    PYTHONPATH=. python benchmarks/hf_coverage.py --markdown docs/HF_ARCHITECTURES.md
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import warnings

import mpmath
import numpy as np
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from certattn.errors import InputError
from certattn.hf import observe, sparse
from certattn.policies import TopK

MAX_PARAMS = 20_000_000  # a config the shrink misses can ask for tens of GB
VOCAB = 128
EPS = 0.2
STATUSES = ("ok", "refused", "fail", "no-build", "not-routed")

# exact key -> shrunk value (ints only; a smaller default is kept)
_TO = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "hidden_dim",
                     "word_embed_proj_dim", "embedding_size", "emb_dim", "out_hidden_size",
                     "attention_hidden_size", "hidden_size_global", "true_hidden_size",
                     "intra_bottleneck_size", "lru_width", "pooler_hidden_size",
                     "projection_dim", "vision_output_dim", "d_latents"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads",
                     "swa_num_attention_heads", "index_n_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "kv_n_heads", "num_kv_heads",
                     "multi_query_group_num"), 2),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts",
                     "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token",
                     "moe_topk", "top_k_experts", "moe_k", "n_group", "topk_group",
                     "n_shared_experts", "num_shared_experts", "first_k_dense_replace",
                     "zero_expert_num"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx",
                     "max_target_positions", "max_source_positions",
                     "original_max_position_embeddings", "context_length"), 256),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "window_size",
                     "attention_window", "attention_chunk_size", "local_attention",
                     "attention_window_size", "local_attention_window_len",
                     "index_topk", "keep_window_size"), 8),
    **dict.fromkeys(("image_size", "crop_size"), 32),
    "patch_size": 8, "depth": 2, "vision_layers": 2,
}
# head and rope dimensions, low ranks: divided by 8 (equal ones stay equal, ratios kept)
_DIMS = ("head_dim", "v_head_dim", "qk_head_dim", "swa_head_dim", "d_head", "d_kv",
         "dim_head", "kv_channels", "attention_head_size", "attention_head_dim",
         "index_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim",
         "qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "kv_lora_rank", "q_lora_rank",
         "o_lora_rank", "hc_lowrank", "laurel_rank", "loop_gate_rank", "embedding_rank",
         "adapter_rank", "mamba_d_head", "mamba_head_dim", "mamba_headdim")
_FFN = 128  # every key with "intermediate", "ffn" or "_ff" in it
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers",
           "decoder_layers", "num_encoder_layers", "num_decoder_layers")
_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
            "decoder_start_token_id": 0, "sep_token_id": 2, "cls_token_id": 1}
_DROP = ("transformers_version", "architectures", "_name_or_path", "id2label", "label2id")


def _small_int(key: str, value: int, state: dict) -> int:
    """The shrunk value of one integer entry."""
    if key in _SPECIAL or key.endswith(("_token_id", "_token_index")):
        if value < VOCAB:
            return value
        if key in _SPECIAL:
            return _SPECIAL[key]
        state["next_token"] -= 1  # distinct ids at the top of the vocabulary
        return state["next_token"]
    if "vocab_size" in key or key == "vocab_offset":
        return min(value, VOCAB)
    if key in _LAYERS:
        return min(value, state["layers"])
    if key in ("num_key_value_heads", "n_kv_heads", "kv_n_heads", "num_kv_heads") and value == 1:
        return 1
    if key in _TO:
        return min(value, _TO[key])
    if "heads" in key:
        return min(value, 2 if "key" in key or "kv" in key else 4)
    if key in _DIMS:
        return max(4, value // 16 * 2) if value > 8 else value
    if key == "num_kv_shared_layers":  # layers reusing another's cache: none once cut
        return value if state["keep"] else 0
    if "intermediate" in key or "ffn" in key or key.endswith(("_ff", "_dim_ff")) or key in (
            "n_inner", "d_inner", "dff", "mlp_dim", "feed_forward_size"):
        return min(value, _FFN)
    return value


def _cut(value, index: list[int], n_layers: int):
    """A per-layer list / string cut to the layers ``index``; anything else unchanged."""
    if isinstance(value, (list, tuple, str)) and len(value) == n_layers and n_layers > 1:
        out = [value[i] for i in index]
        return "".join(out) if isinstance(value, str) else out
    return value


def _layer_index(d: dict, keep_layers: bool) -> tuple[list[int], int]:
    """Which layers a config keeps (one of each distinct layer type) and how many it had."""
    n = next((d[k] for k in _LAYERS if isinstance(d.get(k), int)), 0)
    types = d.get("layer_types")
    if keep_layers or not n:
        return list(range(n)), n
    if isinstance(types, (list, tuple)) and len(types) == n:
        seen: dict = {}
        for i, t in enumerate(types):
            seen.setdefault(repr(t), i)
        index = sorted(seen.values())
        return index if len(index) > 1 else [0, 1][:n], n
    return [0, 1][:n], n


def shrink(d: dict, keep_layers: bool = False, state: dict | None = None) -> dict:
    """A shrunk copy of a config dict (recursing into nested configs and mappings)."""
    state = {"next_token": VOCAB} if state is None else state
    index, n = _layer_index(d, keep_layers)
    inner = dict(state, layers=max(len(index), 1) if n else (99 if keep_layers else 2),
                 keep=keep_layers)
    out = {}
    for key, value in d.items():
        if key in _DROP:
            continue
        if key in _LAYERS and isinstance(value, int) and n:
            out[key] = len(index) if value == n else min(value, inner["layers"])
        elif isinstance(value, dict) and key == "per_layer_config":
            out[key] = {f"{j:02d}": shrink(value[k], keep_layers, inner)
                        for j, i in enumerate(index)
                        for k in value if int(k) == i}
        elif isinstance(value, dict):
            out[key] = shrink(value, keep_layers, inner)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = _small_int(key, value, inner)
        elif value is None and key in ("vocab_size", "num_experts_per_tok"):
            out[key] = _small_int(key, 1 << 30, inner)  # a default left unset
        elif value is None and key == "head_dim" and "hidden_size" in d:
            out[key] = 16  # what the shrunk width and heads give
        elif isinstance(value, list) and key.endswith("token_id"):
            out[key] = [_small_int(key, v, inner) if isinstance(v, int) else v for v in value]
        else:
            out[key] = _cut(value, index, n) if n else value
    _keep_equal(d, out)
    state["next_token"] = inner["next_token"]
    return out


def _keep_equal(d: dict, out: dict) -> None:
    """As many key/value heads as query heads stays so (e.g. MLA needs it)."""
    heads = next((k for k in ("num_attention_heads", "n_head", "n_heads", "num_heads")
                  if isinstance(d.get(k), int)), None)
    for kv in ("num_key_value_heads", "n_kv_heads", "kv_n_heads", "num_kv_heads"):
        if heads and isinstance(d.get(kv), int) and d[kv] == d[heads]:
            out[kv] = out[heads]


def _model_class(model_type: str):
    name = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
            or MODEL_FOR_MASKED_LM_MAPPING_NAMES[model_type])
    return getattr(transformers, name if isinstance(name, str) else name[0])


def routes_through_registry(classes) -> bool:
    """Whether the modeling code of any of these classes uses the attention registry."""
    names = {c.__module__ for cls in classes for c in cls.__mro__
             if c.__module__.startswith("transformers.models.")}
    return any("ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[m]) for m in names
               if m in sys.modules)


def _build(cls, model_type: str, keep_layers: bool):
    base = CONFIG_MAPPING[model_type]()
    d = shrink(copy.deepcopy(base.to_dict()), keep_layers)
    try:
        cfg = type(base)(**d)
    except Exception:  # a config whose constructor does not take its own to_dict back
        cfg = type(base)()
        for key, value in d.items():
            try:
                setattr(cfg, key, value)
            except Exception:
                pass
    if not isinstance(cfg, cls.config_class) and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()  # a multimodal config whose causal LM is its text model
    with torch.device("meta"):  # count parameters before allocating any
        n = sum(p.numel() for p in cls._from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"still {n / 1e6:.0f}M parameters after shrinking")
    torch.manual_seed(0)
    return cls._from_config(cfg, attn_implementation="eager").eval()


def _inputs():
    ids = torch.randint(3, VOCAB // 2, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _run(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def _exact_tail(row: np.ndarray, k: int) -> mpmath.mpf:
    """Exact dropped mass of a row's k largest finite logits (ties by position)."""
    order = np.argsort(-row, kind="stable")
    fin = [mpmath.exp(mpmath.mpf(float(row[i]))) for i in order if np.isfinite(row[i])]
    with mpmath.workdps(40):
        return mpmath.fsum(fin[k:]) / mpmath.fsum(fin)


def _unsound(rec) -> str | None:
    """A recorded certificate above eps or below the exact dropped mass, if any."""
    for c in rec.calls:
        for b, h, q in np.argwhere(~c.masked):
            k, tail = int(c.k[EPS][b, h, q]), float(c.tail_upper[EPS][b, h, q])
            if not tail <= EPS or mpmath.mpf(tail) < _exact_tail(c.logits[b, h, q], k):
                return f"layer {c.layer} row {(b, h, q)}: tail_upper {tail} at k {k}"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:140] if lines else ''}"


def check(model_type: str) -> tuple[str, str]:
    """``(status, detail)`` for one model type (module docstring)."""
    try:
        cls = _model_class(model_type)
    except AttributeError as exc:
        return "no-build", _first_line(exc)
    routed = routes_through_registry([cls])
    error = "no attention call went through certattn"
    ids, mask = _inputs()
    for keep_layers in (False, True):
        try:
            model = _build(cls, model_type, keep_layers)
            with torch.no_grad():
                ref = _run(model, ids, mask)
        except Exception as exc:
            error = _first_line(exc)
            if not routed:
                break
            continue
        if not routes_through_registry({type(m) for m in model.modules()}):
            break
        routed = True  # through a sub-model's code
        status, detail = _certify(model, ids, mask, ref, keep_layers)
        if status != "retry":
            return status, detail
        error = detail
    if not routed:  # none of its modules (sub-models included) uses the registry
        return "not-routed", f"{cls.__name__}: no ALL_ATTENTION_FUNCTIONS in its modeling code"
    return "no-build", error


def _certify(model, ids, mask, ref, keep_layers: bool) -> tuple[str, str]:
    try:
        with torch.no_grad():
            with observe(model, eps=EPS, keep_logits=True) as rec:
                got = _run(model, ids, mask)
            if not rec.calls:
                return "retry", "no attention call went through certattn"
            with sparse(model, TopK(0.0)):
                dense = _run(model, ids, mask)
            with sparse(model, TopK(EPS)) as stats:
                _run(model, ids, mask)
    except InputError as exc:
        return "refused", str(exc)
    except Exception as exc:
        return "fail", _first_line(exc)
    if not torch.equal(got, ref):
        return "fail", f"observe differs from eager by {(got - ref).abs().max().item():.2e}"
    if not torch.equal(dense, ref):
        return "fail", f"sparse(TopK(0)) differs by {(dense - ref).abs().max().item():.2e}"
    bad = _unsound(rec)
    if bad is not None:
        return "fail", f"unsound certificate: {bad}"
    if not stats.tail_upper_max <= EPS:
        return "fail", f"sparse tail_upper_max {stats.tail_upper_max} > {EPS}"
    layers = "all layers" if keep_layers else f"{len(rec.layers())} layers"
    return "ok", (f"{type(model).__name__}, {layers}, {len(rec.calls)} calls; "
                  f"kept {stats.kept_fraction:.3f} at eps {EPS}")


def markdown(results: dict[str, tuple[str, str]], families: dict[str, str]) -> str:
    """docs/HF_ARCHITECTURES.md: the counts, then one table per status."""
    counts = {s: sum(1 for r in results.values() if r[0] == s) for s in STATUSES}
    routed = len(results) - counts["not-routed"]
    built = routed - counts["no-build"]
    lines = [
        "# certattn.hf on the architectures of transformers",
        "",
        "<!-- generated: do not edit by hand -->",
        f"Generated by `PYTHONPATH=. python benchmarks/hf_coverage.py --markdown "
        f"docs/HF_ARCHITECTURES.md` with transformers {transformers.__version__} and torch "
        f"{torch.__version__.split('+')[0]} on CPU. Each architecture is built as a tiny random "
        "model from its config class's defaults, shrunk (no downloads), and run on a "
        "left-padded batch of two: **ok** means `observe` gives eager's logits bit for bit, "
        "`sparse(TopK(0))` too, and every certificate recorded at eps 0.2 lies between the "
        "exact dropped mass of its row and 0.2 (and so does every `sparse(TopK(0.2))` tail).",
        "",
        f"Of {len(results)} causal-LM and encoder (masked-LM) model types, {routed} route their "
        f"attention through transformers' registry; of these, **{counts['ok']} pass** "
        f"({100 * counts['ok'] / routed:.0f}%), {counts['refused']} are refused in one line, "
        f"{counts['fail']} fail, and {counts['no-build']} could not be built or run offline "
        f"from their config defaults. Of the {built} that were built, "
        f"{100 * counts['ok'] / max(built, 1):.0f}% pass. {counts['not-routed']} do not use "
        "the registry (certattn.hf refuses them in one line: their attention is their own code).",
        "",
    ]
    titles = {"ok": "Pass", "refused": "Refused (one line, with the reason)",
              "fail": "Fail", "no-build": "Not built offline (transformers' error)",
              "not-routed": "Not routed through the attention registry"}
    for s in STATUSES:
        rows = [(t, r[1]) for t, r in sorted(results.items()) if r[0] == s]
        if not rows:
            continue
        lines += [f"## {titles[s]} ({len(rows)})", "", "| model type | family | detail |",
                  "|---|---|---|"]
        lines += [f"| `{t}` | {families[t]} | {d.replace('|', '/')} |" for t, d in rows]
        lines.append("")
    return "\n".join(lines)


def model_types() -> dict[str, str]:
    """Model type -> ``causal`` or ``encoder`` (masked LM, not also a causal LM)."""
    out = dict.fromkeys(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal")
    for t in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        out.setdefault(t, "encoder")
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma list of model types")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", metavar="PATH", help="write the per-architecture table")
    args = ap.parse_args()
    families = model_types()
    types = args.only.split(",") if args.only else list(families)
    transformers.utils.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    results = {}
    for t in types:
        results[t] = check(t)
        if not args.json:
            print(f"{t:28s} {results[t][0]:10s} {results[t][1]}", flush=True)
    counts = {s: sum(1 for r in results.values() if r[0] == s) for s in STATUSES}
    if args.json:
        print(json.dumps({"results": results, "counts": counts}, indent=1))
    else:
        print(counts)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, {t: families.get(t, "?") for t in results}))


if __name__ == "__main__":
    main()
