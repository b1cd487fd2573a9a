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
# # The Gaussian rule for Top-k budgets
#
# If the logits of a row were i.i.d. $N(\mu, \sigma^2)$, the attention-weighted law of a
# score is the tilted normal $N(\mu + \sigma^2, \sigma^2)$, and keeping the top fraction
# $\rho$ of the keys leaves the tail $\tau = \Phi(\Phi^{-1}(1-\rho) - \sigma)$. Solving
# $\tau = \varepsilon$ gives the paper's rule
#
# $$\frac{k_\varepsilon}{n} \to \Phi_c\big(\sigma + \Phi^{-1}(\varepsilon)\big).$$
#
# One number, the spread of the logits, predicts the budget. This notebook checks the rule
# against exact budgets of simulated rows, shows where it breaks (when a few top scores
# dominate the partition function), and tries it on real attention rows.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from certattn import certify_topk
from certattn.gaussian import estimate_sigma, keps_fraction, predict_k, top_fraction_tail_mass
from certattn.gaussian_mc import gaussian_validity, monte_carlo_keps
from certattn.models import load_sample

FULL = os.environ.get("CERTATTN_NOTEBOOK_FULL") == "1"
ROWS = 2000 if FULL else 200

# %% [markdown]
# ## 1. Tail mass of the top fraction
#
# The closed form against exact tails of simulated rows of n = 1024 keys.

# %%
rng = np.random.default_rng(0)
n = 1024
rho = np.linspace(0.02, 0.98, 25)
z = np.sort(rng.standard_normal((ROWS // 4, n)), axis=1)[:, ::-1]  # descending
fig, ax = plt.subplots(figsize=(7, 4.2))
colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
for sigma, col in zip((0.5, 1.0, 2.0, 3.0), colors, strict=True):
    e = np.exp(sigma * (z - z[:, :1]))
    tail = 1 - np.cumsum(e, axis=1) / e.sum(axis=1, keepdims=True)
    k = np.ceil(rho * n).astype(int)
    ax.semilogy(rho, top_fraction_tail_mass(rho, sigma), color=col, label=f"rule, σ = {sigma:g}")
    ax.semilogy(k / n, tail[:, k - 1].mean(axis=0), "o", mfc="white", color=col)
ax.plot([], [], "o", mfc="white", color="0.3", label=f"exact, mean of {ROWS // 4} rows")
ax.set_xlabel("kept fraction ρ = k / n")
ax.set_ylabel("discarded mass τ (= TV)")
ax.set_ylim(1e-6, 1)
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")

# %% [markdown]
# ## 2. The rule against exact k_eps, and where it stops being trustworthy
#
# Monte Carlo means of the exact $k_\varepsilon / n$ (markers) against the rule (lines).
# `gaussian_validity` flags the regime where the partition function is dominated by a
# few top scores (relative sd of $\sum e^{s_i}$ above 0.5, or $\sigma$ close to
# $\sqrt{2\ln n}$): there the rule under-predicts (hollow markers).

# %%
sigmas = np.arange(0.5, 4.01, 0.5)
eps_list = np.array([0.1, 0.01, 0.001])
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for ax, n in zip(axes, (128, 1024), strict=False):
    mc = monte_carlo_keps(n, sigmas[:, None], eps_list[None, :], rows=ROWS, seed=1)
    ok = gaussian_validity(n, sigmas).trusted
    line = np.linspace(0, 4, 200)
    for j, (e, col) in enumerate(zip(eps_list, colors, strict=False)):
        ax.plot(line, keps_fraction(e, line), color=col, label=f"rule, ε = {e:g}")
        ax.plot(sigmas[ok], mc.mean[ok, j], "o", color=col)
        ax.plot(sigmas[~ok], mc.mean[~ok, j], "o", mfc="none", color=col)
    ax.axvline(np.sqrt(2 * np.log(n)), color="0.4", ls=":")
    ax.set_title(f"n = {n} (dotted: σ = √(2 ln n))")
    ax.set_xlabel("σ")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("k_eps / n")
axes[0].legend(fontsize=8)
fig.tight_layout()
mc = monte_carlo_keps(128, 3.0, 0.01, rows=ROWS, seed=0)
print(f"n = 128, σ = 3, ε = 0.01: exact mean {float(mc.mean):.3f} vs rule {float(mc.rule):.3f}")

# %% [markdown]
# ## 3. Real attention rows
#
# Real rows are not Gaussian: heavier upper tails (a few keys with much higher scores),
# attention sinks, and heads that attend to one position. Take each row's sample
# standard deviation $\hat\sigma$ and compare the rule with the exact budget.

# %%
rows, layer = [], []
for a in load_sample():
    for li, lay in enumerate(a.layers):
        x = a.logits[li].reshape(-1, a.n_tokens)
        rows.append(x)
        layer.append(np.full(x.shape[0], int(lay)))
layer = np.concatenate(layer)
fig, ax = plt.subplots(figsize=(7, 4.5))
sig_all, frac_all = [], []
for x in rows:
    _, sig, nv = estimate_sigma(x)
    sig_all.append(np.asarray(sig))
    frac_all.append(np.asarray(certify_topk(x, 0.01).k) / np.asarray(nv))
sig_all, frac_all = np.concatenate(sig_all), np.concatenate(frac_all)
for lay, col in zip(np.unique(layer), ("tab:purple", "tab:cyan", "tab:olive"), strict=False):
    m = layer == lay
    ax.scatter(sig_all[m], frac_all[m], s=4, alpha=0.4, color=col, label=f"layer {lay}")
grid = np.linspace(0, sig_all.max(), 300)
ax.plot(grid, keps_fraction(0.01, grid), color="black", lw=2, label="rule, ε = 0.01")
ax.set_xlabel("row logit standard deviation σ̂")
ax.set_ylabel("exact k_eps / n")
ax.set_title("MiniLM rows: exact budget vs the Gaussian rule")
ax.legend(markerscale=3)
ax.grid(alpha=0.3)

# %% [markdown]
# ## 4. The rule as a starting guess
#
# `predict_k` evaluates the rule at $\hat\sigma$: a prediction, not a certificate. How
# often would it have been enough?

# %%
for eps in (0.1, 0.01, 0.001):
    enough, over = [], []
    for x in rows:
        kp = np.asarray(predict_k(x, eps))
        ke = np.asarray(certify_topk(x, eps).k)
        enough.append(kp >= ke)
        over.append(kp - ke)
    enough, over = np.concatenate(enough), np.concatenate(over)
    print(f"eps = {eps:<6g} prediction >= exact k_eps on {enough.mean():.0%} of rows; "
          f"median excess {np.median(over):+.0f} keys")
