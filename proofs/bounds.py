"""Symbolic checks of the logit-only tail bounds (THEORY.md section 3; certattn.bounds, .blocks).

Reductions used for the inequalities: every bound is ``X / (D + X)`` with ``X`` an upper
bound on the tail sum and ``D`` a lower bound on the head sum (in units of ``e^{s_k}``);
``t / (h + t)`` is increasing in ``t`` and decreasing in ``h`` (checked below), so it
suffices to check the termwise inequalities, which hold because the logits are sorted.
"""

from __future__ import annotations

import sympy as sp

from proofs._harness import proof

k, n, m = sp.symbols("k n m", positive=True, integer=True)
a, b, t, h = sp.symbols("a b t h", positive=True)
eps, delta = sp.symbols("epsilon delta", positive=True)
D = sp.Symbol("Delta", real=True)


def _zero(expr: sp.Expr, what: str) -> None:
    res = sp.simplify(expr)
    if res != 0:
        raise AssertionError(f"{what}: residual {res}")


@proof("GAP-SINGLE", "ratio t/(h+t) increases in t, decreases in h (reduction of every bound)")
def ratio_monotone() -> None:
    f = t / (h + t)
    if not sp.simplify(sp.diff(f, t) - h / (h + t) ** 2) == 0:
        raise AssertionError("d/dt t/(h+t) != h/(h+t)^2 > 0")
    if not sp.simplify(sp.diff(f, h) + t / (h + t) ** 2) == 0:
        raise AssertionError("d/dh t/(h+t) != -t/(h+t)^2 < 0")


@proof(
    "GAP-SINGLE",
    "two-level logits: exact tail equals Thm 4.5's closed form 1/(1 + k/(n-k) e^Delta)",
)
def gap_single_equality() -> None:
    # k logits at level s_k = Delta, n - k at level s_{k+1} = 0
    exact_tail = (n - k) * sp.exp(0) / (k * sp.exp(D) + (n - k) * sp.exp(0))
    closed = 1 / (1 + k / (n - k) * sp.exp(D))
    _zero(exact_tail - closed, "two-level tail vs closed form")
    general = (n - k) * sp.exp(b) / (k * sp.exp(a) + (n - k) * sp.exp(b))
    _zero(general.subs(a, b + D) - closed, "general form with s_k - s_{k+1} = Delta")


@proof("GAP-SINGLE", "certify condition: bound <= eps iff Delta >= ln((n-k)/k) + ln((1-eps)/eps)")
def gap_single_certify() -> None:
    nk = sp.Symbol("r", positive=True)  # r = (n - k)/k
    bound = 1 / (1 + sp.exp(D) / nk)
    thr = sp.log(nk) + sp.log((1 - eps) / eps)
    # at the threshold the bound equals eps; the bound decreases in Delta
    _zero(bound.subs(D, thr) - eps, "bound at the threshold")
    dd = sp.simplify(sp.diff(bound, D))
    if not sp.simplify(dd + sp.exp(D) / nk / (1 + sp.exp(D) / nk) ** 2) == 0:
        raise AssertionError(f"d bound / d Delta = {dd} is not -(e^D/r)/(1+e^D/r)^2 < 0")


@proof("GAP-MULTI", "m = 0 (one segment of n - k keys) reduces X/(k+X) to Thm 4.5")
def multigap_m0() -> None:
    X = (n - k) * sp.exp(-D)  # X = (j_1 - j_0) exp(-(s_k - s_{k+1})), j_0 = k, j_1 = n
    _zero(X / (k + X) - 1 / (1 + k / (n - k) * sp.exp(D)), "m = 0")


@proof(
    "GAP-MULTI",
    "cutting every position makes X the exact tail over e^{s_k}; splits never increase X",
)
def multigap_all_and_split() -> None:
    s = sp.symbols("s1:5", real=True)  # s_{k+1} >= ... >= s_{k+4}, relative to s_k
    exact_x = sum(sp.exp(si) for si in s)
    all_cuts = sum(1 * sp.exp(si) for si in s)  # every segment has length 1
    _zero(all_cuts - exact_x, "all-gap X")
    # splitting [a, c) at b: (c - a) e^{s_a} - ((b - a) e^{s_a} + (c - b) e^{s_b})
    # = (c - b)(e^{s_a} - e^{s_b}) >= 0 since s_a >= s_b
    L1, L2 = sp.symbols("L1 L2", positive=True)
    sa, sb = sp.symbols("s_a s_b", real=True)
    diff = (L1 + L2) * sp.exp(sa) - (L1 * sp.exp(sa) + L2 * sp.exp(sb))
    _zero(diff - L2 * (sp.exp(sa) - sp.exp(sb)), "split gain")


