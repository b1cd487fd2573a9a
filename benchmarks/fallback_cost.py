"""The certified fallback of window + sinks and Quest on SmolLM2: rate and cost (issue 24).

Usage: ``python benchmarks/fallback_cost.py [--tokens 1024] [--layers 0 7 15 23 29]
[--bits 2 4 8] [--tiers 4,8] [--eps 0.01] [--rank box estimates]``

Per method and bound, over every head and query row of the chosen layers (SmolLM2-135M on
the built-in prose, causal, the audit's default window 128 + 16 sinks and Quest budget
144 at 1024 tokens): the fallback rate, the share of queries whose base kept set truly
drops more than eps (exact float64 softmax), the cost in float16 keys read over dense
attention's (estimates, boxes and keys scored), the largest certified ``tail_upper`` and
the queries whose exact dropped mass exceeds their certificate (must be 0).  Bounds: page
boxes with the Top-k fallback (``fallback="certified"``, the former default) and
``bits``-bit key estimates with the quantized search (``fallback="quant"``, groups of 128
keys), and tiered estimates (``--tiers``; ``bits=(2, 4, 8)`` is the audit's default: 2-bit
estimates of every dropped key, nested in the 8-bit grid, whose next bits are read only
for the keys of queries the coarser bound does not certify).  Quest runs once per
``--rank`` with tiers: pages ranked by their boxes (Quest) or by the mass the first tier's
estimates give (``rank="estimates"``, the audit's ``quest_certified``).
"""

from __future__ import annotations

import argparse

import numpy as np

from certattn.approx.selection import quest, window_sinks
from certattn.budget import load_attention


def _exact_probs(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    n = k.shape[-2]
    s = np.einsum("hmd,hnd->hmn", q, k) * scale
    s = np.where(np.tril(np.ones((q.shape[-2], n), bool), n - q.shape[-2]), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _truly_estimates(q: np.ndarray, k: np.ndarray, p: np.ndarray, scale: float,
                     params: dict, bits: tuple[int, ...], eps: float) -> np.ndarray:
    """Whether Quest's pages ranked by estimated mass truly drop more than eps."""
    import array_api_compat.numpy as xnp

    from certattn.approx.fallback import CertifiedFallback
    from certattn.policies import Context, Pages

    pol = CertifiedFallback(Pages(params["budget"], params["page_size"]), eps,
                            bound="quant", to="search", bits=bits, page_rank="estimates")
    n = k.shape[-2]
    valid = np.broadcast_to(np.tril(np.ones((q.shape[-2], n), bool), n - q.shape[-2]),
                            p.shape)
    ctx = Context(queries=q, keys=k, scale=scale, start=0, xp=xnp)
    kept, _ = pol.base_kept(np.where(valid, 0.0, -np.inf), valid, ctx)
    return 1.0 - np.sum(np.where(kept, p, 0.0), axis=-1) > eps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 23, 29])
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--tiers", nargs="*", default=["4,8"],
                    help="tiered widths, comma-separated (e.g. 4,8)")
    ap.add_argument("--methods", nargs="+", default=["window_sinks", "quest"])
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--rank", nargs="+", default=["box", "estimates"],
                    choices=["box", "estimates"], help="Quest's page ranks, with tiers")
    args = ap.parse_args()
    (rec,) = load_attention("smollm2", tokens=args.tokens, layers=args.layers)
    kvh = rec.n_heads // rec.keys.shape[1]
    tiers = [tuple(int(b) for b in t.split(",")) for t in args.tiers]
    variants = [("certified", None, "box")] + [("quant", b, "box") for b in args.bits] + \
        [("quant", t, r) for t in tiers for r in args.rank]
    methods = {"window_sinks": window_sinks, "quest": quest}
    acc: dict[tuple[str, str, object], dict[str, list]] = {}
    for li in range(len(rec.layers)):
        q = np.asarray(rec.queries[li], dtype=np.float64)
        k = np.repeat(np.asarray(rec.keys[li], dtype=np.float64), kvh, axis=0)
        v = np.repeat(np.asarray(rec.values[li], dtype=np.float64), kvh, axis=0)
        p = _exact_probs(q, k, rec.scale)
        for name in args.methods:
            fn = methods[name]
            base = fn(q, k, v, causal=True, scale=rec.scale, return_weights=False)
            truly = 1.0 - np.sum(np.where(base.kept, p, 0.0), axis=-1) > args.eps
            for fb, bits, rank in variants:
                if rank != "box" and name != "quest":
                    continue
                kw = {} if bits is None else {"bits": bits}
                t_rank = truly
                if rank != "box":
                    kw["rank"] = rank
                    t_rank = _truly_estimates(q, k, p, rec.scale, base.params, bits,
                                              args.eps)
                r = fn(q, k, v, causal=True, scale=rec.scale, fallback=fb, eps=args.eps,
                       return_weights=False, **kw)
                tau = 1.0 - np.sum(np.where(r.kept, p, 0.0), axis=-1)
                a = acc.setdefault((name, fb, bits, rank), {k_: [] for k_ in
                                                      ("fell", "truly", "cost", "nv", "tail",
                                                       "unsound")})
                a["fell"].append(r.params["fell_back"].ravel())
                a["truly"].append(t_rank.ravel())
                a["cost"].append(r.cost.ravel())
                a["nv"].append(np.broadcast_to(np.arange(1, p.shape[-1] + 1), tau.shape).ravel())
                a["tail"].append(r.tail_upper.ravel())
                a["unsound"].append((tau > r.tail_upper + 1e-12).ravel())
        print(f"layer {int(rec.layers[li])} done", flush=True)
    print(f"SmolLM2-135M, {args.tokens} tokens, layers {args.layers}, all heads, eps {args.eps}")
    print("| method | bound | fallback | truly drops > eps | cost / dense | max tail_upper "
          "| unsound |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, _, bits, rank), a in acc.items():
        c = {k_: np.concatenate(v_) for k_, v_ in a.items()}
        if bits is None:
            label = "page boxes, Top-k"
        elif isinstance(bits, tuple):
            label = "-then-".join(map(str, bits)) + "-bit estimates (tiers), search"
            if rank != "box":
                label += f", pages ranked by {rank}"
        else:
            label = f"{bits}-bit estimates, search"
        print(f"| {name} | {label} | {c['fell'].mean():.1%} | {c['truly'].mean():.1%} "
              f"| {c['cost'].sum() / c['nv'].sum():.3f} | {c['tail'].max():.4g} "
              f"| {int(c['unsound'].sum())} |")


if __name__ == "__main__":
    main()
