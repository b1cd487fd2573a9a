"""Attention approximations of the seed papers, with certificates where the theory gives one.

Every method returns :class:`certattn.approx._result.ApproxResult`.
"""

from __future__ import annotations

from ._result import ApproxResult

__all__ = ["ApproxResult"]
