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
``softcap * tanh(. / softcap)`` when given, T5's ``position_bias`` (added before the mask,
as eager adds it), plus the additive mask, as eager adds it; a
key whose mask entry is at or below half the dtype's minimum (eager's padding, causal and
sliding-window fill) is masked (``-inf``, :func:`certattn.masks.normalize_mask`'s rule):
never kept nor counted, but its logit is finite and its exact mass positive, so every
recorded ``tail_upper`` adds a bound on it (Theorem MASK-HIDDEN,
:func:`certattn.masks.hidden_mass`: at least ``e^-700`` per filled key).  Certificates
(:func:`certattn.certify_topk`, :func:`certattn.certify_kept`) are sound for the exact
softmax of these logits, read exactly in float64 (THEORY section 7).  Query rows
with no visible key (left padding) are skipped: they are flagged ``masked`` and count
neither as kept nor as visible.

Attention sinks (gpt-oss ``s_aux``: one logit per head that joins the softmax
denominator and has no value) are a last logit column that is never masked nor dropped:
every tail is relative to the full distribution, the sink included (so a large sink lets
fewer keys certify a budget), and ``k`` counts keys only (0 when the sink alone carries
``1 - eps``).  A module with ``sinks`` that does not pass them as ``s_aux`` is refused.

How the work is done
--------------------
Query rows are taken in chunks of at most :data:`CHUNK_ELEMS` scores, so the side
computations stay bounded at long contexts (eager itself still forms its full weights).
Top-k and top-p keep every key whose logit is at least the certificate's cut logit
(:attr:`certattn.TopkCertificate.cut`): one comparison on the model's device, no ranking;
keys tied at the cut are all kept (the counts are the true ones; the tail bound holds for
that larger set).  CPU tensors are certified by the NumPy kernel on a view of the logits;
float64 copies of the queries and keys are made only for policies that look at them
(not Top-k, top-p, fixed k or window + sinks).

An additive ``position_bias`` (T5, Inkling) is added after the scaling, as eager adds it.
Refused in one line (:class:`~certattn.errors.InputError`): dropout in training mode,
sinks not passed as ``s_aux``, ``position_bias`` with ``softcap``, an indexer's
``indices`` (DeepSeek sparse attention: the model folds them into the mask only under
eager), a model whose attention does not route through
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
from ..policies import Context, FixedK, TopK, TopP, WindowSinks, as_policy
from ..topk import certify_topk, topp_budget

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
        Layer index (the module's ``layer_idx``, else the order of first call).  In
        encoder-decoder models (T5, BART) the encoder's layer ``i``, and the decoder's
        self- and cross-attention of layer ``i``, all have index ``i``.
    call : int
        Index of this call among the layer's calls in the session.
    n_valid : int64 array (B, H, Lq)
        Visible keys per (batch, head, query).
    masked : bool array (B, H, Lq)
        Rows with no visible key (skipped: ``k`` and ``tail_upper`` are 0 there).
    k, tail_upper : dict eps -> array (B, H, Lq)
        Certified Top-k count and the sound bound on its dropped mass (relative to the
        full distribution: visible keys, finite-fill keys and a sink), per budget.  With
        a sink, ``k`` counts the keys at or above the certificate's cut (the sink is
        always kept; ``k = 0`` when it alone carries ``1 - eps``).
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

    Counts pool every query row that has a visible key, over every call of the session,
    and count only the heads a policy ran on (heads a mapping leaves dense are not
    counted).  ``kept`` is the number of keys actually kept (Top-k keeps every key tied at
    its cut logit, so it may exceed the certified ``k``); ``tail_upper_max`` bounds the
    dropped mass of that very set.

    Attributes
    ----------
    kept, visible : dict layer -> int
    tail_upper_max : float
        Largest certified tail (dropped mass relative to the full distribution, the
        sink included) over every row of every sparse head.
    output_bound_max : dict layer -> float
        With ``sparse(..., output_bound=True)``: per layer, the largest certified bound on
        the Euclidean error of a head's attention output (eager's output with every
        visible key minus the one on the kept set, in exact arithmetic), OUT-BEST of
        :func:`certattn.output.sound_output_bounds`.  Empty otherwise.
    """

    kept: dict[int, int] = field(default_factory=dict)
    visible: dict[int, int] = field(default_factory=dict)
    tail_upper_max: float = 0.0
    output_bound_max: dict[int, float] = field(default_factory=dict)
    scored: dict[int, int] = field(default_factory=dict)

    @property
    def scored_fraction(self) -> float:
        """Keys scored exactly over visible keys, pooled like :attr:`kept_fraction`: every
        visible key for policies that compute every score (all but certified search)."""
        v = sum(self.visible.values())
        return sum(self.scored.values()) / v if v else float("nan")

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

    def _add(self, layer: int, kept: int, visible: int, tail: float,
             bound: float | None = None, scored: int | None = None) -> None:
        self.kept[layer] = self.kept.get(layer, 0) + kept
        self.visible[layer] = self.visible.get(layer, 0) + visible
        self.scored[layer] = self.scored.get(layer, 0) + (visible if scored is None else scored)
        self.tail_upper_max = max(self.tail_upper_max, tail)
        if bound is not None:
            self.output_bound_max[layer] = max(self.output_bound_max.get(layer, 0.0), bound)


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
    output_bound: bool = False
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
def _switched(model: Any, name: str) -> Iterator[None]:
    """``model`` on the registered attention implementation ``name``, the previous one
    restored on exit; a model that does not route through the registry is refused."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise InputError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(previous)
        raise InputError(f"{type(model).__name__} does not route its attention through "
                         "transformers' AttentionInterface")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def _using(model: Any, name: str, session: _Session) -> Iterator[None]:
    register(name)
    with _switched(model, name):
        token = _SESSION.set(session)
        try:
            yield
        finally:
            _SESSION.reset(token)


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
def sparse(model: Any, policy: Any, *, output_bound: bool = False,
           name: str = DEFAULT_NAME) -> Iterator[SparseStats]:
    """Run ``model`` with each query attending only to its policy's kept keys.

    The attention output is the softmax restricted to the kept set (dropped keys get the
    dtype's minimum in eager's additive mask; a gpt-oss sink is never dropped).
    ``sparse(model, TopK(0))`` keeps every visible key and equals eager bit for bit.
    Top-k and top-p keep every key whose logit is at least the certificate's cut
    (:attr:`certattn.TopkCertificate.cut`): one comparison per key on the model's device;
    fixed k likewise keeps every key tied with the k-th largest.  Every other policy gets
    its ``select`` called on float64 scores and its kept set certified with
    :func:`certattn.certify_kept`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    policy : policy object or mapping
        Any :mod:`certattn.policies` object (``select(scores, valid, ctx)``), or a mapping
        whose keys are a layer index (every head of that layer) or a ``(layer, head)``
        pair (that head; it overrides the layer's entry).  Layers and heads not in the
        mapping run dense (and are not counted in the stats).  A layer index is the
        attention module's ``layer_idx``: in encoder-decoder models one index names the
        encoder's layer and the decoder's self- and cross-attention of that layer.
    output_bound : bool
        Also certify each layer's attention-output error
        (``stats.output_bound_max``; float64 copies of the logits and the values).
    name : str
        The registered implementation name.

    Yields
    ------
    SparseStats
        Filled while the block runs.
    """
    stats = SparseStats()
    session = _Session(modules={id(m) for m in model.modules()}, policy=_policy_map(policy),
                       stats=stats, output_bound=bool(output_bound))
    with _using(model, name, session):
        yield stats


