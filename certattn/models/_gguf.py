"""A bounded reader of GGUF files (versions 2 and 3).

Every count, length, dimension and offset the file declares is checked against the bytes
the file holds before anything is sized by it: a string of ``n`` bytes, an array of ``n``
items (each at least its item size) or ``n`` metadata entries or tensors must fit in what
is left of the file, a tensor's data must lie inside the data section and not overlap the
next tensor's.  A file that fails a check is one :class:`ModelFileError` line; loops run
over at most as many items as the file has bytes.  Tensor data are memory-mapped and
dequantised (``gguf.quants``) one tensor at a time.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from certattn.models._files import ModelFileError

__all__ = ["GGUFFile", "GGUFTensor", "read_gguf"]

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4
"""ggml's ``GGML_MAX_DIMS``."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's header: ``shape`` in numpy order (slowest axis first)."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata as Python values, tensor headers, the mapped bytes."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    buffer: Any
    order: str

    def tensor(self, name: str) -> np.ndarray:
        """The float32 values of tensor ``name`` (a fresh array).

        Raises
        ------
        ModelFileError
            A quantization type ``gguf.quants`` cannot dequantize.
        """
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        t = self.tensors[name]
        qtype = GGMLQuantizationType(t.type)
        raw = np.frombuffer(self.buffer, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        floats = {GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F16: "f2",
                  GGMLQuantizationType.F64: "f8"}
        if qtype in floats:
            return raw.view(self.order + floats[qtype]).reshape(t.shape).astype(np.float32)
        if self.order == ">":
            raise ModelFileError(f"{self.path.name}: big-endian {qtype.name} tensors are not "
                                 "supported")
        try:
            out = dequantize(raw.reshape(quant_shape_to_byte_shape(t.shape, qtype)), qtype)
        except NotImplementedError:
            raise ModelFileError(
                f"{self.path.name}: tensor {name} has type {qtype.name}, which cannot be "
                "dequantized here"
            ) from None
        return np.asarray(out, dtype=np.float32).reshape(t.shape)


class _Cursor:
    """Reads the header of a mapped file, refusing to step past its end."""

    def __init__(self, buf: Any, name: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.name = name
        self.order = "<"

    def take(self, n: int, what: str) -> int:
        if self.pos + n > self.size:
            raise ModelFileError(
                f"{self.name}: truncated ({what} at byte {self.pos} needs {n} bytes; the file "
                f"has {self.size})"
            )
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def count(self, what: str, item_bytes: int) -> int:
        """A declared number of items, each taking at least ``item_bytes`` bytes."""
        n = self.scalar("Q", f"the count of {what}")
        if n * item_bytes > self.size - self.pos:
            raise ModelFileError(
                f"{self.name}: truncated or corrupt: declares {n} {what}, more than the "
                f"{self.size - self.pos} bytes left in the file can hold"
            )
        return n

    def string(self, what: str) -> str:
        n = self.count(f"bytes in {what}", 1)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.name}: {what} is not UTF-8") from None

    def value(self, kind: int, what: str, *, nested: bool = False) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY and not nested:
            sub = self.scalar("I", what)
            if sub in _SCALARS:
                size = struct.calcsize(_SCALARS[sub])
                n = self.count(f"items in {what}", size)
                start = self.take(n * size, what)
                dtype = np.dtype(self.order + _SCALARS[sub])
                return np.frombuffer(self.buf, dtype=dtype, count=n, offset=start).tolist()
            if sub == _STRING:
                n = self.count(f"items in {what}", 8)
                return [self.string(what) for _ in range(n)]
            kind = sub
        raise ModelFileError(f"{self.name}: {what} has unsupported value type {kind}")


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF file's header and locate its tensors, with every size checked.

    Parameters
    ----------
    path : pathlib.Path

    Returns
    -------
    GGUFFile

    Raises
    ------
    ModelFileError
        Unreadable, truncated or inconsistent file: one line naming what and where.
    """
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from None
    cur = _Cursor(buf, path.name)
    if bytes(buf[:4]) != b"GGUF":
        cur.take(4, "the magic")
        raise ModelFileError(f"{path.name}: not a GGUF file")
    cur.pos = 4
    version = cur.scalar("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cur.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in (2, 3):
        raise ModelFileError(f"{path.name}: GGUF version {version} is not supported (2, 3)")
    n_tensors = cur.scalar("Q", "the tensor count")
    n_kv = cur.count("metadata entries", 8 + 4 + 1)
    if n_tensors * (8 + 4 + 4 + 8) > cur.size - cur.pos:
        raise ModelFileError(f"{path.name}: truncated or corrupt: declares {n_tensors} "
                             "tensors, more than the file can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in metadata:
            raise ModelFileError(f"{path.name}: metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.scalar("I", f"the type of {key!r}"), repr(key))
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    align = metadata.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
        raise ModelFileError(f"{path.name}: general.alignment {align!r} is not a power of two")
    start = -(-cur.pos // align) * align
    tensors = _locate(infos, start, cur.size, path.name)
    return GGUFFile(path, metadata, tensors, buf, cur.order)


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("a tensor name")
    n_dims = cur.scalar("I", f"the dimension count of {name}")
    if n_dims > MAX_DIMS:
        raise ModelFileError(f"{cur.name}: tensor {name} has {n_dims} dimensions (at most "
                             f"{MAX_DIMS})")
    dims = [cur.scalar("Q", f"the dimensions of {name}") for _ in range(n_dims)]
    kind = cur.scalar("I", f"the type of {name}")
    offset = cur.scalar("Q", f"the offset of {name}")
    return name, tuple(reversed(dims)), kind, offset


def _locate(
    infos: list[tuple[str, tuple[int, ...], int, int]], start: int, size: int, file: str
) -> dict[str, GGUFTensor]:
    """Tensor headers with their byte ranges checked: inside the file, not overlapping."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    out: dict[str, GGUFTensor] = {}
    for name, shape, kind, offset in infos:
        if name in out:
            raise ModelFileError(f"{file}: tensor {name} appears twice")
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFileError(f"{file}: tensor {name} has unknown type {kind}") from None
        inner = shape[-1] if shape else 1
        if inner % block:
            raise ModelFileError(f"{file}: tensor {name} has rows of {inner} values, not a "
                                 f"multiple of the {qtype.name} block of {block}")
        nbytes = int(np.prod(shape, dtype=object)) // block * type_size
        if start + offset + nbytes > size:
            raise ModelFileError(
                f"{file}: tensor {name} ({nbytes} bytes at offset {offset}) runs beyond the "
                f"end of the {size}-byte file"
            )
        out[name] = GGUFTensor(name, shape, kind, start + offset, nbytes)
    ranges = sorted(out.values(), key=lambda t: t.offset)
    for a, b in itertools.pairwise(ranges):
        if a.offset + a.nbytes > b.offset:
            raise ModelFileError(
                f"{file}: tensor {a.name} of shape {a.shape} ({a.nbytes} bytes) overlaps "
                f"tensor {b.name}: its shape does not match its bytes"
            )
    return out
