r"""certattn's attention function for transformers, and the observe / sparse modes.

How the output stays exact
--------------------------
The attention output is always computed by the model's *own* eager function
(``eager_attention_forward`` of the module that defines the attention layer), so in
:func:`observe` the model's outputs are bit-identical to ``attn_implementation="eager"``.
:func:`sparse` passes that same function an additive mask in which every visible key
outside the kept set is set to the dtype's minimum, exactly as eager masks a padded key;
keeping every visible key therefore gives eager's output bit for bit.

What is certified
-----------------
The logits of one call are computed on the side the way eager computes them:
``(query @ key^T) * scaling`` in the model's dtype (grouped key heads repeated), Gemma-2's
``softcap * tanh(. / softcap)`` when given, plus the additive mask, as eager adds it; a
key whose mask entry is at or below half the dtype's minimum (eager's padding, causal and
sliding-window fill) is masked (``-inf``, :func:`certattn.masks.normalize_mask`'s rule):
never kept nor counted, but its logit is finite and its exact mass positive, so every
recorded ``tail_upper`` adds a bound on it (Theorem MASK-HIDDEN,
:func:`certattn.masks.hidden_mass`: at least ``e^-700`` per filled key).  Certificates
(:func:`certattn.certify_topk`, :func:`certattn.certify_kept`) are sound for the exact
softmax of these logits, read exactly in float64 (THEORY section 7).  Query rows
with no visible key (left padding) are skipped: they are flagged ``masked`` and count
neither as kept nor as visible.

An additive ``position_bias`` (Inkling) is added after the scaling, as eager adds it.
Refused in one line (:class:`~certattn.errors.InputError`): attention sinks (gpt-oss
``sinks`` / ``s_aux``), ``position_bias`` with ``softcap``, an indexer's ``indices``
(DeepSeek sparse attention: the model folds them into the mask only under eager),
dropout in training mode, a model whose attention does not route through
``transformers.AttentionInterface``.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .._array import namespace
from .._fp import U
from .._validate import InputError, check_eps
from ..budget import BudgetTable
from ..kept import certify_kept
from ..masks import hidden_mass, hidden_tail
from ..policies import Context, TopK, TopP, as_policy
from ..topk import certify_topk

__all__ = ["LayerCall", "Recorder", "SparseStats", "observe", "register", "sparse"]

DEFAULT_NAME = "certattn"

_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "certattn_hf_session", default=None
)
_EAGER: dict[type, Callable[..., Any]] = {}


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


def register(name: str = DEFAULT_NAME) -> str:
    """Register certattn's attention and mask functions with transformers under ``name``.

    Idempotent.  Outside :func:`observe` and :func:`sparse` the function is plain eager
    attention, so ``attn_implementation=name`` is always safe to select.

    Parameters
    ----------
    name : str
        The implementation name (default ``"certattn"``).

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    ValueError
        ``name`` is taken by another attention or mask function.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"name must be a non-empty string, got {name!r}")
    taken_attn = AttentionInterface._global_mapping.get(name)
    taken_mask = AttentionMaskInterface._global_mapping.get(name)
    if name == "eager" or taken_attn not in (None, _attention) or taken_mask not in (
        None, eager_mask
    ):
        raise InputError(f"attention implementation {name!r} is already registered by another "
                         "library; choose another name")
    AttentionInterface.register(name, _attention)
    AttentionMaskInterface.register(name, eager_mask)  # additive, dtype-minimum fill
    return name


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCall:
    """Certificates of one attention call of one layer (prefill or one decode step).

    Attributes
    ----------
    layer : int
        Layer index (the module's ``layer_idx``, else the order of first call).
    call : int
        Index of this call among the layer's calls in the session.
    n_valid : int64 array (B, H, Lq)
        Visible keys per (batch, head, query).
    masked : bool array (B, H, Lq)
        Rows with no visible key (skipped: ``k`` and ``tail_upper`` are 0 there).
    k, tail_upper : dict eps -> array (B, H, Lq)
        Certified Top-k count and the sound bound on its dropped mass, per budget.
    logits : float64 array (B, H, Lq, Lk) or None
        The certified logits (``-inf`` = masked; exact float64 copies), with
        ``keep_logits=True``.
    """

    layer: int
    call: int
    n_valid: np.ndarray
    masked: np.ndarray
    k: dict[float, np.ndarray]
    tail_upper: dict[float, np.ndarray]
    logits: np.ndarray | None = None


