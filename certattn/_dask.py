"""Certificates on dask arrays, and lazy reading of sharded logits (the ``distributed`` extra).

:func:`certattn.certify_topk`, :func:`certattn.certify_topp` and :func:`certattn.certify_kept`
hand a :class:`dask.array.Array` to this module.  Each block of rows is certified by the
NumPy code path, unchanged, in one task per block (``map_blocks``/``blockwise``); the
results are dask arrays with the batch chunks of the input, built lazily.  Nothing is
computed until the caller computes a result (``.compute()``, :func:`dask.compute`,
:func:`dask.array.store`, a ``distributed`` client).

The key axis must be one chunk (a row is certified as a whole); when it is not, it is
rechunked to one chunk, with the batch axes rechunked ``"auto"`` so that blocks keep dask's
configured size (``array.chunk-size``).

Each block's results are *exactly* the NumPy certificate of that block.  They are exactly
those of one in-memory call on the whole array as well whenever the NumPy path makes the
same chunk-wide choices, as it does for ordinary logits; a block holding a fully masked
row (``masked_rows="skip"``) or a row sum outside :math:`[e^{-650}/\varepsilon, e^{700}]`
sends that block (and, in memory, that NumPy chunk of rows) to the shifted-exponent path,
whose ``tail_upper`` may differ in the last bits (both are sound bounds; ``k`` differs only
within the rounding margin of :mod:`certattn.topk`).

:func:`open_logits` reads a directory of ``.npy`` shards (memory-mapped) or a zarr store as
one lazy dask array, and :func:`certify_store` is the ``certattn certify DIR`` command:
it certifies block by block, writes the results incrementally (a directory of ``.npy``
files, or a zarr store) and summarises from per-block partial statistics, so neither the
input nor the result is ever held whole in memory.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._array import to_numpy
from ._validate import InputError, check_eps, first_bad_position
from .topk import TopkCertificate

__all__ = [
    "DaskTopkCertificate",
    "certify_kept_dask",
    "certify_store",
    "certify_topk_dask",
    "is_dask",
    "open_logits",
]

Array = Any

_CHUNK_BYTES = 1 << 26  # rows per block when reading .npy shards: about 64 MiB of logits

_TOPK = np.dtype(
    [("k", np.int64), ("tail_upper", np.float64), ("kl_upper", np.float64),
     ("n_valid", np.int64), ("masked", np.bool_)]
)
_KEPT = np.dtype(
    [("tail_upper", np.float64), ("kl_upper", np.float64), ("n_kept", np.int64),
     ("n_valid", np.int64)]
)
_RESULTS = ("k", "tail_upper", "kl_upper", "n_valid", "masked")


def is_dask(x: Any) -> bool:
    """True when ``x`` is a :class:`dask.array.Array` (without importing dask)."""
    import array_api_compat as compat

    return bool(compat.is_dask_array(x))


def _require_dask() -> Any:
    try:
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            f"dask arrays need the distributed extra: pip install 'certattn[distributed]' ({exc})"
        ) from None
    return da


# --------------------------------------------------------------------------
# Validation and layout
# --------------------------------------------------------------------------


def _check_float(x: Array, name: str = "logits") -> None:
    dt = np.dtype(x.dtype)
    # ml_dtypes' bfloat16 and friends report kind 'V'; accept them by name.
    if dt.kind != "f" and "float" not in dt.name:
        raise InputError(f"{name} must hold real floating-point numbers, got dtype {dt}")


def _key_last(x: Array, axis: int) -> Array:
    """``x`` with the key axis last and in one chunk (validated)."""
    da = _require_dask()
    if x.ndim == 0:
        raise InputError("logits must have a key axis, got a scalar")
    if isinstance(axis, bool) or not -x.ndim <= int(axis) < x.ndim:
        raise InputError(f"axis {axis} is out of range for logits of shape {tuple(x.shape)}")
    if axis not in (-1, x.ndim - 1):
        x = da.moveaxis(x, axis, -1)
    n = x.shape[-1]
    if isinstance(n, float) and math.isnan(n):
        raise InputError("logits have a key axis of unknown length (compute its chunk sizes)")
    if n == 0:
        raise InputError(f"logits have an empty key axis (shape {tuple(x.shape)})")
    if x.numblocks[-1] > 1:  # a row is certified whole: one chunk along the keys
        last = x.ndim - 1
        x = x.rechunk({**{i: "auto" for i in range(last)}, last: -1})
    return x


def _where(batch_pos: tuple[int, ...], key: int | None) -> str:
    """``in row (i, j) at key k`` -- the words of :mod:`certattn._validate`, global indices."""
    at = "" if key is None else f" at key {key}"
    if not batch_pos:
        return f"in the only row{at}" if key is None else at.strip()
    row = batch_pos[0] if len(batch_pos) == 1 else batch_pos
    return f"in row {row}{at}"


def _offsets(block_info: dict | None, ndim: int) -> tuple[int, ...]:
    if not block_info or 0 not in block_info:
        return (0,) * ndim
    return tuple(int(lo) for lo, _ in block_info[0]["array-location"])


def _explain(block: Array, offset: tuple[int, ...], check_masked: bool) -> None:
    """Raise an :class:`InputError` naming the first bad entry of ``block`` globally."""
    x = np.asarray(to_numpy(block))
    for what, bad in (("NaN", np.isnan(x)), ("+inf", x == np.inf)):
        if bad.any():
            pos = tuple(p + o for p, o in zip(first_bad_position(bad), offset, strict=True))
            raise InputError(f"logits contain {what} {_where(pos[:-1], pos[-1])}")
    if check_masked and x.shape[-1]:
        empty = ~np.any(x > -np.inf, axis=-1)
        if empty.any():
            pos = first_bad_position(empty) if empty.ndim else ()
            pos = tuple(p + o for p, o in zip(pos, offset, strict=False))
            raise InputError(f"logits are fully masked (all -inf) {_where(pos, None)}")


# --------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------


def _topk_block(
    block: Array, eps: float, masked_rows: str, keys: int, block_info: dict | None = None
) -> np.ndarray:
    """One block of rows (key axis last) through the NumPy certificate, as records; the
    compiled path's ``auto`` choice is the whole array's (``keys``), not the block's."""
    from . import _topk_numba
    from .topk import certify_topk

    try:
        with _topk_numba.call_size(keys):
            cert = certify_topk(block, eps, axis=-1, masked_rows=masked_rows)
    except ValueError:
        _explain(block, _offsets(block_info, block.ndim), masked_rows == "error")
        raise
    out = np.empty(block.shape[:-1], dtype=_TOPK)
    for name in _RESULTS:
        out[name] = to_numpy(getattr(cert, name))
    return out


