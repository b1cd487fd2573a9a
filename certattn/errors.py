"""Exception types of certattn (a leaf module: it imports nothing).

:class:`InputError` marks a problem with what the caller passed in (a value outside a
function's domain, a file that cannot be read, an option that makes no sense).  It
subclasses :class:`ValueError`, so ``except ValueError`` keeps working; the command line
(:mod:`certattn.cli`) prints it as one line with exit status 2, while any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Invalid input: an argument outside its domain, an unreadable or malformed file.

    The message says what is wrong and where, in one line.
    """
