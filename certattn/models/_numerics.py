"""Small float32 building blocks of transformer forwards."""

from __future__ import annotations

import numpy as np

_F32 = np.float32


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance), float32.

    Parameters
    ----------
    x : numpy.ndarray
        ``(..., width)``.
    weight, bias : numpy.ndarray
        ``(width,)``.
    eps : float
        Added to the variance.

    Returns
    -------
    numpy.ndarray
    """
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + _F32(eps)) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, float32 (as Llama).

    Parameters
    ----------
    x : numpy.ndarray
        ``(..., width)``.
    weight : numpy.ndarray
        ``(width,)``.
    eps : float
        Added to the mean square.

    Returns
    -------
    numpy.ndarray
    """
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(ms + _F32(eps)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, float32.

    Parameters
    ----------
    x : numpy.ndarray

    Returns
    -------
    numpy.ndarray
    """
    from scipy.special import erf

    return x * _F32(0.5) * (_F32(1.0) + erf(x * _F32(1.0 / np.sqrt(2.0))).astype(_F32))


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU ``x * sigmoid(x)``, float32.

    Parameters
    ----------
    x : numpy.ndarray

    Returns
    -------
    numpy.ndarray
    """
    return x / (_F32(1.0) + np.exp(-x))


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32; ``-inf`` entries get probability 0.

    Parameters
    ----------
    logits : numpy.ndarray
        Every row must hold at least one finite entry.

    Returns
    -------
    numpy.ndarray
    """
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def rope_tables(n: int, dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine tables of rotary embeddings, half-split layout, float32.

    Parameters
    ----------
    n : int
        Number of positions ``0..n-1``.
    dim : int
        Rotated head dimension (even).
    base : float
        Frequency base.

    Returns
    -------
    cos, sin : numpy.ndarray
        ``(n, dim)`` each; columns ``i`` and ``i + dim/2`` share frequency ``base**(-2i/dim)``.
    """
    inv_freq = _F32(1.0) / (_F32(base) ** (np.arange(0, dim, 2, dtype=_F32) / _F32(dim)))
    angles = np.arange(n, dtype=_F32)[:, None] * inv_freq.astype(_F32)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x`` with half-split (``rotate_half``) rotary embeddings.

    Parameters
    ----------
    x : numpy.ndarray
        ``(heads, n, dim)``.
    cos, sin : numpy.ndarray
        ``(n, dim)`` from :func:`rope_tables`.

    Returns
    -------
    numpy.ndarray
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
