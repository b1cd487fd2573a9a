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
# # Certify a model's attention budgets
#
# Sparse attention keeps only the top-k keys of each query. How many keys does a query
# *really* need? For a query with logits $s$ and softmax $P$, keeping the top-k set $H$
# and renormalising gives $\hat P = P(\cdot \mid H)$, and (Lemma 4.1 of Tzachristas et
# al.) the total variation distance is exactly the discarded mass:
#
# $$\mathrm{TV}(P, \hat P) = \tau_k = \sum_{i \notin H} p_i .$$
#
# So the smallest sound budget of a query is $k_\varepsilon = \min\{k: \tau_k \le \varepsilon\}$.
# `certattn.certify_topk` computes it exactly (never below it, whatever the float rounding).
#
# This notebook:
# 1. takes real attention (MiniLM-L6 shipped sample; SmolLM2 on 1024 tokens with
#    `CERTATTN_NOTEBOOK_FULL=1`),
# 2. certifies every query at several budgets and looks at how much the budgets vary,
# 3. turns them into a per-head serving table (a fixed Top-k per head and its coverage),
# 4. checks what the budget costs at the attention *output*,
# 5. exports the table as JSON for an inference engine.

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from certattn import certify_topk
from certattn.budget import attention_budget, load_attention

FULL = os.environ.get("CERTATTN_NOTEBOOK_FULL") == "1"

# %% [markdown]
# ## 1. Real attention
#
# `load_attention` returns `ModelAttention` records: queries, keys, values and the scaled
# logits of every recorded layer and head. The light run uses the shipped MiniLM sample
# (numpy only). The full run uses SmolLM2-135M (causal, 30 layers, 9 query heads sharing 3
# key/value heads) on 1024 tokens of built-in English prose and keeps the query rows of
# the second half, where every query sees at least 512 keys.

# %%
query_rows = None
if FULL:
    try:
        atts = load_attention("smollm2", tokens=1024)
        query_rows = slice(512, None)
    except ImportError as exc:
        print(f"SmolLM2 not installed ({exc}); using the MiniLM sample")
        atts = load_attention("minilm-sample")
else:
    atts = load_attention("minilm-sample")
a = atts[0]
print(a.model)
print(f"{len(atts)} sequence(s), tokens: {[x.n_tokens for x in atts]}")
print(f"recorded layers {a.layers.tolist()}, {a.n_heads} heads, logits {a.logits.shape}")
print("text:", a.metadata.get("text", "")[:120], "...")

# %% [markdown]
# ## 2. One head, every query
#
# Certify every query of one head at $\varepsilon = 0.01$ and look at two queries: the
# sorted attention probabilities and the cut the certificate places.

# %%
li, head = min(1, a.n_layers - 1), 0
x = a.logits[li, head] if query_rows is None else a.logits[li, head, query_rows]
cert = certify_topk(x, 0.01)
k = np.asarray(cert.k)
nv = np.asarray(cert.n_valid)
print(f"layer {int(a.layers[li])}, head {head}: k_eps / n from {np.min(k / nv):.2f} "
      f"to {np.max(k / nv):.2f}; every certified tail <= eps: "
      f"{bool(np.all(cert.tail_upper <= 0.01))}")

fig, ax = plt.subplots(figsize=(7, 4))
for q in (int(np.argmin(k / nv)), int(np.argmax(k / nv))):
    s = np.sort(x[q][np.isfinite(x[q])].astype(np.float64))[::-1]
    p = np.exp(s - s.max())
    p /= p.sum()
    line, = ax.semilogy(np.arange(1, p.size + 1), p, marker=".", label=f"query {q}")
    ax.axvline(k[q] + 0.5, color=line.get_color(), ls="--", lw=1)
ax.set_xlabel("rank of the key (by logit)")
ax.set_ylabel("attention probability")
ax.set_title("Two queries of one head; dashed: certified cut k_eps (ε = 0.01)")
ax.legend()
ax.grid(alpha=0.3, which="both")

# %% [markdown]
# ## 3. Budgets across layers and budgets
#
# The per-query $k_\varepsilon / n$ distribution per layer, at four budgets. Note how wide
# it is inside one layer: a single global Top-k must cover the worst queries.

# %%
eps_list = (0.001, 0.01, 0.05, 0.1)
fracs = {e: [] for e in eps_list}
for e in eps_list:
    for li_ in range(a.n_layers):
        per_layer = []
        for att in atts:
            xl = att.logits[li_] if query_rows is None else att.logits[li_][:, query_rows]
            c = certify_topk(xl, e)
            per_layer.append((np.asarray(c.k) / np.asarray(c.n_valid)).ravel())
        fracs[e].append(np.concatenate(per_layer))

layers = a.layers.tolist()
fig, axes = plt.subplots(1, len(eps_list), figsize=(13, 3.8), sharey=True)
for ax, e in zip(axes, eps_list, strict=False):
    ax.boxplot(fracs[e], whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(layers) + 1), [str(v) if len(layers) <= 12 or i % 5 == 0 else ""
                                             for i, v in enumerate(layers)])
    ax.set_title(f"ε = {e:g}")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("exact k_eps / n per query")
fig.suptitle("Certified budgets per layer (boxes: quartiles, whiskers: 5-95%)")
fig.tight_layout()
for e in eps_list:
    allf = np.concatenate(fracs[e])
    print(f"eps = {e:<6g} mean k/n = {allf.mean():.3f}   1 / mean(k/n) = {1 / allf.mean():.2f}x")

# %% [markdown]
# ## 4. A serving table: one fixed k per head
#
# An engine with a fixed Top-k per head wants the smallest k that certifies
# $\mathrm{TV} \le \varepsilon$ for most queries. `attention_budget` gives, per (layer,
# head), quantiles of $k_\varepsilon$ and $k_\varepsilon/n$ and the fixed k covering a chosen
# fraction of queries, with its coverage measured on the same queries and on held-out
# ones (k chosen on even queries, measured on odd ones).

# %%
table = attention_budget(atts, 0.01, coverage=0.9, query_rows=query_rows)
print(table.to_markdown(per_head=False))

# %% [markdown]
# The coverage-vs-k trade-off for three heads: how many more keys it takes to certify the
# last few percent of queries.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
li0 = a.n_layers // 2
k_all = np.concatenate([
    np.asarray(certify_topk(att.logits[li0] if query_rows is None
                            else att.logits[li0][:, query_rows], 0.01).k)
    for att in atts
], axis=1)  # (heads, all queries of all sequences)
for h in range(min(3, a.n_heads)):
    ks = np.sort(k_all[h])
    (line,) = ax.plot(ks, np.arange(1, ks.size + 1) / ks.size, drawstyle="steps-post",
                      label=f"head {h}")
    hb = table.head(int(a.layers[li0]), h)
    ax.plot(hb.k_fixed, hb.coverage_measured, "o", color=line.get_color())
ax.axhline(0.9, color="0.5", ls="--", lw=1)
ax.set_xlabel("fixed k (keys kept per query)")
ax.set_ylabel("fraction of queries certified (TV ≤ 0.01)")
ax.set_title(f"Coverage of a fixed Top-k, layer {int(a.layers[li0])} (dots: table's fixed k)")
ax.legend()
ax.grid(alpha=0.3)

# %% [markdown]
# ## 5. What the budget costs at the output
#
# The TV budget controls the output error through the head-tail identity
# $\mathrm{Attn} - \mathrm{Attn}_k = \tau(\mu_T - \mu_H)$ (Thm 5.2) and the bounds of
# Props 5.1/5.3 and Thm 5.6. `certify_attention` certifies every query and returns a
# sound bound on $\lVert \mathrm{Attn} - \mathrm{Attn}_k \rVert_2$.

# %%
try:
    from certattn.attention import certify_attention
except ImportError as exc:  # pragma: no cover - teammate module
    print(f"certify_attention not available yet: {exc}")
else:
    hd = a.head(int(a.layers[li0]), 0)
    causal = bool(not a.mask.all())
    rows = []
    for e in eps_list:
        ca = certify_attention(hd.queries, hd.keys, hd.values, e, scale=a.scale, causal=causal)
        full = certify_attention(hd.queries, hd.keys, hd.values, 0.0, scale=a.scale,
                                 causal=causal)
        err = np.linalg.norm(np.asarray(ca.output) - np.asarray(full.output), axis=-1)
        rows.append((e, float(np.mean(np.asarray(ca.k) / np.asarray(ca.n_valid))),
                     float(np.median(err)), float(np.median(np.asarray(ca.error_bound))),
                     bool(np.all(err <= np.asarray(ca.error_bound) * (1 + 1e-9) + 1e-12))))
    print("eps      mean k/n  median |error|  median bound  bound holds")
    for e, f, er, b, ok in rows:
        print(f"{e:<8g} {f:8.3f}  {er:14.3e}  {b:12.3e}  {ok}")

# %% [markdown]
# ## 6. Export for an inference engine
#
# `BudgetTable.to_json()` holds `k_fixed[layer][head]` plus the full statistics. The same
# table comes from the command line:
# `certattn budget --model smollm2 --eps 0.01 --coverage 0.9 --out budget.json`.

# %%
out = Path(tempfile.mkdtemp()) / "budget.json"
table.write_json(out)
doc = json.loads(out.read_text())
print(out, "-", len(doc["heads"]), "heads; k_fixed of the first layer:", doc["k_fixed"][0])
