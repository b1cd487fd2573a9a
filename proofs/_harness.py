"""Tiny harness for the symbolic checks in ``proofs/``.

Each proof module defines functions decorated with :func:`proof`; the decorator
records the theorem id and a one-line description.  A proof function raises
``AssertionError`` (or any exception) on failure and returns ``None`` on success.
``python -m proofs`` imports every module of this package and runs every check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PROOFS", "Proof", "proof"]


@dataclass(frozen=True)
class Proof:
    """One symbolic check of one registered theorem."""

    theorem: str
    what: str
    func: Callable[[], None]
    module: str


PROOFS: list[Proof] = []


def proof(theorem: str, what: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register ``func`` as a symbolic check of ``theorem`` (a registry id)."""

    def register(func: Callable[[], None]) -> Callable[[], None]:
        PROOFS.append(Proof(theorem, what, func, func.__module__))
        return func

    return register
