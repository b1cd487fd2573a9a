"""Symbolic checks of the Gaussian score model (THEORY.md section 5; certattn.gaussian).

Conventions: ``Phi(x) = (1 + erf(x/sqrt 2))/2``, ``Phi^{-1}(p) = sqrt 2 erfinv(2p - 1)``,
scores ``s ~ N(mu, sigma^2)`` with density ``phi_{mu,sigma}``.  Integrals that SymPy
would evaluate slowly are checked through the fundamental theorem of calculus: the
claimed antiderivative has the integrand as derivative and the right limit at -oo.
"""

from __future__ import annotations

import sympy as sp

from proofs._harness import proof

s, t, u, mu = sp.symbols("s t u mu", real=True)
sigma, n = sp.symbols("sigma n", positive=True)
rho, eps = sp.symbols("rho epsilon", positive=True)


def _Phi(x: sp.Expr) -> sp.Expr:
    return (1 + sp.erf(x / sp.sqrt(2))) / 2


def _Phi_inv(p: sp.Expr) -> sp.Expr:
    return sp.sqrt(2) * sp.erfinv(2 * p - 1)


def _pdf(x: sp.Expr, m: sp.Expr, sd: sp.Expr) -> sp.Expr:
    return sp.exp(-((x - m) ** 2) / (2 * sd**2)) / (sd * sp.sqrt(2 * sp.pi))


def _moment(f: sp.Expr) -> sp.Expr:
    """E f(s) for s ~ N(mu, sigma^2), via s = mu + sigma x, x standard normal."""
    x = sp.Symbol("x", real=True)
    g = f.subs(s, mu + sigma * x) * sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi)
    return sp.simplify(sp.integrate(sp.expand(g), (x, -sp.oo, sp.oo)))


def _zero(expr: sp.Expr, what: str) -> None:
    res = sp.simplify(sp.sympify(expr).rewrite(sp.erf))
    if res != 0:
        raise AssertionError(f"{what}: residual {res}")


y = sp.Symbol("y", real=True)


def _inverse_lemmas() -> None:
    """Phi^{-1}(Phi(y)) = y and 1 - Phi(y) = Phi(-y) for real y (used by substitution)."""
    _zero(_Phi_inv(_Phi(y)) - y, "Phi^{-1}(Phi(y)) = y")
    _zero(_Phi(_Phi_inv(rho)) - rho, "Phi(Phi^{-1}(rho)) = rho")
    _zero(1 - _Phi(y) - _Phi(-y), "1 - Phi(y) = Phi(-y)")


_MGF = sp.exp(mu + sigma**2 / 2)  # E e^s


def _tail_antiderivative() -> sp.Expr:
    """Claimed value of int_{-oo}^t e^s phi_{mu,sigma}(s) ds."""
    return _MGF * _Phi((t - mu - sigma**2) / sigma)


@proof("GAUSS-TILT", "e^s phi_{mu,sigma}(s) / E e^s is the N(mu + sigma^2, sigma^2) density")
def tilt() -> None:
    _zero(_moment(sp.exp(s)) - _MGF, "E e^s")
    ratio = sp.exp(s) * _pdf(s, mu, sigma) / _MGF / _pdf(s, mu + sigma**2, sigma)
    _zero(sp.expand(sp.powsimp(sp.simplify(ratio), combine="exp")) - 1, "tilted density")


@proof(
    "GAUSS-THRESHOLD",
    "discarded mass below t is Phi((t-mu-sigma^2)/sigma), kept fraction Phi_c((t-mu)/sigma)",
)
def threshold() -> None:
    f = _tail_antiderivative()
    # d/dt of the claimed integral is the integrand; it vanishes at -oo and tends to E e^s.
    _zero(sp.diff(f, t) - sp.exp(t) * _pdf(t, mu, sigma), "derivative of the tail integral")
    if sp.limit(f.subs(t, mu + sigma * u), u, -sp.oo) != 0:
        raise AssertionError("tail integral does not vanish at -oo")
    _zero(sp.limit(f.subs(t, mu + sigma * u), u, sp.oo) - _MGF, "tail integral at +oo")
    # Kept fraction: P(s >= t); derivative -phi, value 1 at -oo.
    kept = 1 - _Phi((t - mu) / sigma)
    _zero(sp.diff(kept, t) + _pdf(t, mu, sigma), "derivative of the kept fraction")
    # mu cancels: in the standardised threshold u = (t - mu)/sigma neither depends on mu.
    for expr in (f / _MGF, kept):
        if mu in sp.simplify(expr.subs(t, mu + sigma * u)).free_symbols:
            raise AssertionError("mu does not cancel")


@proof(
    "GAUSS-FINITE-N",
    "E sum_{s_i<t} e^{s_i} = n e^{mu+sigma^2/2} Phi(.), E #{s_i>=t} = n Phi_c(.), sd(Z)/E Z",
)
def finite_n() -> None:
    # Linearity: E sum_i 1{s_i < t} e^{s_i} = n E[1{s < t} e^s] = n * (the tail integral).
    # The tail integral is checked in GAUSS-THRESHOLD; here check it again by integration
    # at a concrete threshold, which exercises the closed form end to end.
    x = sp.Symbol("x", real=True)
    tv = sp.Rational(1, 2)
    direct = sp.integrate(sp.exp(x) * _pdf(x, 0, 1), (x, -sp.oo, tv))
    _zero(direct - _tail_antiderivative().subs({t: tv, mu: 0, sigma: 1}), "tail at t = 1/2")
    # E #{s_i >= t} = n P(s >= t): the claimed n Phi_c((t-mu)/sigma) has derivative
    # -n phi_{mu,sigma}(t) and vanishes at t = +oo.
    count = n * (1 - _Phi((t - mu) / sigma))
    _zero(sp.diff(count, t) + n * _pdf(t, mu, sigma), "derivative of the expected count")
    if sp.limit(count.subs(t, mu + sigma * u), u, sp.oo) != 0:
        raise AssertionError("expected count does not vanish at +oo")
    # Partition function Z = sum e^{s_i}: Var Z / (E Z)^2 = (e^{sigma^2} - 1)/n.
    m1, m2 = _moment(sp.exp(s)), _moment(sp.exp(2 * s))
    rel_var = n * (m2 - m1**2) / (n * m1) ** 2
    _zero(rel_var - (sp.exp(sigma**2) - 1) / n, "relative variance of Z")


