"""Symbolic checks (SymPy) of the curvature theorems GEO-* (THEORY.md section 8).

Conventions as in :mod:`certattn.geometry.curvature`:
``R^l_{ijk} = d_i G^l_jk - d_j G^l_ik + G^l_im G^m_jk - G^l_jm G^m_ik``, sectional
``K(e_i, e_j) = g_il R^l_ijj / (g_ii g_jj - g_ij^2)`` (sphere positive).
"""

from __future__ import annotations

import sympy as sp

from ._harness import proof

# ----------------------------------------------------------------------------- helpers


def _christoffel(g: sp.Matrix, x: list[sp.Symbol]) -> list:
    n = len(x)
    gi = g.inv()
    return [[[sp.simplify(sum(gi[k, m] * (sp.diff(g[m, i], x[j]) + sp.diff(g[m, j], x[i])
                                          - sp.diff(g[i, j], x[m])) for m in range(n)) / 2)
              for j in range(n)] for i in range(n)] for k in range(n)]


def _riemann(g: sp.Matrix, x: list[sp.Symbol]) -> list:
    """``R[l][i][j][k] = R^l_{ijk}``."""
    n = len(x)
    G = _christoffel(g, x)
    return [[[[sp.diff(G[a][j][k], x[i]) - sp.diff(G[a][i][k], x[j])
               + sum(G[a][i][m] * G[m][j][k] - G[a][j][m] * G[m][i][k] for m in range(n))
               for k in range(n)] for j in range(n)] for i in range(n)] for a in range(n)]


def _sectional(g: sp.Matrix, x: list[sp.Symbol], i: int = 0, j: int = 1) -> sp.Expr:
    R = _riemann(g, x)
    num = sum(g[i, a] * R[a][i][j][j] for a in range(len(x)))
    return sp.simplify(num / (g[i, i] * g[j, j] - g[i, j] ** 2))


def _clear(M: sp.Matrix) -> tuple[sp.Matrix, sp.Expr]:
    """``(a M, a)`` with ``a`` the lcm of the entries' denominators (rational entries)."""
    M = M.applyfunc(sp.cancel)
    a = sp.lcm([sp.denom(e) for e in M])
    return (M * a).applyfunc(sp.cancel), a


def _gauss_K(mu: sp.Matrix, x: list[sp.Symbol], P: sp.Matrix | None = None,
             at: dict | None = None, derivs: list | None = None,
             rational: bool = False) -> sp.Expr:
    """Gauss-equation K of a 2-parameter mean map with precision ``P`` (default I).

    Fraction-free: with ``II' = det(g) H - J adj(g) J^T P H = det(g) II``,
    ``K = (<II'_00, II'_11> - |II'_01|^2) / det(g)^3``.  ``derivs`` overrides the
    coordinate derivatives (e.g. ``f -> x f_x`` is ``d/dq`` for ``x = e^q``);
    ``rational=True`` first clears denominators of ``J`` (factor ``a``) and of the Hessian
    (factor ``b``), which rescales K by ``b^2 / a^4`` (undone at the end).
    """
    n = mu.shape[0]
    P = sp.eye(n) if P is None else P
    D = derivs if derivs is not None else [lambda f, a=a: f.diff(a) for a in x]
    J = sp.Matrix.hstack(*[Da(mu) for Da in D])
    Hall = sp.Matrix.hstack(*[Db(Da(mu)) for Da in D for Db in D])
    if at is not None:
        J, Hall = J.subs(at), Hall.subs(at)
    a = b = sp.Integer(1)
    if rational:
        (J, a), (Hall, b) = _clear(J), _clear(Hall)
    H = [[Hall[:, 0], Hall[:, 1]], [Hall[:, 2], Hall[:, 3]]]
    g = J.T * P * J
    dg = g.det()
    adj = g.adjugate()
    II = [[dg * H[i][j] - J * (adj * (J.T * (P * H[i][j]))) for j in range(2)]
          for i in range(2)]

    def ip(u: sp.Matrix, v: sp.Matrix) -> sp.Expr:
        return (u.T * P * v)[0, 0]

    num = ip(II[0][0], II[1][1]) - ip(II[0][1], II[0][1])
    if rational:
        num, dg = sp.factor(sp.expand(num)), sp.factor(sp.expand(dg))
    return num / dg**3 * a**4 / b**2


