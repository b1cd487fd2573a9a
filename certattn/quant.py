r"""Low-bit key estimates with certified per-key score bounds (Theorem QUANT-SCORE).

Production sparse-attention systems estimate scores from low-precision keys (Twilight
estimates top-p from INT4 keys; KIVI stores keys quantized per channel in groups of
tokens; Quest reads per-page min/max).  None of them certifies anything.  This module
quantizes keys in the same style and turns the estimate into a *sound* bound on every
exact score, so that certified search (``method="quant"`` of
:func:`certattn.certified_search`, Theorem SEARCH-SOUND) can use one bound per key
instead of one per cell.

Quantization (KIVI-style: per channel, keys grouped in runs of ``group`` consecutive
tokens).  For group ``g`` and channel ``j`` the stored metadata are two float16 numbers
(float32 when the keys exceed the float16 range), ``lo_gj`` (the channel minimum rounded
down) and ``step_gj`` (rounded up so that ``lo_gj + L step_gj >= max``, ``L = 2^b - 1``);
each key stores ``b``-bit codes ``c_ij = clip(rint((k_ij - lo_gj)/step_gj), 0, L)`` and,
optionally, a float16 upper bound ``r_i`` on its residual norm.  The certifier reads only
these (the error bound below is derived from them, not from the keys).

Theorem QUANT-SCORE.  Let ``khat_ij`` be the float64 reconstruction
``fl(lo_gj + step_gj c_ij)`` (``step_gj c_ij`` is exact: 24-bit times 8-bit significands)
and

.. math:: \delta_{ij} = step_{gj} (1/2 + 2^{b+2} u) + 2u |\hat k_{ij}|,

(the last term only where ``step_gj c_ij != 0``: adding 0 is exact),

then ``|k_ij - khat_ij| <= delta_ij`` (the first term is the grid rounding, see
:func:`certattn._fp.quant_step_factor`; the second the rounding of the reconstruction).
For every query ``q`` and scale ``> 0``, the exact score ``s_i = scale q.k_i`` satisfies

.. math:: \mathrm{scale}\,(q\cdot\hat k_i - \rho_i) \le s_i \le
          \mathrm{scale}\,(q\cdot\hat k_i + \rho_i),\qquad
          \rho_i = \min\Big(\sum_j |q_j| \delta_{ij},\ |q|\, r_i\Big),

because ``|q.(k_i - khat_i)| <= sum_j |q_j| |k_ij - khat_ij|`` (triangle inequality) and
``<= |q| |k_i - khat_i|`` (Cauchy-Schwarz).  Zero-range channels whose value is a float16
number get ``step = 0`` and ``delta = 0`` (the reconstruction is exact).

Floating point.  The bounds are computed in float64 and moved outward by
``(2 d + 8) u scale (|q|.|khat_i| + rho_i)`` plus the smallest normal (the dot products'
rounding, :func:`certattn._fp.score_margin`).  A group whose metadata overflow float32
(keys beyond 3.4e38) gets the trivial bounds ``-inf`` and ``+inf`` (its keys are simply
scored: the search fails closed).

Nested grids.  ``quantize_keys(keys, b, grid_bits=B)`` (``B > b``) stores the top ``b``
bits ``c_ij = C_ij >> h`` (``h = B - b``) of the ``B``-bit codes ``C_ij`` on the ``B``-bit
grid (its ``lo`` and ``step``), so that the estimates of every width ``<= B`` share one
grid's metadata and a finer width refines a coarser one by reading only its extra bits.
Since ``2^h c_ij <= C_ij <= 2^h c_ij + 2^h - 1``, the reconstruction at the middle of that
run of codes, ``khat_ij = fl(lo_gj + step_gj (2^h c_ij + (2^h - 1)/2))`` (the product is
exact: 24-bit times 9-bit significands), satisfies QUANT-SCORE with

.. math:: \delta_{ij} = step_{gj} \big((2^h - 1)/2 + 1/2 + 2^{B+2} u\big)
          + 2u |\hat k_{ij}|

(the grid rounding of ``C_ij`` plus the distance from ``C_ij`` to the middle of its run);
``h = 0`` is the plain grid above.

Pages.  Every key of group ``g`` lies in the box ``[lo_g, lo_g + L step_g]``, so the
metadata alone bound every score of the group (BLOCK-SCORE, box, as in Quest):
:meth:`QuantKeys.page_upper`.

Cost.  Reading the estimate of a key costs ``b/16`` of reading the key in float16 plus 2
bytes for its residual norm; the metadata cost ``4 d`` bytes per group (two float16 per
channel) (:meth:`QuantKeys.estimate_bytes`).  On nested grids a finer width refines a
coarser estimate of the same key by reading its extra ``(b' - b) d / 8`` bytes of code and
its own residual norm, no metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import to_numpy
from ._fp import NORMAL_MIN, quant_step_factor, score_margin
from ._fp import U as _U
from ._validate import InputError, check_int_option, check_scale

__all__ = ["BITS", "QuantKeys", "quantize_keys"]

Array = Any
BITS = (2, 4, 8)
"""Supported code widths."""



def _round_down(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Largest ``dtype`` number ``<= x`` (elementwise; ``-inf`` below its range)."""
    dt = np.dtype(dtype).type
    with np.errstate(over="ignore"):
        y = x.astype(dt)
        return np.where(y.astype(np.float64) > x, np.nextafter(y, dt(-np.inf)), y).astype(dt)


