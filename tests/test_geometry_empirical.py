"""Empirical side: the nonlinearity proxy (GEO-PROXY), the classifier experiment, plots."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import check_grad

from certattn.geometry import (
    gaussian_curvature,
    nonlinearity_proxy,
    normal_curvature,
    run_experiment,
    softmax_chart_attention,
    ungated_simplex,
)
from certattn.geometry.experiment import MODELS, TASKS, _Model, make_task
from certattn.geometry.oracles import sphere_map

seeds = st.integers(0, 2**31 - 1)


@given(seed=seeds)
def test_proxy_positive_on_flat_ungated_head(seed: int) -> None:
    """GEO-PROXY: rho > 0 on the ungated softmax-chart head although K = 0 there."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(3, 3))
    m = softmax_chart_attention(U)
    q = rng.normal(size=(6, 2))
    u = rng.normal(size=(6, 2))
    rho = nonlinearity_proxy(m, q, u, h=0.05)
    assert np.all(rho > 1e-6)
    assert np.max(np.abs(gaussian_curvature(m, q))) < 1e-8 * np.max(rho) * 1e6
    # ... and it is chart dependent: the same flat manifold in the simplex chart has rho = 0
    a = m.weights(q)[:, :2]
    rho_simplex = nonlinearity_proxy(ungated_simplex(U), a, u, h=0.05)
    assert np.all(rho_simplex < 1e-10)


@given(r=st.floats(0.2, 5.0), seed=seeds)
def test_normal_curvature_of_sphere(r: float, seed: int) -> None:
    """Normal curvature |II(u,u)| / g(u,u) = 1/r on a sphere, in every direction."""
    rng = np.random.default_rng(seed)
    th = rng.uniform([0.3, -3], [2.8, 3], size=(4, 2))
    np.testing.assert_allclose(normal_curvature(sphere_map(r), th, rng.normal(size=(4, 2))),
                               1 / r, rtol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_experiment_gradient_is_exact(kind: str) -> None:
    """The classifier's hand-written gradient matches finite differences."""
    rng = np.random.default_rng(3)
    model = _Model(kind, 3, 3)
    x, y = make_task("circle", 40, rng)
    p = rng.normal(size=model.size)
    err = check_grad(lambda w: model.loss_grad(w, x, y, 1e-3)[0],
                     lambda w: model.loss_grad(w, x, y, 1e-3)[1], p)
    assert err < 1e-5 * (1 + np.linalg.norm(model.loss_grad(p, x, y, 1e-3)[1]))


def test_tasks_are_balanced_and_correct() -> None:
    """Circle labels are |x|^2 < 8/pi (about half inside); linear labels a half-plane."""
    rng = np.random.default_rng(0)
    x, y = make_task("circle", 4000, rng)
    assert abs(np.mean(y > 0) - 0.5) < 0.05
    assert np.all((np.sum(x**2, 1) < 8 / np.pi) == (y > 0))
    x, y = make_task("linear", 100, rng)
    assert np.all((x @ [0.8, -0.6] + 0.3 > 0) == (y > 0))


def test_experiment_light() -> None:
    """Light run: fields present, 3-key ungated heads flat, gated curved and better on circle."""
    res = run_experiment(n_train=150, n_test=200, seeds=2, maxiter=100, restarts=1)
    assert len(res.runs) == 2 * len(TASKS) * len(MODELS)
    for r in res.runs:
        assert 0.0 <= r.test_accuracy <= 1.0
        if r.model == "ungated":
            assert r.curvature_density < 1e-8  # GEO-UNGATED-FLAT (3 keys, 2-D query)
        assert r.proxy > 0  # GEO-PROXY: positive even where K = 0
    summ = res.summary()
    assert summ[("circle", "elementwise")]["curvature_density"] > 1e-4
    assert summ[("circle", "elementwise")]["test_accuracy"] > summ[("circle", "ungated")][
        "test_accuracy"]
    assert summ[("linear", "ungated")]["test_accuracy"] > 0.9
    assert -1.0 <= res.correlation("circle") <= 1.0
    assert "circle" in res.table()
    from certattn.plots.geometry import plot_experiment

    fig = plot_experiment(res)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_plots_are_labelled() -> None:
    """Figures render, with labelled axes, a legend (depth) and colourbars (simplex)."""
    from certattn.plots.geometry import depth_curves, plot_depth, plot_simplex_curvature

    fig = plot_simplex_curvature(resolution=12)
    main = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(fig.axes) == 2 * len(main)  # one colourbar per panel
    assert all(ax.get_xlabel() for ax in main)
    assert "K = 0" in main[0].get_title()  # the ungated panel is flat
    fig.savefig(io.BytesIO(), format="png")
    c = depth_curves(L_max=4)
    np.testing.assert_allclose(c["tied"], c["L^2 K_1"], rtol=1e-8)
    assert np.all(c["aligned"] >= c["tied"][0])
    np.testing.assert_allclose(c["opposite"][1::2], 0.0, atol=1e-12)
    fig = plot_depth(c)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    fig.savefig(io.BytesIO(), format="png")