def _is_zero(e: sp.Expr) -> bool:
    return sp.simplify(sp.cancel(sp.together(e))) == 0


# ----------------------------------------------------------------------------- GEO-METRIC


@proof("GEO-METRIC", "Fisher info of N(m(th), v(th)) = m_i m_j / v + v_i v_j / (2 v^2)")
def metric_from_fisher_information() -> None:
    t1, t2 = sp.symbols("t1 t2", real=True)
    z = sp.Symbol("z", real=True)
    m = sp.Function("m")(t1, t2)
    v = sp.Function("v", positive=True)(t1, t2)
    y = sp.Symbol("y", real=True)
    logp = -sp.log(2 * sp.pi * v) / 2 - (y - m) ** 2 / (2 * v)
    moments = {0: 1, 1: 0, 2: 1, 3: 0, 4: 3}
    th = [t1, t2]
    for i in range(2):
        for j in range(2):
            e = sp.expand(-sp.diff(logp, th[i], th[j]).subs(y, m + sp.sqrt(v) * z))
            poly = sp.Poly(e, z)
            expect = sum(c * moments[k[0]] for k, c in zip(poly.monoms(), poly.coeffs(),
                                                            strict=True))
            claim = (sp.diff(m, th[i]) * sp.diff(m, th[j]) / v
                     + sp.diff(v, th[i]) * sp.diff(v, th[j]) / (2 * v**2))
            assert _is_zero(expect - claim), (i, j)


# ----------------------------------------------------------------------------- GEO-ORACLES


@proof("GEO-ORACLES", "sphere K = 1/r^2, half-plane -1, scaling g -> lam g gives K/lam")
def oracle_sphere_halfplane_scaling() -> None:
    u, v, r, lam = sp.symbols("u v r lam", positive=True)
    g = sp.diag(r**2, r**2 * sp.sin(u) ** 2)
    assert _is_zero(_sectional(g, [u, v]) - 1 / r**2)
    assert _is_zero(_sectional(lam * g, [u, v]) - 1 / (lam * r**2))
    x, y = sp.symbols("x y", positive=True)
    assert _is_zero(_sectional(sp.diag(1 / y**2, 1 / y**2), [x, y]) + 1)


@proof("GEO-ORACLES", "univariate normal, Fisher metric diag(1,2)/s^2: K = -1/2")
def oracle_univariate_normal() -> None:
    m, s = sp.symbols("m s", positive=True)
    g = sp.diag(1 / s**2, 2 / s**2)
    assert _is_zero(_sectional(g, [m, s]) + sp.Rational(1, 2))


@proof("GEO-ORACLES", "N(mu, s^2 I_d), d = 2, 3: every coordinate sectional = -1/(2d)")
def oracle_isotropic_normal() -> None:
    for d in (2, 3):
        x = [*sp.symbols(f"m1:{d + 1}", real=True), sp.Symbol("s", positive=True)]
        s = x[-1]
        g = sp.diag(*([1 / s**2] * d + [2 * d / s**2]))
        for i in range(d + 1):
            for j in range(i + 1, d + 1):
                assert _is_zero(_sectional(g, x, i, j) + sp.Rational(1, 2 * d)), (d, i, j)


@proof("GEO-ORACLES", "cylinder (r cos u, r sin u, z): K = 0 by the Gauss equation")
def oracle_cylinder() -> None:
    u, z, r = sp.symbols("u z r", positive=True)
    mu = sp.Matrix([r * sp.cos(u), r * sp.sin(u), z])
    assert _is_zero(_gauss_K(mu, [u, z]))


