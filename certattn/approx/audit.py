r"""Audit attention approximations on real attention: TV, output error, certificates, cost.

For every chosen method and every recorded layer of a model's attention
(:func:`certattn.budget.load_attention`), the method runs on all heads of the layer
(queries ``(H, n, d)``, keys and values ``(H_kv, n, d)``, the model's boolean mask) and is
compared with exact attention computed in float64 from the same queries and keys:

* **TV** to exact attention per query: for a kept set :math:`H`, exactly
  :math:`1 - P(H)` (Theorem TV-TAIL, summed over the dropped keys); for a method that
  defines another distribution :math:`W`, :math:`\tfrac12\sum_j |P_j - W_j|`; undefined
  otherwise;
* **relative output error** :math:`|O - \mathrm{Attn}| / |\mathrm{Attn}|` (Euclidean);
* **certified within eps**: the fraction of queries whose *certificate* (not the measured
  error) guarantees the budget: ``tail_upper <= eps`` (TV) and, separately,
  ``error_bound <= eps (|O| - error_bound)``, which implies a relative error
  :math:`\le \varepsilon`;
* **soundness on every query**: a certificate below the float64 reference (beyond the
  reference's own rounding, :math:`64 n u` relative for TV and :math:`64 n u C` absolute
  for the output, :math:`C = \max_j |v_j|`) is counted in ``unsound`` (must be 0), and so
  is a query certified within eps whose reference TV or relative error exceeds eps;
* **cost**: the method's key-equivalents per query (:attr:`ApproxResult.cost`), mean and
  relative to dense attention (``cost / dense`` = total key-equivalents over total visible
  keys: the fraction of dense attention's work).

Methods
-------
:data:`METHODS` maps a name to a callable ``fn(q, k, v, *, mask, causal, scale, kv_heads,
**params) -> ApproxResult`` built from :data:`METHOD_TABLE` (``"module:function"``), imported
lazily on first call, so a method whose module is absent (another branch) is reported as
unavailable instead of breaking the audit.  :data:`PRESETS` adds the audit's parameters
(``window_sinks_certified`` = ``window_sinks(fallback="quant", eps=eps, bits=(2, 4, 8))``:
the window certified from 2-bit key estimates of the keys it drops, Theorem QUANT-SCORE,
refined by the next bits of their nested 8-bit codes (to 4, then 8 bits) where that does
not certify eps, and a quantized certified search where none does; ``quest_certified``
the same over Quest's pages, ranked by their mass estimated from those 2-bit estimates
instead of page boxes, ``rank="estimates"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _topk_numba
from .._fp import U
from .._validate import InputError
from ..attention import CHUNK_ELEMS, _chunks, _prepare
from ._result import ApproxResult

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "METHOD_TABLE",
    "PRESETS",
    "AuditReport",
    "AuditRow",
    "MethodUnavailable",
    "audit",
    "audit_model",
    "available",
]

Array = Any

METHOD_TABLE: dict[str, str] = {
    "window_sinks": "certattn.approx.selection:window_sinks",
    "window_sinks_certified": "certattn.approx.selection:window_sinks",
    "quest": "certattn.approx.selection:quest",
    "quest_certified": "certattn.approx.selection:quest",
    "delta": "certattn.approx.delta:delta_correct",
    "skyformer": "certattn.approx.skyformer:skyformer",
    "hybrid": "certattn.approx.hybrid:hybrid_linear",
}
"""Method name -> ``"module:function"`` (imported on first use)."""

PRESETS: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "window_sinks_certified": lambda n, eps: {"fallback": "quant", "eps": eps, "bits": (2, 4, 8)},
    "quest_certified": lambda n, eps: {"fallback": "quant", "eps": eps, "bits": (2, 4, 8),
                                       "rank": "estimates"},
}
"""Extra keyword arguments per method name, from the context length ``n`` and ``eps``."""

_NO_WEIGHTS = ("window_sinks", "window_sinks_certified", "quest", "quest_certified")

DEFAULT_METHODS = tuple(METHOD_TABLE)
"""Methods the audit runs by default: every registered one whose module is present (the
:data:`DENSE` ones only up to :data:`DENSE_LIMIT`)."""

ROW_SEPARABLE = frozenset({"window_sinks", "window_sinks_certified", "quest", "quest_certified"})
"""Methods whose every query row depends on that row's query and mask row and on all keys
only: the audit runs them by blocks of query rows of at least :data:`ROW_BLOCK_ELEMS`
scores, so that their ``(H, n, n)`` kept sets never exist whole (the results are the
same)."""

ROW_BLOCK_ELEMS = max(1 << 25, 2 * _topk_numba.AUTO_KEYS)
"""Least scores (heads x query rows x keys) per block of a :data:`ROW_SEPARABLE` method:
at least twice the size from which ``CERTATTN_KERNEL=auto`` takes the compiled path
(``_topk_numba.AUTO_KEYS``), so that every block takes the path of the whole call (the
layer is split into equal blocks)."""

DENSE = frozenset({"skyformer", "hybrid"})
"""Methods that form ``(H, n, n)`` float64 arrays (several at once) by construction."""

DENSE_LIMIT = 1 << 28
"""Bytes of one ``(H, n, n)`` float64 array above which the default methods leave out the
:data:`DENSE` ones (SmolLM2, 9 heads: above 1930 tokens); named methods always run."""


class MethodUnavailable(InputError):
    """A method of :data:`METHOD_TABLE` whose module or function cannot be imported."""


class _Lazy:
    """A callable that imports ``module:function`` on first call."""

    def __init__(self, name: str, spec: str) -> None:
        self.name, self.spec = name, spec
        self._fn: Callable[..., ApproxResult] | None = None

    def resolve(self) -> Callable[..., ApproxResult]:
        if self._fn is None:
            module, _, func = self.spec.partition(":")
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                raise MethodUnavailable(
                    f"method {self.name!r} is unavailable: module {module} not found ({exc})"
                ) from None
            fn = getattr(mod, func, None)
            if not callable(fn):
                raise MethodUnavailable(
                    f"method {self.name!r} is unavailable: {module} has no function {func}"
                )
            self._fn = fn
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> ApproxResult:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<lazy method {self.name}: {self.spec}>"


METHODS: dict[str, Callable[..., ApproxResult]] = {
    name: _Lazy(name, spec) for name, spec in METHOD_TABLE.items()
}
"""Method name -> callable ``fn(q, k, v, *, mask, causal, scale, kv_heads, **params)``."""


def available(name: str) -> bool:
    """Whether ``name`` is in :data:`METHODS` and its module and function import."""
    spec = METHOD_TABLE.get(name)
    if spec is None:
        return False
    module = spec.partition(":")[0]
    try:
        if importlib.util.find_spec(module) is None:
            return False
        METHODS[name].resolve()  # type: ignore[attr-defined]
    except (ImportError, MethodUnavailable, ValueError):
        return False
    return True


# --------------------------------------------------------------------------
# Per-query measures
# --------------------------------------------------------------------------


def _exact_rows(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Any:
    """Yield ``(rows, p, valid, prepared)``: float64 exact attention probabilities of one
    layer, one query chunk at a time (:func:`certattn.attention._chunks`, the scores' one
    home: about :data:`~certattn.attention.CHUNK_ELEMS` numbers at once, never the
    ``(H, n, n)`` array)."""
    pr = _prepare(q, k, v, scale=scale, mask=mask, causal=False, kv_heads=int(k.shape[0]))
    for rows, s, valid, *_ in _chunks(pr, CHUNK_ELEMS):
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        yield rows, p, valid, pr


def _reference(q: Array, k: Array, v: Array, mask: Array, scale: float) -> tuple[Array, ...]:
    """float64 exact attention of one layer: output ``(H, n, dv)``, visible keys per query
    ``(H, n)`` and ``C = max_j |v_j|`` per head, computed by query chunks."""
    attn = nv = vv = None
    for rows, p, valid, pr in _exact_rows(q, k, v, mask, scale):
        if attn is None:
            vv = np.asarray(pr.v)
            attn = np.empty((*p.shape[:-2], int(pr.q.shape[-2]), vv.shape[-1]))
            nv = np.empty(attn.shape[:-1])
        attn[..., rows, :] = p @ vv
        nv[..., rows] = np.sum(valid, axis=-1)
    c = np.max(np.linalg.norm(vv, axis=-1), axis=-1)  # (H,)
    return attn, nv, c


def _rows(a: Array, rows: slice) -> Array:
    """Query rows of a ``(..., n, n)`` array (a row axis of length 1 broadcasts)."""
    a = np.asarray(a)
    return a if a.shape[-2] == 1 else a[..., rows, :]


def _tv(res: ApproxResult, q: Array, k: Array, v: Array, mask: Array, scale: float,
        shape: tuple[int, ...]) -> Array:
    """Per-query TV of ``res`` to exact attention (NaN without a kept set or weights), by
    query chunks: ``1 - P(kept)`` for a kept set, else ``sum |P - W| / 2``."""
    tv = np.full(shape, np.nan)
    if res.kept is None and res.weights is None:
        return tv
    for rows, p, valid, _ in _exact_rows(q, k, v, mask, scale):
        if res.kept is not None:
            kept = _rows(res.kept, rows).astype(bool) & valid
            tv[..., rows] = np.sum(np.where(kept, 0.0, p), axis=-1)
        else:
            w = _rows(res.weights, rows).astype(np.float64)
            tv[..., rows] = 0.5 * np.sum(np.abs(p - w), axis=-1)
    return tv


@dataclass
class _Acc:
    """Per-query measures of one (method, layer), accumulated over records."""

    tv: list[Array] = field(default_factory=list)
    rel: list[Array] = field(default_factory=list)
    cert_tv: list[Array] = field(default_factory=list)
    cert_err: list[Array] = field(default_factory=list)
    cost: list[Array] = field(default_factory=list)
    n_valid: list[Array] = field(default_factory=list)
    fell_back: list[Array] = field(default_factory=list)
    unsound: int = 0
    params: dict[str, Any] = field(default_factory=dict)


def _measure(res: ApproxResult, tv: Array, attn: Array, n_valid: Array, c: Array, n: int,
             eps: float, acc: _Acc) -> None:
    """Accumulate one result's per-query measures, given its exact ``tv`` (:func:`_tv`), the
    reference ``attn``, ``n_valid``, ``c`` of the same query rows (:func:`_reference`) and
    the number of keys ``n``."""
    out = np.asarray(res.output, dtype=np.float64)
    a_norm = np.linalg.norm(attn, axis=-1)
    err = np.linalg.norm(out - attn, axis=-1)
    rel = err / np.maximum(a_norm, 1e-300)
    acc.tv.append(tv.ravel())
    acc.rel.append(rel.ravel())
    acc.cost.append(np.broadcast_to(np.asarray(res.cost, np.float64), tv.shape).ravel())
    acc.n_valid.append(np.asarray(n_valid, np.float64).ravel())
    ref_tol = 64 * n * U
    if res.tail_upper is not None:
        tu = np.asarray(res.tail_upper, np.float64)
        acc.unsound += int(np.sum(tv > tu * (1 + ref_tol) + 1e-300))
        cert = tu <= eps
        acc.unsound += int(np.sum(cert & (tv > eps * (1 + ref_tol))))
        acc.cert_tv.append(cert.ravel())
    if res.error_bound is not None:
        eb = np.asarray(res.error_bound, np.float64)
        cc = c.reshape(c.shape + (1,) * (eb.ndim - c.ndim))
        acc.unsound += int(np.sum(err > eb + ref_tol * cc))
        cert = eb <= eps * (np.linalg.norm(out, axis=-1) - eb)
        acc.unsound += int(np.sum(cert & (rel > eps * (1 + ref_tol))))
        acc.cert_err.append(cert.ravel())
    fell = res.params.get("fell_back") if isinstance(res.params, dict) else None
    if fell is not None:
        acc.fell_back.append(np.asarray(fell, bool).ravel())


def _scalars(res: ApproxResult) -> dict[str, Any]:
    return {key: val for key, val in (res.params or {}).items()
            if isinstance(val, int | float | str | bool | type(None))}


def _run_method(m: str, q: Array, k: Array, v: Array, mask: Array, scale: float,
                kw: dict[str, Any], ref: tuple[Array, Array, Array], eps: float,
                acc: _Acc) -> None:
    """Run method ``m`` on one layer (by query blocks if :data:`ROW_SEPARABLE`) and
    accumulate its measures; ``acc.params`` keeps the scalar parameters common to every
    block (a per-block rate such as ``fallback_rate`` is in the ``fallback`` column)."""
    attn, n_valid, c = ref
    lq, n = int(q.shape[-2]), int(k.shape[-2])
    blocks = 1
    if m in ROW_SEPARABLE:
        blocks = min(lq, max(1, int(np.prod(q.shape[:-1])) * n // ROW_BLOCK_ELEMS))
    edges = np.linspace(0, lq, blocks + 1).round().astype(int)
    params: dict[str, Any] | None = None
    for i0, i1 in itertools.pairwise(edges.tolist()):
        rows = slice(int(i0), int(i1))
        qb, mb = (q, mask) if blocks == 1 else (q[..., rows, :], _rows(mask, rows))
        res = METHODS[m](qb, k, v, mask=mb, causal=False, scale=scale,
                         kv_heads=int(k.shape[0]), **kw)
        tv = _tv(res, qb, k, v, mb, scale, np.shape(res.output)[:-1])
        _measure(res, tv, attn[..., rows, :], n_valid[..., rows], c, n, eps, acc)
        block = _scalars(res)
        params = block if params is None else {
            key: val for key, val in params.items() if key in block and block[key] == val}
        del res
    acc.params = params or {}


@dataclass(frozen=True)
class AuditRow:
    """One line of the audit: a method on one layer (all heads and queries); ``layer = -1``
    pools every audited layer."""

    method: str
    layer: int
    queries: int
    tv_mean: float
    tv_p99: float
    rel_mean: float
    rel_p99: float
    cert_tv: float
    cert_err: float
    fallback: float
    cost_mean: float
    cost_frac: float
    unsound: int
    params: dict[str, Any]


def _merge(parts: list[_Acc]) -> _Acc:
    """Pool the per-query measures of several layers."""
    out = _Acc(params=parts[0].params)
    for a in parts:
        for name in ("tv", "rel", "cert_tv", "cert_err", "cost", "n_valid", "fell_back"):
            getattr(out, name).extend(getattr(a, name))
        out.unsound += a.unsound
    return out


def _mean(parts: list[Array]) -> float:
    if not parts:
        return math.nan
    a = np.concatenate(parts).astype(np.float64)
    return float(np.mean(a)) if a.size else math.nan


def _p99(parts: list[Array]) -> float:
    if not parts:
        return math.nan
    a = np.concatenate(parts)
    a = a[~np.isnan(a)]
    return float(np.quantile(a, 0.99)) if a.size else math.nan


def _row(method: str, layer: int, acc: _Acc) -> AuditRow:
    tv = np.concatenate(acc.tv)
    cost = np.concatenate(acc.cost)
    nv = np.concatenate(acc.n_valid)
    return AuditRow(
        method=method, layer=layer, queries=int(tv.size),
        tv_mean=float(np.mean(tv)) if not np.all(np.isnan(tv)) else math.nan,
        tv_p99=_p99(acc.tv), rel_mean=_mean(acc.rel), rel_p99=_p99(acc.rel),
        cert_tv=_mean(acc.cert_tv), cert_err=_mean(acc.cert_err), fallback=_mean(acc.fell_back),
        cost_mean=float(np.mean(cost)), cost_frac=float(np.sum(cost) / np.sum(nv)),
        unsound=int(acc.unsound), params=acc.params,
    )


@dataclass(frozen=True)
class AuditReport:
    """The audit of several methods on one model's attention.

    Attributes
    ----------
    model : str
    tokens : int
        Sequence length (the longest record).
    eps : float
        The budget of the "certified within eps" columns.
    rows : list of AuditRow
        Per method and layer.
    pooled : list of AuditRow
        Per method, every layer pooled (``layer = -1``).
    skipped : dict
        Method name -> why it did not run (unavailable module, error).
    samples : dict
        ``(method, layer) -> {"tv": array, "rel": array}`` per-query values (figures).
    """

    model: str
    tokens: int
    eps: float
    rows: list[AuditRow]
    pooled: list[AuditRow]
    skipped: dict[str, str]
    samples: dict[tuple[str, int], dict[str, Array]] = field(repr=False)

    @property
    def unsound(self) -> int:
        """Certificates below the reference, summed over every row (must be 0)."""
        return sum(r.unsound for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x

        return {
            "model": self.model, "tokens": self.tokens, "eps": self.eps,
            "unsound": self.unsound, "skipped": self.skipped,
            "rows": [clean(dict(r.__dict__)) for r in self.rows],
            "pooled": [clean(dict(r.__dict__)) for r in self.pooled],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, *, summary: bool = False) -> str:
        """One Markdown table, a line per method and layer then per method over all layers
        (``summary``: only the latter), and notes."""
        head = ("| method | layer | queries | TV mean | TV p99 | rel err mean | rel err p99 | "
                f"cert TV<={self.eps:g} | cert err<={self.eps:g} | fallback | cost (keys/q) | "
                "cost / dense | unsound |")
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def f(x: float, spec: str = ".3g") -> str:
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else \
                format(x, spec)

        for r in (self.pooled if summary else [*self.rows, *self.pooled]):
            lines.append(
                f"| {r.method} | {'all' if r.layer < 0 else r.layer} | {r.queries} | "
                f"{f(r.tv_mean)} | {f(r.tv_p99)} | "
                f"{f(r.rel_mean)} | {f(r.rel_p99)} | {f(r.cert_tv, '.1%')} | "
                f"{f(r.cert_err, '.1%')} | {f(r.fallback, '.1%')} | {f(r.cost_mean, '.1f')} | "
                f"{f(r.cost_frac, '.3f')} | {r.unsound} |"
            )
        lines.append("")
        lines.append(f"{self.model}, {self.tokens} tokens, eps = {self.eps:g}; "
                     f"unsound certificates: {self.unsound}")
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path) -> list[Path]:
        """Write ``audit.json`` and one figure per method (TV and error per layer)."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "audit.json"]
        written[0].write_text(self.to_json())
        written += _figures(self, folder)
        return written


