"""Symbolic check of Theorem TOPK-MINIMAL (the certificate of ``certattn.certify_topk``).

The minimal budget ``k_eps = min{k : tau_k <= eps}`` is well defined and found by one
scan from the small end because ``tau_k = T_k / Z`` (``T_k`` the sum of the ``n - k``
smallest terms ``e^{s_i}``) is non-increasing in ``k``: ``tau_k - tau_{k+1} = p_{k+1} >= 0``.
The rounding margin of the kernel is a separate (numerical) analysis in
``certattn/topk.py`` and is checked by ``certattn verify --only TOPK-MINIMAL``.
"""

from __future__ import annotations

import sympy as sp

from ._harness import proof


@proof("TOPK-MINIMAL", "tau_k - tau_{k+1} = p_{k+1} >= 0: the tail is non-increasing in k")
def tail_monotone() -> None:
    n = 6
    e = sp.symbols(f"e1:{n + 1}", positive=True)  # e_i = exp(s_i), sorted descending
    z = sum(e)

    def tau(k: int) -> sp.Expr:
        return sum(e[k:]) / z

    for k in range(n):
        step = sp.simplify(tau(k) - tau(k + 1) - e[k] / z)
        assert step == 0, (k, step)
        assert (e[k] / z).is_positive
    assert sp.simplify(tau(0) - 1) == 0 and tau(n) == 0
