"""Domain edges of every public function of ``certattn.gaussian``, ``certattn.gaussian_mc``
and ``certattn.geometry``: a ``ValueError`` (``InputError``) naming the argument, never a
value (-inf, NaN), a ``LinAlgError`` or a ``TypeError`` from deep inside NumPy."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from certattn import gaussian as G
from certattn import gaussian_mc as MC
from certattn import geometry as geo
from certattn.errors import InputError
from certattn.geometry import derivatives as dv
from certattn.geometry import experiment as ex
from certattn.geometry import gating as ga
from certattn.geometry import metric as me
from certattn.geometry import oracles as orc
from certattn.geometry import proxy as px
from certattn.plots import geometry as gp

cv = importlib.import_module("certattn.geometry.curvature")  # the name is also a function

NAN, INF = math.nan, math.inf
I2, I3 = np.eye(2), np.eye(3)
SING = np.array([[1.0, 1.0], [1.0, 1.0]])
NOT_SYM = np.array([[1.0, 2.0], [0.0, 1.0]])
DG2, D2G2 = np.zeros((2, 2, 2)), np.zeros((2, 2, 2, 2))
JAC, HESS = np.eye(3)[:, :2], np.zeros((3, 2, 2))
RANK1 = np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]])


def _f(t):
    return t


# (call, substring the message must contain: the argument's name)
CASES = {
    # gaussian: population limits
    "entropy_limit n=0": (lambda: G.entropy_limit(0, 1), "n"),
    "entropy_limit n<0": (lambda: G.entropy_limit(-3, 1), "n"),
    "entropy_limit n=nan": (lambda: G.entropy_limit(NAN, 1), "n"),
    "entropy_limit n=inf": (lambda: G.entropy_limit(INF, 1), "n"),
    "entropy_limit sigma<0": (lambda: G.entropy_limit(10, -1), "sigma"),
    "participation n=0": (lambda: G.participation_ratio_limit(0, 1), "n"),
    "participation sigma=nan": (lambda: G.participation_ratio_limit(10, NAN), "sigma"),
    "partition_rel_sd n=0.5": (lambda: G.partition_rel_sd(0.5, 1), "n"),
    "partition_rel_sd sigma=inf": (lambda: G.partition_rel_sd(4, INF), "sigma"),
    "tilted mu=nan": (lambda: G.tilted_normal(NAN, 1), "mu"),
    "tilted mu=inf": (lambda: G.tilted_normal(INF, 1), "mu"),
    "tilted sigma<0": (lambda: G.tilted_normal(0, -1), "sigma"),
    "discarded sigma=0": (lambda: G.discarded_mass(0, 0), "sigma"),
    "discarded t=nan": (lambda: G.discarded_mass(NAN, 1), "t"),
    "discarded mu=inf": (lambda: G.discarded_mass(0, 1, mu=INF), "mu"),
    "kept sigma<0": (lambda: G.kept_fraction(0, -2), "sigma"),
    "kept t=nan": (lambda: G.kept_fraction(NAN, 1), "t"),
    "topfrac rho>1": (lambda: G.top_fraction_tail_mass(1.5, 1), "rho"),
    "topfrac rho<0": (lambda: G.top_fraction_tail_mass(-0.1, 1), "rho"),
    "topfrac rho=nan": (lambda: G.top_fraction_tail_mass(NAN, 1), "rho"),
    "topfrac log rho>0": (lambda: G.top_fraction_tail_mass(0.5, 1, log=True), "rho"),
    "keps eps=1": (lambda: G.keps_fraction(1.0, 1), "eps"),
    "keps eps<0": (lambda: G.keps_fraction(-0.1, 1), "eps"),
    "keps eps=nan": (lambda: G.keps_fraction(NAN, 1), "eps"),
    "keps sigma<0": (lambda: G.keps_fraction(0.1, -1), "sigma"),
    "keps string": (lambda: G.keps_fraction("0.1", 1), "eps"),
    "keps complex": (lambda: G.keps_fraction(0.1, 1j), "sigma"),
    "keps bool": (lambda: G.keps_fraction(True, 1), "eps"),
    "keps shapes": (lambda: G.keps_fraction([0.1, 0.2], [1.0, 2.0, 3.0]), "broadcast"),
    "keps_sigma rho>1": (lambda: G.keps_sigma(2.0, 0.1), "rho"),
    "keps_sigma eps=1": (lambda: G.keps_sigma(0.5, 1.0), "eps"),
    "keps_eps sigma=nan": (lambda: G.keps_eps(0.5, NAN), "sigma"),
    "tail_sum n=0": (lambda: G.expected_tail_sum(0, 0, 1), "n"),
    "tail_sum sigma=0": (lambda: G.expected_tail_sum(5, 0, 0), "sigma"),
    "tail_sum t=nan": (lambda: G.expected_tail_sum(5, NAN, 1), "t"),
    "kept_count n=-1": (lambda: G.expected_kept_count(-1, 0, 1), "n"),
    "kept_count mu=nan": (lambda: G.expected_kept_count(5, 0, 1, mu=NAN), "mu"),
    "estimate_sigma scalar": (lambda: G.estimate_sigma(1.0), "logits"),
    "estimate_sigma nan": (lambda: G.estimate_sigma([0.0, NAN]), "NaN"),
    "estimate_sigma masked": (lambda: G.estimate_sigma([-INF, -INF]), "masked"),
    "predict_k eps=1": (lambda: G.predict_k(np.zeros(4), 1.0), "eps"),
    "predict_k eps=nan": (lambda: G.predict_k(np.zeros(4), NAN), "eps"),
    "predict_k eps=str": (lambda: G.predict_k(np.zeros(4), "x"), "eps"),
    # gaussian_mc
    "mc n=0": (lambda: MC.monte_carlo_keps(0, 1.0, 0.1, rows=2), "n"),
    "mc n=nan": (lambda: MC.monte_carlo_keps(NAN, 1.0, 0.1, rows=2), "n"),
    "mc n=1.5": (lambda: MC.monte_carlo_keps(1.5, 1.0, 0.1, rows=2), "n"),
    "mc rows=0": (lambda: MC.monte_carlo_keps(8, 1.0, 0.1, rows=0), "rows"),
    "mc rows=True": (lambda: MC.monte_carlo_keps(8, 1.0, 0.1, rows=True), "rows"),
    "mc sigma<0": (lambda: MC.monte_carlo_keps(8, -1.0, 0.1, rows=2), "sigma"),
    "mc eps=1": (lambda: MC.monte_carlo_keps(8, 1.0, 1.0, rows=2), "eps"),
    "mc max_elements=0": (lambda: MC.monte_carlo_keps(8, 1.0, 0.1, rows=2, max_elements=0),
                          "max_elements"),
    "mc seed=-1": (lambda: MC.monte_carlo_keps(8, 1.0, 0.1, rows=2, seed=-1), "seed"),
    "validity n=1": (lambda: MC.gaussian_validity(1, 1.0), "n"),
    "validity n=inf": (lambda: MC.gaussian_validity(INF, 1.0), "n"),
    "validity sigma=nan": (lambda: MC.gaussian_validity(10, NAN), "sigma"),
    "validity max_rel_sd=0": (lambda: MC.gaussian_validity(10, 1.0, max_rel_sd=0), "max_rel_sd"),
    "overshoot n=0": (lambda: MC.single_gap_overshoot(0, 1.0, 0.1, rows=2), "n"),
    "overshoot rows=-1": (lambda: MC.single_gap_overshoot(8, 1.0, 0.1, rows=-1), "rows"),
    "overshoot eps=nan": (lambda: MC.single_gap_overshoot(8, 1.0, NAN, rows=2), "eps"),
    # geometry: gating closed forms
    "sigmoid_gate t=nan": (lambda: ga.sigmoid_gate_curvature_at_zero(NAN, 0), "t"),
    "sigmoid_gate b=inf": (lambda: ga.sigmoid_gate_curvature_at_zero(1, INF), "b"),
    "sigmoid_gate b huge": (lambda: ga.sigmoid_gate_curvature_at_zero(1, 1e4), "b"),
    "sigmoid_gate_map t=inf": (lambda: ga.sigmoid_gate_map(INF, 0), "t"),
    "sphere_cap c=0": (lambda: ga.sphere_cap_curvature(0.0), "c"),
    "sphere_cap c<0": (lambda: ga.sphere_cap_curvature(-1.0), "c"),
    "sphere_cap sigma=0": (lambda: ga.sphere_cap_curvature(1.0, 0.0), "sigma"),
    "sphere_cap sigma=nan": (lambda: ga.sphere_cap_curvature(1.0, NAN), "sigma"),
    "headwise s=0": (lambda: ga.headwise_second_fundamental_form([1, 0], [0, 1], 0.0, I2), "s"),
    "headwise m nan": (lambda: ga.headwise_second_fundamental_form([NAN, 0], [0, 1], 1, I2),
                       "m"),
    "depth values shape": (lambda: ga.depth_curvature(I2, [I2]), "values"),
    "depth values singular": (lambda: ga.depth_curvature(np.ones((3, 3)), [I2]), "values"),
    "depth no hessians": (lambda: ga.depth_curvature(I3, []), "hessians"),
    "depth beta nan": (lambda: ga.depth_curvature(I3, [I2], beta=NAN), "beta"),
    "depth theta0 shape": (lambda: ga.depth_curvature(I3, [I2], theta0=[0.1]), "theta0"),
    # proxy
    "proxy h=0": (lambda: px.nonlinearity_proxy(_f, [0.0, 0.0], [1.0, 0.0], h=0), "h"),
    "proxy h<0": (lambda: px.nonlinearity_proxy(_f, [0.0, 0.0], [1.0, 0.0], h=-1), "h"),
    "proxy x nan": (lambda: px.nonlinearity_proxy(_f, [NAN, 0.0], [1.0, 0.0]), "x"),
    "proxy f": (lambda: px.nonlinearity_proxy(3, [0.0, 0.0], [1.0, 0.0]), "f"),
    "mean_proxy n_dirs=0": (lambda: px.mean_proxy(_f, [[0.0, 0.0]], n_dirs=0), "n_dirs"),
    "normal_curvature u=0": (lambda: px.normal_curvature(orc.sphere_map(), [1.0, 1.0],
                                                         [0.0, 0.0]), "u"),
    # curvature
    "christoffel singular": (lambda: cv.christoffel(SING, DG2), "g"),
    "christoffel not symmetric": (lambda: cv.christoffel(NOT_SYM, DG2), "g"),
    "christoffel g nan": (lambda: cv.christoffel([[NAN, 0], [0, 1]], DG2), "g"),
    "christoffel dg shape": (lambda: cv.christoffel(I2, np.zeros((2, 2))), "dg"),
    "christoffel_pullback rank": (lambda: cv.christoffel_pullback(RANK1, HESS), "jac"),
    "riemann d2g shape": (lambda: cv.riemann_from_metric(I2, DG2, DG2), "d2g"),
    "ricci shape": (lambda: cv.ricci_from_riemann(np.zeros((2, 2, 2, 3))), "riemann"),
    "scalar g singular": (lambda: cv.scalar_from_ricci(SING, I2), "g"),
    "sectional parallel": (lambda: cv.sectional_from_riemann(I2, D2G2, [1, 0], [2, 0]), "u"),
    "sectional p=1": (lambda: cv.sectional_from_riemann(np.eye(1), np.zeros((1,) * 4)), "dim"),
    "brioschi p=3": (lambda: cv.brioschi(I3, np.zeros((3,) * 3), np.zeros((3,) * 4)), "g"),
    "brioschi g nan": (lambda: cv.brioschi([[1, 0], [0, NAN]], DG2, D2G2), "g"),
    "sff rank": (lambda: cv.second_fundamental_form(RANK1, HESS), "jac"),
    "sff hess shape": (lambda: cv.second_fundamental_form(JAC, np.zeros((3, 2))), "hess"),
    "sff cov <= 0": (lambda: cv.second_fundamental_form(JAC, HESS, cov=0.0), "cov"),
    "sff cov not pd": (lambda: cv.second_fundamental_form(JAC, HESS, cov=-I3), "cov"),
    "gauss_route jac inf": (lambda: cv.gauss_route(np.full((3, 2), INF), HESS), "jac"),
    "metric_route g singular": (lambda: cv.metric_route(SING, DG2, D2G2), "g"),
    "curvature route": (lambda: geo.curvature(orc.sphere_map(), [1.0, 1.0], route="x"), "route"),
    "curvature theta nan": (lambda: geo.curvature(orc.sphere_map(), [NAN, 1.0]), "theta"),
    "curvature theta size": (lambda: geo.curvature(orc.sphere_map(), [1.0, 1.0, 1.0]),
                             "theta"),
    "curvature obj": (lambda: geo.curvature("sphere", [1.0, 1.0]), "obj"),
    "gaussian_curvature theta inf": (lambda: geo.gaussian_curvature(orc.sphere_map(),
                                                                    [INF, 0.0]), "theta"),
    # metric
    "precision n=0": (lambda: me.precision(None, 0), "n"),
    "precision cov<0": (lambda: me.precision(-1.0, 2), "cov"),
    "precision cov nan": (lambda: me.precision(NAN, 2), "cov"),
    "precision cov singular": (lambda: me.precision(SING, 2), "cov"),
    "pullback jac 1-d": (lambda: me.pullback_metric([1.0, 2.0]), "jac"),
    "fisher cov singular": (lambda: me.gaussian_fisher_metric(JAC, np.zeros((3, 3))), "cov"),
    "fisher dcov shape": (lambda: me.gaussian_fisher_metric(JAC, I3, np.zeros((2, 3))),
                          "dcov"),
    "ExplicitMetric dim=0": (lambda: me.ExplicitMetric(_f, 0), "dim"),
    "ExplicitMetric g": (lambda: me.ExplicitMetric(None, 2), "g"),
    "GaussianFamilyMetric dim": (lambda: me.GaussianFamilyMetric(_f, _f, -1), "dim"),
    "PullbackMetric map": (lambda: me.PullbackMetric("map"), "mean_map"),
    # derivatives
    "jacobian_fd h=0": (lambda: dv.jacobian_fd(_f, [0.0], h=0.0), "h"),
    "jacobian_fd h=nan": (lambda: dv.jacobian_fd(_f, [0.0], h=NAN), "h"),
    "jacobian_fd order": (lambda: dv.jacobian_fd(_f, [0.0], order=3), "order"),
    "jacobian_fd theta inf": (lambda: dv.jacobian_fd(_f, [INF]), "theta"),
    "jacobian_fd theta 0-d": (lambda: dv.jacobian_fd(_f, 1.0), "theta"),
    "hessian_fd h<0": (lambda: dv.hessian_fd(_f, [0.0], h=-1e-3), "h"),
    "hessian_fd f": (lambda: dv.hessian_fd("f", [0.0]), "f"),
    # maps
    "FunctionMap dim_in=0": (lambda: geo.FunctionMap(_f, 0, 1), "dim_in"),
    "FunctionMap dim_out=1.5": (lambda: geo.FunctionMap(_f, 1, 1.5), "dim_out"),
    "AffineMap D nan": (lambda: geo.AffineMap([[NAN]], [0.0]), "D"),
    "AffineMap c shape": (lambda: geo.AffineMap(I2, [0.0, 0.0, 0.0]), "c"),
    "Softmax scale=0": (lambda: geo.SoftmaxAttention(I2, I2, scale=0.0), "scale"),
    "Softmax rows": (lambda: geo.SoftmaxAttention(I2, I3), "rows"),
    "Softmax keys inf": (lambda: geo.SoftmaxAttention([[INF, 0], [0, 1]], I2), "keys"),
    "SigmoidGate weight empty": (lambda: geo.SigmoidGate([]), "weight"),
    "SigmoidGate bias shape": (lambda: geo.SigmoidGate(I2, [0.0, 0.0, 0.0]), "bias"),
    "SphereCapGate c=0": (lambda: geo.SphereCapGate(0.0), "c"),
    "SphereCapGate n=1": (lambda: geo.SphereCapGate(1.0, n=1), "n"),
    "ExpQuadraticGate theta0": (lambda: geo.ExpQuadraticGate(I2, [0.0]), "theta0"),
    "ExpQuadraticGate beta": (lambda: geo.ExpQuadraticGate(I2, [0.0, 0.0], beta=INF), "beta"),
    "Gated base": (lambda: geo.Gated("x", geo.SphereCapGate(1.0)), "base"),
    "Compose empty": (lambda: geo.Compose([]), "layers"),
    "ungated_simplex one key": (lambda: geo.ungated_simplex([[1.0, 2.0]]), "values"),
    "ungated_simplex nan": (lambda: geo.ungated_simplex([[1.0], [NAN]]), "values"),
    "softmax_chart values": (lambda: geo.softmax_chart_attention(np.eye(2)), "rows"),
    "gated_attention scale": (lambda: geo.gated_attention(I2, I2, [1.0, 1.0], scale=-1.0),
                              "scale"),
    "structured_depth no hessians": (lambda: geo.structured_depth_map(I3, []), "hessians"),
    "structured_depth offsets": (lambda: geo.structured_depth_map(I3, [I2], offsets=[0, 1]),
                                 "offsets"),
    # oracles
    "sphere_map r=0": (lambda: orc.sphere_map(0.0), "r"),
    "sphere_metric r<0": (lambda: orc.sphere_metric(-1.0), "r"),
    "sphere_metric analytic": (lambda: orc.sphere_metric(1.0, analytic="yes"), "analytic"),
    "half_plane scale nan": (lambda: orc.half_plane_metric(NAN), "scale"),
    "normal_family d=0": (lambda: orc.normal_family_metric(0), "d"),
    "cylinder r=inf": (lambda: orc.cylinder_map(INF), "r"),
    # experiment and plots
    "make_task task": (lambda: ex.make_task("spiral", 4, np.random.default_rng(0)), "task"),
    "make_task n<0": (lambda: ex.make_task("circle", -1, np.random.default_rng(0)), "n"),
    "run_experiment seeds=0": (lambda: geo.run_experiment(seeds=0), "seeds"),
    "run_experiment n_keys=1": (lambda: geo.run_experiment(n_keys=1), "n_keys"),
    "run_experiment n_keys huge": (lambda: geo.run_experiment(n_keys=500), "parameters"),
    "run_experiment l2<0": (lambda: geo.run_experiment(l2=-1.0), "l2"),
    "run_experiment tasks": (lambda: geo.run_experiment(tasks=("spiral",)), "tasks"),
    "run_experiment models": (lambda: geo.run_experiment(models=()), "models"),
    "plot_simplex resolution": (lambda: gp.plot_simplex_curvature(resolution=1), "resolution"),
    "plot_simplex heads": (lambda: gp.plot_simplex_curvature(heads={}), "heads"),
    "depth_curves L_max": (lambda: gp.depth_curves(L_max=0), "L_max"),
    "depth_curves A shape": (lambda: gp.depth_curves(A=I3), "A"),
    "plot_experiment results": (lambda: gp.plot_experiment(ex.ExperimentResults([])),
                                "results"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_domain_edges_raise_a_value_error_naming_the_argument(name):
    call, needle = CASES[name]
    with pytest.raises(InputError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert needle in str(info.value), str(info.value)


def test_valid_edges_still_return_values():
    """The edges that are inside the domain keep working."""
    assert float(G.keps_fraction(0.0, 0.0)) == 1.0
    assert float(G.keps_fraction(0.1, 0.0)) == pytest.approx(0.9)
    assert float(G.top_fraction_tail_mass(1.0, 2.0)) == 0.0
    assert float(G.entropy_limit(1, 0.0)) == 0.0
    assert float(G.expected_tail_sum(3, INF, 1.0)) == pytest.approx(3 * math.exp(0.5))
    assert float(G.discarded_mass(-INF, 1.0)) == 0.0
    assert float(ga.sphere_cap_curvature(2.0, 1.0)) == 0.25
    assert MC.gaussian_validity(2, 0.0).trusted