def _mask_block(block: Array, k: Array) -> np.ndarray:
    from .distribution import topk_mask

    return np.asarray(to_numpy(topk_mask(block, k, axis=-1)))


def _cut_block(block: Array, k: Array) -> np.ndarray:
    from .topk import topk_cut

    return np.asarray(to_numpy(topk_cut(block, k, axis=-1)))


def _indices_block(block: Array, k: Array, width: int) -> np.ndarray:
    x = np.asarray(to_numpy(block))
    order = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")[..., :width]
    keep = np.arange(width) < np.asarray(k)[..., None]
    return np.where(keep, order, -1)


def _per_row(x: Array, func: Any, dtype: np.dtype, *args: Any) -> Array:
    """``func`` on every block of ``x`` (key axis last), one record per row."""
    da = _require_dask()
    nd = x.ndim
    return da.map_blocks(
        func, x, *args, drop_axis=nd - 1, dtype=dtype, meta=np.empty((0,) * (nd - 1), dtype),
    )


@dataclass(frozen=True)
class DaskTopkCertificate(TopkCertificate):
    r"""A :class:`certattn.TopkCertificate` whose arrays are lazy dask arrays.

    The same fields (``k``, ``tail_upper``, ``kl_upper``, ``n_valid``, ``masked``, ``eps``,
    ``n``, ``axis``) with the same meaning; each array has the batch shape of the logits
    and their batch chunks (after the key axis is moved last), and is computed block by
    block by the NumPy certificate.  Compute several at once (:func:`dask.compute`) to
    certify each block once.  Bad input raises :class:`ValueError` (an
    :class:`~certattn._validate.InputError`) when the result is computed, naming the row
    (global batch index, key axis last) and the key.
    """

    # the logits with the key axis last in one chunk; one record of the five results per row
    _rows: Array = field(default=None, repr=False)
    _records: Array = field(default=None, repr=False)

    def kept_mask(self) -> Array:
        """Lazy boolean mask of the kept keys, same shape (and batch chunks) as the logits.

        Row ``r`` keeps its ``k[r]`` largest logits; ties at the cut go to the earlier
        key; masked keys are never kept (as :meth:`certattn.TopkCertificate.kept_mask`).
        """
        da = _require_dask()
        x = self._rows
        idx = tuple(range(x.ndim))
        mask = da.blockwise(
            _mask_block, idx, x, idx, self.k, idx[:-1], dtype=bool,
            meta=np.empty((0,) * x.ndim, dtype=bool),
        )
        return da.moveaxis(mask, -1, self.axis) if self.axis not in (-1, x.ndim - 1) else mask

    @property
    def cut(self) -> Array:
        """Lazy float64 cut logit per row (as :attr:`certattn.TopkCertificate.cut`)."""
        da = _require_dask()
        x = self._rows
        idx = tuple(range(x.ndim))
        return da.blockwise(
            _cut_block, idx[:-1], x, idx, self.k, idx[:-1], dtype=np.float64,
            concatenate=True, meta=np.empty((0,) * (x.ndim - 1), dtype=np.float64),
        )

    def kept_indices(self) -> Array:
        """Indices of the kept keys, largest logit first, padded with ``-1`` (lazy).

        Shape: batch shape + ``(max(k),)``.  The width ``max(k)`` is computed first, so
        this certifies the logits once to find it.
        """
        da = _require_dask()
        x = self._rows
        width = int(self.k.max().compute()) if self.k.size else 0
        idx = tuple(range(x.ndim))
        return da.blockwise(
            _indices_block, idx, x, idx, self.k, idx[:-1], width, None, dtype=np.int64,
            adjust_chunks={idx[-1]: width}, meta=np.empty((0,) * x.ndim, dtype=np.int64),
        )


