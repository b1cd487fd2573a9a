"""Symbolic checks of the output-level statements (THEORY.md section 4; certattn.output).

A small symbolic instance is used: four keys with symbolic positive weights
:math:`w_i = e^{s_i}` (any positive numbers are softmax weights of some logits) and
symbolic two-dimensional values, several heads; identities that are linear in the
values are checked coordinatewise, which covers any dimension.
"""

from __future__ import annotations

import sympy as sp

from proofs._harness import proof

w_sym = sp.symbols("w1:5", positive=True)  # unnormalised softmax weights e^{s_i}
vx = sp.symbols("x1:5", real=True)
vy = sp.symbols("y1:5", real=True)
tau = sp.Symbol("tau", positive=True)


def _zero(expr: sp.Expr, what: str) -> None:
    res = sp.simplify(expr)
    if res != 0:
        raise AssertionError(f"{what}: residual {res}")


def _parts(head: tuple[int, ...], n: int = 4) -> dict[str, sp.Expr]:
    w = list(w_sym[:n])
    z = sum(w)
    tail = [i for i in range(len(w)) if i not in head]
    zh = sum(w[i] for i in head)
    zt = sum(w[i] for i in tail)
    out = {"tau": zt / z}
    for name, v in (("x", vx), ("y", vy)):
        out["attn_" + name] = sum(w[i] * v[i] for i in range(len(w))) / z
        out["head_" + name] = sum(w[i] * v[i] for i in head) / zh
        out["tail_" + name] = sum(w[i] * v[i] for i in tail) / zt
    out["w"], out["z"], out["zh"], out["zt"] = w, z, zh, zt
    out["head"], out["tail"] = head, tail
    return out


@proof("OUT-HEAD-TAIL", "Attn - Attn_k = tau (mu_tail - mu_head), any kept set, per coordinate")
def head_tail_identity() -> None:
    for head in ((0,), (0, 1), (1, 3), (0, 2, 3)):
        p = _parts(head)
        for c in ("x", "y"):
            lhs = p["attn_" + c] - p["head_" + c]
            rhs = p["tau"] * (p["tail_" + c] - p["head_" + c])
            _zero(lhs - rhs, f"head-tail identity, head {head}, coordinate {c}")


@proof("OUT-BOUNDED", "norm(mu_T - mu_H) <= 2C: each mean is a convex combination")
def bounded_weights() -> None:
    p = _parts((0, 1))
    _zero(sum(p["w"][i] for i in p["head"]) / p["zh"] - 1, "head weights sum to 1")
    _zero(sum(p["w"][i] for i in p["tail"]) / p["zt"] - 1, "tail weights sum to 1")


@proof("OUT-DIAMETER", "mu_T - mu_H = sum_{i in H, j in T} phat_i q_j (v_j - v_i) (diameter step)")
def diameter_convex() -> None:
    p = _parts((0, 1))
    for c, v in (("x", vx), ("y", vy)):
        pair = sum(
            (p["w"][i] / p["zh"]) * (p["w"][j] / p["zt"]) * (v[j] - v[i])
            for i in p["head"]
            for j in p["tail"]
        )
        _zero(p["tail_" + c] - p["head_" + c] - pair, f"pair expansion, coordinate {c}")
        single = sum((p["w"][j] / p["zt"]) * (v[j] - p["head_" + c]) for j in p["tail"])
        _zero(p["tail_" + c] - p["head_" + c] - single, f"tail-to-head expansion, coordinate {c}")


def _var(weights: list[sp.Expr], z: sp.Expr, idx: list[int] | tuple[int, ...]) -> sp.Expr:
    mx = sum(weights[i] * vx[i] for i in idx) / z
    my = sum(weights[i] * vy[i] for i in idx) / z
    return sum(weights[i] * ((vx[i] - mx) ** 2 + (vy[i] - my) ** 2) for i in idx) / z


@proof("OUT-VAR-DECOMP", "Var_P = (1-tau) Var_H + tau Var_T + tau(1-tau) norm(mu_T - mu_H)^2")
def variance_decomposition() -> None:
    p = _parts((0, 1))  # two head and two tail keys: no variance term is trivially 0
    w = p["w"]
    total = _var(w, p["z"], range(4))
    vh = _var(w, p["zh"], p["head"])
    vt = _var(w, p["zt"], p["tail"])
    t = p["tau"]
    gap2 = (p["tail_x"] - p["head_x"]) ** 2 + (p["tail_y"] - p["head_y"]) ** 2
    expr = total - ((1 - t) * vh + t * vt + t * (1 - t) * gap2)
    _zero(sp.cancel(sp.together(expr)), "law of total variance")
    err2 = (p["attn_x"] - p["head_x"]) ** 2 + (p["attn_y"] - p["head_y"]) ** 2
    between = t * (1 - t) * gap2
    _zero(sp.cancel(sp.together(err2 - t / (1 - t) * between)), "|error|^2 = chi2 * between")


@proof(
    "OUT-BEST",
    "sqrt(chi2) sqrt(Var) step: norm(error) = sqrt(chi2 between) <= sqrt(chi2 Var_P)",
)
def variance_step() -> None:
    # error^2 = tau^2 g^2 and chi2 * Var_P - error^2 = chi2 ((1-tau) V_H + tau V_T) >= 0
    g2, vh, vt = sp.symbols("g2 V_H V_T", nonnegative=True)
    chi2 = tau / (1 - tau)
    var_p = (1 - tau) * vh + tau * vt + tau * (1 - tau) * g2
    slack = sp.simplify(chi2 * var_p - tau**2 * g2)
    _zero(slack - (tau * vh + tau**2 * vt / (1 - tau)), "chi2 Var_P - error^2")
    _zero(chi2.subs(tau, sp.Rational(1, 3)) - sp.Rational(1, 2), "chi2 = tau/(1-tau)")
