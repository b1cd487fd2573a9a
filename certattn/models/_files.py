"""Errors and small readers shared by the model loaders (a leaf of ``certattn.models``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from certattn.errors import InputError

__all__ = ["ModelFileError", "load_json"]


class ModelFileError(InputError):
    """A model file certattn cannot run: what is wrong, in one line."""


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with one-line errors."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path.parent.name}: missing {path.name}") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from None