def certify_topk_dask(
    logits: Array,
    eps: float,
    *,
    axis: int = -1,
    masked_rows: str = "error",
    progress: Any = None,
) -> DaskTopkCertificate:
    r""":func:`certattn.certify_topk` of a dask array: lazy, one task per block of rows.

    Parameters
    ----------
    logits : dask.array.Array
        Real floating logits (``-inf`` = masked key), NumPy (or any array-API) chunks.
        If the key axis spans several chunks it is rechunked to one (batch axes
        ``"auto"``): a row is certified as a whole.
    eps : float
        TV budget in [0, 1).
    axis : int
        The key axis.
    masked_rows : {"error", "skip"}
        Fully masked rows: raise at compute time, or give them ``k = 0`` and flag them.
    progress : None
        Not called on dask (use :class:`dask.diagnostics.ProgressBar` or the
        ``distributed`` dashboard).

    Returns
    -------
    DaskTopkCertificate
        Dask arrays of the batch shape; each equals the NumPy certificate of the computed
        logits exactly.

    Raises
    ------
    ValueError
        At once: bad ``eps``, ``masked_rows`` or ``axis``, a non-floating dtype, an empty key
        axis.  At compute time: NaN or ``+inf`` logits, a fully masked row (unless
        ``masked_rows="skip"``), with the global row index and key in the message.
    """
    del progress  # the dask schedulers report progress themselves
    eps = check_eps(eps)
    if masked_rows not in ("error", "skip"):
        raise ValueError(f"masked_rows must be 'error' or 'skip', got {masked_rows!r}")
    _check_float(logits)
    x = _key_last(logits, axis)
    keys = 0 if any(math.isnan(d) for d in x.shape) else math.prod(x.shape)  # nan: unknown
    rec = _per_row(x, _topk_block, _TOPK, eps, masked_rows, keys)
    fields = {name: rec[name] for name in _RESULTS}
    return DaskTopkCertificate(
        **fields, eps=eps, n=int(x.shape[-1]), axis=axis, _logits=logits, _rows=x,
        _records=rec,
    )