@dataclass
class Recorder:
    """What :func:`observe` recorded: a :class:`LayerCall` per layer and call."""

    eps: tuple[float, ...]
    calls: list[LayerCall] = field(default_factory=list)

    def layers(self) -> list[int]:
        """Layer indices seen, sorted."""
        return sorted({c.layer for c in self.calls})

    def kept_fraction(self, eps: float | None = None, layer: int | None = None) -> float:
        """Certified kept keys over visible keys (rows with a visible key), pooled.

        Parameters
        ----------
        eps : float, optional
            One of the recorded budgets (default: the first).
        layer : int, optional
            One layer (default: all).
        """
        e = self._eps(eps)
        kept = visible = 0
        for c in self.calls:
            if layer is None or c.layer == layer:
                kept += int(c.k[e].sum())
                visible += int(c.n_valid[~c.masked].sum())
        return kept / visible if visible else float("nan")

    def tail_upper_max(self, eps: float | None = None) -> float:
        """Largest recorded ``tail_upper`` at ``eps`` (0.0 if nothing was recorded)."""
        e = self._eps(eps)
        return max((float(c.tail_upper[e].max(initial=0.0)) for c in self.calls), default=0.0)

    def summary(self) -> list[dict[str, Any]]:
        """One row per layer and budget: ``layer``, ``eps``, ``kept_fraction``, ``rows``."""
        rows = []
        for layer in self.layers():
            n_rows = sum(int((~c.masked).sum()) for c in self.calls if c.layer == layer)
            for e in self.eps:
                rows.append({"layer": layer, "eps": e, "rows": n_rows,
                             "kept_fraction": self.kept_fraction(e, layer)})
        return rows

    def budget(self, coverage: float = 0.9, eps: float | None = None, *,
               quantiles: Sequence[float] = (0.5, 0.9, 0.99, 1.0),
               model: str = "") -> BudgetTable:
        """Per-layer, per-head serving budgets from the recorded certificates.

        The same table as ``certattn budget`` prints (:func:`certattn.budget.attention_budget`
        on the same rows): quantiles of the certified k and k/n, and the fixed k covering
        ``coverage`` of the queries.  Pools every call (prefill and decode steps) and
        every batch row; rows with no visible key are left out.

        Parameters
        ----------
        coverage : float
            Fraction of queries the fixed k must cover, in (0, 1].
        eps : float, optional
            One of the recorded budgets (default: the first).
        quantiles : sequence of float
            Quantile levels.
        model : str
            Model name for the table.
        """
        from ..budget import _table  # the one table builder of `certattn budget`

        e = self._eps(eps)
        if not self.calls:
            raise InputError("nothing was recorded: run the model inside observe() first")
        if not 0.0 < coverage <= 1.0:
            raise InputError(f"coverage must be in (0, 1], got {coverage!r}")
        n_heads = int(self.calls[0].k[e].shape[1])
        samples: dict[tuple[int, int], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for c in self.calls:
            for h in range(n_heads):
                keep = ~c.masked[:, h]
                ks, nvs = samples.setdefault((c.layer, h), ([], []))
                ks.append(c.k[e][:, h][keep].ravel())
                nvs.append(c.n_valid[:, h][keep].ravel())
        n_tokens = [int(c.n_valid.shape[0] * c.n_valid.shape[2]) for c in self.calls
                    if c.layer == self.calls[0].layer]
        return _table(
            eps=e, coverage=float(coverage), quantiles=tuple(float(q) for q in quantiles),
            layers=tuple(self.layers()), n_heads=n_heads,
            samples={key: (np.concatenate(a), np.concatenate(b))
                     for key, (a, b) in samples.items()},
            model=model, source=f"certattn.hf.observe, {len(self.calls)} attention calls",
            meta={"n_sequences": int(self.calls[0].n_valid.shape[0]), "n_tokens": n_tokens},
        )

    def _eps(self, eps: float | None) -> float:
        if eps is None:
            return self.eps[0]
        if eps not in self.eps:
            raise InputError(f"eps {eps!r} was not recorded (recorded: {list(self.eps)})")
        return eps


@dataclass
class SparseStats:
    """What :func:`sparse` measured: kept and visible keys per layer, the largest tail.

    Counts pool every query row that has a visible key, over every call of the session.
    """

    kept: dict[int, int] = field(default_factory=dict)
    visible: dict[int, int] = field(default_factory=dict)
    tail_upper_max: float = 0.0

    @property
    def kept_fraction(self) -> float:
        """Kept keys over visible keys, pooled over the layers a policy ran on.

        Layers that a mapping leaves dense are not counted.
        """
        v = sum(self.visible.values())
        return sum(self.kept.values()) / v if v else float("nan")

    @property
    def layer_kept_fraction(self) -> dict[int, float]:
        """Kept over visible keys per layer."""
        return {layer: self.kept[layer] / v if v else float("nan")
                for layer, v in sorted(self.visible.items())}

    def _add(self, layer: int, kept: int, visible: int, tail: float) -> None:
        self.kept[layer] = self.kept.get(layer, 0) + kept
        self.visible[layer] = self.visible.get(layer, 0) + visible
        self.tail_upper_max = max(self.tail_upper_max, tail)


# --------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------


@dataclass
class _Session:
    modules: set[int]
    eps: tuple[float, ...] = ()
    recorder: Recorder | None = None
    keep_logits: bool = False
    policy: Callable[[int], Any] | None = None
    stats: SparseStats | None = None
    order: dict[int, int] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def layer_of(self, module: Any) -> int:
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool):
            return idx
        return self.order.setdefault(id(module), len(self.order))

    def next_call(self, layer: int) -> int:
        n = self.counts.get(layer, 0)
        self.counts[layer] = n + 1
        return n