def _is_index(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _policy_map(policy: Any) -> Callable[[int], Any]:
    """``layer -> (policy for every head or None, {head: policy})``, or None (dense)."""
    if not isinstance(policy, Mapping):
        one = as_policy(policy, None)
        return lambda layer: (one, {})
    layers: dict[int, Any] = {}
    heads: dict[int, dict[int, Any]] = {}
    for key, value in policy.items():
        if _is_index(key):
            layers[int(key)] = as_policy(value, None)
        elif isinstance(key, tuple) and len(key) == 2 and all(_is_index(i) for i in key):
            heads.setdefault(int(key[0]), {})[int(key[1])] = as_policy(value, None)
        else:
            raise InputError(f"policy map keys must be a layer index or a (layer, head) "
                             f"pair, got {key!r}")

    def lookup(layer: int) -> Any:
        if layer not in layers and layer not in heads:
            return None
        return layers.get(layer), heads.get(layer, {})

    return lookup


# --------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------

CHUNK_ELEMS = 1 << 24
"""Scores per query chunk, ``B * H * rows * Lk`` (64 MiB of float32 logits): a call with
more is certified chunk by chunk, so the side computations stay bounded."""


def _attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
               **kwargs: Any) -> tuple[Any, Any]:
    """The registered attention function: eager, plus certification or a kept mask."""
    eager = _eager_of(module)
    session = _SESSION.get()
    if session is None or id(module) not in session.modules:
        return eager(module, query, key, value, attention_mask, **kwargs)
    _refuse_unsupported(module, kwargs)
    layer = session.layer_of(module)
    call = _Call(module, query, key, value, attention_mask, kwargs)
    with torch.no_grad():
        if session.recorder is not None:
            _record(session, layer, call)
            return eager(module, query, key, value, attention_mask, **kwargs)
        heads = _head_policies(session.policy(layer), layer, query.shape[1])
        if heads is None:
            return eager(module, query, key, value, attention_mask, **kwargs)
        mask = _sparse_mask(session, layer, call, heads)
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
    if kwargs.get("s_aux") is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise InputError(f"{type(module).__name__} has attention sinks but does not pass them "
                         "as s_aux: certattn.hf cannot tell how its eager function uses them")
    if kwargs.get("position_bias") is not None and kwargs.get("softcap") is not None:
        raise InputError("position_bias together with softcap is not supported by certattn.hf")
    if kwargs.get("indices") is not None or kwargs.get("block_indices") is not None:
        # the model masks its indexer's top-k keys itself only under eager or sdpa
        raise InputError("indexer-selected sparse attention (DeepSeek DSA indices) is not "
                         "supported by certattn.hf")
    if module.training and float(kwargs.get("dropout") or 0.0) > 0.0:
        raise InputError("attention dropout in training mode is not supported: call "
                         "model.eval() first")