# --------------------------------------------------------------------------
# Any kept set
# --------------------------------------------------------------------------


def _kept_block(block: Array, kept: Array, block_info: dict | None = None) -> np.ndarray:
    from .kept import certify_kept

    try:
        cert = certify_kept(block, kept, axis=-1)
    except ValueError:
        _explain(block, _offsets(block_info, block.ndim), True)
        raise
    out = np.empty(block.shape[:-1], dtype=_KEPT)
    for name in _KEPT.names:
        out[name] = to_numpy(getattr(cert, name))
    return out


def _kept_valid_block(block: Array, kept: Array) -> np.ndarray:
    """The kept set without its masked keys, as :func:`certattn.certify_kept` reports it."""
    from .kept import shift_rows

    x = np.asarray(to_numpy(block)).astype(np.float64)
    return np.asarray(to_numpy(kept), dtype=bool) & (shift_rows(x, np) > -np.inf)


def certify_kept_dask(logits: Array, kept: Any, *, axis: int = -1) -> Any:
    """:func:`certattn.certify_kept` of a dask array (``kept`` NumPy or dask): lazy, blockwise.

    ``kept`` is broadcast to the logits' shape and chunked like them; the key axis is
    rechunked to one chunk if needed (see :func:`certify_topk_dask`).  Returns a
    :class:`certattn.KeptCertificate` whose arrays are dask arrays; NaN, ``+inf`` and fully
    masked rows raise :class:`ValueError` at compute time.
    """
    da = _require_dask()
    from .kept import KeptCertificate

    if not is_dask(logits):
        logits = da.asarray(np.asarray(logits))
    _check_float(logits)
    kd = kept if is_dask(kept) else da.asarray(np.asarray(kept))
    if kd.dtype != np.bool_:
        raise InputError(f"kept must be a boolean mask, got dtype {kd.dtype}")
    try:
        kd = da.broadcast_to(kd, logits.shape)
    except ValueError:
        raise InputError(
            f"kept mask of shape {tuple(kd.shape)} does not match logits of shape "
            f"{tuple(logits.shape)}"
        ) from None
    x = _key_last(logits, axis)
    if axis not in (-1, logits.ndim - 1):
        kd = da.moveaxis(kd, axis, -1)
    kd = kd.rechunk(x.chunks)
    idx = tuple(range(x.ndim))
    rec = _per_row(x, _kept_block, _KEPT, kd)
    kept_out = da.blockwise(
        _kept_valid_block, idx, x, idx, kd, idx, dtype=bool,
        meta=np.empty((0,) * x.ndim, dtype=bool),
    )
    if axis not in (-1, logits.ndim - 1):
        kept_out = da.moveaxis(kept_out, -1, axis)
    return KeptCertificate(
        kept=kept_out, tail_upper=rec["tail_upper"], kl_upper=rec["kl_upper"],
        n_kept=rec["n_kept"], n_valid=rec["n_valid"], axis=axis,
    )


# --------------------------------------------------------------------------
# Lazy files: a directory of .npy shards, or a zarr store
# --------------------------------------------------------------------------


def is_zarr(path: str | os.PathLike[str]) -> bool:
    """True for a directory that is a zarr store (v2 or v3) or is named ``*.zarr``."""
    p = Path(path)
    return p.suffix.lower() == ".zarr" or any(
        (p / name).exists() for name in (".zarray", ".zgroup", "zarr.json")
    )