@proof("GAUSS-TOPFRAC", "keeping the top fraction rho leaves tau = Phi(Phi^{-1}(1-rho) - sigma)")
def top_fraction() -> None:
    _inverse_lemmas()
    # Phi^{-1}(1 - rho) = -Phi^{-1}(rho): Phi(-Phi^{-1}(rho)) = 1 - rho and Phi is injective.
    _zero(_Phi(-_Phi_inv(rho)) - (1 - rho), "Phi(-Phi^{-1}(rho)) = 1 - rho")
    z_rho = -_Phi_inv(rho)  # = Phi^{-1}(1 - rho)
    t_rho = mu + sigma * z_rho  # threshold keeping the fraction rho
    _zero(1 - _Phi((t_rho - mu) / sigma) - rho, "threshold keeps the fraction rho")
    tau = _Phi((t_rho - mu - sigma**2) / sigma)  # GAUSS-THRESHOLD at that threshold
    _zero(tau - _Phi(z_rho - sigma), "tau = Phi(Phi^{-1}(1-rho) - sigma)")
    # The library's form Phi_c(Phi^{-1}(rho) + sigma).
    _zero(tau - (1 - _Phi(_Phi_inv(rho) + sigma)), "library form")
    # tau decreases in rho (z = Phi^{-1}(1-rho) decreases in rho) and in sigma.
    z = sp.Symbol("z", real=True)
    tz = _Phi(z - sigma)
    if not (sp.diff(tz, z).is_positive and sp.diff(tz, sigma).is_negative):
        raise AssertionError("monotonicity of tau")


@proof("GAUSS-KEPS", "rho = Phi_c(sigma + Phi^{-1}(eps)) solves tau(rho) = eps; inverses")
def keps_rule() -> None:
    _inverse_lemmas()
    w = sp.Symbol("w", real=True)  # w = Phi^{-1}(eps), increasing in eps
    rule = 1 - _Phi(sigma + w)
    # tau(rule) = Phi(Phi^{-1}(1 - rule) - sigma) and 1 - rule = Phi(sigma + w), so by
    # Phi^{-1}(Phi(y)) = y (y = sigma + w) tau(rule) = Phi(w) = Phi(Phi^{-1}(eps)) = eps.
    _zero((1 - rule) - _Phi(sigma + w), "1 - rule = Phi(sigma + w)")
    tau = _Phi(_Phi_inv(_Phi(y)) - sigma).subs(y, sigma + w)
    _zero(tau.subs(w, _Phi_inv(eps)) - eps, "tau(rule) = eps")
    # Inverse in sigma: sigma(rho, eps) = -Phi^{-1}(rho) - Phi^{-1}(eps).
    rule_eps = rule.subs(w, _Phi_inv(eps))
    _zero(rule_eps.subs(sigma, -_Phi_inv(rho) - _Phi_inv(eps)) - rho, "sigma inverse")
    # Inverse in eps: eps(rho, sigma) = Phi_c(Phi^{-1}(rho) + sigma) = Phi(y) with
    # y = -(Phi^{-1}(rho) + sigma), so Phi^{-1}(eps) = y.
    _zero(1 - _Phi(_Phi_inv(rho) + sigma) - _Phi(-(_Phi_inv(rho) + sigma)), "eps form")
    _zero(rule.subs(w, -(_Phi_inv(rho) + sigma)) - rho, "eps inverse")
    # Monotone: fewer keys for larger sigma, more keys for smaller eps.
    if not (sp.diff(rule, sigma).is_negative and sp.diff(rule, w).is_negative):
        raise AssertionError("monotonicity of the rule")
    # sigma = 0: uniform logits keep 1 - eps.
    _zero(rule_eps.subs(sigma, 0) - (1 - eps), "sigma = 0")


@proof("GAUSS-LIMITS", "entropy -> log n - sigma^2/2, participation ratio -> n e^{-sigma^2}")
def limits() -> None:
    # Reduction (law of large numbers): H = log Z - sum s_i e^{s_i} / Z with
    # Z/n -> E e^s and sum s_i e^{s_i}/n -> E[s e^s]; sum p_i^2 = sum e^{2 s_i} / Z^2.
    m1 = _moment(sp.exp(s))
    ms = _moment(s * sp.exp(s))
    m2 = _moment(sp.exp(2 * s))
    _zero(ms / m1 - (mu + sigma**2), "tilted mean (GAUSS-TILT)")
    entropy = sp.log(n) + sp.log(m1) - ms / m1
    _zero(sp.expand_log(entropy, force=True) - (sp.log(n) - sigma**2 / 2), "entropy limit")
    pr = (n * m1) ** 2 / (n * m2)
    _zero(pr - n * sp.exp(-(sigma**2)), "participation ratio limit")
