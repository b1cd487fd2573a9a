r"""Delta Attention inside a transformers model: a sparse base plus anchor-row corrections.

Delta Attention (Willette, Lee, Hwang, NeurIPS 2025; :mod:`certattn.approx.delta`) is an
*output* correction, not a kept set: per head, with :math:`S` the sparse base's output of
every prompt row and :math:`D` exact attention of the planned dense rows
(:func:`certattn.approx.delta.delta_rows`: every ``gamma``-th row below ``s_p`` and every
row from ``s_p`` on),

.. math:: O_i = S_i + (D_a - S_a)\quad (i < s_p,\ a = \gamma\lfloor i/\gamma\rfloor),
   \qquad O_i = D_i \text{ on dense rows.}

:func:`delta_sparse` runs it on a model: :math:`S` is :func:`certattn.hf.sparse`'s output
for the base policy (the model's own eager function on the base's kept set), :math:`D`
the same eager function with the model's own mask on the dense rows, so a base that keeps
every key gives eager's output.  A decode step (one query row) is a prompt shorter than
the dense tail: every such row is dense.

Cost, as :func:`certattn.approx.delta.delta_correct` counts it (key-equivalents): the base's
kept keys on the rows below ``s_p``, plus every visible key of each dense row (anchors pay
for their :math:`D_a` on top of their base row).  :attr:`SparseStats.kept_fraction` is this
cost over the visible keys; :attr:`SparseStats.tail_upper_max` is the base's (it bounds the
dropped mass of :math:`S`, not the error of :math:`O`, which is not a softmax over a kept
set; :func:`certattn.approx.delta_correct` certifies that error on NumPy arrays).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .._validate import InputError, check_count
from ..approx.delta import delta_rows
from ._attention import (
    _SESSION,
    DEFAULT_NAME,
    SparseStats,
    _attention,
    _eager_of,
    _refuse_unsupported,
    sparse,
)

__all__ = ["DeltaCorrection", "delta_sparse"]

DELTA_NAME = "certattn_delta"

_STATE: contextvars.ContextVar[DeltaCorrection | None] = contextvars.ContextVar(
    "certattn_hf_delta", default=None
)


@dataclass(frozen=True)
class DeltaCorrection:
    """Delta Attention's correction of a sparse ``base`` (run with :func:`delta_sparse`).

    Attributes
    ----------
    base : policy or mapping layer -> policy
        The sparse base, as :func:`certattn.hf.sparse` takes it (layers a mapping leaves
        out run dense, uncorrected).
    gamma : int
        Delta stride (published 64).
    min_tail : int
        The dense tail's constant, ``cut = (s mod gamma) + max(min_tail, gamma)``
        (published 128).
    """

    base: Any
    gamma: int = 64
    min_tail: int = 128
    name: str = "delta"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", check_count(self.gamma, name="gamma", low=1))
        object.__setattr__(self, "min_tail", check_count(self.min_tail, name="min_tail"))


def _register() -> None:
    taken = AttentionInterface._global_mapping.get(DELTA_NAME)
    if taken not in (None, _delta_attention):
        raise InputError(f"attention implementation {DELTA_NAME!r} is already registered by "
                         "another library")
    AttentionInterface.register(DELTA_NAME, _delta_attention)
    AttentionMaskInterface.register(DELTA_NAME, eager_mask)


@contextmanager
def delta_sparse(model: Any, delta: DeltaCorrection, *,
                 name: str = DEFAULT_NAME) -> Iterator[SparseStats]:
    """Run ``model`` with Delta Attention over ``delta.base`` (module docstring).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    delta : DeltaCorrection
    name : str
        The implementation name :func:`certattn.hf.sparse` registers.

    Yields
    ------
    SparseStats
        ``kept_fraction`` = Delta's cost in key-equivalents over the visible keys.
    """
    if not isinstance(delta, DeltaCorrection):
        raise InputError(f"delta must be a DeltaCorrection, got {type(delta).__name__}")
    _register()
    with sparse(model, delta.base, name=name) as stats:
        model.set_attn_implementation(DELTA_NAME)
        token = _STATE.set(delta)
        try:
            yield stats
        finally:
            _STATE.reset(token)
            model.set_attn_implementation(name)


def _rows(x: Any, idx: Any) -> Any:
    """Query rows ``idx`` of a (B, H, Lq, .) tensor or mask (a broadcast row axis stays)."""
    if x is None or x.shape[-2] == 1:
        return x
    return x.index_select(-2, idx)


def _visible(attention_mask: Any, query: Any, n_keys: int) -> Any:
    """Visible keys per (batch, head, query) row, as eager's mask shows them (int64)."""
    b, h, lq = query.shape[0], query.shape[1], query.shape[2]
    if attention_mask is None:
        return torch.full((b, h, lq), n_keys, dtype=torch.int64, device=query.device)
    m = attention_mask[..., :n_keys]
    vis = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return vis.expand(b, h, lq, n_keys).sum(-1)


def _delta_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     **kwargs: Any) -> tuple[Any, Any]:
    """The registered function: certattn's sparse attention, then Delta's correction."""
    delta, session = _STATE.get(), _SESSION.get()
    if (delta is None or session is None or id(module) not in session.modules
            or session.policy is None or session.policy(session.layer_of(module)) is None):
        return _attention(module, query, key, value, attention_mask, **kwargs)
    eager = _eager_of(module)
    s = int(query.shape[2])
    s_p, anchor, dense = delta_rows(s, delta.gamma, delta.min_tail)
    if s_p == 0:  # every row dense (a decode step, a short prompt): eager, all kept
        _refuse_unsupported(module, kwargs)
        _count(session, module, attention_mask, query, key, dense, s_p)
        return eager(module, query, key, value, attention_mask, **kwargs)[0], None
    dev = query.device
    base = torch.arange(s_p, device=dev)
    out_s, _ = _attention(module, _rows(query, base), key, value,
                          _rows(attention_mask, base), **kwargs)
    idx = torch.as_tensor(dense, device=dev)
    out_d, _ = eager(module, _rows(query, idx), key, value, _rows(attention_mask, idx),
                     **kwargs)
    pos = torch.as_tensor(dense.searchsorted(anchor[:s_p]), device=dev)  # a's place in dense
    a = torch.as_tensor(anchor[:s_p], device=dev)
    out = torch.empty((out_s.shape[0], s, *out_s.shape[2:]), dtype=out_s.dtype, device=dev)
    out[:, :s_p] = out_s + (out_d[:, pos] - out_s[:, a])
    out[:, idx] = out_d  # O_i = D_i on the dense rows (anchors included)
    _count(session, module, attention_mask, query, key, dense, s_p)
    return out, None


def _count(session: Any, module: Any, attention_mask: Any, query: Any, key: Any,
           dense: Any, s_p: int) -> None:
    """Add Delta's dense rows to the base's counts (module docstring's cost).

    The base ran (and counted its kept and visible keys) on the rows below ``s_p`` only;
    rows from ``s_p`` on are dense (visible keys, all kept); the dense rows below ``s_p``
    (anchors) add their visible keys to the kept count only.
    """
    nv = _visible(attention_mask, query, int(key.shape[-2]))
    tail = int(nv[..., s_p:].sum())
    below = torch.as_tensor(dense[dense < s_p], dtype=torch.int64, device=nv.device)
    anchors = int(nv.index_select(-1, below).sum())
    session.stats._add(session.layer_of(module), tail + anchors, tail, 0.0)