# ----------------------------------------------------------------------------- GEO-GAUSS-EQ


@proof("GEO-GAUSS-EQ", "Gauss-equation K = metric-only K for a cubic graph surface, Sigma = D")
def gauss_equation_matches_metric_route() -> None:
    x, y = sp.symbols("x y", real=True)
    a, b, c, e = sp.Rational(1, 2), sp.Rational(-1, 3), sp.Rational(2, 5), sp.Rational(1, 7)
    mu = sp.Matrix([x + y**2 / 3, y, a * x**2 + b * x * y + c * y**2 + e * x**3])
    P = sp.diag(1, sp.Rational(1, 2), sp.Rational(1, 3))  # Sigma = diag(1, 2, 3)
    J = mu.jacobian([x, y])
    g = J.T * P * J
    pt = {x: sp.Rational(1, 3), y: sp.Rational(-1, 2)}
    k_gauss = sp.nsimplify(_gauss_K(mu, [x, y], P).subs(pt))
    R = _riemann(g, [x, y])
    num = sum(g[0, a] * R[a][0][1][1] for a in range(2))
    k_metric = (num / g.det()).subs(pt)
    assert sp.simplify(k_gauss - k_metric) == 0
    assert k_gauss != 0


# ----------------------------------------------------------------------------- flatness / scope


def _softmax_chart(U: sp.Matrix) -> tuple[sp.Matrix, list[sp.Symbol], list]:
    """``U^T softmax(q1, q2, 0)`` in the variables ``x = e^q1, y = e^q2`` (rational).

    Returns the map, ``[x, y]`` and the chart derivatives ``d/dq1 = x d/dx``,
    ``d/dq2 = y d/dy``; ``q = 0`` is ``x = y = 1``.
    """
    x, y = sp.symbols("x y", positive=True)
    alpha = sp.Matrix([x, y, 1]) / (x + y + 1)
    derivs = [lambda f: x * f.diff(x), lambda f: y * f.diff(y)]
    return U.T * alpha, [x, y], derivs


@proof("GEO-UNGATED-FLAT", "simplex chart: g = D^T Sigma^-1 D is constant, so R = 0")
def ungated_flat_simplex_chart() -> None:
    t1, t2 = sp.symbols("t1 t2", real=True)
    U = sp.Matrix(3, 4, sp.symbols("u0:12", real=True))
    S = sp.Matrix(4, 4, lambda i, j: sp.Symbol(f"p{min(i, j)}{max(i, j)}"))
    mu = U.T * sp.Matrix([t1, t2, 1 - t1 - t2])
    J = mu.jacobian([t1, t2])
    g = J.T * S * J
    assert all(sp.diff(gij, t) == 0 for gij in g for t in (t1, t2))
    assert all(h == 0 for h in mu.diff(t1, t1).col_join(mu.diff(t1, t2)).col_join(
        mu.diff(t2, t2)))


@proof("GEO-UNGATED-FLAT", "softmax(q1,q2,0) chart, U = I and a 3x4 U: K = 0 identically")
def ungated_flat_softmax_chart() -> None:
    for U in (sp.eye(3), sp.Matrix([[1, 2, 0, -1], [0, 1, 3, 1], [2, -1, 1, 0]])):
        mu, v, D = _softmax_chart(U)
        K = _gauss_K(mu, v, derivs=D, rational=True)
        assert sp.expand(sp.numer(sp.together(K))) == 0


@proof("GEO-SCOPE", "4 keys (logits q1, q2, 0, q1+q2), U = I_4: ungated K(0) = -4 (curved)")
def ungated_four_keys_curved() -> None:
    q1, q2 = sp.symbols("q1 q2", real=True)
    w = sp.Matrix([sp.exp(q1), sp.exp(q2), 1, sp.exp(q1 + q2)])
    mu = w / sum(w)
    K0 = sp.simplify(_gauss_K(mu, [q1, q2], at={q1: 0, q2: 0}, rational=True))
    assert K0 == -4, K0


