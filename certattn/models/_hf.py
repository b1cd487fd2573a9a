"""Reading Hugging Face model folders (config, safetensors weights, tokenizer) without torch."""

from __future__ import annotations

import json
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
        files = sorted({folder / f for f in load_json(index).get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder.name}: missing model.safetensors")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(_read_safetensors(f))
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file read with its JSON header (no torch; bfloat16 via ml_dtypes)."""
    dtypes: dict[str, Any] = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
    try:
        import ml_dtypes

        dtypes["BF16"] = ml_dtypes.bfloat16
    except ImportError:  # pragma: no cover - ml_dtypes ships with the test extra
        pass
    try:
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = dtypes.get(info.get("dtype"))
        if dt is None:
            if info.get("dtype") == "BF16":
                raise ModelFileError(f"{path.name}: bfloat16 weights need ml_dtypes "
                                     "(pip install ml_dtypes)")
            continue  # integer buffers (position ids)
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw, dtype=dt, count=(b - a) // np.dtype(dt).itemsize,
                            offset=base + a)
        out[name] = np.ascontiguousarray(arr.reshape(info["shape"]), dtype=np.float32)
    return out


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
