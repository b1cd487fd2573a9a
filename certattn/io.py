"""Reading logits from files, and the built-in sample.

Formats: ``.npy``, ``.npz`` (one array, or the one named by ``key``) and
``.safetensors`` (likewise; ``BF16`` and ``F8_*`` tensors need the small ``ml_dtypes``
package, a dependency of certattn).  Everything that can go wrong raises
:class:`~certattn.errors.InputError` (a ``ValueError``) with the file name in the
message, never a traceback from a third-party reader.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputError

__all__ = ["LogitsSource", "load_logits", "sample_logits"]


@dataclass(frozen=True)
class LogitsSource:
    """Logits with a human description of where they came from."""

    logits: np.ndarray
    description: str
    row_labels: np.ndarray | None = None  # optional group label per row (e.g. layer)
    label_name: str = ""


def _pick_name(names: list[str], key: str | None, path: Path) -> str:
    """The array to read: ``key``, or the only one; InputError otherwise."""
    if key is not None:
        if key not in names:
            listed = ", ".join(sorted(names)) or "none"
            raise InputError(f"{path}: no array named {key!r} (arrays: {listed})")
        return key
    if len(names) == 1:
        return names[0]
    if not names:
        raise InputError(f"{path}: the file holds no arrays")
    raise InputError(f"{path}: holds several arrays ({', '.join(sorted(names))}); "
                     "choose one with --key")


def _check_npy_size(fh: BinaryIO, available: int, path: Path) -> None:
    """Refuse a ``.npy`` stream whose header promises more data than ``available`` bytes.

    Reads the header from ``fh`` (at its start); a header claiming a huge shape is
    refused here, before NumPy would try to allocate it.
    """
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        start = fh.tell()
        read = npformat.read_array_header_1_0 if version == (1, 0) else (
            npformat.read_array_header_2_0)
        shape, _, dtype = read(fh)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise InputError(f"{path}: cannot read (bad .npy header: {exc})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects, not numbers")
    need = math.prod(shape) * dtype.itemsize
    have = available - (fh.tell() - start) - 6 - 2  # magic string and version bytes
    if need > have:
        raise InputError(
            f"{path}: truncated or corrupt: the header promises shape {tuple(shape)} of "
            f"{dtype} ({need:,} bytes), the file holds {max(have, 0):,}"
        )


_ML_DTYPES = ("BF16", "F8_", "F6_", "F4")
_ML_NAMES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "F8_E8M0": "float8_e8m0fnu"}


def _safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors of a ``.safetensors`` header (empty if it cannot be parsed)."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return {}
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:  # safetensors' own limit; its reader reports it
            return {}
        try:
            meta = json.loads(fh.read(size))
        except (UnicodeDecodeError, ValueError):
            return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if k != "__metadata__" and isinstance(v, dict)}


def _read_ml_tensor(path: Path, info: dict) -> np.ndarray:
    """A BF16/F8 tensor read directly (safetensors' NumPy reader lacks float8)."""
    import ml_dtypes

    dtype = np.dtype(getattr(ml_dtypes, _ML_NAMES[info["dtype"]]))
    shape = tuple(int(d) for d in info["shape"])
    start, stop = (int(v) for v in info["data_offsets"])
    if stop - start != math.prod(shape) * dtype.itemsize or start < 0:
        raise InputError(f"{path}: corrupt header (data offsets do not match the shape)")
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + size + start)
        data = fh.read(stop - start)
    if len(data) != stop - start:
        raise InputError(f"{path}: truncated (tensor data ends early)")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _import_ml_dtypes() -> None:
    import ml_dtypes  # noqa: F401  (registers bfloat16, float8_* with NumPy)


def _need_ml_dtypes(path: Path, dtypes: set[str]) -> None:
    """Import ``ml_dtypes`` when a tensor needs it; one clear error when it is missing."""
    wanted = sorted(d for d in dtypes if d.startswith(_ML_DTYPES))
    if not wanted:
        return
    try:
        _import_ml_dtypes()
    except ImportError:
        raise InputError(
            f"{path}: {', '.join(wanted)} tensors need the ml_dtypes package "
            "(pip install ml_dtypes)"
        ) from None


def load_logits(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """Read a logits array from ``.npy``, ``.npz`` or ``.safetensors``.

    Raises
    ------
    InputError
        Missing, unreadable or corrupt file, unknown extension, missing ``key``, a
        bfloat16/float8 tensor without ``ml_dtypes`` installed.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not a logits file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise InputError(f"{p}: --key applies to .npz and .safetensors files only")
            with p.open("rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise InputError(f"{p}: not a .npy file (bad magic bytes)")
                fh.seek(0)
                _check_npy_size(fh, p.stat().st_size, p)
            return np.load(p, allow_pickle=False)
        if suffix == ".npz":
            with zipfile.ZipFile(p) as zf:
                members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()
                           if i.filename.endswith(".npy")}
                info = members[_pick_name(list(members), key, p)]
                with zf.open(info) as fh:
                    _check_npy_size(fh, info.file_size, p)
                with zf.open(info) as fh:
                    return np.asarray(np.lib.format.read_array(fh, allow_pickle=False))
        if suffix == ".safetensors":
            from safetensors import safe_open

            header = _safetensors_header(p)
            _need_ml_dtypes(p, {str(v.get("dtype")) for v in header.values()})
            with safe_open(str(p), framework="numpy") as st:
                name = _pick_name(list(st.keys()), key, p)
                info = header.get(name, {})
                if info.get("dtype") in _ML_NAMES:
                    return _read_ml_tensor(p, info)
                return np.asarray(st.get_tensor(name))
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"{p}: cannot read ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{p}: cannot read ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # e.g. safetensors' own SafetensorError on corrupt headers
        raise InputError(f"{p}: cannot read ({exc.__class__.__name__}: {exc})") from None
    raise InputError(f"{p}: unknown format {suffix!r} (use .npy, .npz or .safetensors)")


def sample_logits() -> LogitsSource:
    """The built-in sample: real MiniLM-L6 attention logits, one row per query.

    Rows of every sentence, stored layer and head of the shipped sample
    (:func:`certattn.models.load_sample`), keys padded with ``-inf`` to a common length.
    """
    from .models import load_sample

    atts = load_sample()
    n = max(a.logits.shape[-1] for a in atts)
    rows, labels = [], []
    for a in atts:
        lg = np.asarray(a.logits, dtype=np.float32)  # (layers, heads, q, k)
        pad = np.full((*lg.shape[:-1], n), -np.inf, dtype=np.float32)
        pad[..., : lg.shape[-1]] = lg
        rows.append(pad.reshape(-1, n))
        layer = np.broadcast_to(np.asarray(a.layers)[:, None, None], lg.shape[:-1])
        labels.append(layer.reshape(-1))
    meta = atts[0].metadata
    name = meta.get("model", "sentence-transformers/all-MiniLM-L6-v2") if meta else "MiniLM"
    logits = np.concatenate(rows)
    desc = (
        f"built-in sample: real attention logits of {name} "
        f"({len(atts)} sentences, layers {', '.join(str(int(v)) for v in atts[0].layers)}, "
        f"{atts[0].logits.shape[1]} heads; {logits.shape[0]} query rows, keys padded to {n})"
    )
    return LogitsSource(logits, desc, np.concatenate(labels), "layer")
