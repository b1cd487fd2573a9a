"""Symbolic checks of the distribution-level identities (THEORY section 2)."""

from __future__ import annotations

import sympy as sp

from ._harness import proof

# A generic truncation: head weights a_1..a_3 > 0 and tail weights b_1..b_2 > 0
# (unnormalised e^{s_i}); Z = A + B with A = sum a, B = sum b, tau = B / Z.
_a = sp.symbols("a1:4", positive=True)
_b = sp.symbols("b1:3", positive=True)
_A, _B = sum(_a), sum(_b)
_Z = _A + _B
_tau = _B / _Z
_p_head = [ai / _Z for ai in _a]
_p_tail = [bi / _Z for bi in _b]
_phat = [ai / _A for ai in _a]


def _zero(expr: sp.Expr) -> None:
    assert sp.simplify(expr) == 0, expr


@proof("TV-TAIL", "1/2 sum |p - p_hat| = tail mass for a generic kept set")
def tv_equals_tail() -> None:
    # On the head p_hat >= p (renormalised up); on the tail p_hat = 0.
    gain = sum(ph - p for ph, p in zip(_phat, _p_head, strict=True))
    tv = sp.Rational(1, 2) * (gain + sum(_p_tail))
    for ph, p in zip(_phat, _p_head, strict=True):
        assert sp.simplify(ph - p - p * _B / _A) == 0  # p_hat - p = p * B/A >= 0
    _zero(tv - _tau)


@proof("TV-KL", "KL(P_hat||P) = LSE(all) - LSE(head) = -log(1 - tau); TV = 1 - exp(-KL)")
def kl_identity() -> None:
    kl = sum(ph * sp.log(ph / p) for ph, p in zip(_phat, _p_head, strict=True))
    _zero(sp.expand_log(sp.simplify(kl - sp.log(_Z / _A)), force=True))
    _zero(sp.simplify(sp.log(_Z / _A) + sp.log(1 - _tau)))
    _zero(sp.simplify(1 - sp.exp(-sp.log(_Z / _A)) - _tau))


@proof("DIV-COROLLARIES", "chi2 = tau/(1-tau), Hellinger^2 = 1 - sqrt(1-tau), Renyi = -log(1-tau)")
def corollaries() -> None:
    chi2 = sum(ph**2 / p for ph, p in zip(_phat, _p_head, strict=True)) - 1
    _zero(chi2 - _tau / (1 - _tau))
    # Bhattacharyya coefficient sum sqrt(p_hat p); squared Hellinger = 1 - bc.
    bc = sum(sp.sqrt(ph * p) for ph, p in zip(_phat, _p_head, strict=True))
    _zero(sp.simplify(bc**2 - (1 - _tau)))
    alpha = sp.symbols("alpha", positive=True)
    # D_alpha = log(sum_i p_hat_i^alpha p_i^(1 - alpha)) / (alpha - 1) with p_hat_i = r p_i:
    ratio = sp.simplify(_phat[0] / _p_head[0])  # = Z / A on every head key
    inner = sum(p * ratio**alpha for p in _p_head)
    _zero(sp.simplify(inner - ratio ** (alpha - 1)))
    _zero(sp.simplify(sp.log(ratio ** (alpha - 1)) / (alpha - 1) - sp.log(ratio)))


@proof("BUDGET-EQUIV", "tau <= eps  <=>  -log(1-tau) <= -log(1-eps) (monotone map)")
def budget_equivalence() -> None:
    t = sp.symbols("t", positive=True)
    f = -sp.log(1 - t)
    assert sp.simplify(sp.diff(f, t) - 1 / (1 - t)) == 0  # derivative > 0 on [0, 1)
    eps = sp.symbols("epsilon", positive=True)
    _zero(sp.simplify(1 - sp.exp(-f.subs(t, eps)) - eps))


@proof("MASK-HIDDEN", "tau_full = tau_V/(1+r) + r/(1+r) <= tau_V + r, r = X/Z")
def hidden_tail_bound() -> None:
    # Visible mass Z = Z_K + Z_D (kept, dropped), hidden mass X; the kept set is visible.
    zk, zd, x = sp.symbols("Z_K Z_D X", positive=True)
    z = zk + zd
    tau_v, r = zd / z, x / z
    tau_full = 1 - zk / (z + x)
    _zero(tau_full - (tau_v / (1 + r) + r / (1 + r)))
    slack = sp.simplify(tau_v + r - tau_full)  # = (tau_v + r) r/(1+r) >= 0
    _zero(slack - (tau_v + r) * r / (1 + r))
    assert slack.is_nonnegative


@proof("MASK-HIDDEN", "Attn - Attn_V = X/(Z+X) (mu_H - mu_V); X/Z <= sum e^{s_j - M}")
def hidden_output_identity() -> None:
    z, x = sp.symbols("Z X", positive=True)
    mh, mv = sp.symbols("mu_H mu_V", real=True)  # one coordinate of the two means
    attn = (z * mv + x * mh) / (z + x)
    _zero(attn - mv - x / (z + x) * (mh - mv))
    assert sp.simplify(1 - x / (z + x)).is_positive  # weight <= min(X/Z, 1)
    assert sp.simplify(x / z - x / (z + x)).is_positive
    # Z >= e^M (M the largest visible logit), so X/Z <= X e^{-M} = sum_hidden e^{s_j - M}
    m, extra = sp.symbols("M E", positive=True)
    assert sp.simplify(x / sp.exp(m) - x / (sp.exp(m) + extra)).is_positive
