"""Llama-family decoders (Llama, Mistral, Qwen2) in numpy, from GGUF or safetensors.

One forward for every file: token embedding, ``n_layers`` x (RMSNorm, grouped-query
attention with RoPE (half-split rotation) and a causal mask, residual, RMSNorm, SwiGLU
MLP, residual), final RMSNorm, output head (tied to the embedding when the file has none).
Architecture, head counts, GQA groups, RoPE base and linear scaling and the RMSNorm eps
come from the file's own metadata.  Weights are held in float32 with Hugging Face row
order: GGUF files written for llama.cpp (arch ``llama``/``mistral``) store the q and k rows
permuted for its adjacent-pair rotation, which is undone at load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from certattn.errors import InputError
from certattn.models._attend import FORWARD_CHUNK_ELEMS, attend
from certattn.models._files import (
    Fields,
    ModelFileError,
    as_float,
    as_int,
    check_finite,
    token_ids,
)
from certattn.models._numerics import apply_rope, rms_norm, silu
from certattn.models._types import ModelAttention

__all__ = ["Llama", "LlamaConfig"]

GGUF_ARCHS = ("llama", "mistral", "qwen2")
"""GGUF ``general.architecture`` values this forward runs."""
HF_LLAMA_TYPES = ("llama", "mistral", "qwen2")
"""``config.json`` ``model_type`` values of the Llama family."""


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    Attributes
    ----------
    arch : str
        ``"llama"``, ``"mistral"`` or ``"qwen2"``.
    n_layers, n_heads, n_kv_heads, width, head_dim, ffn : int
        Layers, query heads, key/value heads (GQA), model width, head dimension,
        feed-forward width.
    rope_base : float
        RoPE frequency base (``rope_theta``).
    rope_linear : float
        Linear RoPE scaling factor (positions are divided by it); 1 without scaling.
    rms_eps : float
        RMSNorm epsilon.
    context : int
        Maximum positions the model was trained for.
    qkv_bias : bool
        q/k/v projections have biases (Qwen2).
    sliding_window : int or None
        Mistral's sliding attention window, when the file sets one.
    """

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    width: int
    head_dim: int
    ffn: int
    rope_base: float
    rope_linear: float
    rms_eps: float
    context: int
    qkv_bias: bool
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for field in ("n_layers", "n_heads", "width", "head_dim", "ffn", "context"):
            if getattr(self, field) < 1:
                raise ModelFileError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"{self.n_heads} query heads cannot share {self.n_kv_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise ModelFileError(f"RoPE needs an even head dimension, got {self.head_dim}")

    @property
    def kv_head(self) -> np.ndarray:
        """``(n_heads,)`` key/value head of each query head."""
        return np.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)


