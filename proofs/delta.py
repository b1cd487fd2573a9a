"""Symbolic checks of Theorem DELTA-ERROR (Delta Attention's correction; certattn.approx.delta).

Two query rows ``i`` and ``a`` over the same five keys, with independent symbolic positive
weights (any positive numbers are softmax weights of some logits) and shared symbolic
two-dimensional values; the kept sets of the two rows differ.  The identity is linear in
the values, so coordinatewise checks cover any dimension.
"""

from __future__ import annotations

import sympy as sp

from proofs._harness import proof

N = 5
w_i = sp.symbols("w1:6", positive=True)  # row i: e^{s_ij}
w_a = sp.symbols("u1:6", positive=True)  # row a: e^{s_aj}
vx = sp.symbols("x1:6", real=True)
vy = sp.symbols("y1:6", real=True)


def _zero(expr: sp.Expr, what: str) -> None:
    res = sp.simplify(sp.together(expr))
    if res != 0:
        raise AssertionError(f"{what}: residual {res}")


def _row(w: tuple[sp.Symbol, ...], head: tuple[int, ...], v: tuple[sp.Symbol, ...]) -> dict:
    tail = [j for j in range(N) if j not in head]
    z, zh, zt = sum(w), sum(w[j] for j in head), sum(w[j] for j in tail)
    return {
        "attn": sum(w[j] * v[j] for j in range(N)) / z,
        "mu_h": sum(w[j] * v[j] for j in head) / zh,
        "mu_t": sum(w[j] * v[j] for j in tail) / zt,
        "tau": zt / z,
        "tail": tail,
        "zt": zt,
    }


_CASES = (((0, 1), (0, 4)), ((0, 1, 2), (3,)), ((4,), (0, 1, 2, 3)), ((1, 3), (1, 3)))


@proof("DELTA-ERROR", "O_i - Attn_i = tau_a (mu_T,a - mu_H,a) - tau_i (mu_T,i - mu_H,i), "
       "O_i = S_i + D_a - S_a, any two kept sets, per coordinate")
def delta_error_identity() -> None:
    for head_i, head_a in _CASES:
        for c, v in (("x", vx), ("y", vy)):
            ri, ra = _row(w_i, head_i, v), _row(w_a, head_a, v)
            o_i = ri["mu_h"] + (ra["attn"] - ra["mu_h"])  # S_i + (D_a - S_a)
            rhs = ra["tau"] * (ra["mu_t"] - ra["mu_h"]) - ri["tau"] * (ri["mu_t"] - ri["mu_h"])
            _zero(o_i - ri["attn"] - rhs, f"heads {head_i}, {head_a}, coordinate {c}")
        # the anchor row itself: O_a = S_a + (D_a - S_a) = D_a exactly
        ra = _row(w_a, head_a, vx)
        _zero(ra["mu_h"] + (ra["attn"] - ra["mu_h"]) - ra["attn"], "anchor row is dense")


@proof("DELTA-ERROR", "mu_T - mu_H = sum_{j in T} (w_j / Z_T)(v_j - mu_H), a convex combination "
       "(weights positive, summing to 1): the triangle inequality gives the bound")
def delta_error_bound_steps() -> None:
    for head_i, _ in _CASES:
        r = _row(w_i, head_i, vx)
        q = [w_i[j] / r["zt"] for j in r["tail"]]
        _zero(sum(q) - 1, f"tail weights sum to 1, head {head_i}")
        assert all(x.is_positive for x in q)
        conv = sum(qj * (vx[j] - r["mu_h"]) for qj, j in zip(q, r["tail"], strict=True))
        _zero(r["mu_t"] - r["mu_h"] - conv, f"tail-to-head expansion, head {head_i}")
        # tau * max_T |v_j - mu_H| <= tau diam(H, T): mu_H is a convex combination of the
        # head values, so v_j - mu_H = sum_{l in H} (w_l / Z_H)(v_j - v_l)
        zh = sum(w_i[m] for m in head_i)
        for j in r["tail"]:
            pair = sum((w_i[m] / zh) * (vx[j] - vx[m]) for m in head_i)
            _zero(vx[j] - r["mu_h"] - pair, f"head expansion, key {j}")
