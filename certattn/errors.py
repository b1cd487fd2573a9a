"""certattn's exception for bad input (a leaf module: it imports nothing)."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input to a certattn function: what is wrong and where, in one line.

    A subclass of :class:`ValueError`, so ``except ValueError`` keeps working; the CLI
    prints it as one line with exit status 2 (other exceptions are bugs and keep their
    traceback).
    """