@dataclass
class _Call:
    """One attention call's inputs, as the registered function received them."""

    module: Any
    query: Any
    key: Any
    value: Any
    mask: Any
    kwargs: dict[str, Any]

    @property
    def sink(self) -> Any:
        """The per-head sink logits (gpt-oss ``s_aux``, shape (H,)), or None."""
        return self.kwargs.get("s_aux")

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Query row ranges ``[q0, q1)`` of at most :data:`CHUNK_ELEMS` scores each."""
        b, h, lq, _ = self.query.shape
        step = max(1, CHUNK_ELEMS // max(1, b * h * self.key.shape[-2]))
        for q0 in range(0, lq, step):
            yield q0, min(lq, q0 + step)


@dataclass
class _Logits:
    """The certified logits of one query chunk, (B, H, rows, Lk [+ 1 sink column]).

    ``s``: float32 or float64, ``-inf`` = masked (the sink column is never masked, except
    on rows with no visible key); ``visible``: the visible keys (bool, broadcastable to
    ``s`` without the sink column); ``rows``: rows with a visible key (B, H or 1, rows);
    ``h``: the bound on the finite-fill keys' mass relative to the visible keys', or
    None (:func:`_filled_mass`); ``n``: the number of keys (without the sink).
    """

    s: Any
    visible: Any
    rows: Any
    h: Any
    n: int

    @property
    def has_sink(self) -> bool:
        return int(self.s.shape[-1]) > self.n


def _rows_of(x: Any, q0: int, q1: int) -> Any:
    """Query rows ``q0:q1`` of a mask or bias (B or 1, H or 1, Lq or 1, Lk)."""
    if x is None or x.dim() < 2 or x.shape[-2] == 1:
        return x
    return x[..., q0:q1, :]


def _logits(call: _Call, q0: int, q1: int) -> _Logits:
    """The certified logits of query rows ``q0:q1``, computed as eager computes them:
    ``(query @ key^T) * scaling`` in the model's dtype (grouped key heads repeated),
    Gemma-2's softcap, ``position_bias`` (T5: added before the mask, as eager does), plus
    the additive mask; then widened exactly to float32 when narrower, for NumPy.  With
    gpt-oss sinks (``s_aux``) the sink logits are a last column."""
    query = call.query[:, :, q0:q1]
    keys = _repeat_heads(call.key, query.shape[1])
    scaling = call.kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = torch.matmul(query, keys.transpose(2, 3)) * scaling
    n = int(s.shape[-1])
    softcap = call.kwargs.get("softcap")
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    bias = call.kwargs.get("position_bias")
    if bias is not None:
        s = s + _rows_of(bias, q0, q1)[..., :n]
    h = None
    if call.mask is None:
        visible = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=s.device)
    else:
        m = _rows_of(call.mask, q0, q1)[..., :n]
        if m.dtype == torch.bool:
            visible = m
            s = torch.where(visible, s, -torch.inf)
        else:
            visible = m > torch.finfo(m.dtype).min / 2
            hidden = ~visible  # (B, 1, rows, Lk) mostly: cheap
            raw_max = s.amax(-1) if bool(hidden.any()) else None
            s = (s + m).masked_fill_(hidden, -torch.inf)
            if raw_max is not None:
                h = _filled_mass(raw_max, m, hidden, s)
    rows = visible.any(dim=-1)
    if call.sink is not None:
        sink = call.sink.detach().reshape(1, -1, 1, 1)
        wide = torch.promote_types(s.dtype, sink.dtype)  # both exact in the wider type
        s, sink = s.to(wide), sink.to(wide).expand(*s.shape[:-1], 1)
        sink = torch.where(rows[..., None], sink, -torch.inf)  # no visible key: skipped
        s = torch.cat([s, sink], dim=-1)
    if s.dtype not in (torch.float32, torch.float64):
        s = s.to(torch.float32)  # exact: every narrower float is a float32
    return _Logits(s=s, visible=visible, rows=rows, h=h, n=n)


def _filled_mass(raw_max: Any, m: Any, hidden: Any, s: Any) -> Any:
    """Sound bound ``h`` (float64, (B, H, rows)) on the mass of the keys a finite fill
    masks, relative to the visible keys' (:func:`certattn.masks.hidden_mass`).

    A hidden key's logit is ``fl(s_j + m_j)`` with ``s_j`` at most the row's largest
    unmasked logit ``raw_max`` and ``m_j`` at most the largest fill of the row, so (the
    rounding of a sum is monotone) it is at most ``top = fl(raw_max + max m)``; with
    ``c`` hidden keys, ``h <= c e^{top - M}`` (``M`` the largest visible logit of ``s``).
    ``c`` counts every hidden key, also one whose sum overflowed to ``-inf`` (mass 0): an
    over-count.  Three passes over the row's scores at most (the two maxima and ``s``),
    the rest per row.  Rows with no visible key get 0 (they are skipped)."""
    fill_max = torch.where(hidden, m, -torch.inf).amax(-1)  # (B, 1 or H, rows)
    top = (raw_max + fill_max).to(torch.float64)[..., None]  # rounded as eager rounds
    mx = s.amax(-1, keepdim=True).to(torch.float64)
    top, mx = torch.broadcast_tensors(top, mx)
    xp, _ = namespace(top)
    one = top > -torch.inf
    # the given logits are exact: no rounding margin, no fill to add (it is in ``top``)
    h1 = hidden_mass(top, torch.zeros_like(top), one, mx, torch.zeros_like(mx[..., 0]), xp)
    count = hidden.sum(-1).to(torch.float64)
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


def _with_filled(tail: Any, h: Any) -> Any:
    """``tail`` plus the filled keys' mass bound ``h`` (:func:`certattn.masks.hidden_tail`),
    as a float64 tensor."""
    tail = torch.as_tensor(tail, dtype=torch.float64)
    if h is None:
        return tail
    xp, _ = namespace(tail)
    return hidden_tail(tail, h.to(tail.device), xp)


def _kept_at_cut(lg: _Logits, cert: Any) -> Any:
    """Keys at or above the certificate's cut logit (bool, (B, H, rows, Lk)): the Top-k set
    plus every key tied at its cut, one comparison on the logits' device; the sink column
    (never dropped) is left out."""
    cut = torch.as_tensor(cert.cut, device=lg.s.device).to(lg.s.dtype)  # exact: a logit
    return lg.s[..., : lg.n] >= cut[..., None]


def _record(session: _Session, layer: int, call: _Call) -> None:
    """Certify every query chunk at every eps and append one :class:`LayerCall`."""
    parts: list[dict[str, Any]] = []
    for q0, q1 in call.chunks():
        lg = _logits(call, q0, q1)
        part: dict[str, Any] = {"k": {}, "tail": {}}
        for e in session.eps:
            cert = certify_topk(_host(lg.s), e, masked_rows="skip")
            k = cert.k
            if lg.has_sink:  # keys kept beside the sink: those at or above the cut
                k = _kept_at_cut(lg, cert).sum(-1)
            part["k"][e] = _numpy(k)
            part["tail"][e] = _numpy(_with_filled(_numpy(cert.tail_upper), lg.h))
        part["masked"] = _numpy(cert.masked)
        part["n_valid"] = _numpy(cert.n_valid) - (~part["masked"] if lg.has_sink else 0)
        if session.keep_logits:
            part["logits"] = _numpy(lg.s[..., : lg.n]).astype(np.float64)
        parts.append(part)

    def cat(get: Callable[[dict[str, Any]], np.ndarray]) -> np.ndarray:
        return np.concatenate([get(p) for p in parts], axis=2) if len(parts) > 1 \
            else get(parts[0])

    session.recorder.calls.append(LayerCall(
        layer=layer, call=session.next_call(layer), n_valid=cat(lambda p: p["n_valid"]),
        masked=cat(lambda p: p["masked"]),
        k={e: cat(lambda p, e=e: p["k"][e]) for e in session.eps},
        tail_upper={e: cat(lambda p, e=e: p["tail"][e]) for e in session.eps},
        logits=cat(lambda p: p["logits"]) if session.keep_logits else None,
    ))


def _head_policies(plan: Any, layer: int, n_heads: int) -> list[Any] | None:
    """The policy of each head of ``layer`` (None = dense), or None if all are dense."""
    if plan is None:
        return None
    base, per_head = plan
    bad = [h for h in per_head if not 0 <= h < n_heads]
    if bad:
        raise InputError(f"policy map names head {bad[0]} of layer {layer}, which has "
                         f"{n_heads} heads")
    heads = [per_head.get(h, base) for h in range(n_heads)]
    return None if all(p is None for p in heads) else heads


def _groups(heads: list[Any]) -> list[tuple[Any, Any]]:
    """``(policy, head index)`` per distinct policy; the index is None for all heads."""
    out: dict[int, tuple[Any, list[int]]] = {}
    for h, p in enumerate(heads):
        if p is not None:
            out.setdefault(id(p), (p, []))[1].append(h)
    if len(out) == 1 and len(heads) == len(next(iter(out.values()))[1]):
        return [(next(iter(out.values()))[0], None)]
    return [(p, torch.tensor(hs)) for p, hs in out.values()]


def _sparse_mask(session: _Session, layer: int, call: _Call, heads: list[Any]) -> Any:
    """Eager's additive (or boolean) mask with every visible but dropped key masked, and
    the call's counts, tails (and output bounds) added to the session's stats."""
    query = call.query
    b, n_heads, lq, _ = query.shape
    n = call.key.shape[-2]
    base = call.mask[..., :n] if call.mask is not None else None
    dtype = torch.bool if base is not None and base.dtype == torch.bool else query.dtype
    out = torch.empty((b, n_heads, lq, n), dtype=dtype, device=query.device)
    fill = False if dtype == torch.bool else torch.finfo(dtype).min
    groups = _groups(heads)
    kept_total = visible_total = scored_total = 0
    tail_max, bound_max = 0.0, 0.0
    for q0, q1 in call.chunks():
        lg = _logits(call, q0, q1)
        vis = lg.visible.expand(b, n_heads, q1 - q0, n)
        keep = vis.clone() if len(groups) > 1 or groups[0][1] is not None else None
        for policy, idx in groups:
            part = lg if idx is None else _head_slice(lg, idx)
            kept, tail, scored = _select(policy, part, call, q0, idx)
            # a broadcast repeats every entry equally: count before expanding
            n_vis = int(part.visible.sum()) * (kept.numel() // part.visible.numel())
            visible_total += n_vis
            scored_total += n_vis if scored is None else scored
            kept_total += int(kept.sum())
            if session.output_bound:
                bound_max = max(bound_max, _output_bound(call, part, kept, tail, idx))
            tail = _with_filled(tail, part.h)
            rows = part.rows.expand(tail.shape)
            if bool(rows.any()):
                tail_max = max(tail_max, float(tail[rows].max()))
            if keep is None:
                keep = kept
            else:
                keep[:, idx] = kept
        if base is None:
            chunk = torch.zeros((), dtype=dtype, device=query.device).expand(keep.shape)
        else:
            chunk = _rows_of(base, q0, q1).expand(keep.shape)
        out[:, :, q0:q1].copy_(chunk).masked_fill_(vis & ~keep, fill)
    session.stats._add(layer, kept_total, visible_total, tail_max,
                       bound_max if session.output_bound else None, scored_total)
    return out


def _head_slice(lg: _Logits, idx: Any) -> _Logits:
    """The logits of the heads ``idx`` only."""
    def pick(x: Any) -> Any:
        return x if x is None or x.shape[1] == 1 else x[:, idx.to(x.device)]
    return _Logits(s=pick(lg.s), visible=pick(lg.visible), rows=pick(lg.rows), h=pick(lg.h),
                   n=lg.n)


_NO_GEOMETRY = (TopK, TopP, FixedK, WindowSinks)


def _select(policy: Any, lg: _Logits, call: _Call, q0: int,
            idx: Any) -> tuple[Any, Any, int | None]:
    """The kept keys of ``policy`` (bool tensor, (B, h, rows, Lk)), a sound bound on
    their tail (float64, (B, h, rows)), relative to the visible keys and the sink, and the
    number of keys it scored exactly on visible rows (None: every visible key)."""
    if isinstance(policy, (TopK, TopP)):  # the certificate's cut: one comparison
        eps = policy.eps if isinstance(policy, TopK) else topp_budget(policy.p)
        cert = certify_topk(_host(lg.s), eps, masked_rows="skip")
        return (_kept_at_cut(lg, cert), torch.as_tensor(cert.tail_upper, dtype=torch.float64),
                None)
    scored = None
    s = lg.s[..., : lg.n]
    vis = lg.visible.expand(s.shape)
    empty = ~lg.rows.expand(s.shape[:-1])[..., None]  # no visible key: a dummy row
    if isinstance(policy, FixedK):  # the k largest, all ties at the k-th kept
        top = torch.topk(s, min(policy.k, lg.n), dim=-1).values[..., -1:]
        kept = (s >= top) & vis
    else:
        scores = _host(torch.where(empty, 0.0, s.to(torch.float64)))
        valid = _host(vis | empty)
        xp = namespace(scores)[0]  # array-API NumPy or torch (policies use array-API calls)
        ctx = Context(queries=None, keys=None, scale=_scale(call), xp=xp,
                      start=int(lg.n - call.query.shape[-2] + q0))
        if not isinstance(policy, _NO_GEOMETRY):  # a policy may look at the geometry
            q = call.query[:, :, q0:q0 + s.shape[-2]]
            k = _repeat_heads(call.key, call.query.shape[1])
            if idx is not None:
                q, k = q[:, idx.to(q.device)], k[:, idx.to(k.device)]
            ctx.queries = _host(q.detach().to(torch.float64))
            ctx.keys = _host(k.detach().to(torch.float64))
        sel = policy.select(scores, valid, ctx)
        kept = torch.as_tensor(sel.kept, device=s.device) & vis
        if sel.scored is not None:  # a dummy (no visible key) row scored nothing real
            rows = lg.rows.expand(s.shape[:-1])
            scored = int(torch.as_tensor(sel.scored)[rows.cpu()].sum())
    full, kept_full = lg.s, kept & ~empty
    if lg.has_sink:  # the sink is always kept
        kept_full = torch.cat([kept_full, torch.ones_like(kept_full[..., :1])], dim=-1)
    x = _host(torch.where(empty, 0.0, full.to(torch.float64)))
    kf = _host(kept_full | empty)
    return kept, torch.as_tensor(certify_kept(x, kf).tail_upper, dtype=torch.float64), scored


def _scale(call: _Call) -> float:
    scaling = call.kwargs.get("scaling")
    return call.query.shape[-1] ** -0.5 if scaling is None else float(scaling)


def _output_bound(call: _Call, lg: _Logits, kept: Any, tail: Any, idx: Any) -> float:
    """Largest certified output-error bound of the chunk's rows (OUT-BEST,
    :func:`certattn.output.sound_output_bounds` on the kept set and the layer's values,
    grouped heads repeated; a sink is a key whose value is 0, always kept), plus
    ``2 C h`` for the keys a finite fill hides (``C`` the largest value norm)."""
    from ..kept import shift_rows
    from ..output import sound_output_bounds

    v = _repeat_heads(call.value, call.query.shape[1]).detach().to(torch.float64)
    if idx is not None:
        v = v[:, idx.to(v.device)]
    x = lg.s.to(torch.float64)
    rows = lg.rows.expand(x.shape[:-1])
    valid = torch.isfinite(x) | ~rows[..., None]  # a row without visible key: a dummy
    x = torch.where(rows[..., None], x, 0.0)
    keep = kept & rows[..., None]
    if lg.has_sink:
        v = torch.cat([v, torch.zeros_like(v[..., :1, :])], dim=-2)
        keep = torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)
    keep = keep | ~rows[..., None]
    tau = torch.where(rows, tail, 0.0)
    xh, vh, validh, keeph = (_host(t) for t in (x, v, valid, keep))
    xp = namespace(xh)[0]
    b = sound_output_bounds(shift_rows(xh, xp), vh, validh, keeph, _host(tau), xp)
    bound = torch.as_tensor(b["best"] + b["mu_err"], dtype=torch.float64)
    if lg.h is not None:
        c = float(torch.linalg.vector_norm(v, dim=-1).max()) * (1.0 + 64 * U)
        bound = bound + 2.0 * c * lg.h.to(bound.device) * (1.0 + 4 * U)
    bound = torch.where(rows, bound, 0.0)
    return float(bound.max()) if bound.numel() else 0.0