@contextmanager
def _using(model: Any, name: str, session: _Session) -> Iterator[None]:
    register(name)
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise InputError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(previous)
        raise InputError(f"{type(model).__name__} does not route its attention through "
                         "transformers' AttentionInterface")
    token = _SESSION.set(session)
    try:
        yield
    finally:
        _SESSION.reset(token)
        model.set_attn_implementation(previous)


def _eps_tuple(eps: float | Sequence[float]) -> tuple[float, ...]:
    values = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not values:
        raise InputError("give at least one eps")
    return tuple(dict.fromkeys(check_eps(e) for e in values))


@contextmanager
def observe(model: Any, eps: float | Sequence[float] = 0.01, *, keep_logits: bool = False,
            name: str = DEFAULT_NAME) -> Iterator[Recorder]:
    """Run ``model`` with exact attention and record certified Top-k budgets.

    Inside the ``with`` block the model's attention implementation is certattn's
    (restored on exit); every attention call (prefill and each decode step of
    ``generate``) is computed by the model's own eager function, so outputs are
    bit-identical to ``eager``, and certified on the side (module docstring).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    eps : float or sequence of float
        TV budgets in [0, 1).
    keep_logits : bool
        Also keep each call's float64 logits (memory: 8 bytes per score).
    name : str
        The registered implementation name.

    Yields
    ------
    Recorder
        Filled while the block runs.
    """
    rec = Recorder(eps=_eps_tuple(eps))
    session = _Session(modules={id(m) for m in model.modules()}, eps=rec.eps, recorder=rec,
                       keep_logits=keep_logits)
    with _using(model, name, session):
        yield rec


@contextmanager
def sparse(model: Any, policy: Any, *, name: str = DEFAULT_NAME) -> Iterator[SparseStats]:
    """Run ``model`` with each query attending only to its policy's kept keys.

    The attention output is the softmax restricted to the kept set (dropped keys get the
    dtype's minimum in eager's additive mask).  ``sparse(model, TopK(0))`` keeps every
    visible key and equals eager bit for bit.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    policy : policy object or mapping layer -> policy
        Any :mod:`certattn.policies` object (``select(scores, valid, ctx)``), or a dict
        from layer index to policy (layers not in it run dense).
    name : str
        The registered implementation name.

    Yields
    ------
    SparseStats
        Filled while the block runs.
    """
    stats = SparseStats()
    session = _Session(modules={id(m) for m in model.modules()}, policy=_policy_map(policy),
                       stats=stats)
    with _using(model, name, session):
        yield stats


def _policy_map(policy: Any) -> Callable[[int], Any]:
    if isinstance(policy, Mapping):
        table = {int(k): as_policy(v, None) for k, v in policy.items()}
        return table.get
    one = as_policy(policy, None)
    return lambda layer: one


