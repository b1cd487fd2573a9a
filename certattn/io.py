"""Reading logits from files, and the built-in sample.

Formats: ``.npy``, ``.npz`` (one array, or the one named by ``key``) and
``.safetensors`` (likewise).  Everything that can go wrong raises ``ValueError`` with
the file name in the message, never a traceback from a third-party reader.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LogitsSource", "load_logits", "sample_logits"]


@dataclass(frozen=True)
class LogitsSource:
    """Logits with a human description of where they came from."""

    logits: np.ndarray
    description: str
    row_labels: np.ndarray | None = None  # optional group label per row (e.g. layer)
    label_name: str = ""


def _pick(arrays: dict[str, np.ndarray], key: str | None, path: Path) -> np.ndarray:
    if key is not None:
        if key not in arrays:
            names = ", ".join(sorted(arrays)) or "none"
            raise ValueError(f"{path}: no array named {key!r} (arrays: {names})")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if not arrays:
        raise ValueError(f"{path}: the file holds no arrays")
    names = ", ".join(sorted(arrays))
    raise ValueError(f"{path}: holds several arrays ({names}); choose one with --key")


def load_logits(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """Read a logits array from ``.npy``, ``.npz`` or ``.safetensors``.

    Raises
    ------
    ValueError
        Missing, unreadable or corrupt file, unknown extension, missing ``key``.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, not a logits file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise ValueError(f"{p}: --key applies to .npz and .safetensors files only")
            with p.open("rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise ValueError(f"{p}: not a .npy file (bad magic bytes)")
            return np.load(p, allow_pickle=False)
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return np.asarray(_pick({name: z[name] for name in z.files}, key, p))
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return _pick(load_file(str(p)), key, p)
    except ValueError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise ValueError(f"{p}: cannot read ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{p}: cannot read ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # e.g. safetensors' own SafetensorError on corrupt headers
        raise ValueError(f"{p}: cannot read ({exc.__class__.__name__}: {exc})") from None
    raise ValueError(f"{p}: unknown format {suffix!r} (use .npy, .npz or .safetensors)")


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