# ----------------------------------------------------------------------------- headwise gate


@proof("GEO-HEADWISE", "nu . d_ij(s m) = -(nu . m) s^2 d_ij(1/s) for m affine, nu normal")
def headwise_second_fundamental_form() -> None:
    t1, t2 = sp.symbols("t1 t2", real=True)
    s = sp.Function("s", positive=True)(t1, t2)
    m0, m1, m2 = (sp.Matrix(sp.symbols(f"{n}0:3", real=True)) for n in ("a", "b", "c"))
    m = m0 + t1 * m1 + t2 * m2
    mu = s * m
    th = [t1, t2]
    nu = mu.diff(t1).cross(mu.diff(t2))  # normal (unnormalised; both sides are linear in nu)
    for i in range(2):
        for j in range(2):
            lhs = nu.dot(mu.diff(th[i]).diff(th[j]))
            rhs = -nu.dot(m) * s**2 * sp.diff(1 / s, th[i], th[j])
            assert _is_zero(sp.expand(lhs - rhs)), (i, j)


@proof("GEO-HEADWISE", "sigmoid of affine in alpha: det Hess(1/s) = 0, so K = 0")
def headwise_sigmoid_affine_flat() -> None:
    t1, t2, a, b1, b2 = sp.symbols("t1 t2 a b1 b2", real=True)
    s = 1 / (1 + sp.exp(-(a + b1 * t1 + b2 * t2)))
    Hs = sp.hessian(1 / s, [t1, t2])
    assert sp.simplify(Hs.det()) == 0
    mu = s * sp.Matrix([t1, t2, 1 - t1 - t2])
    K = _gauss_K(mu, [t1, t2], at={t1: sp.Rational(1, 5), t2: sp.Rational(1, 3), a: 0,
                                    b1: 5, b2: -3})  # affine part 0 there: exact rationals
    assert sp.simplify(K) == 0


@proof("GEO-SPHERE-GATE", "mu = c alpha/|alpha| on the sphere |mu| = c; K = sigma^2/c^2, S = 2K")
def sphere_cap_gate() -> None:
    t1, t2, c, sig = sp.symbols("t1 t2 c sigma", positive=True)
    alpha = sp.Matrix([t1, t2, 1 - t1 - t2])
    mu = c * alpha / sp.sqrt(alpha.dot(alpha))
    assert sp.simplify(mu.dot(mu) - c**2) == 0
    for pt in ((sp.Rational(1, 3), sp.Rational(1, 3)), (sp.Rational(1, 2), sp.Rational(1, 4)),
               (sp.Rational(1, 7), sp.Rational(2, 3))):
        K = _gauss_K(mu, [t1, t2], sp.eye(3) / sig**2, at={t1: pt[0], t2: pt[1]})
        assert sp.simplify(K - sig**2 / c**2) == 0, pt


@proof("GEO-SIGMOID-GATE", "K(0) = 27 t^2 (6t-1)(1+e^b)^4 e^-2b / ((1+e^b)^2 + 18 t^2)^2")
def sigmoid_gate_curvature_at_zero() -> None:
    t = sp.Symbol("t", real=True)
    B = sp.Symbol("B", positive=True)  # B = e^b
    mu, v, _ = _softmax_chart(sp.eye(3))
    x, y = v
    # sigmoid(t (q1 + q2) + b) = 1 / (1 + (x y)^(-t) / B)
    s = 1 / (1 + (x * y) ** (-t) / B)
    K0 = _gauss_K(s * mu, v, at={x: 1, y: 1}, rational=True,
                  derivs=[lambda f: x * f.diff(x), lambda f: y * f.diff(y)])
    claim = 27 * t**2 * (6 * t - 1) * (1 + B) ** 4 / B**2 / ((1 + B) ** 2 + 18 * t**2) ** 2
    assert sp.cancel(sp.together(K0 - claim)) == 0
    # sign change exactly at t = 1/6: the only sign-carrying factor is (6t - 1)
    assert set(sp.solve(sp.numer(sp.factor(claim)), t)) == {0, sp.Rational(1, 6)}


