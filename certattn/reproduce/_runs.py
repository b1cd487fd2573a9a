"""Inputs of ``certattn reproduce``: the attention of the real models.

Loads MiniLM-L6 (live model when installed, else the shipped sample) and SmolLM2-135M
(when installed, else pending) on the built-in corpus into a :class:`_Run` per model,
computes the per-row statistics every section shares (exact ``k_eps`` at every budget of
:data:`EPS_GRID`, valid key counts, layer / head / sequence labels) and samples rows with
their location.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._summary import EPS_GRID, SEARCH_NS, Progress


@dataclass
class _Run:
    """One model's attention, as the sections consume it."""

    key: str
    label: str
    source: str
    attentions: list[Any]
    query_rows: slice | None
    causal: bool
    windows: dict[int, list[tuple[Any, slice]]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def layer_logits(self, a: Any, li: int) -> np.ndarray:
        """``(H, Q, K)`` logits of recorded layer position ``li`` of sequence ``a``.

        ``a.logits`` is computed from the queries and keys on first access (and cached):
        the reproduction runs at moderate lengths (1024 tokens by default).
        """
        x = a.logits[li]
        return x if self.query_rows is None else x[:, self.query_rows, :]

    def depth(self, layer: int) -> float:
        n = int(self.attentions[0].metadata.get("n_model_layers", 0) or 0)
        top = max(n - 1, int(max(int(v) for v in self.attentions[0].layers)), 1)
        return layer / top


def load_runs(
    models: Sequence[str], smollm2_tokens: int, quick: bool, note: Progress
) -> tuple[list[_Run], dict[str, dict[str, Any]]]:
    from .._corpus import PARAGRAPHS, corpus_text
    from ..models import load_sample

    runs, info = [], {}
    for key in models:
        if key not in ("minilm", "smollm2"):
            raise ValueError(f"unknown model {key!r}; choose from 'minilm', 'smollm2'")
        if key == "minilm":
            run = None
            reason = ""
            if not quick:
                try:
                    from ._approx import _minilm

                    m = _minilm()  # loaded once, shared with the sections
                except ImportError as exc:
                    reason = f"live MiniLM unavailable ({exc}); used the shipped sample"
                else:
                    texts = ["\n\n".join(PARAGRAPHS[i : i + 4]) for i in range(0, 12, 4)]
                    atts = [m.attention(t) for t in texts]
                    run = _Run(
                        key, "MiniLM-L6", f"all-MiniLM-L6-v2 (live, numpy forward) on "
                        f"{len(atts)} built-in English texts of "
                        f"{', '.join(str(a.n_tokens) for a in atts)} tokens, all query rows",
                        atts, None, False,
                    )
                    run.windows = _minilm_windows(m, corpus_text())
            if run is None:
                atts = load_sample()
                why = "quick mode" if quick else reason
                run = _Run(
                    key, "MiniLM-L6 (sample)", "shipped MiniLM sample (3 sentences, "
                    f"{', '.join(str(a.n_tokens) for a in atts)} tokens; layers 0, 2, 5); {why}",
                    atts, None, False,
                )
                run.windows = {int(a.n_tokens): [(a, slice(None))] for a in atts[:1]}
            for a in run.attentions:
                a.metadata.setdefault("n_model_layers", 6)
        else:
            if quick:
                info[key] = {"status": "pending", "reason": "skipped in quick mode"}
                continue
            note(f"loading {key} and running {smollm2_tokens} tokens", 0, 1)
            try:
                from ._approx import _smollm2

                m = _smollm2()  # loaded once, shared with the sections
            except ImportError as exc:
                info[key] = {"status": "pending", "reason": f"SmolLM2 unavailable: {exc}"}
                continue
            from ..budget import _sequences
            from ._approx import signals

            # The built-in prose, repeated when --tokens asks for more than it holds.
            ids = _sequences(m, key, None, smollm2_tokens)[0][0]
            # One forward: the layer signals the skyformer and fal sections use (kept) give
            # the queries, keys and values the model's own forward records, bit for bit.
            sig = signals(m, ids)
            a = m._record(sig.token_ids, range(m.n_layers), sig.queries, sig.keys, sig.values)
            a.metadata.setdefault("n_model_layers", m.n_layers)
            half = a.n_tokens // 2
            run = _Run(
                key, "SmolLM2-135M", f"SmolLM2-135M-Instruct Q4_1 (live, numpy forward, causal) "
                f"on {a.n_tokens} tokens of built-in English text; query rows {half}-"
                f"{a.n_tokens - 1}", [a], slice(half, None), True,
            )
            # Query position n - 1 sees exactly its n-key causal prefix (and n = 1024 for
            # the search section, where the context allows it).
            run.windows = {n: [(a, slice(n - 1, n))] for n in (*SEARCH_NS, 1024)
                           if n <= a.n_tokens}
        a0 = run.attentions[0]
        info[key] = {
            "status": "ok",
            "label": run.label,
            "model": a0.model,
            "source": run.source,
            "n_tokens": [a.n_tokens for a in run.attentions],
            "layers": [int(v) for v in a0.layers],
            "heads": a0.n_heads,
            "kv_heads": int(a0.keys.shape[1]),
            "causal": run.causal,
        }
        runs.append(run)
        note(f"loading {key}" + (f" and running {smollm2_tokens} tokens" if run.causal else ""),
             1, 1)
    return runs, info


def _minilm_windows(m: Any, text: str) -> dict[int, list[tuple[Any, slice]]]:
    """MiniLM on windows of exactly n tokens ([CLS] body [SEP]) at three offsets."""
    ids = m.encode(text)
    cls_, body, sep = ids[0], ids[1:-1], ids[-1]
    out: dict[int, list[tuple[Any, slice]]] = {}
    for n in SEARCH_NS:
        wins = []
        for start in (0, 400, 800):
            chunk = body[start : start + n - 2]
            if len(chunk) == n - 2:
                wins.append((m.attention([cls_, *chunk, sep]), slice(None)))
        if wins:
            out[n] = wins
    return out


def row_stats(run: _Run, note: Progress) -> None:
    """Exact k_eps per row at every eps of the grid (certify_topk), plus row labels."""
    from ..topk import certify_topk

    a0 = run.attentions[0]
    per_layer = len(a0.layers)
    total = per_layer * len(run.attentions)
    ks: list[list[np.ndarray]] = [[] for _ in EPS_GRID]
    nv_l, layer_l, head_l, seq_l = [], [], [], []
    done = 0
    for si, a in enumerate(run.attentions):
        for li in range(per_layer):
            x = run.layer_logits(a, li)
            for ei, e in enumerate(EPS_GRID):
                c = certify_topk(x, e)
                ks[ei].append(np.asarray(c.k, dtype=np.int32).ravel())
                if ei == 0:
                    nv_l.append(np.asarray(c.n_valid, dtype=np.int32).ravel())
            h, q = x.shape[:2]
            layer_l.append(np.full(h * q, int(a.layers[li]), dtype=np.int32))
            head_l.append(np.repeat(np.arange(h, dtype=np.int32), q))
            seq_l.append(np.full(h * q, si, dtype=np.int32))
            done += 1
            note(f"{run.key}: certify_topk at {len(EPS_GRID)} eps", done, total)
    run.stats = {
        "k": np.stack([np.concatenate(k) for k in ks]),  # (E, R)
        "n_valid": np.concatenate(nv_l),
        "layer": np.concatenate(layer_l),
        "head": np.concatenate(head_l),
        "seq": np.concatenate(seq_l),
    }


def sample_rows(
    run: _Run, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``count`` random rows: (logits (R, K) padded with -inf, layer, head, row index)."""
    st = run.stats
    total = st["layer"].size
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(total, size=min(count, total), replace=False))
    width = max(a.n_tokens for a in run.attentions)
    out = np.full((idx.size, width), -np.inf, dtype=np.float32)
    offsets = _row_offsets(run)
    for r, i in enumerate(idx):
        si, li, h, q = _locate(run, offsets, int(i))
        row = run.layer_logits(run.attentions[si], li)[h, q]
        out[r, : row.size] = row
    return out, st["layer"][idx], st["head"][idx], idx


def _row_offsets(run: _Run) -> list[tuple[int, int, int, int, int]]:
    """(start, seq, layer position, heads, queries) of each block of rows in ``stats``."""
    out, start = [], 0
    for si, a in enumerate(run.attentions):
        for li in range(len(a.layers)):
            h, q = run.layer_logits(a, li).shape[:2]
            out.append((start, si, li, h, q))
            start += h * q
    return out


def _locate(run: _Run, offsets: list, i: int) -> tuple[int, int, int, int]:
    for start, si, li, h, q in offsets:
        if start <= i < start + h * q:
            j = i - start
            return si, li, j // q, j % q
    raise IndexError(i)