@proof(
    "GAP-UNIFORM",
    "gaps >= delta: X <= sum_r e^{-r delta} = 1/(e^delta - 1), X/(k+X) = 1/(1 + k(e^delta - 1))",
)
def uniform_gap() -> None:
    # partial sums c(N) = sum_{r=1}^N x^r, x = e^{-delta} in (0, 1): closed form by
    # induction, and the series limit x/(1-x) exceeds every partial sum by x^{N+1}/(1-x)
    x = sp.Symbol("x", positive=True)
    N = sp.Symbol("N", integer=True, positive=True)
    c = x * (1 - x**N) / (1 - x)
    _zero(c.subs(N, 1) - x, "c(1) = x")
    _zero(c.subs(N, N + 1) - c - x ** (N + 1), "c(N+1) - c(N) = x^(N+1)")
    limit = x / (1 - x)
    _zero(limit - c - x ** (N + 1) / (1 - x), "series minus partial sum")
    _zero(limit.subs(x, sp.exp(-delta)) - 1 / (sp.exp(delta) - 1), "x/(1-x) = 1/(e^delta - 1)")
    X = 1 / (sp.exp(delta) - 1)
    _zero(X / (k + X) - 1 / (1 + k * (sp.exp(delta) - 1)), "corollary")


@proof("BLOCK-BOUNDS", "block-constant logits attain the upper and the lower bound (equality)")
def block_equality() -> None:
    n1, n2, n3 = sp.symbols("n1:4", positive=True)
    l1, u1, l2, u2, l3, u3 = sp.symbols("l1 u1 l2 u2 l3 u3", real=True)
    # kept S = {1}; tail = {2, 3}
    upper = (n2 * sp.exp(u2) + n3 * sp.exp(u3)) / (
        n1 * sp.exp(l1) + n2 * sp.exp(u2) + n3 * sp.exp(u3)
    )
    lower = (n2 * sp.exp(l2) + n3 * sp.exp(l3)) / (
        n1 * sp.exp(u1) + n2 * sp.exp(l2) + n3 * sp.exp(l3)
    )

    def tau(level1: sp.Expr, level2: sp.Expr, level3: sp.Expr) -> sp.Expr:
        # softmax of n_b copies of a constant level per block; tail mass of blocks 2, 3
        tail = n2 * sp.exp(level2) + n3 * sp.exp(level3)
        return tail / (n1 * sp.exp(level1) + tail)

    _zero(tau(l1, u2, u3) - upper, "upper attained (head at l, tail at u)")
    _zero(tau(u1, l2, l3) - lower, "lower attained (head at u, tail at l)")


@proof("BLOCK-BOUNDS", "upper bound increases in every tail u_b and decreases in every kept l_b")
def block_monotone() -> None:
    n1, n2 = sp.symbols("n1 n2", positive=True)
    l1, u2, u1, l2 = sp.symbols("l1 u2 u1 l2", real=True)
    upper = n2 * sp.exp(u2) / (n1 * sp.exp(l1) + n2 * sp.exp(u2))
    du = sp.simplify(sp.diff(upper, u2))
    dl = sp.simplify(sp.diff(upper, l1))
    prod = n1 * n2 * sp.exp(l1 + u2) / (n1 * sp.exp(l1) + n2 * sp.exp(u2)) ** 2
    _zero(du - prod, "d upper / d u_tail")
    _zero(dl + prod, "d upper / d l_head")
    lower = n2 * sp.exp(l2) / (n1 * sp.exp(u1) + n2 * sp.exp(l2))
    prod2 = n1 * n2 * sp.exp(u1 + l2) / (n1 * sp.exp(u1) + n2 * sp.exp(l2)) ** 2
    _zero(sp.diff(lower, l2) - prod2, "d lower / d l_tail")
    _zero(sp.diff(lower, u1) + prod2, "d lower / d u_head")


@proof(
    "BLOCK-BOUNDS",
    "greedy value: upper <= eps iff sum_S n_b(eps e^l + (1-eps) e^u) >= (1-eps) sum_b n_b e^u",
)
def block_knapsack_form() -> None:
    A, B, U = sp.symbols("A B U", positive=True)  # A = tail sum of n e^u, B = head sum n e^l
    # with W = head sum of n e^u, U = A + W: eps(B + A) - A = eps B + (1-eps) W - (1-eps) U
    W = U - A
    lhs = eps * (B + A) - A
    rhs = eps * B + (1 - eps) * W - (1 - eps) * U
    _zero(lhs - rhs, "knapsack rewriting")


@proof(
    "GAP-EXACT-HEAD",
    "sorted head: sum_{i<=k} e^{s_i} - k e^{s_k} = e^{s_k} sum_i (e^{a_i} - 1) >= 0",
)
def exact_head_dominates() -> None:
    sk = sp.Symbol("s_k", real=True)
    a_i = sp.symbols("a1:4", nonnegative=True)
    head = sum(sp.exp(sk + ai) for ai in a_i) + sp.exp(sk)
    _zero(head - 4 * sp.exp(sk) - sp.exp(sk) * sum(sp.exp(ai) - 1 for ai in a_i), "head excess")
    # each e^{a_i} - 1 >= 0 for a_i >= 0, so D_exact >= k e^{s_k}; conclude by ratio_monotone
    # e^a - 1 vanishes at a = 0 and has derivative e^a > 0
    a0 = a_i[0]
    if not (sp.exp(a0) - 1).subs(a0, 0) == 0 or not sp.diff(sp.exp(a0) - 1, a0).is_positive:
        raise AssertionError("e^a - 1 >= 0 for a >= 0 not established")
