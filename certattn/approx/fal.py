r"""The premise of FAL (First Attentions Last, NeurIPS 2025), measured on real models.

FAL feeds the first block's attention (MHA) output to the MLP of every later block in
place of that block's own attention output; its motivation is that the first attention
output is similar to later attention outputs and MLP inputs. This module measures that
similarity per layer :math:`l`:

* linear CKA (Kornblith et al. 2019) on token-centred features :math:`X, Y` (``n x p``):

  .. math:: \mathrm{CKA}(X, Y) = \frac{\|Y^\top X\|_F^2}{\|X^\top X\|_F\,\|Y^\top Y\|_F};

* the mean cosine over tokens, :math:`\frac1n \sum_t \cos(x_t, y_t)` (uncentred);

between :math:`A_0` (the first layer's attention output, after the output projection) and
:math:`A_l` (each later attention output), and between :math:`A_0` and :math:`M_l`, the
MLP input of block :math:`l`: what its MLP reads -- ``RMSNorm(x_l + A_l)`` in Llama
(SmolLM2), ``LayerNorm(x_l + A_l)`` in BERT (MiniLM, post-norm) -- and the residual sum
:math:`x_l + A_l` before that norm.

The signals come from :func:`layer_signals`, a small forward of our own that re-runs the
blocks from the weights the model objects expose (``model.weights``, the
``certattn.models`` naming of each architecture) without editing
:mod:`certattn.models`; it records the per-layer queries, keys and values too, and the
tests check them against the model's own :class:`~certattn.models.ModelAttention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import InputError, check_finite

__all__ = ["LayerSignals", "fal_profile", "layer_signals", "linear_cka", "mean_cosine"]

_F32 = np.float32


def linear_cka(x: Any, y: Any) -> float:
    r"""Linear CKA of two representations of the same ``n`` tokens.

    .. math:: \mathrm{CKA}(X, Y) = \|\tilde Y^\top \tilde X\|_F^2 /
              (\|\tilde X^\top \tilde X\|_F \|\tilde Y^\top \tilde Y\|_F),
              \quad \tilde X = X - \mathbf 1 \bar x^\top.

    Invariant to orthogonal transforms and isotropic scaling of either argument; 1 when
    :math:`Y = X`; in ``[0, 1]``. Computed in float64 with the ``n x n`` Gram matrices
    when ``n`` is smaller than the feature dimensions, on inputs scaled to largest magnitude
    1 before and after centring (so no scale of the inputs overflows or underflows).

    Parameters
    ----------
    x : array_like
        ``(n, p)``, finite.
    y : array_like
        ``(n, p')``, finite.

    Returns
    -------
    float
        NaN when either centred representation is zero.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise InputError(f"CKA needs (n, p) and (n, p') arrays, got {x.shape} and {y.shape}")
    x, y = _centred(x, "x"), _centred(y, "y")
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        gx, gy = x @ x.T, y @ y.T
        num = float(np.sum(gx * gy))
        den = float(np.linalg.norm(gx) * np.linalg.norm(gy))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den if den > 0 else float("nan")


def _centred(a: np.ndarray, name: str) -> np.ndarray:
    """Token-centred ``a`` (checked finite), scaled to largest magnitude 1 before and after
    centring (CKA is invariant to both scalings)."""
    a = _unit_max(a, name)
    return _unit_max(a - a.mean(axis=0))


def _unit_max(a: np.ndarray, name: str | None = None, axis: int | None = None) -> np.ndarray:
    """``a`` divided by its largest magnitude (over ``axis``; rows or the whole array) where
    that is positive: CKA and cosine are invariant to it, and entries in ``[-1, 1]`` keep
    every product and sum of squares clear of overflow and underflow.  ``name``: check
    that ``a`` is finite first."""
    if name is not None:
        check_finite(a, np, name)
    m = np.max(np.abs(a), axis=axis, keepdims=True) if a.size else np.zeros((1,) * a.ndim)
    return a / np.where(m > 0, m, 1.0)


def mean_cosine(x: Any, y: Any) -> float:
    r"""Mean over tokens of :math:`\cos(x_t, y_t) = x_t\cdot y_t / (|x_t||y_t|)`.

    Each token's vectors are scaled by their largest magnitude first (the cosine is
    invariant to it), so no scale of the inputs overflows or underflows.

    Parameters
    ----------
    x, y : array_like
        ``(n, p)`` each, finite.

    Returns
    -------
    float
        A token where either vector is zero counts as cosine 0.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise InputError(f"cosine needs two (n, p) arrays of one shape, got {x.shape}, {y.shape}")
    check_finite(x, np, "x")
    check_finite(y, np, "y")
    x, y = _unit_max(x, axis=1), _unit_max(y, axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(np.sum(x * y, axis=1) / np.where(den > 0, den, np.inf)))


@dataclass(frozen=True)
class LayerSignals:
    """Per-layer signals of one forward.

    Attributes
    ----------
    model : str
        ``"llama"`` or ``"bert"``.
    token_ids : numpy.ndarray
        ``(n,)``.
    attn_out : numpy.ndarray
        ``(L, n, width)`` float32, attention output after the output projection.
    mlp_in : numpy.ndarray
        ``(L, n, width)`` float32, what the MLP reads (normed residual).
    residual : numpy.ndarray
        ``(L, n, width)`` float32, ``x_l + A_l`` before the norm.
    queries, keys, values : list of numpy.ndarray
        Per layer ``(H, n, d)`` / ``(H_kv, n, d)`` (after RoPE for Llama), for checks.
    """

    model: str
    token_ids: np.ndarray
    attn_out: np.ndarray
    mlp_in: np.ndarray
    residual: np.ndarray
    queries: list[np.ndarray]
    keys: list[np.ndarray]
    values: list[np.ndarray]


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + _F32(eps)))


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    c = x - x.mean(axis=-1, keepdims=True)
    return c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + _F32(eps)) * w + b


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """``(H, n, d)`` heads -> ``(n, H d)`` context, float32 softmax."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * _F32(q.shape[-1] ** -0.5)
    s = np.where(visible, s, -np.inf).astype(_F32)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    ctx = np.matmul(s, v)
    return ctx.transpose(1, 0, 2).reshape(q.shape[1], -1)


def _rope(x: np.ndarray, base: float) -> np.ndarray:
    n, d = x.shape[-2], x.shape[-1]
    inv = _F32(1.0) / (_F32(base) ** (np.arange(0, d, 2, dtype=_F32) / _F32(d)))
    ang = np.arange(n, dtype=_F32)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    half = d // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _llama(model: Any, ids: np.ndarray, n_layers: int) -> LayerSignals:
    w = model.weights
    n, d = ids.size, int(model.head_dim)
    nh, nkv = int(model.n_heads), int(model.n_kv_heads)
    kvh = np.arange(nh) // (nh // nkv)
    vis = np.tril(np.ones((n, n), dtype=bool))
    x = w["token_embd.weight"][ids]
    out: dict[str, list[np.ndarray]] = {a: [] for a in ("a", "m", "r", "q", "k", "v")}
    for i in range(n_layers):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], model.eps)

        def heads(name: str, count: int, hh: np.ndarray = h, pp: str = p) -> np.ndarray:
            return np.ascontiguousarray((hh @ w[pp + name].T).reshape(n, count, d)
                                        .transpose(1, 0, 2))

        q = _rope(heads("attn_q.weight", nh), model.rope_base)
        k = _rope(heads("attn_k.weight", nkv), model.rope_base)
        v = heads("attn_v.weight", nkv)
        a = _attend(q, k[kvh], v[kvh], vis) @ w[p + "attn_output.weight"].T
        r = x + a
        m = _rms(r, w[p + "ffn_norm.weight"], model.eps)
        gate = m @ w[p + "ffn_gate.weight"].T
        x = r + ((gate / (_F32(1) + np.exp(-gate))) * (m @ w[p + "ffn_up.weight"].T)) @ w[
            p + "ffn_down.weight"].T
        for key, val in zip("amrqkv", (a, m, r, q, k, v), strict=True):
            out[key].append(val)
    return _signals("llama", ids, out)


