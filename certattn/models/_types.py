"""Result type shared by the live model forwards and the shipped sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = ["HeadAttention", "ModelAttention", "head_logits"]


class HeadAttention(NamedTuple):
    """The tensors of one attention head of one layer.

    Attributes
    ----------
    queries : numpy.ndarray
        ``(n_queries, d)`` float32.
    keys : numpy.ndarray
        ``(n_keys, d)`` float32 (the key/value head this query head reads).
    values : numpy.ndarray
        ``(n_keys, d)`` float32.
    logits : numpy.ndarray
        ``(n_queries, n_keys)`` float32, ``q.k * scale``; ``-inf`` where ``mask`` is False.
    mask : numpy.ndarray
        ``(n_queries, n_keys)`` bool, True where the key is visible to the query.
    """

    queries: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    logits: np.ndarray
    mask: np.ndarray


def head_logits(
    queries: np.ndarray,
    keys: np.ndarray,
    kv_head: np.ndarray,
    mask: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Scaled, masked pre-softmax logits of one layer.

    This is the single place where logits are formed, both inside the model forwards
    and when a :class:`ModelAttention` is rebuilt from stored queries and keys, so the
    two agree bit for bit.

    Parameters
    ----------
    queries : numpy.ndarray
        ``(heads, n_queries, d)`` float32.
    keys : numpy.ndarray
        ``(kv_heads, n_keys, d)`` float32.
    kv_head : numpy.ndarray
        ``(heads,)`` int, the key/value head each query head reads.
    mask : numpy.ndarray
        ``(n_queries, n_keys)`` bool, True where visible.
    scale : float
        Logit scale, ``1 / sqrt(d)``.

    Returns
    -------
    numpy.ndarray
        ``(heads, n_queries, n_keys)`` float32; ``-inf`` where ``mask`` is False.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = np.ascontiguousarray(np.asarray(keys, dtype=np.float32)[np.asarray(kv_head)])
    logits = np.matmul(q, k.transpose(0, 2, 1))
    logits *= np.float32(scale)
    logits[:, ~np.asarray(mask, dtype=bool)] = -np.inf
    return logits


@dataclass(frozen=True, eq=False)
class ModelAttention:
    """Attention tensors of one input sequence through a pretrained model.

    Let ``L`` be the number of recorded layers, ``H`` the number of query heads,
    ``H_kv`` the number of key/value heads, ``n`` the sequence length and ``d`` the
    head dimension. Query head ``h`` reads key/value head ``kv_head[h]``: for BERT
    (MiniLM) ``H_kv = H`` and ``kv_head = arange(H)``; for SmolLM2 (grouped-query
    attention, 9 query heads, 3 key/value heads) ``kv_head = [0,0,0,1,1,1,2,2,2]``.

    Attributes
    ----------
    model : str
        Model name, e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``.
    tokens : tuple of str
        The ``n`` token strings.
    token_ids : numpy.ndarray
        ``(n,)`` int64 token ids.
    layers : numpy.ndarray
        ``(L,)`` int64, the model layer index of each recorded layer (0-based).
    queries : numpy.ndarray
        ``(L, H, n, d)`` float32: the queries that form the logits (after the
        projection; after RoPE for SmolLM2).
    keys : numpy.ndarray
        ``(L, H_kv, n, d)`` float32: the keys that form the logits (after RoPE for SmolLM2).
    values : numpy.ndarray
        ``(L, H_kv, n, d)`` float32.
    kv_head : numpy.ndarray
        ``(H,)`` int64, the key/value head read by each query head.
    mask : numpy.ndarray
        ``(n, n)`` bool, ``mask[i, j]`` True when key ``j`` is visible to query ``i``
        (padding mask for BERT, causal mask for SmolLM2); the same for every layer and head.
    scale : float
        Logit scale ``1 / sqrt(d)``.
    logits : numpy.ndarray
        ``(L, H, n, n)`` float32, ``q.k * scale`` with ``-inf`` where ``mask`` is False.
    metadata : dict
        Free-form provenance (text, licence, ...).
    """

    model: str
    tokens: tuple[str, ...]
    token_ids: np.ndarray
    layers: np.ndarray
    queries: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    kv_head: np.ndarray
    mask: np.ndarray
    scale: float
    logits: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_qkv(
        cls,
        *,
        model: str,
        tokens: tuple[str, ...],
        token_ids: np.ndarray,
        layers: np.ndarray,
        queries: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        kv_head: np.ndarray,
        mask: np.ndarray,
        scale: float,
        metadata: dict[str, Any] | None = None,
    ) -> ModelAttention:
        """Build a record, computing the logits from queries and keys.

        Parameters
        ----------
        model, tokens, token_ids, layers, queries, keys, values, kv_head, mask, scale
            As the attributes of the class.
        metadata : dict, optional
            Provenance.

        Returns
        -------
        ModelAttention
        """
        queries = np.asarray(queries, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.float32)
        kv_head = np.asarray(kv_head, dtype=np.int64)
        mask = np.asarray(mask, dtype=bool)
        if queries.ndim != 4 or keys.ndim != 4 or queries.shape[0] != keys.shape[0]:
            raise ValueError("queries and keys must be (layers, heads, n, d) arrays")
        logits = np.empty((*queries.shape[:3], keys.shape[2]), dtype=np.float32)
        for i in range(queries.shape[0]):
            logits[i] = head_logits(queries[i], keys[i], kv_head, mask, scale)
        return cls(
            model=model,
            tokens=tuple(tokens),
            token_ids=np.asarray(token_ids, dtype=np.int64),
            layers=np.asarray(layers, dtype=np.int64),
            queries=queries,
            keys=keys,
            values=np.asarray(values, dtype=np.float32),
            kv_head=kv_head,
            mask=mask,
            scale=float(scale),
            logits=logits,
            metadata=dict(metadata or {}),
        )

    @property
    def n_layers(self) -> int:
        """Number of recorded layers ``L``."""
        return int(self.queries.shape[0])

    @property
    def n_heads(self) -> int:
        """Number of query heads ``H``."""
        return int(self.queries.shape[1])

    @property
    def n_tokens(self) -> int:
        """Sequence length ``n``."""
        return int(self.queries.shape[2])

    def layer_position(self, layer: int) -> int:
        """Position in the recorded arrays of model layer ``layer``.

        Parameters
        ----------
        layer : int
            Model layer index (0-based); negative values count from the last recorded layer.

        Returns
        -------
        int
        """
        if layer < 0:
            return range(self.n_layers)[layer]
        hits = np.flatnonzero(self.layers == layer)
        if hits.size == 0:
            raise KeyError(f"layer {layer} was not recorded (recorded: {self.layers.tolist()})")
        return int(hits[0])

    def head(self, layer: int, head: int) -> HeadAttention:
        """Tensors of one head, with the key/value head resolved.

        Parameters
        ----------
        layer : int
            Model layer index (see :meth:`layer_position`).
        head : int
            Query head index.

        Returns
        -------
        HeadAttention
        """
        pos = self.layer_position(layer)
        kv = int(self.kv_head[head])
        return HeadAttention(
            queries=self.queries[pos, head],
            keys=self.keys[pos, kv],
            values=self.values[pos, kv],
            logits=self.logits[pos, head],
            mask=self.mask,
        )

    def probs(self) -> np.ndarray:
        """Attention probabilities ``softmax(logits)`` over keys.

        Returns
        -------
        numpy.ndarray
            ``(L, H, n, n)`` float32, computed in float64 then rounded; exactly 0 where masked.
        """
        out = np.empty(self.logits.shape, dtype=np.float32)
        for i in range(self.n_layers):
            s = self.logits[i].astype(np.float64)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[i] = s
        return out
