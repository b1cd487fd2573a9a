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


@proof("TOPK-MINIMAL", "the compiled kernel's polynomial exp errs by at most EXP_POLY_ERR")
def polynomial_exp_bound() -> None:
    """The error budget of ``certattn._topk_numba_kernels._exp_poly`` (derived in
    ``certattn/_topk_numba.py``), in exact rational arithmetic: the Cody-Waite constants,
    the reduced argument's range, truncation + Horner + reduction <= EXP_POLY_ERR, and
    that this lies inside the per-term margin GAMMA_EXP the acceptance test grants."""
    from fractions import Fraction

    from certattn._fp import EXP_POLY_ERR, GAMMA_EXP
    from certattn._topk_numba import _kernel_constants

    c = _kernel_constants()
    hi, lo = sp.Rational(Fraction(c["LN2_HI"])), sp.Rational(Fraction(c["LN2_LO"]))
    u = sp.Rational(1, 2**53)
    # LN2_HI has at most 32 significant bits: n * LN2_HI is exact for |n| <= 1025
    mant = Fraction(c["LN2_HI"]).numerator
    assert mant.bit_length() - (mant & -mant).bit_length() + 1 <= 32
    assert abs(sp.log(2) - hi - lo).evalf(60) <= sp.Rational(1, 2**86)
    # |r| <= ln2 / 2 + (rounding of a * log2(e), |a| <= 710): within R
    r_max = sp.Rational(347, 1000)
    assert (sp.log(2) / 2 + 710 * 4 * u).evalf(40) < r_max
    # degree 11: truncation R^12/12! e^R, Horner gamma_23 e^R, relative to e^-R
    trunc = r_max**12 / sp.factorial(12) * sp.exp(2 * r_max)
    horner = 23 * u / (1 - 23 * u) * sp.exp(2 * r_max)
    reduction = sp.Rational(7, 10) * u  # |r-hat - r| <= 0.7u, exp'(r) / exp(r) = 1
    total = (1 + trunc) * (1 + horner) * sp.exp(reduction) - 1
    bound = sp.Rational(Fraction(EXP_POLY_ERR))
    assert total.evalf(50) <= bound, total.evalf(10) / u
    assert bound <= sp.Rational(Fraction(GAMMA_EXP))
