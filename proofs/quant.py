"""Symbolic checks of per-key score bounds from quantized keys (QUANT-SCORE).

Reductions (stated here, the key steps checked below):

* Grid.  With ``lo <= k <= lo + L step`` the real quotient ``t = (k - lo)/step`` lies in
  ``[0, L]`` and ``k - (lo + step c) = step (t - c)`` for any code ``c``.  The float64
  quotient ``t'`` satisfies ``|t' - t| <= 2.01 u L`` and the code ``c = clip(rint(t'), 0, L)``
  has ``|t' - c| <= 1/2``, so ``|t - c| <= 1/2 + 2.01 u L <= 1/2 + 2^(b+2) u``
  (``quant_step_factor``).
* Score.  ``q.k - q.khat = sum_j q_j e_j`` with ``|e_j| <= delta_j``; each term
  ``q_j e_j`` lies in ``[-|q_j| delta_j, |q_j| delta_j]`` (a linear function of ``e_j`` is
  extreme at an end of the interval), and ``|q.e| <= |q| |e|`` by Cauchy-Schwarz
  (Lagrange's identity, checked for BLOCK-SCORE); either bound, hence their minimum,
  holds.
* Paged search.  With unopened pages ``P``, the unscored keys of opened pages are the
  unscored keys minus those of unopened pages (a subset), so
  ``X = sum_P n_p e^{U_p} + C - D`` with ``C`` the unscored keys' bound mass and ``D``
  the unopened pages' keys' bound mass; computed sums ``C'``, ``D'`` within relative
  ``g`` make ``C'(1 + g) - D'(1 - g)`` an upper bound on ``C - D``.
"""

from __future__ import annotations

import sympy as sp

from proofs._harness import proof


@proof("QUANT-SCORE", "grid: k - (lo + step c) = step (t - c) and |t - c| <= 1/2 + |t' - t|")
def grid_rounding() -> None:
    k, lo, c = sp.symbols("k lo c", real=True)
    step = sp.symbols("step", positive=True)
    t = (k - lo) / step
    assert sp.simplify(k - (lo + step * c) - step * (t - c)) == 0
    # triangle inequality |t - c| <= |t - t'| + |t' - c| with |t' - c| <= 1/2: every sign
    # pattern of the two differences, as linear facts with non-negative slack
    a, b = sp.symbols("a b", nonnegative=True)  # |t - t'| = a, |t' - c| = b <= 1/2
    for s1 in (1, -1):
        for s2 in (1, -1):
            diff = s1 * a + s2 * b  # t - c = (t - t') + (t' - c)
            assert sp.expand((a + b) - diff).is_nonnegative  # diff <= a + b
            assert sp.expand((a + b) + diff).is_nonnegative  # -diff <= a + b


@proof("QUANT-SCORE", "float64 code: 1/2 + 2.01 u (2^b - 1) <= quant_step_factor(b), exactly")
def code_margin() -> None:
    from certattn._fp import quant_step_factor

    u = sp.Rational(1, 2**53)
    for b in (2, 4, 8):
        need = sp.Rational(1, 2) + sp.Rational(201, 100) * u * (2**b - 1)
        assert sp.Rational(quant_step_factor(b)) >= need
        # |t' - t| <= t ((1 + u)^2 - 1) <= 2.01 u L for t <= L
        assert ((1 + u) ** 2 - 1) * (2**b - 1) <= sp.Rational(201, 100) * u * (2**b - 1)


@proof("QUANT-SCORE", "nested grid: |C - (2^h c + (2^h - 1)/2)| <= (2^h - 1)/2 for the codes "
                      "C with top bits c = C >> h, and the product step (2^h c + ...) is exact")
def nested_run() -> None:
    for grid in (2, 4, 8):
        for bits in (2, 4, 8):
            if bits > grid:
                continue
            h = grid - bits
            run = 2**h
            for code in range(2**grid):
                c = code >> h
                mid = sp.Rational(2 * run * c + run - 1, 2)
                assert sp.Abs(code - mid) <= sp.Rational(run - 1, 2)
                # 2 mid is an integer below 2^(grid + 1) <= 2^9: 9 significant bits, so
                # step (24 bits) times mid has at most 33 < 53 bits
                assert (2 * mid).is_integer and 2 * mid < 2 ** (grid + 1)


@proof("QUANT-SCORE", "q e in [-|q| delta, |q| delta] for e in [-delta, delta], both signs of q")
def coordinate_bound() -> None:
    p, delta = sp.symbols("p delta", nonnegative=True)
    e = sp.symbols("e", real=True)
    for q in (p, -p):
        f = q * e
        # linear in e: extremes at e = +-delta, both within [-|q| delta, |q| delta]
        assert sp.diff(f, e, 2) == 0
        for end in (delta, -delta):
            v = f.subs(e, end)
            assert sp.simplify(p * delta - v).is_nonnegative
            assert sp.simplify(p * delta + v).is_nonnegative


@proof("QUANT-SCORE", "sum of coordinate bounds: q.khat - sum|q_j| d_j <= q.k <= q.khat + ...")
def score_sum() -> None:
    n = 4
    q = sp.symbols(f"q1:{n + 1}", real=True)
    kh = sp.symbols(f"h1:{n + 1}", real=True)
    s = sp.symbols(f"s1:{n + 1}", nonnegative=True)  # slack |q_j| delta_j - q_j e_j >= 0
    bound = sp.symbols(f"b1:{n + 1}", nonnegative=True)  # |q_j| delta_j
    qe = [bound[j] - s[j] for j in range(n)]  # q_j e_j = |q_j| delta_j - slack
    score = sum(q[j] * kh[j] for j in range(n)) + sum(qe)
    upper = sum(q[j] * kh[j] for j in range(n)) + sum(bound)
    assert sp.simplify(upper - score - sum(s)) == 0


@proof("QUANT-SCORE", "paged X: C'(1+g) - D'(1-g) bounds C - D when C <= C'(1+g), D >= D'(1-g)")
def paged_frontier() -> None:
    c1, d1, g = sp.symbols("C1 D1 g", nonnegative=True)
    a, b = sp.symbols("a b", nonnegative=True)
    c_exact = c1 * (1 + g) - a
    d_exact = d1 * (1 - g) + b
    assert sp.simplify((c1 * (1 + g) - d1 * (1 - g)) - (c_exact - d_exact) - (a + b)) == 0