def _figures(report: AuditReport, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = list(dict.fromkeys(r.method for r in report.rows))
    for m in methods:
        layers = [r.layer for r in report.rows if r.method == m]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        cmap = plt.get_cmap("viridis")
        for i, layer in enumerate(layers):
            col = cmap(i / max(1, len(layers) - 1))
            smp = report.samples[(m, layer)]
            for ax, key in zip(axes, ("tv", "rel"), strict=True):
                x = smp[key]
                x = x[np.isfinite(x)]
                if x.size == 0:
                    continue
                x = np.log10(np.maximum(x, 1e-17))
                ax.hist(x, bins=60, histtype="step", color=col, label=f"layer {layer}")
        if all(not np.isfinite(report.samples[(m, lay)]["tv"]).any() for lay in layers):
            axes[0].text(0.5, 0.5, "TV undefined: no kept set or distribution",
                         ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_xlabel("log10 TV to exact attention")
        axes[1].set_xlabel("log10 relative output error")
        for ax in axes:
            ax.set_ylabel("queries")
        axes[0].axvline(math.log10(report.eps), color="red", lw=0.8, ls="--")
        axes[1].legend(fontsize=6, ncol=2)
        fig.suptitle(f"{m} on {report.model} ({report.tokens} tokens)")
        fig.tight_layout()
        path = folder / f"audit_{m}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------
# Running the audit
# --------------------------------------------------------------------------


def _resolve_methods(methods: Sequence[str] | None, explicit: bool) -> tuple[list[str], dict]:
    names = list(dict.fromkeys(DEFAULT_METHODS if methods is None else methods))
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    run, skipped = [], {}
    for m in names:
        if available(m):
            run.append(m)
            continue
        try:
            METHODS[m].resolve()  # type: ignore[attr-defined]
            why = "not importable"
        except MethodUnavailable as exc:
            why = str(exc)
        except Exception as exc:  # a broken module is reported, not raised
            why = f"{type(exc).__name__}: {exc}"
        if explicit and methods is not None and len(names) == 1:
            raise MethodUnavailable(why)
        skipped[m] = why
    return run, skipped


def audit(
    records: Sequence[Any],
    methods: Sequence[str] | None = None,
    *,
    eps: float = 0.01,
    params: dict[str, dict[str, Any]] | None = None,
    layers: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    r"""Run ``methods`` on every layer of ``records`` and compare with exact attention.

    Parameters
    ----------
    records : sequence of :class:`certattn.models.ModelAttention`
        One or more sequences of the same model (layers are pooled across records).
    methods : sequence of str, optional
        Names of :data:`METHODS` (default :data:`DEFAULT_METHODS`; unavailable ones are
        skipped and listed in ``skipped``).
    eps : float
        Budget of the "certified within eps" columns (TV, and relative output error).
    params : dict, optional
        Extra keyword arguments per method name (override :data:`PRESETS`).
    layers : sequence of int, optional
        Model layers to audit (default: every recorded layer).
    progress : callable, optional
        Called with a short message after each method and layer.

    Returns
    -------
    AuditReport

    Notes
    -----
    Memory grows linearly with the context for every method but the :data:`DENSE` ones:
    the exact references and TVs are computed by query chunks (:func:`_exact_rows`) and
    the :data:`ROW_SEPARABLE` methods run by blocks of query rows.  With ``methods=None``
    the :data:`DENSE` methods are left out (listed in ``skipped``) above
    :data:`DENSE_LIMIT`.  Repeated names in ``methods`` run once.
    """
    from .._validate import check_eps

    eps = check_eps(eps)
    if not records:
        raise InputError("no attention records to audit")
    recorded = {int(x) for rec in records for x in np.asarray(rec.layers).tolist()}
    wanted = recorded if layers is None else {int(x) for x in layers}
    if not wanted <= recorded:
        raise InputError(f"layer(s) {sorted(wanted - recorded)} not recorded; recorded: "
                         f"{sorted(recorded)}")
    run, skipped = _resolve_methods(methods, explicit=methods is not None)
    if methods is None:
        big = max(8 * int(r.queries.shape[-3]) * int(r.queries.shape[-2]) * int(r.keys.shape[-2])
                  for r in records)
        for m in [m for m in run if m in DENSE and big > DENSE_LIMIT]:
            run.remove(m)
            skipped[m] = (f"left out by default: it forms (H, n, n) float64 arrays, "
                          f"{big / 1e9:.1f} GB each here; name it in the methods to run it")
    params = params or {}
    accs: dict[tuple[str, int], _Acc] = {}
    for rec in records:
        n = int(rec.keys.shape[-2])
        mask = np.asarray(rec.mask, bool)
        for li, layer in enumerate(np.asarray(rec.layers).tolist()):
            if int(layer) not in wanted:
                continue
            q, k, v = rec.queries[li], rec.keys[li], rec.values[li]
            attn, n_valid, c = _reference(q, k, v, mask, float(rec.scale))
            for m in run:
                kw = dict(PRESETS[m](n, eps)) if m in PRESETS else {}
                if m in _NO_WEIGHTS:
                    kw["return_weights"] = False
                kw.update(params.get(m, {}))
                acc = accs.setdefault((m, int(layer)), _Acc())
                try:
                    _run_method(m, q, k, v, mask, float(rec.scale), kw, (attn, n_valid, c),
                                eps, acc)
                except MethodUnavailable as exc:
                    skipped[m] = str(exc)
                    del accs[(m, int(layer))]
                    continue
                if progress is not None:
                    progress(f"{m} layer {layer}")
    pooled = []
    for m in run:
        parts = [a for (mm, _), a in sorted(accs.items()) if mm == m]
        if parts:
            pooled.append(_row(m, -1, _merge(parts)))
    rows = [_row(m, layer, accs[(m, layer)]) for m in run
            for layer in sorted({lay for (mm, lay) in accs if mm == m})]
    samples = {key: {"tv": np.concatenate(a.tv), "rel": np.concatenate(a.rel)}
               for key, a in accs.items()}
    run_set = {r.method for r in rows}
    skipped = {m: why for m, why in skipped.items() if m not in run_set}
    return AuditReport(
        model=str(records[0].model), tokens=max(int(r.keys.shape[-2]) for r in records),
        eps=eps, rows=rows, pooled=pooled, skipped=skipped, samples=samples,
    )


def audit_model(
    model: str = "minilm-sample",
    *,
    tokens: int | None = None,
    methods: Sequence[str] | None = None,
    eps: float = 0.01,
    layers: Sequence[int] | None = None,
    text: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """:func:`audit` on a named model's attention (:func:`certattn.budget.load_attention`:
    ``"minilm-sample"``, ``"minilm"`` or ``"smollm2"``; ``tokens`` tokens of the built-in
    prose or of ``text``; ``layers`` restricts the recorded layers)."""
    from ..budget import load_attention

    records = load_attention(model, text, tokens=tokens,
                             layers=None if model == "minilm-sample" else layers)
    return audit(records, methods, eps=eps, layers=layers, progress=progress)


def run_cli(args: Any, load_records: Callable[..., Sequence[Any]] | None = None) -> int:
    """``certattn audit`` (the subcommand of :mod:`certattn.cli` delegates here).

    Prints the Markdown table (or JSON with ``--json``); ``--out DIR`` also writes
    ``audit.json`` and one figure per method.  Exit status 0, or 1 when a certificate is
    unsound (it must never be).  ``load_records(model, tokens=, layers=)``, when given,
    reads the model's attention instead of :func:`certattn.budget.load_attention`
    (``certattn.hf`` for a Hugging Face folder of another architecture).
    """
    import sys

    from .._validate import check_eps

    CLIError = InputError  # one line on stderr, exit status 2 (certattn.cli.main)
    try:
        eps = check_eps(float(args.eps))
    except ValueError:
        raise CLIError(f"--eps must be a number in [0, 1), got {args.eps!r}") from None
    methods = None
    if args.methods:
        # duplicates are dropped, first occurrence kept (one row per method)
        methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise CLIError(f"--methods takes names from {', '.join(METHODS)}, got "
                           f"{args.methods!r}")
    layers = None
    if args.layers:
        try:
            layers = list(dict.fromkeys(int(x) for x in args.layers.split(",") if x.strip()))
        except ValueError:
            layers = []
        if not layers:
            raise CLIError(f"--layers takes a comma list of integers, got {args.layers!r}")
    if args.tokens is not None and args.tokens < 2:
        raise CLIError(f"--tokens must be at least 2, got {args.tokens}")

    def note(msg: str) -> None:
        if sys.stderr.isatty():
            print(f"\raudit: {msg:<40}", end="", file=sys.stderr, flush=True)

    if load_records is None:
        report = audit_model(args.model, tokens=args.tokens, methods=methods, eps=eps,
                             layers=layers, progress=note)
    else:
        records = load_records(args.model, tokens=args.tokens, layers=layers)
        report = audit(records, methods, eps=eps, layers=layers, progress=note)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if not report.rows:
        raise CLIError("no method could run: " + "; ".join(report.skipped.values()))
    if args.out is not None:
        try:
            report.write(args.out)
        except OSError as exc:
            raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    text = report.to_json() if args.json else report.to_markdown(summary=args.summary)
    print(text, end="" if not args.json else "\n")
    return 1 if report.unsound else 0