def open_logits(
    path: str | os.PathLike[str], key: str | None = None, *, chunk_bytes: int | None = None
) -> Array:
    """A directory of ``.npy`` shards or a zarr store as one lazy dask array.

    Shards are sorted by file name, memory-mapped and concatenated along axis 0; each is
    cut into blocks of whole rows of about ``chunk_bytes`` (default 64 MiB), the key axis
    (the last) in one chunk.  A zarr store keeps its own chunks (``key``: the array's path
    inside a zarr group).  Nothing is read until the array is computed.

    Raises
    ------
    ValueError
        Missing path, no shards, a shard that is not a ``.npy`` array, shards whose shapes
        (beyond axis 0) or dtypes differ, an unreadable zarr store.
    """
    da = _require_dask()
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if is_zarr(p):
        try:
            import zarr  # noqa: F401
        except ImportError:  # pragma: no cover - part of the extra
            raise ImportError(
                f"{p}: reading zarr needs zarr: pip install 'certattn[distributed]'"
            ) from None
        try:
            return da.from_zarr(str(p), component=key)
        except Exception as exc:  # zarr's own errors on a missing array or bad metadata
            if key is None:
                names = _zarr_arrays(p)
                if names:
                    raise InputError(
                        f"{p}: a zarr group; choose an array with --key ({', '.join(names)})"
                    ) from None
            raise InputError(f"{p}: cannot read zarr ({exc.__class__.__name__}: {exc})") from None
    if not p.is_dir():
        raise InputError(f"{p}: not a directory of .npy shards or a zarr store")
    if key is not None:
        raise InputError(f"{p}: --key applies to zarr stores and .npz/.safetensors files only")
    shards = sorted(s for s in p.iterdir() if s.suffix.lower() == ".npy" and s.is_file())
    if not shards:
        raise InputError(f"{p}: no .npy shards in this directory")
    limit = _CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    parts = []
    for s in shards:
        try:
            a = np.load(s, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{s}: cannot read ({exc.__class__.__name__}: {exc})") from None
        if a.ndim < 2:
            raise InputError(f"{s}: a shard needs a row axis and a key axis, got shape {a.shape}")
        if parts and (a.shape[1:] != parts[0].shape[1:] or a.dtype != parts[0].dtype):
            raise InputError(
                f"{s}: shape {a.shape} / dtype {a.dtype} does not match the first shard "
                f"{shards[0].name} ({parts[0].shape} / {parts[0].dtype})"
            )
        parts.append(a)
    row_bytes = max(1, math.prod(parts[0].shape[1:]) * parts[0].dtype.itemsize)
    rows = max(1, limit // row_bytes)
    arrays = [
        da.from_array(
            _NpyShard(s, a.shape, a.dtype), chunks=(min(rows, max(a.shape[0], 1)), *a.shape[1:]),
            meta=np.empty((0,) * a.ndim, a.dtype),
        )
        for s, a in zip(shards, parts, strict=True)
    ]
    return arrays[0] if len(arrays) == 1 else da.concatenate(arrays, axis=0)


class _NpyShard:
    """A ``.npy`` file as an array-like that reads only the rows asked for.

    :func:`dask.array.from_array` copies anything with a ``copy`` method (a memory map
    included, which would read the whole file): this stand-in has none, pickles as its
    path, and memory-maps the file anew for every block it serves.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        st = self.path.stat()
        self._token = (str(self.path.resolve()), st.st_mtime_ns, st.st_size, self.shape,
                       str(self.dtype))

    def __dask_tokenize__(self) -> tuple:
        return self._token

    def __getitem__(self, index: Any) -> np.ndarray:
        mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.array(mm[index])  # just these rows, in memory; the map is dropped


def _zarr_arrays(p: Path) -> list[str]:
    """Names of the arrays directly in the zarr group at ``p`` (empty if it is none)."""
    import zarr

    try:
        group = zarr.open_group(str(p), mode="r")
        return sorted(name for name, _ in group.arrays())
    except Exception:
        return []


# --------------------------------------------------------------------------
# certattn certify DIR: certify block by block, write incrementally, summarise
# --------------------------------------------------------------------------


_STATS = 6  # rows, masked rows, sum n_valid, sum k, sum k/n (exact rounding), max tail


def _block_stats(rec: np.ndarray) -> np.ndarray:
    """Partial statistics of one block of results (unmasked rows only)."""
    rec = np.asarray(rec).reshape(-1)
    keep = ~rec["masked"]
    k, nv, tail = rec["k"][keep], rec["n_valid"][keep], rec["tail_upper"][keep]
    ratio = math.fsum((k / nv).tolist()) if k.size else 0.0
    return np.array(
        [k.size, rec.size - k.size, int(nv.sum()), int(k.sum()), ratio,
         float(tail.max()) if k.size else -math.inf],
        dtype=object,
    )


@dataclass(frozen=True)
class Summary:
    """Whole-input statistics merged from per-block partial ones."""

    rows: int
    masked: int
    sum_n: int
    sum_k: int
    sum_ratio: float
    max_tail: float

    @classmethod
    def merge(cls, parts: list[np.ndarray]) -> Summary:
        """Merge the partial statistics of every block."""
        if not parts:
            return cls(0, 0, 0, 0, 0.0, -math.inf)
        return cls(
            rows=sum(int(p[0]) for p in parts),
            masked=sum(int(p[1]) for p in parts),
            sum_n=sum(int(p[2]) for p in parts),
            sum_k=sum(int(p[3]) for p in parts),
            sum_ratio=math.fsum(float(p[4]) for p in parts),
            max_tail=max(float(p[5]) for p in parts),
        )

    def row(self, label: str) -> str:
        """The summary row of ``certattn certify``'s table."""
        if self.rows == 0:
            return f"| {label} | 0 | - | - | - | - | - |"
        c = self.rows
        return (
            f"| {label} | {c} | {self.sum_n / c:.1f} | {self.sum_k / c:.2f} | "
            f"{self.sum_ratio / c:.3f} | {(self.sum_n / self.sum_k):.2f}x | {self.max_tail:.3g} |"
        )


def _targets(out: Path, batch: tuple[int, ...], chunks: tuple, eps: float, n: int) -> list:
    """Writable arrays for the results: ``.npy`` memory maps, or zarr arrays."""
    dtypes = [_TOPK[name] for name in _RESULTS]
    if out.suffix.lower() == ".zarr":
        import zarr

        group = zarr.open_group(str(out), mode="w")
        group.attrs.update({"eps": eps, "n": n, "schema": "certattn.certify/1"})
        size = tuple(max(1, int(c[0])) for c in chunks) if batch else ()
        return [
            group.create_array(name, shape=batch, chunks=size or None, dtype=dt)
            if hasattr(group, "create_array")
            else group.create_dataset(name, shape=batch, chunks=size or None, dtype=dt)
            for name, dt in zip(_RESULTS, dtypes, strict=True)
        ]
    if out.suffix.lower() == ".npz":
        raise InputError(
            f"{out}: for a sharded or zarr input --out is a directory (one .npy per result) "
            "or a .zarr store, not an .npz file"
        )
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "eps.npy", np.float64(eps))
    np.save(out / "n.npy", np.int64(n))
    return [
        np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=dt, shape=batch)
        for name, dt in zip(_RESULTS, dtypes, strict=True)
    ]


