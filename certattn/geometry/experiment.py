"""Tiny attention classifiers: does gating help, and does curvature track accuracy?

Setup (seeded, numpy + scipy L-BFGS with an analytic gradient):

* inputs ``x in [-2, 2]^2`` are the query; ``n_keys`` learnable keys and values in
  ``R^{d_v}``; head ``y = V^T softmax(K x / sqrt 2)``;
* models: ``"ungated"`` (``y``), ``"headwise"`` (``y * sigmoid(w_g . x + b_g)``) and
  ``"elementwise"`` (``y * sigmoid(W_g x + b_g)``), gate after SDPA as in Qiu et al. 2025;
  a linear read-out and the logistic loss (plus a small L2 penalty);
* tasks: ``"circle"`` (label ``|x|^2 < 8/pi``: a closed, nonlinear boundary, balanced
  classes) and ``"linear"`` (label ``w . x + b > 0``).

With 3 keys the ungated representation is flat (Theorem GEO-UNGATED-FLAT); the
measured curvatures are the intrinsic Gaussian curvature ``K`` of the 2-D representation
manifold ``x -> head output`` (Fisher metric, ``Sigma = I``) at test points: its mean
``|K|``, the scale-free density ``|K| sqrt(det g)`` (mean total absolute curvature per unit
input area: invariant under rescaling of the values) and the proxy of
:mod:`.proxy` (not intrinsic).  The paper reports gated heads better only on the
nonlinear task; a third-party summary quotes a curvature-accuracy correlation of about
0.79.  Nothing here targets those numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from ..errors import InputError
from ._check import integer, number
from .curvature import gauss_route
from .maps import Gated as _Gated
from .maps import MeanMap, SigmoidGate, SoftmaxAttention, sigmoid
from .proxy import mean_proxy

__all__ = [
    "MODELS",
    "TASKS",
    "ExperimentResults",
    "RunResult",
    "make_task",
    "run_experiment",
]

Array = NDArray[np.float64]
MODELS = ("ungated", "headwise", "elementwise")
TASKS = ("circle", "linear")
_SCALE = 1.0 / np.sqrt(2.0)


def make_task(task: str, n: int, rng: np.random.Generator) -> tuple[Array, Array]:
    """Sample ``n`` points uniform on ``[-2, 2]^2`` with labels in ``{-1, +1}``."""
    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    x = rng.uniform(-2.0, 2.0, size=(integer(n, "n"), 2))
    if task == "circle":
        y = np.where(np.sum(x**2, 1) < 8.0 / np.pi, 1.0, -1.0)
    elif task == "linear":
        w = np.array([0.8, -0.6])
        y = np.where(x @ w + 0.3 > 0, 1.0, -1.0)
    else:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return x, y


class _Model:
    """Parameter packing, forward pass, loss and analytic gradient."""

    def __init__(self, kind: str, n_keys: int, d_v: int) -> None:
        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}")
        self.kind, self.n, self.d = kind, n_keys, d_v
        m = 0 if kind == "ungated" else (1 if kind == "headwise" else d_v)
        self.shapes = [("K", (n_keys, 2)), ("V", (n_keys, d_v)), ("Wg", (m, 2)), ("bg", (m,)),
                       ("w", (d_v,)), ("c", ())]
        self.size = sum(int(np.prod(s)) for _, s in self.shapes)

    def unpack(self, p: Array) -> dict[str, Array]:
        out, i = {}, 0
        for name, s in self.shapes:
            k = int(np.prod(s))
            out[name] = p[i:i + k].reshape(s)
            i += k
        return out

    def head_map(self, p: Array) -> MeanMap:
        q = self.unpack(p)
        att = SoftmaxAttention(q["K"], q["V"], _SCALE)
        if self.kind == "ungated":
            return att
        W = q["Wg"][0] if self.kind == "headwise" else q["Wg"]
        b = q["bg"][0] if self.kind == "headwise" else q["bg"]
        return _Gated(att, SigmoidGate(W, b))

    def logits(self, p: Array, x: Array) -> Array:
        q = self.unpack(p)
        return self.head_map(p)(x) @ q["w"] + q["c"]

    def loss_grad(self, p: Array, x: Array, y: Array, l2: float) -> tuple[float, Array]:
        q = self.unpack(p)
        N = x.shape[0]
        z = _SCALE * x @ q["K"].T
        z = z - z.max(1, keepdims=True)
        a = np.exp(z)
        a /= a.sum(1, keepdims=True)
        h = a @ q["V"]
        if self.kind == "ungated":
            s = np.ones((N, 1))
        else:
            s = sigmoid(x @ q["Wg"].T + q["bg"])
        o = h * s
        f = o @ q["w"] + q["c"]
        margin = y * f
        loss = float(np.mean(np.logaddexp(0.0, -margin))) + l2 * float(p @ p)
        df = -y * sigmoid(-margin) / N
        grads: dict[str, Array] = {"c": np.array(df.sum()), "w": o.T @ df}
        do = df[:, None] * q["w"][None, :]
        dh = do * s
        if self.kind == "ungated":
            grads["Wg"] = np.zeros((0, 2))
            grads["bg"] = np.zeros(0)
        else:
            ds = do * h
            if self.kind == "headwise":
                ds = ds.sum(1, keepdims=True)
            dpre = ds * s * (1 - s)
            grads["Wg"] = dpre.T @ x
            grads["bg"] = dpre.sum(0)
        grads["V"] = a.T @ dh
        da = dh @ q["V"].T
        dz = a * (da - np.sum(a * da, 1, keepdims=True))
        grads["K"] = _SCALE * dz.T @ x
        g = np.concatenate([np.ravel(grads[name]) for name, _ in self.shapes])
        return loss, g + 2 * l2 * p


@dataclass(frozen=True)
class RunResult:
    """One fitted model: accuracies and curvature of its head's representation."""

    task: str
    model: str
    seed: int
    train_accuracy: float
    test_accuracy: float
    mean_abs_curvature: float
    curvature_density: float
    proxy: float