# ----------------------------------------------------------------------------- depth


@proof("GEO-DEPTH", "tied layers: K_L(theta0) = L^2 K_1 = (nu.m)^2 beta^2 det(L A)/det g0")
def depth_tied_layers() -> None:
    t1, t2, beta, L = sp.symbols("t1 t2 beta L", positive=True)
    a11, a12, a22 = sp.symbols("a11 a12 a22", real=True)
    A = sp.Matrix([[a11, a12], [a12, a22]])
    th0 = sp.Matrix([sp.Rational(1, 3), sp.Rational(1, 3)])
    d = sp.Matrix([t1, t2]) - th0
    phi = (d.T * A * d)[0, 0] / 2
    U = sp.Matrix([[1, 0, 1], [0, 2, 1], [1, 1, 0]])
    m = U.T * sp.Matrix([t1, t2, 1 - t1 - t2])
    at = {t1: th0[0], t2: th0[1]}

    def K(layers: sp.Expr) -> sp.Expr:
        return sp.simplify(_gauss_K(sp.exp(-beta * layers * phi) * m, [t1, t2], at=at))

    K1, KL = K(1), K(L)
    assert _is_zero(KL - L**2 * K1)
    D = U[:2, :] - sp.Matrix([U[2, :], U[2, :]])
    g0 = D * D.T
    nu = D[0, :].cross(D[1, :])
    nu_m = (nu * m.subs(at))[0, 0] / sp.sqrt(nu.dot(nu))
    assert _is_zero(K1 - nu_m**2 * beta**2 * A.det() / g0.det())
    # opposite layers cancel: phi_1 + phi_2 = 0
    assert K(0) == 0


@proof("GEO-DEPTH", "unnormalised phi_l(theta0) = c: K_L / K_1 = L^2 e^{2 beta (L-1) c}")
def depth_needs_normalisation() -> None:
    t1, t2, beta, L, c = sp.symbols("t1 t2 beta L c", positive=True)
    th0 = sp.Rational(1, 3)
    phi = ((t1 - th0) ** 2 + (t1 - th0) * (t2 - th0) / 2 + 2 * (t2 - th0) ** 2) / 2 + c
    m = sp.Matrix([t1, t2, 1 - t1 - t2])
    at = {t1: th0, t2: th0}
    K1 = _gauss_K(sp.exp(-beta * phi) * m, [t1, t2], at=at)
    KL = _gauss_K(sp.exp(-beta * L * phi) * m, [t1, t2], at=at)
    assert _is_zero(sp.simplify(KL / K1) - L**2 * sp.exp(2 * beta * (L - 1) * c))


# ----------------------------------------------------------------------------- proxy


@proof("GEO-PROXY", "proxy > 0 on the flat ungated softmax-chart head (h = 1/10, q = 0)")
def proxy_positive_on_flat() -> None:
    mu, v, D = _softmax_chart(sp.eye(3))
    h = sp.Rational(1, 10)

    def f(a: sp.Expr) -> sp.Matrix:  # the head at q = (a, 0)
        return mu.subs({v[0]: sp.exp(a), v[1]: 1})

    num = f(h) - 2 * f(0) + f(-h)
    assert sp.simplify(num.dot(num)) > 0
    K = _gauss_K(mu, v, derivs=D, rational=True)
    assert sp.expand(sp.numer(sp.together(K))) == 0  # ... while K = 0 (GEO-UNGATED-FLAT)