# --------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------


def _attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
               **kwargs: Any) -> tuple[Any, Any]:
    """The registered attention function: eager, plus certification or a kept mask."""
    eager = _eager_of(module)
    session = _SESSION.get()
    if session is None or id(module) not in session.modules:
        return eager(module, query, key, value, attention_mask, **kwargs)
    _refuse_unsupported(module, kwargs)
    layer = session.layer_of(module)
    if session.recorder is not None:
        logits, _, h = _logits(module, query, key, attention_mask, kwargs)
        _record(session, layer, logits, h)
        return eager(module, query, key, value, attention_mask, **kwargs)
    policy = session.policy(layer) if session.policy is not None else None
    if policy is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    logits, visible, h = _logits(module, query, key, attention_mask, kwargs)
    kept = _select(session.stats, layer, policy, logits, query, key, kwargs, h)
    mask = _drop_mask(attention_mask, visible, kept, query)
    return eager(module, query, key, value, mask, **kwargs)


def _eager_of(module: Any) -> Callable[..., Any]:
    cls = type(module)
    fn = _EAGER.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise InputError(f"{cls.__name__} has no eager_attention_forward in "
                             f"{cls.__module__}: certattn.hf cannot reproduce its attention")
        _EAGER[cls] = fn
    return fn


def _refuse_unsupported(module: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise InputError("attention sinks (gpt-oss s_aux) are not supported by certattn.hf yet")
    if kwargs.get("position_bias") is not None and kwargs.get("softcap") is not None:
        raise InputError("position_bias together with softcap is not supported by certattn.hf")
    if kwargs.get("indices") is not None or kwargs.get("block_indices") is not None:
        # the model masks its indexer's top-k keys itself only under eager or sdpa
        raise InputError("indexer-selected sparse attention (DeepSeek DSA indices) is not "
                         "supported by certattn.hf")
    if module.training and float(kwargs.get("dropout") or 0.0) > 0.0:
        raise InputError("attention dropout in training mode is not supported: call "
                         "model.eval() first")


def _logits(module: Any, query: Any, key: Any, attention_mask: Any,
            kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The certified logits (``-inf`` = masked) and the visible mask, both (B, H, Lq, Lk).

    Computed as eager computes them, in the model's dtype (then widened exactly to
    float32 when narrower, for NumPy).
    """
    with torch.no_grad():
        keys = _repeat_heads(key, query.shape[1])
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        s = torch.matmul(query, keys.transpose(2, 3)) * scaling
        softcap = kwargs.get("softcap")
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        bias = kwargs.get("position_bias")
        if bias is not None:  # additive, after the scaling, as eager adds it (Inkling)
            s = s + bias
        filled = full = None
        if attention_mask is None:
            visible = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        else:
            m = attention_mask[..., : s.shape[-1]]
            if m.dtype == torch.bool:
                visible = m.expand(s.shape)
            else:
                visible = (m > torch.finfo(m.dtype).min / 2).expand(s.shape)
                s = s + m
                filled = ~visible & (s > -torch.inf)  # a finite fill: positive exact mass
            full = s
            s = torch.where(visible, s, -torch.inf)
        if s.dtype not in (torch.float32, torch.float64):
            s = s.to(torch.float32)  # exact: every narrower float is a float32
        h = None if filled is None else _filled_mass(full, filled, s)
        return s, visible, h


def _filled_mass(full: Any, filled: Any, s: Any) -> Any:
    """Sound bound ``h`` (float64, (B, H, Lq)) on the mass of the keys a finite fill masks,
    relative to the visible keys' (:func:`certattn.masks.hidden_mass`): each of the ``c``
    filled keys of a row has a logit at most their largest, so ``h <= c e^{max - M}``;
    None when no key is filled.  Rows with no visible key get 0 (they are skipped)."""
    if not bool(filled.any()):
        return None
    top = torch.where(filled, full, -torch.inf).amax(-1, keepdim=True).to(torch.float64)
    mx = s.amax(-1, keepdim=True).to(torch.float64)
    xp, _ = namespace(top)
    one = top > -torch.inf
    # the given logits are exact: no rounding margin, no fill to add (it is in ``full``)
    h1 = hidden_mass(top, torch.zeros_like(top), one, mx, torch.zeros_like(mx[..., 0]), xp)
    count = filled.sum(-1).to(torch.float64)
    h = h1 * count * (1.0 + 2 * U)  # the product rounded up (both factors >= 0)
    return torch.where(mx[..., 0] > -torch.inf, h, torch.zeros_like(h))


def _repeat_heads(key: Any, n_heads: int) -> Any:
    """Key heads repeated for grouped-query attention (transformers' ``repeat_kv``)."""
    b, h_kv, n, d = key.shape
    if n_heads == h_kv:
        return key
    if n_heads % h_kv:
        raise InputError(f"{n_heads} query heads cannot share {h_kv} key heads evenly")
    return key[:, :, None].expand(b, h_kv, n_heads // h_kv, n, d).reshape(b, n_heads, n, d)


def _host(x: Any) -> Any:
    """NumPy for CPU tensors (the fast kernel), the tensor itself elsewhere."""
    return x.numpy() if x.device.type == "cpu" else x


def _numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _record(session: _Session, layer: int, logits: Any, h: Any) -> None:
    arr = _host(logits)
    ks, tails = {}, {}
    cert = None
    for e in session.eps:
        cert = certify_topk(arr, e, masked_rows="skip")
        ks[e] = _numpy(cert.k)
        tails[e] = _with_filled(_numpy(cert.tail_upper), h)
    assert cert is not None
    session.recorder.calls.append(LayerCall(
        layer=layer, call=session.next_call(layer), n_valid=_numpy(cert.n_valid),
        masked=_numpy(cert.masked), k=ks, tail_upper=tails,
        logits=_numpy(logits).astype(np.float64) if session.keep_logits else None,
    ))


def _with_filled(tail: np.ndarray, h: Any) -> np.ndarray:
    """``tail`` plus the filled keys' mass bound ``h`` (:func:`certattn.masks.hidden_tail`)."""
    if h is None:
        return tail
    return hidden_tail(np.asarray(tail, dtype=np.float64), _numpy(h), np)


def _select(stats: SparseStats, layer: int, policy: Any, logits: Any, query: Any, key: Any,
            kwargs: dict[str, Any], h: Any) -> Any:
    """The kept mask (torch bool, (B, H, Lq, Lk)) of ``policy``; adds to ``stats``."""
    visible = torch.isfinite(logits)
    empty = ~visible.any(dim=-1, keepdim=True)  # rows with no visible key: a dummy row
    scores = _host(torch.where(empty, 0.0, logits.to(torch.float64)))
    valid = _host(visible | empty)
    xp = np if isinstance(scores, np.ndarray) else _torch_namespace()
    scaling = kwargs.get("scaling")
    ctx = Context(
        queries=_host(query.detach().to(torch.float64)),
        keys=_host(_repeat_heads(key.detach(), query.shape[1]).to(torch.float64)),
        scale=query.shape[-1] ** -0.5 if scaling is None else float(scaling),
        start=int(logits.shape[-1] - logits.shape[-2]), xp=xp,
    )
    sel = policy.select(scores, valid, ctx)
    kept_all = sel.kept & valid
    if isinstance(policy, (TopK, TopP)) and sel.tail_upper is not None:
        tail = sel.tail_upper  # certified on these very logits
    else:  # any other policy: certify its kept set on the logits (TV-TAIL, any set)
        tail = certify_kept(scores, kept_all).tail_upper
    kept = torch.as_tensor(kept_all, device=logits.device) & visible
    rows = ~empty[..., 0]
    tail_t = torch.as_tensor(_with_filled(_numpy(tail), h), device=logits.device)
    stats._add(layer, int(kept.sum()), int(visible.sum()),
               float(tail_t[rows].max()) if bool(rows.any()) else 0.0)
    return kept


def _torch_namespace() -> Any:
    from array_api_compat import array_namespace

    return array_namespace(torch.empty(0))


def _drop_mask(attention_mask: Any, visible: Any, kept: Any, query: Any) -> Any:
    """Eager's additive mask with every visible but dropped key set to the dtype minimum."""
    drop = visible & ~kept
    if attention_mask is None:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(drop, torch.finfo(query.dtype).min, zero)
    m = attention_mask[..., : kept.shape[-1]]
    if m.dtype == torch.bool:
        return m & ~drop
    return torch.where(drop, torch.finfo(m.dtype).min, m)