def _bert(model: Any, ids: np.ndarray, n_layers: int) -> LayerSignals:
    from scipy.special import erf

    w = model.weights
    n, nh = ids.size, int(model.n_heads)
    d = int(model.width) // nh
    e = "embeddings."
    x = _ln(w[e + "word_embeddings.weight"][ids] + w[e + "token_type_embeddings.weight"][0]
            + w[e + "position_embeddings.weight"][:n], w[e + "LayerNorm.weight"],
            w[e + "LayerNorm.bias"], model.eps)
    vis = np.ones((n, n), dtype=bool)
    out: dict[str, list[np.ndarray]] = {a: [] for a in ("a", "m", "r", "q", "k", "v")}

    def lin(z: np.ndarray, name: str) -> np.ndarray:
        return z @ w[name + ".weight"].T + w[name + ".bias"]

    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + t).reshape(n, nh, d).transpose(1, 0, 2)
                   for t in ("query", "key", "value"))
        a = lin(_attend(q, k, v, vis), p + "attention.output.dense")
        r = a + x
        m = _ln(r, w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"], model.eps)
        hdn = lin(m, p + "intermediate.dense")
        hdn = hdn * _F32(0.5) * (_F32(1) + erf(hdn * _F32(2**-0.5)).astype(_F32))
        x = _ln(lin(hdn, p + "output.dense") + m, w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"], model.eps)
        for key, val in zip("amrqkv", (a, m, r, q, k, v), strict=True):
            out[key].append(val)
    return _signals("bert", ids, out)


def _signals(kind: str, ids: np.ndarray, out: dict[str, list[np.ndarray]]) -> LayerSignals:
    return LayerSignals(
        model=kind, token_ids=ids,
        attn_out=np.stack(out["a"]).astype(_F32), mlp_in=np.stack(out["m"]).astype(_F32),
        residual=np.stack(out["r"]).astype(_F32),
        queries=out["q"], keys=out["k"], values=out["v"],
    )


def layer_signals(
    model: Any, text_or_ids: str | Sequence[int], *, n_layers: int | None = None
) -> LayerSignals:
    """Attention outputs and MLP inputs of every layer, from the model's weights.

    Parameters
    ----------
    model : certattn.models.SmolLM2 or certattn.models.MiniLM
        A loaded model (its ``weights`` dict, ``encode`` and size attributes are used).
    text_or_ids : str or sequence of int
        Text (encoded with ``model.encode``) or token ids; no padding.
    n_layers : int, optional
        Run only the first ``n_layers`` blocks (default: all).

    Returns
    -------
    LayerSignals

    Raises
    ------
    InputError
        A model whose weights follow neither naming; token ids that are not integers in
        ``0 .. vocabulary - 1`` (a negative id would silently read a row from the end);
        more tokens than a BERT model has positions.
    """
    names = getattr(model, "weights", {})
    if "blk.0.attn_q.weight" in names:
        run, embd = _llama, "token_embd.weight"
    elif "encoder.layer.0.attention.self.query.weight" in names:
        run, embd = _bert, "embeddings.word_embeddings.weight"
    else:
        raise InputError("layer_signals needs a certattn SmolLM2 (llama) or MiniLM (bert) model")
    raw = model.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    ids = _token_ids(raw, int(names[embd].shape[0]))
    if run is _bert and ids.size > names["embeddings.position_embeddings.weight"].shape[0]:
        raise InputError(f"{ids.size} tokens exceed the model's "
                         f"{names['embeddings.position_embeddings.weight'].shape[0]} positions")
    total = int(model.n_layers)
    n_layers = total if n_layers is None else min(int(n_layers), total)
    return run(model, ids, n_layers)


def _token_ids(raw: Any, vocab: int) -> np.ndarray:
    """Token ids as an int64 ``(n,)`` array: integers (not bools) in ``0 .. vocab - 1``."""
    items = list(raw)
    if not items:
        raise InputError("need at least one token")
    for pos, t in enumerate(items):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise InputError(f"token id at position {pos} is not an integer: {t!r}")
        if not 0 <= int(t) < vocab:
            raise InputError(f"token id {int(t)} at position {pos} is outside 0 .. {vocab - 1}")
    return np.asarray([int(t) for t in items], dtype=np.int64)


def fal_profile(signals: LayerSignals, *, first: int = 0) -> dict[str, list[float]]:
    """Similarity of the first attention output to each layer's attention output and MLP input.

    Parameters
    ----------
    signals : LayerSignals
    first : int
        The reference layer (FAL: 0).

    Returns
    -------
    dict
        Lists over layers ``l = 0 .. L-1``: ``cka_attn`` CKA(A_first, A_l), ``cka_mlp_in``
        CKA(A_first, M_l), ``cka_residual`` CKA(A_first, x_l + A_l), ``cos_attn``,
        ``cos_mlp_in``, ``cos_residual`` (mean cosines), and ``cka_own_mlp_in``
        CKA(A_l, M_l), the similarity FAL gives up by bypassing a block's own connection.
    """
    a0 = signals.attn_out[first]
    res: dict[str, list[float]] = {k: [] for k in (
        "cka_attn", "cka_mlp_in", "cka_residual", "cos_attn", "cos_mlp_in", "cos_residual",
        "cka_own_mlp_in")}
    for a, m, r in zip(signals.attn_out, signals.mlp_in, signals.residual, strict=True):
        res["cka_attn"].append(linear_cka(a0, a))
        res["cka_mlp_in"].append(linear_cka(a0, m))
        res["cka_residual"].append(linear_cka(a0, r))
        res["cos_attn"].append(mean_cosine(a0, a))
        res["cos_mlp_in"].append(mean_cosine(a0, m))
        res["cos_residual"].append(mean_cosine(a0, r))
        res["cka_own_mlp_in"].append(linear_cka(a, m))
    return res
