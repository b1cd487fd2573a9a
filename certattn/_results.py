"""Small shared pieces of result types (a leaf module)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

__all__ = ["Unpackable"]


class Unpackable:
    """Tuple unpacking and indexing for a result dataclass whose function returned a bare
    tuple in 0.1 (``lo, hi = block_tail_bounds(...)`` keeps working)."""

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fields())

    def __getitem__(self, i: int) -> Any:
        return self._fields()[i]

    def __len__(self) -> int:
        return len(self._fields())
