"""Symbolic (SymPy) checks of every registered theorem.  Run ``python -m proofs``."""

from __future__ import annotations

import importlib
import pkgutil

try:
    import sympy  # noqa: F401
except ImportError as exc:  # pragma: no cover - the test extra installs sympy
    raise ImportError("the symbolic proofs need SymPy: pip install 'certattn[proofs]'") from exc

from ._harness import PROOFS, Proof, proof

__all__ = ["PROOFS", "Proof", "load_all", "proof"]


def load_all() -> list[Proof]:
    """Import every proof module of this package and return the registered checks."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return list(PROOFS)