def rope_tables_scaled(
    n: int, dim: int, base: float, linear: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """RoPE cos/sin tables (half-split layout, float32) with linear position scaling.

    With ``linear == 1`` this is :func:`certattn.models._numerics.rope_tables` bit for bit.

    Returns
    -------
    cos, sin : numpy.ndarray
        ``(n, dim)`` each.
    """
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    pos = np.arange(n, dtype=f32)
    if linear != 1.0:
        pos = pos / f32(linear)
    angles = pos[:, None] * inv_freq.astype(f32)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (adjacent pairs -> half-split halves).

    llama.cpp's converter stores, within each head, row ``2i`` = original row ``i`` and
    row ``2i+1`` = original row ``i + d/2``; this restores the original order so the
    half-split rotation (Hugging Face ``rotate_half``) applies.  Works on 1-D biases too.
    """
    rows = w.shape[0]
    d = rows // n_heads
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of :func:`unpermute_rope_rows`)."""
    rows = w.shape[0]
    d = rows // n_heads
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, d // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


_LAYER = re.compile(r"blk\.([0-9]+)\.")


def _layer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer tensor (suffix after ``blk.{i}.``), biases included."""
    q, kv, w = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.width
    return {
        "attn_norm.weight": (w,), "ffn_norm.weight": (w,),
        "attn_q.weight": (q, w), "attn_k.weight": (kv, w), "attn_v.weight": (kv, w),
        "attn_output.weight": (w, q), "ffn_gate.weight": (c.ffn, w),
        "ffn_up.weight": (c.ffn, w), "ffn_down.weight": (w, c.ffn),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
    }


def _check_tensors(c: LlamaConfig, shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """Every tensor the forward reads is present with the shape the metadata implies.

    The declared layer count is first checked against the layers the tensors hold, so
    the work is bounded by the number of tensors, not by what the metadata declares.

    Raises
    ------
    ModelFileError
        Too many declared layers, a missing tensor, a tensor of another shape.
    """
    present = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    if c.n_layers > len(present):
        raise ModelFileError(
            f"{name}: declares {c.n_layers} layers but holds tensors of {len(present)} layers"
        )
    per_layer = _layer_shapes(c)
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}" for i in range(c.n_layers) for t in per_layer
        if c.qkv_bias or not t.endswith(".bias")
    ]
    missing = [t for t in required if t not in shapes]
    if missing:
        raise ModelFileError(
            f"{name}: missing tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    expect = {"output_norm.weight": (c.width,)}
    for i in range(c.n_layers):
        expect.update({f"blk.{i}.{t}": shape for t, shape in per_layer.items()})
    for key, shape in expect.items():
        if key in shapes and tuple(shapes[key]) != shape:
            raise ModelFileError(
                f"{name}: tensor {key} has shape {tuple(shapes[key])}, expected {shape} from "
                "the metadata"
            )
    for key in ("token_embd.weight", "output.weight"):
        got = tuple(shapes.get(key, (1, c.width)))
        if len(got) != 2 or got[0] < 1 or got[1] != c.width:
            raise ModelFileError(f"{name}: tensor {key} has shape {got}, expected (vocab, "
                                 f"{c.width})")


def _check_vocabulary(n_vocab: int, rows: int, name: str, what: str) -> None:
    """Refuse a vocabulary larger than the token embedding (its ids would index past it)."""
    if n_vocab > rows:
        raise ModelFileError(
            f"{name}: {what} has {n_vocab} tokens but the token embedding only {rows} rows "
            "(the vocabulary must fit)"
        )


def _kv_heads(get: Fields, key: str, default: int) -> int:
    """Key/value heads: one count, or a per-layer list of one repeated count."""
    v = get.value(key, default)
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ModelFileError(f"{get.where} {key}: per-layer key/value head counts "
                                 f"{v[:8]} are not supported")
        v = v[0]
    return as_int(v, f"{get.where} {key}", minimum=0)


def _token(get: Fields, key: str, rows: int) -> int | None:
    """A token id, or None when absent; outside the embedding's rows is refused."""
    v = get.optional_int(key, minimum=0)
    if v is not None and v >= rows:
        raise ModelFileError(f"{get.where} {key} {v} is outside the vocabulary of {rows}")
    return v


def _gguf_config(
    get: Fields, arch: str, tensors: dict[str, Any], file: str
) -> LlamaConfig:
    """The :class:`LlamaConfig` of a GGUF file's metadata (typed, ranged, consistent)."""
    heads = get.int(f"{arch}.attention.head_count")
    kv = _kv_heads(get, f"{arch}.attention.head_count_kv", heads)
    width = get.int(f"{arch}.embedding_length")
    head_dim = get.int(f"{arch}.attention.key_length", width // heads, minimum=0)
    rope_dim = get.int(f"{arch}.rope.dimension_count", head_dim, minimum=0)
    if rope_dim != head_dim:
        raise ModelFileError(
            f"{file}: partial RoPE ({rope_dim} of {head_dim} dimensions) is not supported"
        )
    scaling = get.value(f"{arch}.rope.scaling.type", "none")
    factor = get.float(f"{arch}.rope.scaling.factor", 1.0) or 1.0
    linear = _rope_linear(scaling, factor, file)
    if scaling == "none" and f"{arch}.rope.scale_linear" in get.values:
        linear = get.float(f"{arch}.rope.scale_linear", positive=True)
    up = tensors.get("blk.0.ffn_up.weight")
    return LlamaConfig(
        arch=arch,
        n_layers=get.int(f"{arch}.block_count"),
        n_heads=heads,
        n_kv_heads=kv,
        width=width,
        head_dim=head_dim,
        ffn=get.int(f"{arch}.feed_forward_length", up.shape[0] if up and up.shape else 0),
        rope_base=get.float(f"{arch}.rope.freq_base", 10000.0, positive=True),
        rope_linear=linear,
        rms_eps=get.float(f"{arch}.attention.layer_norm_rms_epsilon"),
        context=get.int(f"{arch}.context_length"),
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        sliding_window=get.optional_int(f"{arch}.attention.sliding_window"),
    )


class Llama:
    """Numpy forward of a Llama-family decoder that records its attention.

    Build it with :func:`certattn.models.load` (a name, a GGUF file or a Hugging Face
    folder), :meth:`from_gguf` or :meth:`from_hf`.

    Parameters
    ----------
    config : LlamaConfig
    weights : dict of str to numpy.ndarray
        float32 weights with GGUF names (``token_embd.weight``, ``blk.{i}.attn_q.weight``,
        ...), q/k rows in Hugging Face (half-split) order.
    tokenizer : tokenizers.Tokenizer or None
        Needed to run text (token ids work without).
    name : str
        Model name.
    add_special_tokens : bool
        Whether :meth:`encode` lets the tokenizer add BOS/EOS (Hugging Face folders: as
        the tokenizer says).
    eos_id : int, optional
        End-of-sequence token (stops :meth:`generate_greedy`).
    bos_id : int, optional
        Token :meth:`encode` prepends (GGUF files with ``add_bos_token``).
    metadata : dict, optional
        Provenance copied into every :class:`ModelAttention`.
    """

    causal = True

    def __init__(
        self,
        config: LlamaConfig,
        weights: dict[str, np.ndarray],
        tokenizer: Any,
        *,
        name: str,
        add_special_tokens: bool = False,
        eos_id: int | None = None,
        bos_id: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._bos = bos_id
        _check_tensors(config, {k: tuple(w.shape) for k, w in weights.items()}, name)
        for key, w in weights.items():
            if not np.isfinite(w).all():
                raise ModelFileError(f"{name}: tensor {key} holds NaN or infinite values")
        self.weights = weights
        self.tokenizer = tokenizer
        self.name = name
        self.add_special_tokens = add_special_tokens
        self.eos_id = eos_id
        self.metadata = dict(metadata or {}, model=name)
        self.n_layers = config.n_layers
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.width = config.width
        self.head_dim = config.head_dim
        self.rope_base = config.rope_base
        self.eps = config.rms_eps
        self.context = config.context
        self.kv_head = config.kv_head

    # ------------------------------------------------------------------ loaders

    @classmethod
    def from_gguf(cls, path: str | Path, *, name: str | None = None,
                  metadata: dict[str, Any] | None = None) -> Llama:
        """Load a GGUF file of the Llama family (arch ``llama``, ``mistral`` or ``qwen2``).

        The file is read by :func:`certattn.models._gguf.read_gguf`, which checks every
        declared size against the file before using it; the metadata's types and ranges
        are checked here, the tensors' shapes against the metadata before any is
        dequantised.

        Parameters
        ----------
        path : str or pathlib.Path
        name : str, optional
            Model name (default: the file's ``general.name``, else its file name).
        metadata : dict, optional
            Provenance.

        Returns
        -------
        Llama

        Raises
        ------
        ModelFileError
            Unsupported architecture, RoPE scaling or tokenizer; missing, mistyped or
            inconsistent metadata or tensor; a truncated or malformed file.
        """
        from certattn.models._gguf import read_gguf
        from certattn.models._gguf_tokenizer import gguf_bpe_tokenizer

        path = Path(path)
        gf = read_gguf(path)
        get = Fields(gf.metadata, f"{path.name}: GGUF metadata")
        arch = get.value("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{path.name}: general.architecture must be a string, got "
                                 f"{arch!r}")
        if arch not in GGUF_ARCHS:
            raise ModelFileError(
                f"{path.name}: unsupported GGUF architecture {arch!r} (supported: "
                f"{', '.join(GGUF_ARCHS)})"
            )
        config = _gguf_config(get, arch, gf.tensors, path.name)
        name = name or str(gf.metadata.get("general.name", path.name))
        _check_tensors(config, {k: t.shape for k, t in gf.tensors.items()}, name)
        weights: dict[str, np.ndarray] = {}
        for t in gf.tensors:
            w = gf.tensor(t)
            if arch in ("llama", "mistral"):  # llama.cpp permutes q/k rows for these
                if t.endswith(("attn_q.weight", "attn_q.bias")):
                    w = unpermute_rope_rows(w, config.n_heads)
                elif t.endswith(("attn_k.weight", "attn_k.bias")):
                    w = unpermute_rope_rows(w, config.n_kv_heads)
            weights[t] = np.ascontiguousarray(w)
        tokens = gf.metadata.get("tokenizer.ggml.tokens")
        _check_vocabulary(len(tokens) if isinstance(tokens, list) else 0,
                          weights["token_embd.weight"].shape[0], name, "the vocabulary")
        try:
            tokenizer = gguf_bpe_tokenizer(gf.metadata)
        except (KeyError, ValueError) as exc:
            tokenizer = _TokenizerError(f"{path.name}: no usable tokenizer ({exc})")
        rows = weights["token_embd.weight"].shape[0]
        eos = _token(get, "tokenizer.ggml.eos_token_id", rows)
        bos = _token(get, "tokenizer.ggml.bos_token_id", rows)
        add_bos = bool(gf.metadata.get("tokenizer.ggml.add_bos_token", False))
        return cls(
            config, weights, tokenizer, name=name, eos_id=eos,
            bos_id=bos if add_bos else None,
            metadata=dict(metadata or {}, file=str(path), format="gguf", arch=arch),
        )

    @classmethod
    def from_hf(cls, folder: str | Path, *, name: str | None = None) -> Llama:
        """Load a Hugging Face folder (``config.json``, ``*.safetensors``, ``tokenizer.json``).

        Parameters
        ----------
        folder : str or pathlib.Path
        name : str, optional
            Model name (default: ``_name_or_path`` of the config, else the folder name).

        Returns
        -------
        Llama

        Raises
        ------
        ModelFileError
            Unsupported ``model_type`` or RoPE scaling, missing file, key or tensor.
        """
        from certattn.models._hf import hf_config, hf_tensors, hf_tokenizer

        folder = Path(folder)
        cfg = hf_config(folder)
        kind = cfg.get("model_type")
        if kind not in HF_LLAMA_TYPES:
            raise ModelFileError(
                f"{folder.name}: model_type {kind!r} is not of the Llama family "
                f"({', '.join(HF_LLAMA_TYPES)})"
            )

        c = Fields(cfg, f"{folder.name}/config.json")
        heads = c.int("num_attention_heads")
        width = c.int("hidden_size")
        rs = cfg.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise ModelFileError(f"{c.where} rope_scaling must be an object or null, got "
                                 f"{rs!r:.40}")
        scaling = rs.get("rope_type", rs.get("type", "none")) if rs else "none"
        factor = as_float(rs.get("factor", 1.0) or 1.0, f"{c.where} rope_scaling.factor") \
            if rs else 1.0
        linear = _rope_linear(scaling, factor, folder.name)
        window = c.optional_int("sliding_window") if cfg.get("use_sliding_window", True) \
            else None
        config = LlamaConfig(
            arch=str(kind),
            n_layers=c.int("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=c.int("num_key_value_heads", cfg.get("num_key_value_heads") or heads,
                             minimum=0),
            width=width,
            head_dim=c.int("head_dim", cfg.get("head_dim") or width // heads, minimum=0),
            ffn=c.int("intermediate_size"),
            rope_base=c.float("rope_theta", 10000.0, positive=True),
            rope_linear=linear,
            rms_eps=c.float("rms_norm_eps"),
            context=c.int("max_position_embeddings"),
            qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=window,
        )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFileError(
                f"{folder.name}: hidden_act {cfg.get('hidden_act')!r} is not supported (silu)"
            )
        raw = hf_tensors(folder)
        weights: dict[str, np.ndarray] = {}
        names = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
        per_layer = {
            "input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
            "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
            "self_attn.o_proj.weight": "attn_output.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight",
        }
        for key, w in raw.items():
            if key in names:
                weights[names[key]] = w
            elif key.startswith("model.layers."):
                i, _, rest = key[len("model.layers."):].partition(".")
                if rest in per_layer:
                    weights[f"blk.{i}.{per_layer[rest]}"] = w
        if cfg.get("tie_word_embeddings", False):
            weights.pop("output.weight", None)
        try:
            tokenizer = hf_tokenizer(folder)
        except ModelFileError as exc:
            tokenizer = _TokenizerError(str(exc))
        model = cls(
            config, weights, tokenizer, name=name or str(cfg.get("_name_or_path") or folder.name),
            add_special_tokens=True, eos_id=_int_or_none(cfg.get("eos_token_id")),
            metadata={"file": str(folder), "format": "safetensors", "arch": str(kind)},
        )
        vocab = c.optional_int("vocab_size")
        _check_vocabulary(vocab or 0, weights["token_embd.weight"].shape[0], model.name,
                          f"{c.where} vocab_size (the vocabulary)")
        return model

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (BOS as the file says).

        Parameters
        ----------
        text : str

        Returns
        -------
        list of int
        """
        ids = list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids)
        return ([self._bos] if self._bos is not None else []) + ids

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

    def token_strings(self, ids: np.ndarray) -> tuple[str, ...]:
        """Token strings of ids (``"<id>"`` without a tokenizer)."""
        if isinstance(self.tokenizer, _TokenizerError):
            return tuple(f"<{int(t)}>" for t in ids)
        return tuple(str(self.tokenizer.id_to_token(int(t))) for t in ids)

    # ------------------------------------------------------------------ forward

    @property
    def _output(self) -> np.ndarray:
        return self.weights.get("output.weight", self.weights["token_embd.weight"])

    def _proj(self, h: np.ndarray, p: str, name: str, count: int) -> np.ndarray:
        n, d = h.shape[0], self.head_dim
        y = h @ self.weights[p + name + ".weight"].T
        bias = self.weights.get(p + name + ".bias")
        if bias is not None:
            y = y + bias
        return np.ascontiguousarray(y.reshape(n, count, d).transpose(1, 0, 2))

    def _layer(
        self, x: np.ndarray, i: int, cos: np.ndarray, sin: np.ndarray, chunk_elems: int,
        probs_out: np.ndarray | None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        w = self.weights
        p = f"blk.{i}."
        n = x.shape[0]
        h = rms_norm(x, w[p + "attn_norm.weight"], self.eps)
        q = np.ascontiguousarray(apply_rope(self._proj(h, p, "attn_q", self.n_heads), cos, sin))
        k = np.ascontiguousarray(
            apply_rope(self._proj(h, p, "attn_k", self.n_kv_heads), cos, sin)
        )
        v = self._proj(h, p, "attn_v", self.n_kv_heads)
        ctx = attend(q, k, v, self.kv_head, self.head_dim**-0.5, causal=True,
                     chunk_elems=chunk_elems, probs_out=probs_out)
        ctx = ctx.transpose(1, 0, 2).reshape(n, self.n_heads * self.head_dim)
        x = x + ctx @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], self.eps)
        gate = silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + gate @ w[p + "ffn_down.weight"].T
        return x, (q, k, v)

    def forward(
        self,
        text_or_ids: str | Sequence[int],
        *,
        layers: Sequence[int] | None = None,
        keep_values: bool = True,
        keep_hidden: bool = False,
        keep_probs: Sequence[int] = (),
        all_vocab_logits: bool = False,
        on_layer: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
        chunk_elems: int = FORWARD_CHUNK_ELEMS,
    ) -> dict[str, Any]:
        """Run the model; attention is computed one query chunk at a time.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text or token ids.
        layers : sequence of int, optional
            Model layers whose queries/keys/values are recorded (default: all; ``()`` for
            none).
        keep_values : bool
            Record the values too (else a ``(L, H_kv, n, 0)`` placeholder).
        keep_hidden : bool
            Also return the residual stream before each layer and the final normed output.
        keep_probs : sequence of int
            Layers whose float32 attention probabilities (as used by the forward) are
            returned (``(H, n, n)`` each: short inputs only).
        all_vocab_logits : bool
            Return vocabulary logits of every position instead of the last only.
        on_layer : callable, optional
            ``on_layer(layer, q, k, v)`` after each layer with its ``(H, n, d)`` queries
            and ``(H_kv, n, d)`` keys and values (after RoPE): streams the attention
            without recording it.
        chunk_elems : int
            Float32 logits per query chunk of the forward's attention.

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
        cos, sin = rope_tables_scaled(n, self.head_dim, self.rope_base,
                                      self.config.rope_linear)
        x = self.weights["token_embd.weight"][ids]
        qs, ks, vs, hidden, probs = [], [], [], [], {}
        for i in range(self.n_layers):
            if keep_hidden:
                hidden.append(x)
            p_out = np.empty((self.n_heads, n, n), np.float32) if i in keep_probs else None
            with np.errstate(all="ignore"):  # checked just below, in one line
                x, (q, k, v) = self._layer(x, i, cos, sin, chunk_elems, p_out)
            check_finite(self.name, f"layer {i}", x, q, k, v)
            if i in record:
                qs.append(q)
                ks.append(k)
                vs.append(v if keep_values else v[..., :0])
            if p_out is not None:
                probs[i] = p_out
            if on_layer is not None:
                on_layer(i, q, k, v)
        with np.errstate(all="ignore"):
            x = rms_norm(x, self.weights["output_norm.weight"], self.eps)
            vocab_logits = (x if all_vocab_logits else x[-1]) @ self._output.T
        check_finite(self.name, "the output head", vocab_logits)
        if keep_hidden:
            hidden.append(x)
        return {
            "attention": self._record(ids, record, qs, ks, vs, keep_values,
                                      text_or_ids if isinstance(text_or_ids, str) else ""),
            "vocab_logits": vocab_logits.astype(np.float32, copy=False),
            "hidden": hidden,
            "probs": probs,
        }

    def _record(
        self, ids: np.ndarray, layers: Sequence[int], qs: Sequence[np.ndarray],
        ks: Sequence[np.ndarray], vs: Sequence[np.ndarray], keep_values: bool = True,
        text: str = "",
    ) -> ModelAttention:
        """The :class:`ModelAttention` of :meth:`forward`: token ids ``ids``, recorded model
        ``layers`` and their ``(H, n, d)`` queries and ``(H_kv, n, d)`` keys and values
        (after RoPE; values ``(H_kv, n, 0)`` without ``keep_values``)."""
        n, d = int(ids.size), self.head_dim
        dv = d if keep_values else 0
        return ModelAttention.from_qkv(
            model=self.name,
            tokens=self.token_strings(ids),
            token_ids=ids,
            layers=np.array(list(layers), dtype=np.int64),
            queries=np.stack(qs) if len(qs) else np.zeros((0, self.n_heads, n, d), np.float32),
            keys=np.stack(ks) if len(ks) else np.zeros((0, self.n_kv_heads, n, d), np.float32),
            values=(np.stack(vs) if len(vs)
                    else np.zeros((0, self.n_kv_heads, n, dv), np.float32)),
            kv_head=self.kv_head,
            causal=True,
            scale=d**-0.5,
            metadata=dict(self.metadata, text=text, n_model_layers=self.n_layers),
        )

    def attention(
        self, text_or_ids: str | Sequence[int], *, layers: Sequence[int] | None = None,
        keep_values: bool = True,
    ) -> ModelAttention:
        """Attention tensors (queries, keys, values; no logits) of one sequence.

        Parameters
        ----------
        text_or_ids : str or sequence of int
            Text or token ids (at most the model's context).
        layers : sequence of int, optional
            Model layers to record (default: all).
        keep_values : bool
            Record the values.

        Returns
        -------
        ModelAttention
            Causal; ``kv_head = h // (H / H_kv)``; ``scale = 1/sqrt(d)``; queries and keys
            after RoPE.
        """
        return self.forward(text_or_ids, layers=layers, keep_values=keep_values)["attention"]

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
            raise InputError(
                f"{self.name}: need 1 to {self.context} tokens (its context), got {len(ids)}"
            )
        w = self.config.sliding_window
        if w is not None and len(ids) > w:
            raise InputError(
                f"{self.name}: sliding-window attention ({w} keys) is not supported; "
                f"give at most {w} tokens"
            )
        return token_ids(ids, self.weights["token_embd.weight"].shape[0], self.name,
                         from_text=isinstance(text_or_ids, str))


def _rope_linear(kind: Any, factor: float, where: str) -> float:
    if not isinstance(kind, str):
        raise ModelFileError(f"{where}: RoPE scaling type must be a string, got {kind!r:.40}")
    if kind in ("none", "default", ""):
        return 1.0
    if kind == "linear":
        if not factor > 0:
            raise ModelFileError(f"{where}: linear RoPE scaling factor must be > 0, got {factor}")
        return float(factor)
    raise ModelFileError(
        f"{where}: RoPE scaling type {kind!r} is not supported (only linear scaling)"
    )


def _int_or_none(v: Any) -> int | None:
    """A token id from a config (an int, or the first of a list); anything else is None."""
    if isinstance(v, list):
        v = v[0] if v else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class _TokenizerError:
    """Stands in for a tokenizer that could not be built: raises on use, in one line."""

    def __init__(self, message: str) -> None:
        self.message = message

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelFileError(f"{self.message}; pass token ids instead of text")

    decode = encode
    id_to_token = encode