def _round_up(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Smallest ``dtype`` number ``>= x`` (elementwise; ``+inf`` above its range)."""
    dt = np.dtype(dtype).type
    with np.errstate(over="ignore"):
        y = x.astype(dt)
        return np.where(y.astype(np.float64) < x, np.nextafter(y, dt(np.inf)), y).astype(dt)


@dataclass(frozen=True, eq=False)
class QuantKeys:
    """Quantized keys of one head: codes, per-group metadata, residual norms.

    Attributes
    ----------
    codes : numpy.ndarray
        ``(n, d)`` uint8 codes in ``[0, 2^bits - 1]``.
    lo, step : numpy.ndarray
        ``(G, d)`` grid origin and step of each group of ``group`` keys (float16, or
        float32 where the keys exceed the float16 range).
    resid : numpy.ndarray or None
        ``(n,)`` float16 upper bounds on ``|k_i - khat_i|`` (None: not stored).
    bits : int
        Code width (2, 4 or 8).
    group : int
        Keys per group (consecutive tokens share the group's metadata).
    hidden : int
        Low bits of the grid's codes not stored (nested grids, module docstring): the
        grid has ``bits + hidden`` bits and ``codes`` are its codes shifted right by
        ``hidden``.
    """

    codes: np.ndarray
    lo: np.ndarray
    step: np.ndarray
    resid: np.ndarray | None
    bits: int
    group: int
    hidden: int = 0

    @property
    def grid_bits(self) -> int:
        """Width ``B = bits + hidden`` of the grid the codes lie on."""
        return self.bits + self.hidden

    @property
    def n_keys(self) -> int:
        """Number of keys ``n``."""
        return int(self.codes.shape[0])

    @property
    def dim(self) -> int:
        """Key dimension ``d``."""
        return int(self.codes.shape[1])

    @property
    def group_of(self) -> np.ndarray:
        """``(n,)`` group index of every key."""
        return np.arange(self.n_keys) // self.group

    def _meta(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Float64 reconstruction ``khat``, ``delta`` (QUANT-SCORE) and bad-key mask."""
        g = self.group_of
        lo = self.lo.astype(np.float64)[g]
        step = self.step.astype(np.float64)[g]
        run = 2.0**self.hidden  # grid codes per stored code (nested grids)
        with np.errstate(invalid="ignore", over="ignore"):
            # exact: 24 + 9 significant bits
            sc = step * (run * self.codes.astype(np.float64) + (run - 1.0) / 2.0)
            khat = lo + sc  # one rounding, none when sc = 0
            delta = step * (quant_step_factor(self.grid_bits) + (run - 1.0) / 2.0) + \
                np.where(sc != 0, 2.0 * _U * np.abs(khat), 0.0)
        bad = ~np.all(np.isfinite(khat) & np.isfinite(delta), axis=1)
        khat = np.where(bad[:, None], 0.0, khat)
        delta = np.where(bad[:, None], 0.0, delta)
        return khat, delta, bad

    def reconstruct(self) -> np.ndarray:
        """``(n, d)`` float64 reconstruction ``khat = fl(lo + step c)`` (0 for bad groups)."""
        return self._meta()[0]

    def error_bound(self) -> np.ndarray:
        """``(n, d)`` float64 ``delta`` with ``|k_ij - khat_ij| <= delta_ij`` (QUANT-SCORE);
        ``inf`` for keys of groups whose metadata are not finite."""
        _, delta, bad = self._meta()
        return np.where(bad[:, None], np.inf, delta)

    def score_bounds(self, q: Array, *, scale: float) -> tuple[np.ndarray, np.ndarray]:
        r"""Sound bounds on every exact score (Theorem QUANT-SCORE).

        :math:`\mathrm{scale}(q\cdot\hat k_i \mp \rho_i) \mp \eta_i`, with
        :math:`\rho_i = \min(\sum_j |q_j|\delta_{ij}, |q| r_i)` and the rounding margin
        :math:`\eta_i = (2d + 8) u\, \mathrm{scale}\,(|q|\cdot|\hat k_i| + \rho_i)` plus the
        smallest normal float64.

        Parameters
        ----------
        q : array
            ``(m, d)`` queries (converted to float64 NumPy).
        scale : float
            Positive logit scale.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            ``(m, n)`` float64 lower and upper bounds (``-inf``/``+inf`` for keys of
            groups whose metadata are not finite, and wherever the bound overflows).
        """
        scale = check_scale(scale)
        q = np.asarray(to_numpy(q), dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries must be (m, {self.dim}), got shape {q.shape}")
        khat, delta, bad = self._meta()
        aq = np.abs(q)
        with np.errstate(over="ignore", invalid="ignore"):
            dot = q @ khat.T
            mag = aq @ np.abs(khat).T
            rho = aq @ delta.T
            if self.resid is not None:
                # |q| scaled by its largest entry: squares of tiny queries do not underflow
                qmax = np.max(aq, axis=1, initial=0.0)[:, None]
                qs = np.where(qmax > 0, qmax, 1.0)
                qn = qmax * np.linalg.norm(q / qs, axis=1)[:, None]
                rho = np.fmin(rho, qn * self.resid.astype(np.float64)[None, :])  # nan: 0 inf
            eta = score_margin(self.dim) * scale * (mag + rho) + NORMAL_MIN
            upper = (dot + rho) * scale + eta
            lower = (dot - rho) * scale - eta
        upper = np.where(np.isnan(upper) | bad[None, :], np.inf, upper)
        lower = np.where(np.isnan(lower) | bad[None, :], -np.inf, lower)
        return lower, upper

    def page_upper(self, q: Array, *, scale: float) -> np.ndarray:
        r"""Upper bounds ``(m, G)`` on every score of every group (page), from metadata only.

        Every key of group ``g`` lies in the box ``lo_g <= k <= lo_g + L step_g``
        (``L = 2^B - 1``, ``B`` the grid's width), so (Theorem BLOCK-SCORE, box, as in Quest)
        :math:`s \le \mathrm{scale} \sum_j \max(q_j lo_{gj}, q_j hi_{gj})`, moved outward by
        ``(2 d + 8) u scale sum_j |q_j| max(|lo_gj|, |hi_gj|)`` plus the smallest normal.
        ``+inf`` where the metadata are not finite.
        """
        scale = check_scale(scale)
        q = np.asarray(to_numpy(q), dtype=np.float64)
        lo = self.lo.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            hi = lo + self.step.astype(np.float64) * (2**self.grid_bits - 1)
            qp, qm = np.maximum(q, 0.0), np.minimum(q, 0.0)
            up = qp @ hi.T + qm @ lo.T
            big = np.abs(q) @ np.maximum(np.abs(lo), np.abs(hi)).T
            out = up * scale + (score_margin(self.dim) * scale * big + NORMAL_MIN)
        bad = ~np.all(np.isfinite(hi) & np.isfinite(lo), axis=1)
        return np.where(np.isnan(out) | bad[None, :], np.inf, out)

    @property
    def meta_bytes(self) -> float:
        """Bytes of one group's metadata: ``lo`` and ``step`` for every channel."""
        return 2.0 * self.dim * self.lo.dtype.itemsize

    @property
    def key_bytes(self) -> float:
        """Bytes of one key's estimate: ``d b / 8`` of codes plus its residual norm."""
        extra = 0.0 if self.resid is None else float(self.resid.dtype.itemsize)
        return self.dim * self.bits / 8.0 + extra

    def estimate_bytes(self, visible: np.ndarray) -> np.ndarray:
        """Bytes read to bound every visible key: codes, group metadata, residual norms.

        Parameters
        ----------
        visible : numpy.ndarray
            ``(m, n)`` bool.

        Returns
        -------
        numpy.ndarray
            ``(m,)`` float64: ``nvis`` times :attr:`key_bytes` plus :attr:`meta_bytes` per
            group holding a visible key.
        """
        vis = np.asarray(visible, dtype=bool)
        nvis = vis.sum(axis=1).astype(np.float64)
        n_groups = self.lo.shape[0]
        touched = np.zeros((vis.shape[0], n_groups), dtype=bool)
        rows = np.broadcast_to(np.arange(vis.shape[0])[:, None], vis.shape)
        np.logical_or.at(touched, (rows, np.broadcast_to(self.group_of, vis.shape)), vis)
        return nvis * self.key_bytes + self.meta_bytes * touched.sum(axis=1)


def quantize_keys(
    keys: Array, bits: int = 4, *, group: int | None = 32, residual: bool = True,
    grid_bits: int | None = None,
) -> QuantKeys:
    """Quantize keys to ``bits`` per channel, per group of tokens (KIVI-style).

    Parameters
    ----------
    keys : array
        ``(n, d)`` finite keys (converted to float64 NumPy).
    bits : {2, 4, 8}
        Code width.
    group : int or None
        Consecutive keys sharing one ``lo``/``step`` per channel; None: all keys.
    residual : bool
        Also store a float16 upper bound on each key's residual norm ``|k_i - khat_i|``
        (2 bytes per key), intersected with the per-channel bound (QUANT-SCORE).
    grid_bits : {2, 4, 8}, optional
        Width of the grid (``>= bits``; default ``bits``): the codes are the top ``bits``
        bits of the ``grid_bits``-bit codes (nested grids, module docstring), so that
        ``quantize_keys(k, 4, grid_bits=8)`` and ``quantize_keys(k, 8)`` share their
        metadata and the 8-bit codes refine the 4-bit ones.

    Returns
    -------
    QuantKeys
        ``|k_ij - khat_ij| <= delta_ij`` holds exactly for the stored data (module
        docstring).
    """
    bits = check_int_option(bits, name="bits", choices=BITS, optional=False)
    grid_bits = bits if grid_bits is None else check_int_option(
        grid_bits, name="grid_bits", choices=BITS, optional=False)
    if grid_bits < bits:
        raise InputError(f"grid_bits must be at least bits ({bits}), got {grid_bits}")
    k = np.asarray(to_numpy(keys), dtype=np.float64)
    if k.ndim != 2 or k.shape[0] == 0 or k.shape[1] == 0:
        raise InputError(f"keys must be a non-empty (n, d) array, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise InputError("keys contain NaN or inf")
    n, d = k.shape
    group = check_int_option(group, name="group")
    g = n if group is None else group
    n_groups = math.ceil(n / g)
    gid = np.arange(n) // g
    lo64 = np.stack([k[gid == i].min(axis=0) for i in range(n_groups)])
    hi64 = np.stack([k[gid == i].max(axis=0) for i in range(n_groups)])
    levels = 2**grid_bits - 1

    def grid(dt: Any) -> tuple[np.ndarray, np.ndarray]:
        lo = _round_down(lo64, dt)
        hi = _round_up(hi64, dt)
        with np.errstate(over="ignore", invalid="ignore"):
            span = hi.astype(np.float64) - lo.astype(np.float64)
            # (hi - lo)/L errs by at most 2u relative; 4u more makes it an upper bound
            step = np.where(span > 0, _round_up(span / levels * (1.0 + 4.0 * _U), dt), 0.0)
        return lo, step.astype(dt)

    lo, step = grid(np.float16)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(step))):
        lo, step = grid(np.float32)  # beyond the float16 range
    with np.errstate(over="ignore", invalid="ignore"):
        step64 = step.astype(np.float64)[gid]
        t = np.where(step64 > 0, (k - lo.astype(np.float64)[gid]) / step64, 0.0)
    t = np.where(np.isfinite(t), t, 0.0)
    hidden = grid_bits - bits
    codes = (np.clip(np.rint(t), 0, levels).astype(np.uint8) >> hidden).astype(np.uint8)
    q = QuantKeys(codes=codes, lo=lo, step=step, resid=None, bits=bits, group=g, hidden=hidden)
    if not residual:
        return q
    khat, _, bad = q._meta()
    diff = k - khat
    amax = np.max(np.abs(diff), axis=1)
    safe = np.where(amax > 0, amax, 1.0)
    # |fl(k - khat)| is within u of |k - khat| per entry; the scaled norm errs by (d + 4) u
    with np.errstate(over="ignore"):
        r = amax * np.linalg.norm(diff / safe[:, None], axis=1)
        r = r * (1.0 + score_margin(d)) + NORMAL_MIN
    r = np.where(bad | ~np.isfinite(r), np.inf, r)
    return QuantKeys(codes=codes, lo=lo, step=step, resid=_round_up(r, np.float16), bits=bits,
                     group=g, hidden=hidden)
