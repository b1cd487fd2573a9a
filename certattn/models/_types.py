"""Result type shared by the live model forwards and the shipped sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

__all__ = ["HeadAttention", "ModelAttention", "head_logits", "visibility"]


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


def visibility(
    rows: slice, n_keys: int, *, causal: bool, key_valid: np.ndarray | None
) -> np.ndarray:
    """Boolean visibility of query rows ``rows`` over ``n_keys`` keys.

    Parameters
    ----------
    rows : slice
        Query positions (``start`` and ``stop`` given).
    n_keys : int
        Keys ``0..n_keys-1``.
    causal : bool
        Query ``i`` sees keys ``j <= i``.
    key_valid : numpy.ndarray, optional
        ``(n,)`` bool, False for padding keys (hidden from every query).

    Returns
    -------
    numpy.ndarray
        ``(len(rows), n_keys)`` bool.
    """
    q = np.arange(rows.start, rows.stop)
    vis = np.ones((q.size, n_keys), dtype=bool)
    if causal:
        vis &= np.arange(n_keys)[None, :] <= q[:, None]
    if key_valid is not None:
        vis &= np.asarray(key_valid, dtype=bool)[None, :n_keys]
    return vis


def head_logits(
    queries: np.ndarray,
    keys: np.ndarray,
    kv_head: np.ndarray,
    mask: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Scaled, masked pre-softmax logits of one layer (or of a block of query rows).

    This is the single place where float32 logits are formed, both inside the model
    forwards (one query chunk at a time) and when :attr:`ModelAttention.logits` is
    built from stored queries and keys, so the two agree.

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


def _mask_spec(mask: np.ndarray) -> tuple[bool, np.ndarray | None, np.ndarray | None]:
    """``(causal, key_valid, explicit)`` describing an ``(n, n)`` visibility mask."""
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[-1]
    if mask.ndim != 2 or mask.shape[0] != n:
        return False, None, mask
    if np.array_equal(mask, np.tril(np.ones((n, n), dtype=bool))):
        return True, None, None
    if (mask == mask[:1]).all():
        col = mask[0].copy()
        return False, (None if col.all() else col), None
    return False, None, mask


@dataclass(frozen=True, eq=False)
class ModelAttention:
    """Attention tensors of one input sequence through a pretrained model.

    Let ``L`` be the number of recorded layers, ``H`` the number of query heads,
    ``H_kv`` the number of key/value heads, ``n`` the sequence length and ``d`` the
    head dimension. Query head ``h`` reads key/value head ``kv_head[h]``: for BERT
    (MiniLM) ``H_kv = H`` and ``kv_head = arange(H)``; for SmolLM2 (grouped-query
    attention, 9 query heads, 3 key/value heads) ``kv_head = [0,0,0,1,1,1,2,2,2]``.

    Only queries, keys and values are stored (``O(L n d)``); the ``(n, n)`` mask and the
    ``(L, H, n, n)`` logits are computed on first access (and then cached), so long
    sequences should be certified from queries and keys (:func:`certattn.certify_scores`,
    :meth:`certify_layer`) and never touch :attr:`logits`.

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
        projection; after RoPE for Llama models).
    keys : numpy.ndarray
        ``(L, H_kv, n, d)`` float32: the keys that form the logits (after RoPE).
    values : numpy.ndarray
        ``(L, H_kv, n, d)`` float32 (``(L, H_kv, n, 0)`` when not recorded).
    kv_head : numpy.ndarray
        ``(H,)`` int64, the key/value head read by each query head.
    scale : float
        Logit scale ``1 / sqrt(d)``.
    causal : bool
        Query ``i`` sees keys ``j <= i`` (Llama models).
    key_valid : numpy.ndarray or None
        ``(n,)`` bool, False for padding keys hidden from every query; None: all valid.
    explicit_mask : numpy.ndarray or None
        An ``(n, n)`` mask that is neither causal nor a key mask (rare); else None.
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
    scale: float
    causal: bool = False
    key_valid: np.ndarray | None = None
    explicit_mask: np.ndarray | None = None
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
        scale: float,
        mask: np.ndarray | None = None,
        causal: bool = False,
        key_valid: np.ndarray | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ModelAttention:
        """Build a record from queries, keys and values (no logits are formed).

        Parameters
        ----------
        model, tokens, token_ids, layers, queries, keys, values, kv_head, scale
            As the attributes of the class.
        mask : numpy.ndarray, optional
            ``(n, n)`` bool visibility; a causal or key-padding mask is recognised and
            stored compactly.  Give either ``mask`` or ``causal`` / ``key_valid``.
        causal : bool
            Causal visibility.
        key_valid : numpy.ndarray, optional
            ``(n,)`` bool, False for padding keys.
        metadata : dict, optional
            Provenance.

        Returns
        -------
        ModelAttention
        """
        queries = np.asarray(queries, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.float32)
        if queries.ndim != 4 or keys.ndim != 4 or queries.shape[0] != keys.shape[0]:
            raise ValueError("queries and keys must be (layers, heads, n, d) arrays")
        explicit = None
        if mask is not None:
            if causal or key_valid is not None:
                raise ValueError("give mask, or causal / key_valid, not both")
            causal, key_valid, explicit = _mask_spec(mask)
        elif key_valid is not None:
            key_valid = np.asarray(key_valid, dtype=bool)
            key_valid = None if key_valid.all() else key_valid
        return cls(
            model=model,
            tokens=tuple(tokens),
            token_ids=np.asarray(token_ids, dtype=np.int64),
            layers=np.asarray(layers, dtype=np.int64),
            queries=queries,
            keys=keys,
            values=np.asarray(values, dtype=np.float32),
            kv_head=np.asarray(kv_head, dtype=np.int64),
            scale=float(scale),
            causal=bool(causal),
            key_valid=key_valid,
            explicit_mask=explicit,
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

    def mask_rows(self, rows: slice) -> np.ndarray:
        """Visibility of query rows ``rows`` (``(len(rows), n)`` bool)."""
        start, stop, _ = rows.indices(self.n_tokens)
        if self.explicit_mask is not None:
            return self.explicit_mask[start:stop]
        return visibility(
            slice(start, stop), self.n_tokens, causal=self.causal, key_valid=self.key_valid
        )

    @cached_property
    def mask(self) -> np.ndarray:
        """``(n, n)`` bool, ``mask[i, j]`` True when key ``j`` is visible to query ``i``.

        Padding mask for BERT, causal mask for Llama models; the same for every layer and
        head.  Built on first access (``n * n`` bytes).
        """
        return self.mask_rows(slice(None))

    @cached_property
    def logits(self) -> np.ndarray:
        """``(L, H, n, n)`` float32, ``q.k * scale`` with ``-inf`` where masked.

        Computed from the queries and keys on first access and cached: ``4 L H n^2``
        bytes, for short sequences only (use :meth:`head` or :meth:`certify_layer`).
        """
        out = np.empty((*self.queries.shape[:3], self.keys.shape[2]), dtype=np.float32)
        for i in range(self.n_layers):
            out[i] = head_logits(self.queries[i], self.keys[i], self.kv_head, self.mask,
                                 self.scale)
        return out

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

        The head's ``(n, n)`` logits are computed here (the full :attr:`logits` are not).

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
        if "logits" in self.__dict__:
            logits = self.logits[pos, head]
        else:
            logits = head_logits(
                self.queries[pos, head][None], self.keys[pos, kv][None], np.zeros(1, np.int64),
                self.mask, self.scale,
            )[0]
        return HeadAttention(
            queries=self.queries[pos, head],
            keys=self.keys[pos, kv],
            values=self.values[pos, kv],
            logits=logits,
            mask=self.mask,
        )

    def certify_layer(
        self,
        position: int,
        eps: float,
        *,
        query_rows: slice | None = None,
        policy: Any = None,
        block: int = 1024,
        chunk_elems: int | None = None,
    ) -> Any:
        """Per-query certificates of one recorded layer, from queries and keys only.

        Runs :func:`certattn.certify_scores` over blocks of ``block`` query rows (a causal
        block only scores its keys ``0..stop-1``), so memory stays ``O(chunk)`` and the
        ``(n, n)`` logits are never formed.  With the default policy the result is
        :func:`certattn.certify_topk` on the float64 scores ``scale * q k^T``, row by row,
        made a certificate for the exact scores (:mod:`certattn.attention`: the budget is
        shrunk and the bound widened by the rows' rounding slack, still at most ``eps``).

        Parameters
        ----------
        position : int
            Position of the layer in the recorded arrays (:meth:`layer_position`).
        eps : float
            TV budget of the default Top-k policy.
        query_rows : slice, optional
            Query rows to certify (step 1); default all.
        policy : policy object, optional
            Selection policy (default ``TopK(eps)``).
        block : int
            Query rows per call.
        chunk_elems : int, optional
            Passed to :func:`certattn.certify_scores`.

        Returns
        -------
        certattn.attention.ScoreCertificate
            Arrays of shape ``(H, rows)``; ``kept`` is None.
        """
        return certify_qk(
            self.queries[position], self.keys[position], eps, kv_head=self.kv_head,
            scale=self.scale, causal=self.causal, key_valid=self.key_valid,
            explicit_mask=self.explicit_mask, query_rows=query_rows, policy=policy,
            block=block, chunk_elems=chunk_elems,
        )

    def probs(self) -> np.ndarray:
        """Attention probabilities ``softmax(logits)`` over keys.

        Returns
        -------
        numpy.ndarray
            ``(L, H, n, n)`` float32, computed in float64 then rounded; exactly 0 where masked.
        """
        out = np.empty((*self.queries.shape[:3], self.keys.shape[2]), dtype=np.float32)
        for i in range(self.n_layers):
            s = head_logits(
                self.queries[i], self.keys[i], self.kv_head, self.mask, self.scale
            ).astype(np.float64)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[i] = s
        return out


def certify_qk(
    queries: np.ndarray,
    keys: np.ndarray,
    eps: float,
    *,
    kv_head: np.ndarray,
    scale: float,
    causal: bool,
    key_valid: np.ndarray | None = None,
    explicit_mask: np.ndarray | None = None,
    query_rows: slice | None = None,
    policy: Any = None,
    block: int = 1024,
    chunk_elems: int | None = None,
) -> Any:
    """Certificates of one layer's ``(H, n, d)`` queries against ``(H_kv, n, d)`` keys.

    See :meth:`ModelAttention.certify_layer`.

    Returns
    -------
    certattn.attention.ScoreCertificate
    """
    from ..attention import CHUNK_ELEMS, ScoreCertificate, certify_scores

    n = int(keys.shape[1])
    kv_head = np.asarray(kv_head)
    start, stop, step = (query_rows or slice(None)).indices(int(queries.shape[1]))
    if step != 1:
        raise ValueError("query_rows must be a contiguous slice (step 1)")
    if stop <= start:
        raise ValueError(f"query_rows {query_rows} selects no query row")
    # One head per call: certify_scores sizes its query chunks by chunk_elems / (heads *
    # keys), and a chunk of many rows of one head is several times faster (BLAS) than a
    # few rows of every head, for the same memory.
    per_head = []
    for h in range(int(queries.shape[0])):
        parts = []
        kh = keys[int(kv_head[h])][None]
        for i0 in range(start, stop, max(1, int(block))):
            i1 = min(stop, i0 + max(1, int(block)))
            # A causal block sees keys 0..i1-1 only; certify_scores aligns causal masks at
            # the end, so query row r of the block (position i0 + r) sees keys j <= i0 + r.
            n_keys = i1 if causal else n
            if explicit_mask is not None:
                mask = explicit_mask[i0:i1, :n_keys]
            elif key_valid is not None:
                mask = np.asarray(key_valid[:n_keys], dtype=bool)[None, :]
            else:
                mask = None
            parts.append(
                certify_scores(
                    queries[h, i0:i1][None], kh[:, :n_keys], eps, policy=policy, scale=scale,
                    mask=mask, causal=causal and explicit_mask is None,
                    chunk_elems=CHUNK_ELEMS if chunk_elems is None else int(chunk_elems),
                )
            )
        per_head.append(parts)

    def cat(name: str) -> np.ndarray | None:
        if getattr(per_head[0][0], name) is None:
            return None
        return np.concatenate(
            [np.concatenate([getattr(p, name) for p in parts], axis=-1) for parts in per_head],
            axis=0,
        )

    first = per_head[0][0]
    return ScoreCertificate(
        k=cat("k"), tail_upper=cat("tail_upper"), kl_upper=cat("kl_upper"),
        n_valid=cat("n_valid"), kept=None, scored=cat("scored"), policy=first.policy,
        eps=first.eps,
    )
