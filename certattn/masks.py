r"""Attention masks and head groupings, the same for every attention-level function.

* :func:`normalize_mask`: a boolean (True = visible) or additive (Hugging Face style) mask
  as ``(visible, bias)`` (and, on request, the finite fills that hide keys);
* :func:`hidden_mass`, :func:`hidden_tail`, :func:`hidden_error`: the exact mass of keys
  hidden by a finite fill, and what it adds to a certificate;
* :func:`kv_head_map`: grouped-query attention, the key/value head each query head reads.

Causal masks are aligned at the end (query ``i`` of ``Lq`` sees keys
``j <= i + Lk - Lq``, as with a key/value cache).

Which entries mask a key
------------------------
Boolean masks: False.  Additive masks: ``-inf``, and every finite entry at or below half
the mask dtype's most negative finite number (BERT and Hugging Face eager attention fill
padding with ``finfo(dtype).min``, e.g. ``-65504`` in float16 or ``-3.4e38`` in float32).
Such a key is *masked*: never kept, not counted in ``n_valid``, not a window or sink
position, and a query whose every key is masked is refused as fully masked.  Other finite
entries are biases added to the scores.

Hidden keys still count
-----------------------
A ``-inf`` entry gives its key exact probability 0; a finite fill does not: the exact
softmax of the given logits :math:`\sigma_j = \mathrm{scale}\,q\cdot k_j + b_j` gives a
*hidden* key :math:`j` (a finite fill the causal mask does not hide) the mass
:math:`e^{\sigma_j}/(Z + X)`, :math:`Z` the visible keys' sum and :math:`X` the hidden
keys'.  Usually :math:`e^{-3.4\cdot 10^{38}}`, but for scores :math:`65504` apart in a
float16 model, all of it.  Every certificate therefore covers it: for a kept set
:math:`K` of visible keys, :math:`p = P_V(K)` its mass among the visible keys and
:math:`r = X/Z`,

.. math::
    \tau_{\mathrm{full}} = 1 - \frac{p}{1 + r} = \frac{1 - p}{1 + r} + \frac{r}{1 + r}
    \le \tau_V + r, \qquad
    r \le h := \sum_{j\ \mathrm{hidden}} e^{\sigma_j - M},

:math:`M` the largest visible logit (:math:`Z \ge e^M`); and, since
:math:`\mathrm{Attn} - \mathrm{Attn}_V = \frac{r}{1 + r}(\mu_H - \mu_V)` with
:math:`\mu_H, \mu_V` the hidden and visible means of the values,

.. math::
    |\mathrm{Attn} - \mathrm{out}| \le |\mathrm{Attn}_V - \mathrm{out}|
    + \min(h, 1)\,\bigl(\max_{\mathrm{hidden}}|v_j| + \max_{\mathrm{visible}}|v_j|\bigr).

:func:`hidden_mass` computes a sound float64 upper bound of :math:`h` (never 0 when a
hidden key exists, as the exact mass is positive: each counts at least ``e^-700``;
``inf`` on overflow), :func:`hidden_tail`
and :func:`hidden_error` add it, rounded up.  Rows without hidden keys are left
untouched, so boolean and ``-inf`` masks certify exactly as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array import asarray_on, is_numpy, namespace
from ._fp import EXP_FLOOR, GAMMA_EXP, SMALLEST, U, add_up, scaled_norm, sum_gamma
from ._validate import InputError, exact_int

__all__ = ["hidden_error", "hidden_mass", "hidden_tail", "kv_head_map", "normalize_mask"]

Array = Any


def normalize_mask(
    mask: Any, *, xp: Any = None, device: Any = None, hidden: bool = False
) -> tuple[Array, ...]:
    """A boolean or additive attention mask as ``(visible, bias)`` (module docstring).

    * boolean: True = visible; ``bias`` is None;
    * floating (additive, as Hugging Face models use): an entry at or below half the
      dtype's most negative finite number (or ``-inf``) is masked; the other entries are
      added to the scores (``bias``, float64, 0 where masked).

    Parameters
    ----------
    mask : array
    xp, device : optional
        Namespace and device of the result (those of ``mask`` by default).
    hidden : bool
        Also return ``fill``: float64, the finite entries that mask a key (``-inf``
        elsewhere), or None where there are none (boolean masks, no finite fill).  Their
        keys keep an exact mass that certificates must cover (:func:`hidden_mass`).

    Returns
    -------
    (visible, bias) or (visible, bias, fill)

    Raises
    ------
    ValueError
        Integer masks, NaN or ``+inf`` entries.
    """
    if xp is None:
        xp, device = namespace(mask)
    m = asarray_on(mask, xp=xp, device=device)
    if m.dtype == xp.bool:
        return (m, None, None) if hidden else (m, None)
    m, lowest = _additive(m, xp)
    if bool(xp.any(xp.isnan(m))) or bool(xp.any(m == xp.inf)):
        raise InputError("additive mask contains NaN or +inf")
    visible = m > lowest / 2
    m64 = xp.astype(m, xp.float64)
    bias = xp.where(visible, m64, xp.zeros(m.shape, dtype=xp.float64, device=device))
    if not hidden:
        return visible, bias
    filled = ~visible & (m > -xp.inf)
    fill = None
    if bool(xp.any(filled)):
        fill = xp.where(filled, m64, xp.full(m.shape, -xp.inf, dtype=xp.float64, device=device))
    return visible, bias, fill


def _additive(m: Array, xp: Any) -> tuple[Array, float]:
    """An additive mask in a standard floating dtype, and its dtype's most negative number.

    NumPy arrays of ml_dtypes' formats (bfloat16, float8: kind 'V' to NumPy) become
    float32, which holds each of their values exactly; the threshold is their own.
    """
    if is_numpy(xp) and np.dtype(m.dtype).kind == "V" and "float" in np.dtype(m.dtype).name:
        import ml_dtypes

        return m.astype(np.float32), float(ml_dtypes.finfo(m.dtype).min)
    if not xp.isdtype(m.dtype, "real floating"):
        raise InputError(
            f"mask must be boolean (True = visible) or additive floating, got dtype {m.dtype}"
        )
    return m, float(xp.finfo(m.dtype).min)


def hidden_mass(
    raw: Array, fill: Array, hidden: Array, scores: Array, margin: Array, xp: Any
) -> Array:
    r"""Sound upper bound on :math:`h = \sum_{j\ \mathrm{hidden}} e^{\sigma_j - M}` per row.

    :math:`\sigma_j = \mathrm{scale}\,q\cdot k_j + b_j` (``b_j`` the fill) and :math:`M`
    the largest visible logit, both exact; ``h`` bounds the hidden keys' mass relative to
    the visible keys' (module docstring).

    Rounding.  With ``e`` = ``margin`` (the score rounding,
    :func:`certattn._fp.score_abs_margin`), ``raw`` exceeds the exact hidden score by at
    least ``-2e`` (``e`` for a computed score, ``2e`` for a computed Cauchy-Schwarz bound
    ``scale |q| |k_j|``), the computed ``M`` (a score plus a bias) is within
    ``e + 2u|M|``, adding the fill errs by ``2u|sigma|`` and ``fl(sigma - M)`` by
    ``u(|sigma| + |M|)``; so ``x = fl(sigma - M) + 4e + 8u(|sigma| + |M|)`` (more than
    ``3e + 3u(...)``: the slack covers forming it) is at least the exact exponent.
    Exponents below ``EXP_FLOOR`` (-700) are raised to it (an over-estimate: every hidden
    key counts at least ``e^-700``, so ``h > 0`` as the exact mass is, and no ``exp``
    underflows); ``exp(x)`` is widened by ``GAMMA_EXP`` (the rounding of ``x`` and 4
    ulps), the sum by :func:`certattn._fp.sum_gamma` (extra 4 for the products around
    it).  An overflow gives ``inf``, NaN gives ``inf``.

    Parameters
    ----------
    raw : float64 array (..., m, n)
        The computed ``scale * q.k`` (no bias), or a computed upper bound of it.
    fill : float64 array, broadcastable to (..., m, n)
        The fills (:func:`normalize_mask` with ``hidden=True``).
    hidden : bool array, broadcastable to (..., m, n)
        Hidden keys: filled and not hidden by the causal mask.
    scores : float64 array (..., m, n)
        Visible scores (``-inf`` elsewhere), any subset of them: ``M`` is their maximum
        (``inf`` results where a row has none).
    margin : float64 array (..., m)
        Absolute rounding bound of ``raw`` per row.
    xp : namespace

    Returns
    -------
    float64 array (..., m)
        0 where a row has no hidden key, else in ``[e^-700, inf]``.
    """
    mx = xp.max(scores, axis=-1, keepdims=True)
    raw, fill, hidden = _hidden_columns(raw, fill, hidden, xp)
    with np.errstate(over="ignore", invalid="ignore"):
        sig = xp.where(hidden, raw + fill, xp.zeros_like(raw))
        pad = 4.0 * margin[..., None] + 8.0 * U * (xp.abs(sig) + xp.abs(mx))
        # exponents below EXP_FLOOR are raised to it: no underflow, no subnormal or
        # special-value exp (slow), every hidden term positive; elsewhere exp(0), then 0
        x = xp.where(hidden, xp.maximum((sig - mx) + pad, EXP_FLOOR), xp.zeros_like(sig))
        t = xp.where(hidden, xp.exp(x), xp.zeros_like(x))
        h = xp.sum(t, axis=-1) * ((1.0 + GAMMA_EXP) * (1.0 + sum_gamma(x.shape[-1], 4)))
    return xp.where(xp.isnan(h), xp.full_like(h, xp.inf), h)


def _hidden_columns(raw: Array, fill: Array, hidden: Array, xp: Any) -> tuple[Array, ...]:
    """``raw``, ``fill``, ``hidden`` restricted to the keys hidden for some row (padding
    hides the same few keys from every query: the work is then O(rows x padded keys));
    a contiguous run of keys (left or right padding) is a slice, not a copy."""
    n = int(raw.shape[-1])
    hb = xp.broadcast_to(hidden, raw.shape)
    cols = xp.any(hb, axis=tuple(range(hb.ndim - 1))) if hb.ndim > 1 else hb
    idx = xp.nonzero(cols)[0]
    k = int(idx.shape[0])
    if k == n or k == 0:
        return raw, fill, hidden
    lo, hi = int(idx[0]), int(idx[-1]) + 1

    def cut(a: Array) -> Array:
        if int(a.shape[-1]) == 1:  # broadcast along the keys
            return a
        if hi - lo == k:
            return a[..., lo:hi]
        return xp.take(a, idx, axis=a.ndim - 1)

    return cut(raw), cut(fill), cut(hidden)


def hidden_tail(tail: Array, h: Array, xp: Any) -> Array:
    r"""``tail + h`` rounded up and clamped to 1 where ``h > 0`` (:math:`\tau_{\mathrm{full}}
    \le \tau_V + h`); unchanged elsewhere (NaN gives 1)."""
    t = add_up(tail, h, xp)
    t = xp.where(xp.isnan(t), xp.ones_like(t), xp.minimum(t, 1.0))
    return xp.where(h > 0, t, tail)


def hidden_error(
    error: Array, h: Array, hidden: Array, valid: Array, values: Array, xp: Any, *,
    value_norms: Array | None = None,
) -> Array:
    r"""``error + min(h, 1) (max_hidden |v_j| + max_visible |v_j|)``, rounded up, where
    ``h > 0`` (module docstring); unchanged elsewhere.

    Parameters
    ----------
    error : float64 array (..., m)
        A sound bound on the distance of the output to attention over the visible keys.
    h : float64 array (..., m)
        :func:`hidden_mass`.
    hidden, valid : bool arrays, broadcastable to (..., m, n)
        Hidden and visible keys.
    values : float64 array (..., n, dv)
    xp : namespace
    value_norms : float64 array (..., n), optional
        ``scaled_norm(values, xp)``, when the caller already has it (chunked loops).
    """
    dv = int(values.shape[-1])
    vn = scaled_norm(values, xp) if value_norms is None else value_norms
    vn = vn[..., None, :] * (1.0 + (dv + 8) * U)
    zero = xp.zeros_like(vn)
    vh = xp.max(xp.where(hidden, vn, zero), axis=-1)
    vv = xp.max(xp.where(valid, vn, zero), axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):  # + SMALLEST: a subnormal product
        extra = xp.minimum(h, 1.0) * (vh + vv) * (1.0 + 4 * U) + SMALLEST
    return xp.where(h > 0, add_up(error, extra, xp), error)


def kv_head_map(kv_heads: Any, n_q: int, n_kv: int) -> list[int] | None:
    """Key head of every query head, or None when no mapping is needed."""
    if kv_heads is None:
        if n_q == n_kv:
            return None
        if n_kv < 1 or n_q % n_kv:
            raise InputError(
                f"{n_q} query heads cannot share {n_kv} key/value heads evenly (axis -3)"
            )
        return [h // (n_q // n_kv) for h in range(n_q)]
    if exact_int(kv_heads) is not None:
        if exact_int(kv_heads) != n_kv:
            raise InputError(f"kv_heads = {kv_heads} but keys have {n_kv} heads (axis -3)")
        return kv_head_map(None, n_q, n_kv)
    mapping = _index_list(kv_heads)
    if mapping is None:
        raise InputError(
            "kv_heads must be the number of key/value heads (an int) or a sequence of "
            f"key-head indices, one per query head, got {_short_repr(kv_heads)}"
        )
    if len(mapping) != n_q or any(not 0 <= h < n_kv for h in mapping):
        raise InputError(
            f"kv_heads must map each of the {n_q} query heads to one of {n_kv} key heads"
        )
    return mapping


def _index_list(x: Any) -> list[int] | None:
    """A sequence of exact integers as a list, else None (strings are not sequences here)."""
    if isinstance(x, (str, bytes)):
        return None
    try:
        items = [exact_int(h) for h in x]
    except TypeError:  # not iterable
        return None
    return None if any(h is None for h in items) else items  # type: ignore[return-value]


def _short_repr(x: Any) -> str:
    """``repr(x)`` if it is one short line, else its type (error messages stay one line)."""
    r = repr(x)
    return r if len(r) <= 80 and "\n" not in r else f"a value of type {type(x).__name__}"
