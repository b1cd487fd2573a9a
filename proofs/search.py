"""Symbolic checks of certified search (SEARCH-SOUND) and its cell bounds (BLOCK-SCORE,
BLOCK-MASS).

Reductions (stated here, the key steps checked below):

* SEARCH-SOUND.  With scored keys S, kept A (subset of S), unscored mass x and any upper
  bound X >= x on it, the exact tail is ``tau(A) = 1 - Z_A/(Z_S + x) = (a + x)/(b + x)``
  with ``a = Z_S - Z_A <= b = Z_S``; ``d/dx (a + x)/(b + x) = (b - a)/(b + x)^2 >= 0``, so
  replacing x by X gives an upper bound.  The per-cell ``X = sum_j n_j e^{U_j}`` bounds x
  because every score of cell j is at most U_j (BLOCK-SCORE).
* BLOCK-SCORE (ball).  ``q.k = q.c + q.(k - c) <= q.c + |q||k - c| <= q.c + |q| r`` by
  Cauchy-Schwarz (Lagrange's identity ``|q|^2|u|^2 - (q.u)^2 = |q x u|^2 >= 0`` in 3-D, the
  general case being the sum of squares ``sum_{i<j} (q_i u_j - q_j u_i)^2``); equality at
  ``k = c + r q/|q|``.  (Box) coordinate-wise ``q_j k_j <= max(q_j lo_j, q_j hi_j)`` for
  ``lo_j <= k_j <= hi_j``, attained at a corner.
* BLOCK-MASS (Bennett).  For ``Y <= b``, ``E Y = 0``, ``E Y^2 <= v``: the quadratic
  ``p(y) = alpha + beta y + gamma y^2`` with ``p(a) = e^a``, ``p'(a) = e^a``, ``p(b) = e^b``,
  ``a = -v/b``, majorises ``e^y`` on ``(-inf, b]`` (``h = p - e^y`` has a double zero at a and
  a zero at b, ``h''' = -e^y < 0`` allows no other zero, ``h -> +inf`` at ``-inf``), and
  ``gamma >= 0`` (convexity), so ``E e^Y <= alpha + gamma v``, which equals the two-point
  value ``(v e^b + b^2 e^{-v/b})/(v + b^2)``.
"""

from __future__ import annotations

import sympy as sp

from proofs._harness import proof


@proof("SEARCH-SOUND", "(a+x)/(b+x) is non-decreasing in x when a <= b")
def ratio_monotone() -> None:
    a, c = sp.symbols("a c", nonnegative=True)
    x = sp.symbols("x", positive=True)
    b = a + c  # b >= a
    r = (a + x) / (b + x)
    d = sp.simplify(sp.diff(r, x))
    assert sp.simplify(d - c / (b + x) ** 2) == 0
    assert sp.simplify(c / (b + x) ** 2).is_nonnegative


@proof("SEARCH-SOUND", "tail of A with unscored mass x is (Z_S - Z_A + x)/(Z_S + x)")
def tail_as_ratio() -> None:
    za, zs, x = sp.symbols("Z_A Z_S x", positive=True)
    tau = 1 - za / (zs + x)
    assert sp.simplify(tau - (zs - za + x) / (zs + x)) == 0


@proof("BLOCK-SCORE", "ball bound: Lagrange identity (Cauchy-Schwarz) and equality case")
def ball_bound() -> None:
    q = sp.Matrix(sp.symbols("q1:4", real=True))
    u = sp.Matrix(sp.symbols("u1:4", real=True))
    c = sp.Matrix(sp.symbols("c1:4", real=True))
    r = sp.symbols("r", positive=True)
    lagrange = q.dot(q) * u.dot(u) - q.dot(u) ** 2 - q.cross(u).dot(q.cross(u))
    assert sp.expand(lagrange) == 0
    qn = sp.sqrt(q.dot(q))
    k_star = c + r * q / qn
    assert sp.simplify(q.dot(k_star) - (q.dot(c) + qn * r)) == 0
    assert sp.simplify((k_star - c).dot(k_star - c) - r**2) == 0


@proof("BLOCK-SCORE", "box bound: q k <= max(q lo, q hi) for lo <= k <= hi, both signs of q")
def box_bound() -> None:
    p, s, t = sp.symbols("p s t", nonnegative=True)  # k = lo + s, hi = k + t
    lo = sp.symbols("lo", real=True)
    k, hi = lo + s, lo + s + t
    # q = p >= 0: the max is q hi, and q hi - q k = p t >= 0
    assert sp.expand(p * hi - p * k - p * t) == 0 and (p * t).is_nonnegative
    # q = -p <= 0: the max is q lo, and q lo - q k = p s >= 0
    assert sp.expand(-p * lo - (-p * k) - p * s) == 0 and (p * s).is_nonnegative


@proof("BLOCK-MASS", "Bennett: quadratic majorant through (a,e^a) tangent, (b,e^b); E = 2-point")
def bennett_mass() -> None:
    b, v = sp.symbols("b v", positive=True)
    y = sp.symbols("y", real=True)
    a = -v / b
    gamma = (sp.exp(b) - sp.exp(a) - sp.exp(a) * (b - a)) / (b - a) ** 2
    p = sp.exp(a) + sp.exp(a) * (y - a) + gamma * (y - a) ** 2
    assert sp.simplify(p.subs(y, a) - sp.exp(a)) == 0
    assert sp.simplify(sp.diff(p, y).subs(y, a) - sp.exp(a)) == 0
    assert sp.simplify(p.subs(y, b) - sp.exp(b)) == 0
    # h''' = -e^y < 0
    assert sp.simplify(sp.diff(p - sp.exp(y), y, 3) + sp.exp(y)) == 0
    # gamma >= 0: gamma (b-a)^2 = e^a (e^t - 1 - t), t = b - a > 0, and e^t - 1 - t >= 0
    t = sp.symbols("t", positive=True)
    f = sp.exp(t) - 1 - t
    assert f.subs(t, 0) == 0 and sp.simplify(sp.diff(f, t) - (sp.exp(t) - 1)) == 0
    assert sp.simplify(gamma * (b - a) ** 2 - sp.exp(a) * f.subs(t, b - a)) == 0
    # E p(Y) with E Y = 0, E Y^2 = v equals the two-point average
    poly = sp.Poly(sp.expand(p), y)
    alpha0, gamma2 = poly.coeff_monomial(1), poly.coeff_monomial(y**2)
    target = (v * sp.exp(b) + b**2 * sp.exp(-v / b)) / (v + b**2)
    assert sp.simplify(alpha0 + gamma2 * v - target) == 0
    # numeric spot check of the majorant on (-inf, b]
    vals = {b: sp.Rational(3, 2), v: sp.Rational(2, 3)}
    for yy in (-8, -2, -1, -sp.Rational(4, 9), 0, 1, sp.Rational(3, 2)):
        assert sp.N((p - sp.exp(y)).subs(vals).subs(y, yy)) >= -1e-30
