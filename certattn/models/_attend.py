"""The models' own attention ``softmax(q k^T * scale) v``, one query chunk at a time."""

from __future__ import annotations

import numpy as np

from certattn.models._numerics import softmax_rows
from certattn.models._types import head_logits, visibility

FORWARD_CHUNK_ELEMS = 1 << 22
"""Float32 logits held at once by a forward (16 MiB): ``heads * rows * keys``."""


def attend(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    kv_head: np.ndarray,
    scale: float,
    *,
    causal: bool,
    key_valid: np.ndarray | None = None,
    chunk_elems: int = FORWARD_CHUNK_ELEMS,
    probs_out: np.ndarray | None = None,
) -> np.ndarray:
    """Attention outputs of one layer, without holding the ``(H, n, n)`` logits.

    Each head's query rows are processed in chunks of about ``chunk_elems / n`` rows: each
    chunk forms its float32 logits (:func:`certattn.models._types.head_logits`, the same
    code that rebuilds :attr:`ModelAttention.logits`), takes the float32 softmax and
    multiplies by the values.  A causal chunk only reads keys ``0..stop-1`` (the later
    ones have probability exactly 0).  Peak extra memory is ``O(chunk_elems)``.

    Parameters
    ----------
    q : numpy.ndarray
        ``(H, n, d)`` float32 queries.
    k, v : numpy.ndarray
        ``(H_kv, n, d)`` float32 keys and values.
    kv_head : numpy.ndarray
        ``(H,)`` key/value head of each query head.
    scale : float
        Logit scale.
    causal : bool
        Causal visibility.
    key_valid : numpy.ndarray, optional
        ``(n,)`` bool, False for padding keys.
    chunk_elems : int
        Logits per chunk.
    probs_out : numpy.ndarray, optional
        ``(H, n, n)`` float32 array to receive the probabilities (checks only).

    Returns
    -------
    numpy.ndarray
        ``(H, n, d_v)`` float32.
    """
    heads, n = int(q.shape[0]), int(q.shape[1])
    kv_head = np.asarray(kv_head)
    out = np.empty((heads, n, v.shape[-1]), dtype=np.float32)
    # One head at a time, in chunks of many query rows: BLAS is several times faster on
    # (rows x d) @ (d x n) with many rows than on a few rows of every head.
    step = max(1, int(chunk_elems) // max(1, n))
    one = np.zeros(1, dtype=np.int64)
    for h in range(heads):
        kh = k[int(kv_head[h])][None]
        vh = v[int(kv_head[h])]
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            n_keys = i1 if causal else n
            vis = visibility(slice(i0, i1), n_keys, causal=causal, key_valid=key_valid)
            logits = head_logits(q[h : h + 1, i0:i1], kh[:, :n_keys], one, vis, scale)[0]
            probs = softmax_rows(logits)
            out[h, i0:i1] = probs @ vh[:n_keys]
            if probs_out is not None:
                probs_out[h, i0:i1, :n_keys] = probs
                probs_out[h, i0:i1, n_keys:] = 0.0
    return out
