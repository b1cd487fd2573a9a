"""Cost of certified search: paper-style MC-Search vs ours vs the floor (Theorem SEARCH-SOUND).

For every dataset, n and eps, one run measures per query keys scored, cost and bytes read
(relative to dense attention over float16 keys) of

* MC-Search (``method="mc"``: k-means, ``ceil(sqrt(n))`` ball cells, seed 0),
* ours (``method="ours"``, the default: MC-Search's cells and order, stopped by the tighter
  ball-and-box score bounds and Bennett mass bounds, so never costlier than MC-Search),
* ours, hierarchical (``method="tree"``: MC-Search's cells split further by k-means where
  that removes enough scatter, refined best-first; cheaper on structured keys, below
  MC-Search on average but not guaranteed query by query),
* the gap-stopped search (``method="gap"``),
* per-key bounds from b-bit key estimates (``method="quant"``, b = 2, 4, 8; Theorem
  QUANT-SCORE: KIVI-style per-channel quantization in groups of 32 keys) and its paged
  variant (``method="paged"``, b = 4: Quest-style page bounds first),
* the floor: the exact minimal ``k_eps`` (:func:`certattn.certify_topk`); no certified
  search keeps fewer keys, so none scores fewer,

where cost = keys scored + cells bounded and bytes read = keys scored at 2 d bytes
(float16) + the metadata of the cells bounded + (quant) every visible key's b-bit estimate
and its group's metadata, over dense attention's 2 d bytes per visible key; a second
table adds the values (dense reads every visible value, a search those of the kept
keys).  Prints
markdown tables of the means with ratios against the floor measured in the same run,
plus the paper's numbers where they apply (bert-base-uncased, eps = 0.01: 58.8 of 128 and
107.8 of 256 keys scored).  Every certificate is re-checked against the exact full softmax
(longdouble logits) while measuring; an unsound one aborts the run.

Usage::

    python benchmarks/search_cost.py [--quick] [--real] [--only-real] [--eps E ...]
                                     [--json PATH] [--queries M]

``--real`` adds real attention: live all-MiniLM-L6-v2 on windows of exactly n = 128 and
256 tokens of the built-in corpus (three windows, 32 query rows each; MiniLM has 512
positions, so no n = 1024), or the shipped sample (n = 41-53) when the model package is
missing, and, when the model packages are installed, SmolLM2-135M on the Python licence
text (causal, GQA; n = 128, 256, 1024, 32 query rows from the last half).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certattn import certify_topk
from certattn.search import certified_search

EPS = (0.001, 0.01, 0.05, 0.1)
SIZES = (128, 256, 1024)
PAPER = {(128, 0.01): 58.8, (256, 0.01): 107.8}  # bert-base-uncased, keys scored
# (label, method, extra keyword arguments) of every search measured
SEARCHES = (
    ("mc", "mc", {}),
    ("ours", "ours", {}),
    ("tree", "tree", {}),
    ("gap", "gap", {}),
    ("quant2", "quant", {"bits": 2}),
    ("quant4", "quant", {"bits": 4}),
    ("quant8", "quant", {"bits": 8}),
    ("paged4", "paged", {"bits": 4}),
)


def clustered(n: int, m: int, rng: np.random.Generator, d: int = 64) -> tuple[np.ndarray, ...]:
    """Keys in ``n/16`` Gaussian clusters; each query leans towards one cluster.

    Cluster centres ~ N(0, I), keys = centre + 0.35 N(0, I), queries =
    1.6 * (a random cluster's centre) + N(0, I); scale 1/sqrt(d).
    """
    c = max(4, n // 16)
    centres = rng.normal(size=(c, d))
    keys = centres[rng.integers(0, c, n)] + 0.35 * rng.normal(size=(n, d))
    queries = 1.6 * centres[rng.integers(0, c, m)] + rng.normal(size=(m, d))
    values = rng.normal(size=(n, d))
    return queries, keys, values


def dominant(n: int, m: int, rng: np.random.Generator, d: int = 64) -> tuple[np.ndarray, ...]:
    """A few dominant keys (attention sinks) over a clustered bulk, as in real heads.

    The bulk is :func:`clustered` with weaker queries (0.8 * centre); 4 keys get a large
    component along a direction ``u`` that every query shares with a random weight, so
    their logits exceed the bulk's by about 2 to 10.
    """
    q, keys, values = clustered(n, m, rng, d)
    q = 0.5 * q + 0.6 * rng.normal(size=q.shape)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    sinks = rng.choice(n, size=4, replace=False)
    keys[sinks] += u * rng.uniform(12.0, 16.0, size=(4, 1))
    q = q + np.outer(rng.uniform(1.5, 4.5, size=m), u)
    return q, keys, values


SYNTHETIC = {"clustered": clustered, "dominant": dominant}


def _check(res: object, logits: np.ndarray, eps: float) -> int:
    """Every certificate sound against the exact softmax (longdouble logits, tail summed
    directly); returns the number of queries checked."""
    s = np.asarray(logits, dtype=np.longdouble)
    mx = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - mx)
    kept = np.asarray(res.kept)
    tail = np.sum(np.where(kept, 0.0, p), axis=-1) / np.sum(p, axis=-1)
    bound = np.asarray(res.tail_upper).astype(np.longdouble)
    if np.any(tail > bound * (1 + 1e-12)) or np.any(bound > eps):
        raise AssertionError("unsound certificate in the benchmark")
    return int(tail.size)


def measure(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    eps: float,
    *,
    scale: float,
    mask: np.ndarray | None = None,
    logits: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-query cost, keys scored and bytes read of every search, and the floor."""
    out = {}
    checked = 0
    for label, method, kw in SEARCHES:
        res = certified_search(queries, keys, values, eps, scale=scale, mask=mask,
                               method=method, **kw)
        checked += _check(res, logits, eps)
        out[label] = np.asarray(res.cost).reshape(-1)
        out[label + "_scored"] = np.asarray(res.scored).reshape(-1)
        out[label + "_read"] = np.asarray(res.read_fraction).reshape(-1)
        # the whole attention's traffic: dense reads every visible key and value (float16),
        # a search reads what it decides from plus the values of the kept keys
        dv = values.shape[-1]
        kept = np.asarray(res.kept).sum(axis=-1)
        kv = (np.asarray(res.bytes_read) + kept * 2.0 * dv) / (
            np.asarray(res.bytes_dense) + np.asarray(res.n_valid) * 2.0 * dv)
        out[label + "_kv"] = kv.reshape(-1)
        out["visible"] = np.asarray(res.n_valid).reshape(-1)
    out["floor"] = np.asarray(certify_topk(logits, eps).k).reshape(-1)
    out["checked"] = np.asarray([checked])
    return out


def _logits(q: np.ndarray, k: np.ndarray, scale: float, mask: np.ndarray | None) -> np.ndarray:
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    return s if mask is None else np.where(mask, s, -np.inf)


def synthetic_cases(sizes: tuple[int, ...], m: int, reps: int) -> Iterator[tuple]:
    """(dataset, n, problems) with fixed seeds."""
    for name, gen in SYNTHETIC.items():
        for n in sizes:
            probs = []
            for r in range(reps):
                rng = np.random.default_rng([n, r, len(name)])
                q, k, v = gen(n, m, rng)
                probs.append((q, k, v, 1.0 / math.sqrt(q.shape[-1]), None))
            yield name, n, probs


def _minilm_cases(quick: bool) -> Iterator[tuple]:
    """Live MiniLM on windows of exactly n tokens ([CLS] body [SEP]); the sample without
    the model package."""
    from certattn._corpus import corpus_text
    from certattn.models import load_sample

    try:
        from certattn.models import load_minilm

        model = load_minilm()
    except Exception as exc:  # package not installed
        print(f"(live MiniLM unavailable: {exc}; using the shipped sample)", file=sys.stderr)
        probs = []
        for att in load_sample():
            for pos in range(att.n_layers):
                probs.append((att.queries[pos], att.keys[pos], att.values[pos], att.scale,
                              None))
        yield "MiniLM-L6 sample", int(np.mean([p[1].shape[1] for p in probs])), probs
        return
    ids = model.encode(corpus_text())
    cls_, body, sep = ids[0], ids[1:-1], ids[-1]
    for n in (128,) if quick else (128, 256):
        probs = []
        for start in (0, 400, 800):
            chunk = body[start : start + n - 2]
            if len(chunk) != n - 2:
                continue
            att = model.attention([cls_, *chunk, sep])
            rows = np.arange(0, n, max(1, n // 32))
            for pos in range(att.n_layers):
                probs.append((att.queries[pos][:, rows], att.keys[pos], att.values[pos],
                              att.scale, None))
        if probs:
            yield "MiniLM-L6 (live)", n, probs


def real_cases(quick: bool) -> Iterator[tuple]:
    """Real attention: MiniLM windows and, if installed, SmolLM2 prefixes."""
    yield from _minilm_cases(quick)
    try:
        from certattn.models import load_smollm2

        model = load_smollm2()
    except Exception as exc:  # package not installed
        print(f"(SmolLM2 skipped: {exc})", file=sys.stderr)
        return
    text = Path(__file__).with_name("search_text.txt")
    body = text.read_text() if text.exists() else _licence_text()
    layers = [3, 15] if quick else [0, 3, 8, 15, 22, 29]
    att = model.attention(body, layers=layers)
    for n in (256,) if quick else (128, 256, 1024):
        if att.n_tokens < n:
            continue
        rows = np.arange(n // 2, n, max(1, (n // 2) // 32))
        mask = att.mask[np.ix_(rows, np.arange(n))]
        probs = [
            (att.queries[i][:, rows], att.keys[i][:, :n], att.values[i][:, :n], att.scale, mask)
            for i in range(len(layers))
        ]
        yield "SmolLM2-135M (causal)", n, probs


def _licence_text() -> str:
    import sysconfig

    for base in (sysconfig.get_paths()["stdlib"], sys.base_prefix):
        p = Path(base) / "LICENSE.txt"
        if p.exists():
            return p.read_text()[:8000]
    return " ".join(["The quick brown fox jumps over the lazy dog."] * 300)


def run(cases: Iterator[tuple], eps_list: tuple[float, ...]) -> list[dict]:
    rows = []
    for name, n, probs in cases:
        for eps in eps_list:
            acc: dict[str, list[np.ndarray]] = {}
            for q, k, v, scale, mask in probs:
                kk = k if q.ndim == 2 else np.repeat(k, q.shape[0] // k.shape[0], axis=0)
                lg = _logits(q, kk, scale, mask)
                for key, val in measure(q, k, v, eps, scale=scale, mask=mask, logits=lg).items():
                    acc.setdefault(key, []).append(val)
            cat = {key: np.concatenate(val).astype(np.float64) for key, val in acc.items()}
            row = {
                "dataset": name,
                "n": n,
                "eps": eps,
                "queries": int(cat["floor"].size),
                "checked": int(cat["checked"].sum()),
                "floor": float(cat["floor"].mean()),
                "visible": float(cat["visible"].mean()),
                "paper": PAPER.get((n, eps)) if "bert" in name else None,
            }
            for label, _, _ in SEARCHES:
                row[label] = float(cat[label].mean())
                row[label + "_scored"] = float(cat[label + "_scored"].mean())
                row[label + "_read"] = float(cat[label + "_read"].mean())
                row[label + "_read_max"] = float(cat[label + "_read"].max())
                row[label + "_kv"] = float(cat[label + "_kv"].mean())
            row["ours_over_mc_max"] = float(np.max(cat["ours"] / cat["mc"]))
            row["tree_over_mc_max"] = float(np.max(cat["tree"] / cat["mc"]))
            row["frac_ours_above_mc"] = float(np.mean(cat["ours"] > cat["mc"]))
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


HEADER = (
    "| dataset | n (visible) | eps | floor k_eps | MC-Search | ours | tree | gap | "
    "quant b=2 | quant b=4 | quant b=8 | paged b=4 | quant4/floor | quant8/floor |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
"""Keys scored per query (mean), and in brackets bytes read over dense float16 keys."""


def _fmt(r: dict) -> str:
    cells = [f"{r[lab + '_scored']:.1f} ({r[lab + '_read']:.2f})" for lab, _, _ in SEARCHES]
    return (
        f"| {r['dataset']} | {r['n']} ({r['visible']:.0f}) | {r['eps']} | {r['floor']:.1f} | "
        + " | ".join(cells)
        + f" | {r['quant4_scored'] / r['floor']:.2f} | {r['quant8_scored'] / r['floor']:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (n 128, 256; 2 eps)")
    ap.add_argument("--real", action="store_true", help="add real model attention")
    ap.add_argument("--only-real", action="store_true", help="real model attention only")
    ap.add_argument("--eps", type=float, nargs="+", default=None, help="budgets to run")
    ap.add_argument("--queries", type=int, default=None, help="queries per problem")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    sizes = (128, 256) if args.quick else SIZES
    eps_list = tuple(args.eps) if args.eps else ((0.01, 0.1) if args.quick else EPS)
    m = args.queries or (32 if args.quick else 64)
    reps = 1 if args.quick else 2
    t0 = time.time()
    print("Keys scored per query (mean) and, in brackets, bytes read / dense float16 keys.")
    print()
    print(HEADER)
    rows = [] if args.only_real else run(synthetic_cases(sizes, m, reps), eps_list)
    if args.real or args.only_real:
        rows += run(real_cases(args.quick), eps_list)
    else:
        print("| real models | - | - | pending (run with --real) |" + " |" * 10)
    for (n, eps), scored in PAPER.items():
        print(
            f"| paper: bert-base-uncased (reported, not re-measured) | {n} | {eps} | - | "
            f"{scored} of {n} ({n / scored:.1f}x fewer) |" + " |" * 9
        )
    print()
    print("Bytes read over dense attention: keys only (decision traffic, as in the table "
          "above) / keys and values (the whole attention, float16 K and V).")
    print()
    print("| dataset | n | eps | " + " | ".join(lab for lab, _, _ in SEARCHES) + " |")
    print("|---|---|---|" + "---|" * len(SEARCHES))
    for r in rows:
        print(f"| {r['dataset']} | {r['n']} | {r['eps']} | " + " | ".join(
            f"{r[lab + '_read']:.2f} / {r[lab + '_kv']:.2f}" for lab, _, _ in SEARCHES) + " |")
    mc = np.array([r["mc"] for r in rows])
    ours = np.array([r["ours"] for r in rows])
    tree = np.array([r["tree"] for r in rows])
    floor = np.array([r["floor"] for r in rows])
    q4 = np.array([r["quant4_scored"] for r in rows])
    q8 = np.array([r["quant8_scored"] for r in rows])
    print()
    print(
        f"{len(rows)} configurations, {sum(r['checked'] for r in rows):,} certificates "
        f"checked sound against the exact tail; mean cost MC {mc.mean():.1f}, ours "
        f"{ours.mean():.1f}, floor {floor.mean():.1f}; mean ours/MC {np.mean(ours / mc):.3f}, "
        f"worst ours/MC {np.max(ours / mc):.3f}; mean tree/MC {np.mean(tree / mc):.3f}; keys "
        f"scored over the floor: quant b=4 mean {np.mean(q4 / floor):.2f} (worst "
        f"{np.max(q4 / floor):.2f}), b=8 mean {np.mean(q8 / floor):.2f} (worst "
        f"{np.max(q8 / floor):.2f}); {time.time() - t0:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
