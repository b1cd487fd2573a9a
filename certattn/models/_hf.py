"""Reading Hugging Face model folders (config, safetensors weights, tokenizer) without torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from certattn.models._files import ModelFileError, load_json


def hf_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder.

    Raises
    ------
    ModelFileError
        Missing or unreadable file.
    """
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a model folder")
    return load_json(folder / "config.json")


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every floating tensor of the folder's safetensors files, as float32.

    Reads ``model.safetensors``, or the shards listed by ``model.safetensors.index.json``
    (else every ``*.safetensors`` file).  bfloat16 tensors are widened through ml_dtypes.

    Raises
    ------
    ModelFileError
        No safetensors file, or one that cannot be read.
    """
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        files = _shards(folder, load_json(index).get("weight_map", {}))
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder.name}: missing model.safetensors")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(_read_safetensors(f))
    return out


_FLOATS = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
_OTHERS = {"BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Byte sizes of the dtypes read as data but not as weights (BF16 needs ml_dtypes)."""
MAX_HEADER = 100 << 20
"""Largest safetensors header accepted (the format's own limit, 100 MB)."""


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The floating tensors of a safetensors file, float32 (no torch; bfloat16 via ml_dtypes).

    The header's length, every entry's dtype, shape and byte range are checked against
    the file before a tensor is read: one :class:`ModelFileError` line otherwise.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from None
    header, data = _safetensors_header(raw, path.name)
    out = {}
    for name, (dtype, shape, a, b) in header.items():
        if dtype == "BF16":
            try:
                import ml_dtypes
            except ImportError:  # pragma: no cover - ml_dtypes ships with the test extra
                raise ModelFileError(f"{path.name}: bfloat16 weights need ml_dtypes "
                                     "(pip install ml_dtypes)") from None
            dt: Any = ml_dtypes.bfloat16
        elif dtype in _FLOATS:
            dt = _FLOATS[dtype]
        else:
            continue  # integer buffers (position ids)
        arr = np.frombuffer(data, dtype=dt, count=(b - a) // np.dtype(dt).itemsize, offset=a)
        out[name] = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    return out


def _safetensors_header(
    raw: bytes, file: str
) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], memoryview]:
    """Checked header entries ``name -> (dtype, shape, start, stop)`` and the data bytes."""
    if len(raw) < 8:
        raise ModelFileError(f"{file}: no safetensors header (the file has {len(raw)} bytes)")
    size = int.from_bytes(raw[:8], "little")
    if size > min(len(raw) - 8, MAX_HEADER):
        raise ModelFileError(f"{file}: a safetensors header of {size} bytes does not fit the "
                             f"{len(raw)}-byte file")
    try:
        header = json.loads(raw[8 : 8 + size])
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{file}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{file}: the safetensors header is not a JSON object")
    data = memoryview(raw)[8 + size :]
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            out[name] = _safetensors_entry(name, info, len(data), file)
    return out, data


def _safetensors_entry(
    name: str, info: Any, n_data: int, file: str
) -> tuple[str, tuple[int, ...], int, int]:
    dtype = info.get("dtype") if isinstance(info, dict) else None
    if not isinstance(dtype, str) or (dtype not in _FLOATS and dtype not in _OTHERS):
        raise ModelFileError(f"{file}: tensor {name} has unknown dtype {dtype!r:.40}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ModelFileError(f"{file}: tensor {name} has shape {shape!r:.40}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in offsets
    ) or not 0 <= offsets[0] <= offsets[1]:
        raise ModelFileError(f"{file}: tensor {name} has data_offsets {offsets!r:.40}")
    a, b = offsets
    if b > n_data:
        raise ModelFileError(f"{file}: tensor {name} (bytes {a}..{b}) runs beyond the end of "
                             f"the {n_data} data bytes")
    itemsize = np.dtype(_FLOATS[dtype]).itemsize if dtype in _FLOATS else _OTHERS[dtype]
    nbytes = math.prod(shape) * itemsize
    if nbytes != b - a:
        raise ModelFileError(f"{file}: tensor {name} of shape {shape} {dtype} needs {nbytes} "
                             f"bytes, its data_offsets give {b - a}")
    return dtype, tuple(shape), a, b


def _shards(folder: Path, weight_map: Any) -> list[Path]:
    """The shard files named by an index's ``weight_map`` (plain file names only)."""
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f and Path(f).name == f and f not in (".", "..")
        for f in weight_map.values()
    ):
        raise ModelFileError(f"{folder.name}/model.safetensors.index.json: weight_map is not "
                             "an object of shard file names")
    return sorted({folder / f for f in weight_map.values()})


def hf_tokenizer(folder: Path) -> Any:
    """``tokenizer.json`` of a folder as a ``tokenizers.Tokenizer`` (no padding/truncation).

    Raises
    ------
    ModelFileError
        Missing or unreadable file.
    """
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelFileError(f"{folder.name}: missing tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ModelFileError(f"{path}: cannot read ({exc})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok
