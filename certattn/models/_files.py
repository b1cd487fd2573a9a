"""Errors and small readers shared by the model loaders (a leaf of ``certattn.models``).

Every value read from a model file is checked for its type and range here before it
sizes anything (:func:`as_int`, :func:`as_float`), so a hostile file gives one
:class:`ModelFileError` line, never a traceback or a huge allocation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from certattn.errors import InputError

__all__ = [
    "Fields", "ModelFileError", "as_float", "as_int", "check_finite", "load_json", "token_ids",
]

_F32_MAX = float(np.finfo(np.float32).max)


class ModelFileError(InputError):
    """A model file certattn cannot run: what is wrong, in one line.

    A message given on several lines (a third-party reader's) is joined into one.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_int(value: Any, what: str, *, minimum: int = 0) -> int:
    """``value`` as an int of at least ``minimum``, else a :class:`ModelFileError`.

    Parameters
    ----------
    value : Any
        Read from a file: only an int (not a bool) is accepted.
    what : str
        Names the value in the message (file and key).
    minimum : int
        Smallest accepted value.

    Returns
    -------
    int
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ModelFileError(f"{what} must be an integer, got {_show(value)}")
    if value < minimum:
        raise ModelFileError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def as_float(value: Any, what: str, *, positive: bool = False) -> float:
    """``value`` as a float32-finite float, non-negative (or positive), else a ModelFileError.

    The forwards run in float32, so a value beyond float32's range is refused too.

    Parameters
    ----------
    value : Any
        An int or float read from a file (not a bool, not a string).
    what : str
        Names the value in the message.
    positive : bool
        Require ``value > 0`` (else ``value >= 0``).

    Returns
    -------
    float
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ModelFileError(f"{what} must be a number, got {_show(value)}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0) or v > _F32_MAX:
        raise ModelFileError(
            f"{what} must be a {'positive' if positive else 'non-negative'} number within "
            f"float32's range, got {_show(value)}"
        )
    return v


class Fields:
    """Typed access to a file's settings (GGUF metadata, ``config.json``).

    Each value is checked for its type and range (:func:`as_int`, :func:`as_float`)
    before the loaders size anything by it.

    Parameters
    ----------
    values : dict
        The settings, as parsed.
    where : str
        Names them in messages (``"model.gguf: GGUF metadata"``, ``"folder/config.json"``).
    """

    def __init__(self, values: dict[str, Any], where: str) -> None:
        self.values = values
        self.where = where

    def value(self, key: str, default: Any = ...) -> Any:
        """``key``'s value; without a default, a missing key is a ModelFileError."""
        if key not in self.values:
            if default is ...:
                raise ModelFileError(f"{self.where} lacks {key!r}")
            return default
        return self.values[key]

    def int(self, key: str, default: Any = ..., *, minimum: int = 1) -> int:
        """Integer ``key`` of at least ``minimum``."""
        return as_int(self.value(key, default), f"{self.where} {key}", minimum=minimum)

    def float(self, key: str, default: Any = ..., *, positive: bool = False) -> float:
        """Non-negative (or positive) number ``key`` within float32's range."""
        return as_float(self.value(key, default), f"{self.where} {key}", positive=positive)

    def optional_int(self, key: str, *, minimum: int = 1) -> int | None:
        """Integer ``key``, or None when absent or null."""
        v = self.values.get(key)
        return None if v is None else as_int(v, f"{self.where} {key}", minimum=minimum)


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with one-line errors."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path.parent.name}: missing {path.name}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: not a JSON object (got a {type(doc).__name__})")
    return doc


def token_ids(ids: Any, rows: int, name: str, *, from_text: bool) -> np.ndarray:
    """``ids`` as int64, each a row of the ``rows``-row token embedding.

    Parameters
    ----------
    ids : sequence of int
    rows : int
        Rows of the token embedding.
    name : str
        Model name (in the message).
    from_text : bool
        The ids came from the model's own tokenizer: an id outside the embedding is then
        the file's fault (:class:`ModelFileError`), else the caller's (:class:`InputError`).

    Returns
    -------
    numpy.ndarray
    """
    arr = np.asarray(ids, dtype=np.int64)
    bad = (arr < 0) | (arr >= rows)
    if bad.any():
        error = ModelFileError if from_text else InputError
        raise error(
            f"{name}: token id {int(arr[bad][0])} is outside the vocabulary (the token "
            f"embedding has {rows} rows)" + ("; its tokenizer gave it" if from_text else "")
        )
    return arr


def check_finite(name: str, where: str, *arrays: np.ndarray) -> None:
    """Refuse non-finite activations of a forward (weights that overflow float32).

    Raises
    ------
    ModelFileError
        One line naming the model and the layer.
    """
    if not all(np.isfinite(a).all() for a in arrays):
        raise ModelFileError(
            f"{name}: {where} gives non-finite values (NaN or overflow of float32): its "
            "weights cannot be run"
        )