def certify_store(
    path: str | os.PathLike[str],
    eps: float,
    *,
    key: str | None = None,
    out: str | os.PathLike[str] | None = None,
    as_json: bool = False,
    masked_rows: str = "error",
    scheduler: str = "threads",
    progress: bool | None = False,
) -> int:
    """``certattn certify DIR``: certify a sharded or zarr input lazily; print as ``certify``.

    Reads with :func:`open_logits`, certifies block by block with
    :func:`certify_topk_dask`, writes ``out`` incrementally (a directory holding ``k.npy``,
    ``tail_upper.npy``, ``kl_upper.npy``, ``n_valid.npy``, ``masked.npy``, ``eps.npy``,
    ``n.npy`` -- the names of ``certify --out x.npz`` -- or a ``.zarr`` store with those
    arrays and ``eps``/``n`` attributes) and prints the summary table of ``certify`` from
    per-block partial statistics (integer sums exact, the mean of k/n summed with
    :func:`math.fsum`).  ``as_json`` prints the JSON of ``certify --json`` instead (which
    holds every row's result, so the result, not the input, is gathered in memory).
    ``progress`` (``True``, ``False`` or ``None`` = on a terminal, as
    :func:`certattn._progress.progress_enabled`) draws a bar of finished dask tasks on
    stderr, erased before the summary is printed.

    Returns
    -------
    int
        The exit status, 0.
    """
    import dask
    import dask.array

    from .topk import certify_topk

    x = open_logits(path, key)
    description = f"{path}" + (f" [{key}]" if key else "") + (
        f" (zarr store, read lazily in {x.npartitions} blocks)" if is_zarr(path)
        else f" (.npy shards, read lazily in {x.npartitions} blocks)"
    )
    cert = certify_topk(x, eps, masked_rows=masked_rows)
    results = [getattr(cert, name) for name in _RESULTS]
    stats = [dask.delayed(_block_stats)(b) for b in cert._records.to_delayed().ravel()]
    work: list[Any] = list(stats)
    if out is not None:
        target_dir = Path(out)
        if target_dir.resolve() == Path(path).resolve():
            raise InputError(f"{target_dir}: --out must not be the input itself")
        try:
            targets = _targets(target_dir, cert.batch_shape, cert.k.chunks, cert.eps, cert.n)
        except OSError as exc:
            raise InputError(f"cannot write {target_dir}: {exc.strerror or exc}") from None
        work.append(dask.array.store(results, targets, compute=False, lock=True))
    if as_json:
        work.extend(results)
    done = _compute_with_progress(work, scheduler, progress)
    summary = Summary.merge(list(done[: len(stats)]))
    if as_json:
        k, tail, kl, nv, masked = (np.asarray(a) for a in done[-len(_RESULTS):])
        doc = {
            "source": description, "batch_shape": list(k.shape), "n": cert.n, "eps": cert.eps,
            "k": k.ravel().tolist(), "tail_upper": tail.ravel().tolist(),
            "kl_upper": kl.ravel().tolist(), "n_valid": nv.ravel().tolist(),
            "masked": masked.ravel().tolist(),
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"certattn certify: {description}")
    print(f"eps = {cert.eps:g} (TV budget; KL(P_hat||P) <= {-math.log1p(-cert.eps):.4g}), key "
          f"axis n = {cert.n}; k is the certified minimal Top-k per row (sound in exact "
          "arithmetic)")
    if summary.masked:
        print(f"{summary.masked} fully masked rows skipped")
    print()
    print("| rows | count | mean n | mean k | mean k/n | reduction n/k | max tail bound |")
    print("|---|---|---|---|---|---|---|")
    print(summary.row("all"))
    return 0


def _compute_with_progress(work: list[Any], scheduler: str, flag: bool | None) -> tuple:
    """``dask.compute(*work)``, with a bar of finished tasks on stderr when ``flag`` says so
    (:func:`certattn._progress.progress_enabled`); the bar is erased at the end."""
    import dask
    from dask.callbacks import Callback

    from ._progress import Progress, progress_enabled

    if not progress_enabled(flag):
        return dask.compute(*work, scheduler=scheduler)
    bar = Progress("certifying", 0, unit="tasks")

    def show(state: dict) -> None:  # the local schedulers' state, as dask's own ProgressBar
        done = len(state["finished"])
        bar.update(done, done + sum(len(state[k]) for k in ("ready", "waiting", "running")))

    try:
        with Callback(start_state=lambda dsk, state: show(state),
                      posttask=lambda key, res, dsk, state, worker: show(state)):
            return dask.compute(*work, scheduler=scheduler)
    finally:
        bar.close()
