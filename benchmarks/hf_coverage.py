"""Which causal-LM architectures of the installed transformers certattn.hf handles (issue 21).

For every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random model
from its config class's defaults, shrunk (2 layers, width 64, 4 heads, 2 key/value
heads, vocabulary 128; no downloads), and check on a left-padded batch that

* ``observe`` gives eager's logits bit for bit,
* ``sparse(TopK(0))`` gives eager's logits bit for bit,
* ``sparse(TopK(0.2))`` certifies every row within 0.2.

An architecture that cannot be built this way (multimodal, needs extra inputs or special
config values) is reported as ``skip`` with the reason; a refusal of certattn.hf (e.g.
attention sinks) as ``refused``.

Run (needs the [hf] extra; a few minutes on 2 cores)::

    PYTHONPATH=. python benchmarks/hf_coverage.py [--only llama,gpt2] [--json]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from certattn.errors import InputError
from certattn.hf import observe, sparse
from certattn.policies import TopK

MAX_PARAMS = 20_000_000  # a config the shrink misses can ask for tens of GB

_SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "num_hidden_layers": 2, "n_layer": 2,
    "num_layers": 2, "intermediate_size": 128, "num_attention_heads": 4, "n_head": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
    "max_position_embeddings": 256, "n_positions": 256, "sliding_window": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


def _tiny(model_type: str):
    cfg = CONFIG_MAPPING[model_type]()
    for key, value in _SHRINK.items():
        if hasattr(cfg, key):
            try:
                setattr(cfg, key, value)
            except AttributeError:  # a derived property (e.g. head_dim)
                pass
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:2]
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    with torch.device("meta"):  # count parameters before allocating any
        n = sum(p.numel() for p in cls._from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"still {n / 1e6:.0f}M parameters after shrinking")
    torch.manual_seed(0)
    return cls._from_config(cfg, attn_implementation="eager").eval()


def check(model_type: str) -> tuple[str, str]:
    """``(status, detail)`` for one model type."""
    try:
        model = _tiny(model_type)
        ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
    except Exception as exc:
        return "skip", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        with torch.no_grad():
            with observe(model, eps=0.2) as rec:
                got = model(input_ids=ids, attention_mask=mask).logits
            with sparse(model, TopK(0.0)):
                dense = model(input_ids=ids, attention_mask=mask).logits
            with sparse(model, TopK(0.2)) as stats:
                model(input_ids=ids, attention_mask=mask)
    except InputError as exc:
        return "refused", str(exc)
    except Exception as exc:
        return "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if not rec.calls:
        return "fail", "no attention call went through certattn"
    if not torch.equal(got, ref):
        return "fail", f"observe differs from eager by {(got - ref).abs().max().item():.2e}"
    if not torch.equal(dense, ref):
        return "fail", f"sparse(TopK(0)) differs by {(dense - ref).abs().max().item():.2e}"
    if not stats.tail_upper_max <= 0.2:
        return "fail", f"tail_upper_max {stats.tail_upper_max} > 0.2"
    return "ok", f"{len(rec.calls)} calls, kept {stats.kept_fraction:.3f} at eps 0.2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma list of model types")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    types = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    transformers.utils.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    results = {}
    for t in types:
        results[t] = check(t)
        if not args.json:
            print(f"{t:28s} {results[t][0]:8s} {results[t][1]}", flush=True)
    counts = {s: sum(1 for r in results.values() if r[0] == s)
              for s in ("ok", "refused", "fail", "skip")}
    if args.json:
        print(json.dumps({"results": results, "counts": counts}, indent=1))
    else:
        print(counts)


if __name__ == "__main__":
    main()
