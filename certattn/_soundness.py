r"""The registry of certificate-producing entry points, for the soundness matrix.

Every public function that returns a certificate (a ``tail_upper``, ``kl_upper`` or
``error_bound``) is registered here with an *adapter*: a function that turns one generic
attention case (:class:`Case`: queries, keys, values, a mask form, causal alignment,
grouped-query heads, a scale) into a call and reads the result back as a :class:`Claim`.
The test suite's soundness matrix (``tests/test_soundness_matrix.py``) runs every
registered entry point, in every variant, on every mask form, dtype and extreme scale,
and checks each claim against exact arithmetic.

Variants are discovered, not listed: an entry point that takes a selection policy runs
with every policy class of :mod:`certattn.policies` (and any class registered with
:func:`register_policy`), built from :data:`POLICY_EXAMPLES`; one that takes a search
method runs with every key of :data:`certattn.search.METHODS`.  The matrix fails when a
policy class has no example here, or when a public function whose result carries a
``tail_upper`` or ``error_bound`` is not registered (see CONTRIBUTING.md).

Applications register their own entry points in their own package
(``certattn/approx/_soundness.py``); this module imports the core only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import policies as _policies
from .attention import certify_attention, certify_scores
from .distribution import topk_mask
from .kept import certify_kept
from .output import output_bounds
from .search import METHODS, certified_search
from .topk import certify_topk, certify_topp

__all__ = [
    "ENTRY_POINTS",
    "POLICY_EXAMPLES",
    "Case",
    "Claim",
    "EntryPoint",
    "policy_classes",
    "policy_variants",
    "register",
    "register_policy",
]

Array = Any


@dataclass(frozen=True)
class Case:
    """One generic attention case, in one dtype.

    Attributes
    ----------
    queries : array (H, Lq, d)
    keys, values : arrays (H_kv, Lk, d), (H_kv, Lk, dv)
        NumPy arrays of the case's dtype (float16, bfloat16, float32 or float64).
    mask : array or None
        Boolean (True = visible) or additive (the case's dtype), broadcastable to
        ``(H, Lq, Lk)``.
    causal : bool
        Query ``i`` sees keys ``j <= i + Lk - Lq``.
    kv_heads : int or None
        Key/value heads (grouped-query attention when ``H_kv < H``).
    scale : float
        The score scale.
    label : str
        ``mask form / dtype / scale kind``, for reports.
    """

    queries: Array
    keys: Array
    values: Array
    mask: Array | None
    causal: bool
    kv_heads: int | None
    scale: float
    label: str = ""

    def head_map(self) -> list[int]:
        """Key head of every query head."""
        h, hkv = int(self.queries.shape[0]), int(self.keys.shape[0])
        return [i // (h // hkv) for i in range(h)]

    def logits(self) -> np.ndarray:
        """Logits ``scale q.k + bias`` per query head in the case's dtype, ``-inf`` where
        not visible: what a logit-level entry point (``certify_topk``, ``output_bounds``)
        is given.

        Computed in float64 and cast; a finite logit that the cast sends to ``-inf`` is
        clamped to the dtype's minimum (a finite mask entry stays a finite logit).
        """
        q = self.queries.astype(np.float64)
        k = self.keys.astype(np.float64)[self.head_map()]
        s = (q @ np.swapaxes(k, -1, -2)) * self.scale
        visible = np.ones(s.shape, dtype=bool)
        if self.mask is not None:
            m = np.asarray(self.mask)
            if m.dtype == bool:
                visible = visible & m
            else:
                m64 = m.astype(np.float64)
                visible = visible & (m64 > -np.inf)
                s = s + np.where(m64 > -np.inf, m64, 0.0)
        if self.causal:
            lq, lk = s.shape[-2:]
            visible = visible & (np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq)
        dt = self.queries.dtype
        with np.errstate(over="ignore"):
            x = s.astype(dt)
        x = np.where(np.isneginf(x) & visible, np.asarray(np.finfo(dt).min, dtype=dt), x)
        return np.where(visible, x, np.asarray(-np.inf, dtype=dt))

    def head_values(self) -> np.ndarray:
        """Values per query head ``(H, Lk, dv)`` (grouped-query heads expanded)."""
        return self.values[self.head_map()]


@dataclass(frozen=True)
class Claim:
    """What an entry point claims about one case, per query head and query.

    Attributes
    ----------
    tail_upper, kl_upper, error_bound : arrays (H, Lq) or None
        The certificate's bounds (None where the entry point gives none).
    kept : bool array (H, Lq, Lk) or None
        The kept set the tail bound is about.
    output : array (H, Lq, dv) or None
        The returned output (``error_bound`` bounds its distance to exact attention); None:
        ``error_bound`` bounds the exact truncated attention over ``kept``.
    logits : array (H, Lq, Lk) or None
        The logits the claim is about, when the entry point was given logits rather than
        queries and keys (``-inf`` = masked); None: the exact ``scale q.k + bias``.
    """

    tail_upper: Array | None = None
    kl_upper: Array | None = None
    error_bound: Array | None = None
    kept: Array | None = None
    output: Array | None = None
    logits: Array | None = None


@dataclass(frozen=True)
class EntryPoint:
    """A registered certificate-producing function.

    Attributes
    ----------
    name : str
        Qualified public name (``"certattn.certify_attention"``).
    function : callable
        The public function.
    adapter : callable
        ``adapter(case, variant) -> Claim``.
    variants : callable
        ``variants() -> list of (label, variant)``: every configuration to check (every
        policy, every method, ...), computed when asked (discovered, never hand-listed).
    """

    name: str
    function: Callable[..., Any]
    adapter: Callable[[Case, Any], Claim]
    variants: Callable[[], list[tuple[str, Any]]] = field(
        default=lambda: [("default", None)]
    )


ENTRY_POINTS: dict[str, EntryPoint] = {}
"""Every registered entry point by name: the core's (here) and, once
``certattn.approx._soundness`` is imported, the approximations'."""


def register(
    function: Callable[..., Any], *, name: str | None = None,
    variants: Callable[[], list[tuple[str, Any]]] | None = None,
) -> Callable[[Callable[[Case, Any], Claim]], Callable[[Case, Any], Claim]]:
    """Decorator: register ``adapter`` as the soundness-matrix adapter of ``function``."""
    qual = name or f"{function.__module__.split('.')[0]}.{function.__name__}"

    def deco(adapter: Callable[[Case, Any], Claim]) -> Callable[[Case, Any], Claim]:
        kw = {} if variants is None else {"variants": variants}
        ENTRY_POINTS[qual] = EntryPoint(qual, function, adapter, **kw)
        return adapter

    return deco


# --------------------------------------------------------------------------
# Policies: every class, from an example table
# --------------------------------------------------------------------------

POLICY_EXAMPLES: dict[type, Callable[[], list[Any]]] = {
    _policies.TopK: lambda: [_policies.TopK(0.05)],
    _policies.TopP: lambda: [_policies.TopP(0.9)],
    _policies.FixedK: lambda: [_policies.FixedK(3)],
    _policies.WindowSinks: lambda: [_policies.WindowSinks(3, 1)],
    _policies.Pages: lambda: [_policies.Pages(4, page_size=3)],
    _policies.CertifiedBlocks: lambda: [
        _policies.CertifiedBlocks(0.1, block_size=4, kind=kind) for kind in ("box", "ball", "both")
    ],
    _policies.Search: lambda: [_policies.Search(0.05, method=m) for m in sorted(METHODS)],
}
"""Example instances of every policy class (a class without an entry fails the matrix)."""

_EXTRA_POLICY_MODULES: list[Any] = [_policies]


def register_policy(cls: type, examples: Callable[[], list[Any]], module: Any = None) -> None:
    """Add a policy class defined outside :mod:`certattn.policies` (and its module, so that
    its siblings are discovered too)."""
    POLICY_EXAMPLES[cls] = examples
    if module is not None and module not in _EXTRA_POLICY_MODULES:
        _EXTRA_POLICY_MODULES.append(module)


def policy_classes() -> list[type]:
    """Every public policy class: a class in a policy module's ``__all__`` with ``select``
    (protocols excluded)."""
    out = []
    for mod in _EXTRA_POLICY_MODULES:
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if (inspect.isclass(obj) and callable(getattr(obj, "select", None))
                    and not getattr(obj, "_is_protocol", False) and obj not in out):
                out.append(obj)
    return out


def _policy_label(p: Any) -> str:
    fields = getattr(p, "__dataclass_fields__", {})
    args = ",".join(f"{f}={getattr(p, f)!r}" for f in fields if f != "name")
    return f"{type(p).__name__}({args})"


def policy_variants() -> list[tuple[str, Any]]:
    """``(label, policy)`` for every example of every policy class.

    Raises
    ------
    KeyError
        A policy class without an example in :data:`POLICY_EXAMPLES`.
    """
    out = []
    for cls in policy_classes():
        if cls not in POLICY_EXAMPLES:
            raise KeyError(f"policy class {cls.__name__} has no example in POLICY_EXAMPLES")
        out.extend((_policy_label(p), p) for p in POLICY_EXAMPLES[cls]())
    return out


def _method_variants() -> list[tuple[str, Any]]:
    return [(m, m) for m in sorted(METHODS)]


def _kept_example(logits: np.ndarray) -> np.ndarray:
    """A fixed kept set: every third key and each row's largest logit."""
    n = logits.shape[-1]
    every_third = (np.arange(n) % 3 == 0) & (logits > -np.inf)
    return every_third | np.asarray(topk_mask(logits.astype(np.float64), 1))


def _attention_kwargs(case: Case) -> dict[str, Any]:
    return {"mask": case.mask, "causal": case.causal, "kv_heads": case.kv_heads,
            "scale": case.scale}


# --------------------------------------------------------------------------
# The core entry points
# --------------------------------------------------------------------------


@register(certify_topk, variants=lambda: [("eps=0.05", (0.05, False)), ("eps=0", (0.0, False)),
                                          ("eps=0.05 cut", (0.05, True))])
def _topk(case: Case, variant: tuple[float, bool]) -> Claim:
    """The Top-k set (``kept_mask``), or with ``cut`` every key at or above the cut logit
    (ties at the cut kept: the set ``certattn.hf`` keeps)."""
    eps, by_cut = variant
    x = case.logits()
    c = certify_topk(x, eps)
    kept = (x >= c.cut[..., None]) if by_cut else c.kept_mask()
    return Claim(tail_upper=c.tail_upper, kl_upper=c.kl_upper, kept=kept, logits=x)


@register(certify_topp, variants=lambda: [("p=0.9", 0.9)])
def _topp(case: Case, p: float) -> Claim:
    x = case.logits()
    c = certify_topp(x, p)
    return Claim(tail_upper=c.tail_upper, kl_upper=c.kl_upper, kept=c.kept_mask(), logits=x)


@register(certify_kept)
def _kept(case: Case, _: Any) -> Claim:
    x = case.logits()
    c = certify_kept(x, _kept_example(x))
    return Claim(tail_upper=c.tail_upper, kl_upper=c.kl_upper, kept=c.kept_mask(), logits=x)


@register(output_bounds)
def _output_bounds(case: Case, _: Any) -> Claim:
    x = case.logits()
    kept = _kept_example(x)
    ob = output_bounds(x, case.head_values(), kept)
    return Claim(tail_upper=ob.tail_upper, error_bound=ob.best, kept=kept, logits=x)


@register(certify_scores, variants=policy_variants)
def _scores(case: Case, policy: Any) -> Claim:
    c = certify_scores(case.queries, case.keys, policy=policy, return_kept=True,
                       **_attention_kwargs(case))
    return Claim(tail_upper=c.tail_upper, kl_upper=c.kl_upper, kept=c.kept)


@register(certify_attention, variants=policy_variants)
def _attention(case: Case, policy: Any) -> Claim:
    c = certify_attention(case.queries, case.keys, case.values, policy=policy,
                          **_attention_kwargs(case))
    return Claim(tail_upper=c.tail_upper, kl_upper=c.kl_upper, error_bound=c.error_bound,
                 kept=c.kept, output=c.output)


@register(certified_search, variants=_method_variants)
def _search(case: Case, method: str) -> Claim:
    r = certified_search(case.queries, case.keys, case.values, 0.05, method=method,
                         **_attention_kwargs(case))
    return Claim(tail_upper=r.tail_upper, error_bound=r.error_bound, kept=r.kept,
                 output=r.output)

