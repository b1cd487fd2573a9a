# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gating enables curvature
#
# Bathula & Joshi (arXiv 2604.14702) model an attention head's output as the mean of a
# Gaussian with fixed covariance, $p(y\mid\theta) = N(\mu(\theta), \Sigma)$, and study the
# Fisher-Rao geometry this induces on the parameters $\theta$. The Fisher metric is the
# pull-back
#
# $$g = J^\top \Sigma^{-1} J, \qquad J = \partial\mu/\partial\theta,$$
#
# and the question is whether the *intrinsic* curvature of $g$ (its Riemann tensor, here the
# Gaussian curvature $K$ of a two-parameter family) can be non-zero. `certattn.geometry`
# computes it two ways: the Gauss equation (from $J$ and the Hessian of $\mu$) and the
# metric alone (Christoffel symbols, Riemann tensor). Convention: the sphere is positive.
#
# This notebook shows: (1) ungated heads are flat (and where that stops being true),
# (2) gates curve, with exact closed forms, (3) curvature adds up over depth, and
# (4) a small classifier experiment.

# %%
import numpy as np

from certattn.geometry import (
    SoftmaxAttention,
    curvature,
    gaussian_curvature,
    nonlinearity_proxy,
    run_experiment,
    sigmoid_gate_curvature_at_zero,
    softmax_chart_attention,
)
from certattn.geometry.gating import sigmoid_gate_map
from certattn.geometry.oracles import half_plane_metric, sphere_map
from certattn.plots.geometry import (
    depth_curves,
    plot_depth,
    plot_experiment,
    plot_simplex_curvature,
)

rng = np.random.default_rng(0)

# %% [markdown]
# ## Sign check first
# A sphere of radius 2 must give $K = 1/4$ by both routes; the hyperbolic half-plane $-1$.

# %%
th = np.array([[0.7, 0.2], [1.9, -2.0]])
print("sphere, Gauss route :", gaussian_curvature(sphere_map(2.0), th))
print("sphere, metric route:", gaussian_curvature(sphere_map(2.0), th, route="metric"))
print("half-plane          :", gaussian_curvature(half_plane_metric(), np.array([[0.0, 0.5]])))

# %% [markdown]
# ## 1. Ungated heads are flat ... within scope
# With 3 keys, $\alpha = \mathrm{softmax}(q_1, q_2, 0)$ and $\mu = \sum_i \alpha_i U_i$: the
# output is affine in $\alpha$, the image lies in a plane, and $K = 0$ even though the
# metric varies from point to point. The finite-difference "nonlinearity proxy" is
# nevertheless positive: it measures the parametrisation, not the geometry.

# %%
head = softmax_chart_attention(rng.normal(size=(3, 4)))
q = rng.normal(size=(5, 2))
cv = curvature(head, q)
print("K                 :", cv.gaussian)
print("g_00 varies       :", cv.metric[:, 0, 0])
print("proxy (not K!)    :", nonlinearity_proxy(head, q, rng.normal(size=(5, 2)), h=0.05))

# %% [markdown]
# **Scope.** The flatness theorem is about the affine-coefficient model. Four keys with a
# 2-D query already give a curved ungated head: for logits $(q_1, q_2, 0, q_1+q_2)$ and
# $U = I_4$, $K(0) = -4$ exactly.

# %%
four = SoftmaxAttention([[1, 0], [0, 1], [0, 0], [1, 1]], np.eye(4), scale=1.0)
print("4 keys, K(0) =", gaussian_curvature(four, np.zeros(2)))

# %% [markdown]
# ## 2. Gates curve
# A gate after scaled dot-product attention (Qiu et al. 2025) multiplies the head output.
# Below: $K$ over the simplex for an ungated head, a headwise and an elementwise
# query-driven sigmoid gate, and the spherical-cap gate $s = c/|\alpha|$ whose output lies
# on a sphere of radius $c$ ($K = \sigma^2/c^2$, here $4$).

# %%
plot_simplex_curvature(resolution=30)

# %% [markdown]
# For the headwise gate $s = \mathrm{sigmoid}(t(q_1+q_2)+b)$ at $q = 0$:
# $K(0) = 27t^2(6t-1)(1+e^b)^4e^{-2b}/((1+e^b)^2+18t^2)^2$, which changes sign at $t = 1/6$.

# %%
for t in (0.1, 1 / 6, 0.25, 1.0):
    k = float(gaussian_curvature(sigmoid_gate_map(t, 0.5), np.zeros(2)))
    closed = float(sigmoid_gate_curvature_at_zero(t, 0.5))
    print(f"t = {t:.3f}: computed {k:+.6f}, closed form {closed:+.6f}")

# %% [markdown]
# ## 3. Depth amplification
# In the structured regime $\mu_L = (\prod_l s_l)\, m$ with $s_l = e^{-\beta\phi_l}$, every
# $\phi_l$ stationary at $\theta_0$ and normalised to $\phi_l(\theta_0) = 0$:
# $K_L = (\nu\cdot m)^2\beta^2 \det(\sum_l \nabla^2\phi_l)/\det g_0$. Tied layers give
# $K_L = L^2 K_1$; aligned layers are superadditive ($\sqrt{K_L} \ge \sum_l \sqrt{K_l}$);
# opposite layers cancel.

# %%
curves = depth_curves(L_max=6)
print({k: np.round(v, 4) for k, v in curves.items()})
plot_depth(curves)

# %% [markdown]
# ## 4. Does curvature help a classifier?
# Tiny attention classifiers on 2-D inputs (the input is the query; 3 learnable keys; values in
# $\mathbb{R}^3$; linear read-out), fitted with L-BFGS, on a task with a closed, nonlinear
# decision boundary (`circle`) and one with a linear boundary. Curvature is measured as the
# scale-free density $|K|\sqrt{\det g}$ of the head's representation at test points.
# The light size runs in seconds; `run_experiment()` (defaults) is the full size.

# %%
res = run_experiment(n_train=200, n_test=400, seeds=3, maxiter=200, restarts=1)
print(res.table())
print("corr(curvature density, accuracy), circle:", round(res.correlation("circle"), 3))
plot_experiment(res)

# %% [markdown]
# The ungated 3-key head is flat (density $\approx 0$) and cannot draw a closed boundary; gated
# heads are curved and fit the circle; on the linear task all models are equally good.
# These are measurements at a small size, not a reproduction of the paper's numbers.
