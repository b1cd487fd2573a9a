"""Cost of certified search: paper-style MC-Search vs ours vs the floor (Theorem SEARCH-SOUND).

For every dataset, n and eps, one run measures per query

* MC-Search (``method="mc"``: k-means, ``ceil(sqrt(n))`` ball cells, seed 0),
* ours (``method="ours"``, the default: MC-Search's cells and order, stopped by the tighter
  ball-and-box score bounds and Bennett mass bounds, so never costlier than MC-Search),
* ours, hierarchical (``method="tree"``: MC-Search's cells split further by k-means where
  that removes enough scatter, refined best-first; cheaper on structured keys, below
  MC-Search on average but not guaranteed query by query),
* the floor: the exact minimal ``k_eps`` (:func:`certattn.certify_topk`); no certified
  search keeps fewer keys, so none scores fewer,

where cost = keys scored + cells bounded, and prints a markdown table of the means, with
ratios against the floor measured in the same run, plus the paper's numbers where they
apply (bert-base-uncased, eps = 0.01: 58.8 of 128 and 107.8 of 256 keys scored).  Every
certificate is re-checked against the exact full softmax (float64) while measuring.

Usage::

    python benchmarks/search_cost.py [--quick] [--real] [--json PATH] [--queries M]

``--real`` adds real attention: the shipped MiniLM sample (``certattn.models.load_sample``,
n = 41-53) and, when the model packages are installed, SmolLM2-135M on the Python licence
text (causal, GQA; queries are the last half of the rows).
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


def _check(res: object, logits: np.ndarray, eps: float) -> None:
    """Every certificate sound against the exact softmax (float64 reference)."""
    s = np.asarray(logits, dtype=np.float64)
    mx = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - mx)
    p /= p.sum(axis=-1, keepdims=True)
    kept = np.asarray(res.kept)
    tail = 1.0 - np.sum(np.where(kept, p, 0.0), axis=-1)
    bound = np.asarray(res.tail_upper)
    if np.any(tail > bound + 1e-12) or np.any(bound > eps):
        raise AssertionError("unsound certificate in the benchmark")


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
    """Per-query costs of MC-Search and ours, and the floor, on one problem."""
    out = {}
    for method in ("mc", "ours", "tree"):
        res = certified_search(queries, keys, values, eps, scale=scale, mask=mask, method=method)
        _check(res, logits, eps)
        out[method] = np.asarray(res.cost).reshape(-1)
        out[method + "_scored"] = np.asarray(res.scored).reshape(-1)
        out["visible"] = np.asarray(res.n_valid).reshape(-1)
    out["floor"] = np.asarray(certify_topk(logits, eps).k).reshape(-1)
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


def real_cases(quick: bool) -> Iterator[tuple]:
    """Real attention: the MiniLM sample and, if installed, SmolLM2 prefixes."""
    from certattn.models import load_sample

    probs = []
    for att in load_sample():
        for pos in range(att.n_layers):
            probs.append((att.queries[pos], att.keys[pos], att.values[pos], att.scale, None))
    yield "MiniLM-L6 sample", int(np.mean([p[1].shape[1] for p in probs])), probs
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
            rows.append(
                {
                    "dataset": name,
                    "n": n,
                    "eps": eps,
                    "queries": int(cat["floor"].size),
                    "mc": float(cat["mc"].mean()),
                    "mc_scored": float(cat["mc_scored"].mean()),
                    "ours": float(cat["ours"].mean()),
                    "ours_scored": float(cat["ours_scored"].mean()),
                    "tree": float(cat["tree"].mean()),
                    "tree_scored": float(cat["tree_scored"].mean()),
                    "floor": float(cat["floor"].mean()),
                    "visible": float(cat["visible"].mean()),
                    "ours_over_mc_max": float(np.max(cat["ours"] / cat["mc"])),
                    "tree_over_mc_max": float(np.max(cat["tree"] / cat["mc"])),
                    "frac_ours_above_mc": float(np.mean(cat["ours"] > cat["mc"])),
                    "paper": None,
                }
            )
            print(_fmt(rows[-1]), flush=True)
    return rows


HEADER = (
    "| dataset | n (visible) | eps | MC-Search cost (scored) | ours cost (scored) | "
    "floor k_eps | visible/floor | MC/floor | ours/floor | ours/MC (max per query) | "
    "tree cost (scored) | tree/MC (max) | paper (scored) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(r: dict) -> str:
    paper = "-"
    return (
        f"| {r['dataset']} | {r['n']} ({r['visible']:.0f}) | {r['eps']} | "
        f"{r['mc']:.1f} ({r['mc_scored']:.1f}) | "
        f"{r['ours']:.1f} ({r['ours_scored']:.1f}) | {r['floor']:.1f} | "
        f"{r['visible'] / r['floor']:.2f} | {r['mc'] / r['floor']:.2f} | "
        f"{r['ours'] / r['floor']:.2f} | "
        f"{r['ours'] / r['mc']:.3f} ({r['ours_over_mc_max']:.2f}) | "
        f"{r['tree']:.1f} ({r['tree_scored']:.1f}) | "
        f"{r['tree'] / r['mc']:.3f} ({r['tree_over_mc_max']:.2f}) | {paper} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (n 128, 256; 2 eps)")
    ap.add_argument("--real", action="store_true", help="add real model attention")
    ap.add_argument("--queries", type=int, default=None, help="queries per problem")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    sizes = (128, 256) if args.quick else SIZES
    eps_list = (0.01, 0.1) if args.quick else EPS
    m = args.queries or (32 if args.quick else 64)
    reps = 1 if args.quick else 2
    t0 = time.time()
    print(HEADER)
    rows = run(synthetic_cases(sizes, m, reps), eps_list)
    if args.real:
        rows += run(real_cases(args.quick), eps_list)
    else:
        print("| real models | - | - | pending (run with --real) | | | | | | | | | |")
    for (n, eps), scored in PAPER.items():
        print(
            f"| paper: bert-base-uncased (reported, not re-measured) | {n} | {eps} | "
            f"- ({scored}) | | | | | | | | | {scored} of {n} ({n / scored:.1f}x fewer) |"
        )
    mc = np.array([r["mc"] for r in rows])
    ours = np.array([r["ours"] for r in rows])
    tree = np.array([r["tree"] for r in rows])
    floor = np.array([r["floor"] for r in rows])
    print()
    print(
        f"mean over configurations: MC {mc.mean():.1f}, ours {ours.mean():.1f}, floor "
        f"{floor.mean():.1f}; mean ours/MC {np.mean(ours / mc):.3f}, worst configuration "
        f"ours/MC {np.max(ours / mc):.3f}, mean ours/floor {np.mean(ours / floor):.2f}; tree "
        f"{tree.mean():.1f}, mean tree/MC {np.mean(tree / mc):.3f}, worst {np.max(tree / mc):.3f}; "
        f"{time.time() - t0:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