@dataclass(frozen=True)
class ExperimentResults:
    """All runs, with summaries.

    Attributes
    ----------
    runs : list of RunResult
    config : dict
    """

    runs: list[RunResult]
    config: dict = field(default_factory=dict)

    def summary(self) -> dict[tuple[str, str], dict[str, float]]:
        """Means over seeds for each ``(task, model)``."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        for task in TASKS:
            for model in MODELS:
                rs = [r for r in self.runs if r.task == task and r.model == model]
                if not rs:
                    continue
                out[(task, model)] = {
                    k: float(np.mean([getattr(r, k) for r in rs]))
                    for k in ("train_accuracy", "test_accuracy", "mean_abs_curvature",
                              "curvature_density", "proxy")
                } | {"test_accuracy_std": float(np.std([r.test_accuracy for r in rs]))}
        return out

    def correlation(self, task: str | None = None, measure: str = "curvature_density") -> float:
        """Pearson correlation between ``measure`` and test accuracy over runs (of ``task``)."""
        rs = [r for r in self.runs if task is None or r.task == task]
        c = np.array([getattr(r, measure) for r in rs])
        a = np.array([r.test_accuracy for r in rs])
        if np.std(c) == 0 or np.std(a) == 0:
            return float("nan")
        return float(np.corrcoef(c, a)[0, 1])

    def table(self) -> str:
        """Plain-text table of :meth:`summary`."""
        lines = [f"{'task':8s} {'model':12s} {'test acc':>14s} {'mean|K|':>10s} "
                 f"{'|K|dA':>10s} {'proxy':>8s}"]
        for (task, model), s in self.summary().items():
            lines.append(
                f"{task:8s} {model:12s} {s['test_accuracy']:7.3f}+-{s['test_accuracy_std']:.3f}"
                f" {s['mean_abs_curvature']:10.3g} {s['curvature_density']:10.3g}"
                f" {s['proxy']:8.3g}"
            )
        return "\n".join(lines)


def run_experiment(
    n_train: int = 400,
    n_test: int = 1000,
    seeds: int = 5,
    n_keys: int = 3,
    d_v: int = 3,
    maxiter: int = 400,
    l2: float = 1e-4,
    restarts: int = 3,
    tasks: tuple[str, ...] = TASKS,
    models: tuple[str, ...] = MODELS,
) -> ExperimentResults:
    """Fit every model on every task for ``seeds`` seeds; measure accuracy and curvature.

    The default size runs in about 15 s on one core; ``run_experiment(n_train=150,
    n_test=200, seeds=2, maxiter=100, restarts=1)`` is the light size (tests, notebook).

    Raises
    ------
    InputError
        (a ``ValueError``) A count below 1 (``n_keys`` below 2), a negative or
        non-finite ``l2``, an unknown or empty ``tasks`` / ``models``, or a model with
        more than 200 parameters (``n_keys``, ``d_v`` too large).
    """
    n_train, n_test = integer(n_train, "n_train"), integer(n_test, "n_test")
    seeds, maxiter = integer(seeds, "seeds"), integer(maxiter, "maxiter")
    restarts = integer(restarts, "restarts")
    n_keys, d_v = integer(n_keys, "n_keys", minimum=2), integer(d_v, "d_v")
    l2 = number(l2, "l2", low=0.0)
    for name, given, known in (("tasks", tasks, TASKS), ("models", models, MODELS)):
        if isinstance(given, str) or not given or any(g not in known for g in given):
            raise InputError(f"{name} must be a non-empty tuple of {', '.join(known)}, "
                             f"got {given!r}")
    if max(_Model(k, n_keys, d_v).size for k in models) > 200:
        raise InputError(f"n_keys = {n_keys}, d_v = {d_v}: more than 200 parameters")
    runs = []
    for task in tasks:
        for seed in range(seeds):
            rng = np.random.default_rng(1000 + seed)
            xtr, ytr = make_task(task, n_train, rng)
            xte, yte = make_task(task, n_test, rng)
            inits = rng.normal(scale=0.5, size=(restarts, 200))
            for kind in models:
                model = _Model(kind, n_keys, d_v)
                best = None
                for init in inits:  # same starts for every model; keep the best fit
                    res = minimize(model.loss_grad, init[: model.size].copy(),
                                   args=(xtr, ytr, l2), jac=True, method="L-BFGS-B",
                                   options={"maxiter": maxiter})
                    if best is None or res.fun < best.fun:
                        best = res
                p = best.x
                tr = float(np.mean(np.sign(model.logits(p, xtr)) == ytr))
                te = float(np.mean(np.sign(model.logits(p, xte)) == yte))
                head = model.head_map(p)
                pts = xte[:200]
                J = head.jacobian(pts)
                sv = np.linalg.svd(J, compute_uv=False)
                # Near-degenerate immersion (saturated softmax or collinear keys): the
                # metric is singular to working precision and K is undefined there; such
                # points are skipped for mean |K| and contribute 0 to the density.
                ok = sv[:, -1] > 1e-4 * np.maximum(sv[:, 0], 1e-150)
                K = np.zeros(len(pts))
                if ok.any():
                    K[ok] = np.abs(gauss_route(J[ok], head.hessian(pts[ok])).gaussian)
                dens = K * sv[:, 0] * sv[:, 1]  # |K| sqrt(det g)
                mean_k = float(np.mean(K[ok])) if ok.any() else 0.0
                runs.append(RunResult(task, kind, seed, tr, te, mean_k, float(np.mean(dens)),
                                      mean_proxy(head, pts, seed=seed)))
    cfg = dict(n_train=n_train, n_test=n_test, seeds=seeds, n_keys=n_keys, d_v=d_v,
               maxiter=maxiter, l2=l2, restarts=restarts)
    return ExperimentResults(runs, cfg)
