"""The soundness matrix: generic cases, the exact-arithmetic oracle, and the checker.

Cases (:func:`make_case`): every mask form of :data:`MASK_FORMS` x every dtype of
:data:`DTYPES` x every scale kind of :data:`SCALES`.  The oracle (:class:`Exact`) is the
exact softmax of the exact logits ``scale * q.k + bias`` computed in mpmath from the
(dtype-converted) inputs: every key with a finite bias is included (a dtype-minimum fill
has a positive exact mass), ``-inf`` / ``False`` / causally hidden keys are excluded.
:func:`check` compares a :class:`certattn._soundness.Claim` with it: the exact tail of the
kept set <= ``tail_upper``, ``-log(1 - tail) <= kl_upper``, the exact output error <=
``error_bound``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import ml_dtypes
import mpmath
import numpy as np

from certattn._soundness import Case, Claim

THOROUGH = os.environ.get("CERTATTN_HYPOTHESIS") == "thorough"
DPS = 120
"""mpmath digits: logits are exact (float products and sums), tails far below 1e-4000
are relative to themselves (mpmath exponents are unbounded)."""

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}

SCALES = ("unit", "large_scores", "tiny_scores", "huge_values", "tiny_values", "clustered")
"""Score scale kinds: N(0, 1)-ish scores, scores near +-1e4, scores near 1e-6, values near
the dtype's maximum (beyond 2^1023 in float64), subnormal-sized values, and keys in
clusters of 4 consecutive near-copies (block and cell bounds nearly tight: a bound that
miscounts a block shows)."""

MASK_FORMS = (
    "none", "causal", "causal_more_keys", "causal_more_queries", "bool", "additive",
    "additive_10000", "additive_min", "additive_inf", "padded", "fully_masked_rows", "gqa",
)

ORDINARY = ("none", "float64", "unit")
"""The plainest case (every entry point must certify it)."""

PLAIN_FORMS = ("none", "causal", "causal_more_keys", "bool", "padded", "gqa")
"""Mask forms that every entry point must certify, in every dtype, at the unit scale, when
every query sees a key (no refusal allowed); elsewhere an ``InputError`` is acceptable."""


def must_certify(case: Case) -> bool:
    """Whether ``case`` may not be refused: a plain form at the unit scale in which every
    query sees a key."""
    form, _, kind = case.label.split("/")
    if form not in PLAIN_FORMS or kind != "unit":
        return False
    return not bool(np.any(np.all(np.isneginf(case.logits()), axis=-1)))


SIZES = {"heads": 2, "lq": 6, "lk": 12, "d": 4, "dv": 3}
if THOROUGH:
    SIZES = {"heads": 2, "lq": 12, "lk": 40, "d": 8, "dv": 4}


def _shape(form: str, sizes: dict[str, int]) -> tuple[int, int, int, int]:
    """``(H, H_kv, Lq, Lk)`` of a mask form."""
    h, lq, lk = sizes["heads"], sizes["lq"], sizes["lk"]
    if form == "gqa":
        return 2 * h, h, lq, lk
    if form == "causal":
        return h, h, lk, lk
    if form == "causal_more_queries":
        return h, h, lk, max(2, lk // 2)
    return h, h, lq, lk


def _mask(form: str, rng: np.random.Generator, h: int, lq: int, lk: int,
          dt: np.dtype) -> np.ndarray | None:
    """The mask of a form (None for no mask and the causal forms)."""
    def somewhere_visible(vis: np.ndarray) -> np.ndarray:
        vis = vis.copy()
        vis[..., rng.integers(lk)] = True
        return vis

    dmin = np.finfo(dt).min
    fill = {"additive_10000": -10000.0, "additive_min": dmin, "additive_inf": -np.inf}
    if form in ("bool", "fully_masked_rows"):
        vis = somewhere_visible(rng.random((h, lq, lk)) < 0.6)
        if form == "fully_masked_rows":
            vis[:, lq // 2, :] = False
        return vis
    if form == "padded":  # key padding, broadcast over heads and queries
        vis = np.ones((1, lk), dtype=bool)
        vis[:, lk - max(1, lk // 4):] = False
        return vis
    if form == "additive":  # finite biases of both signs (relative-position style), none masked
        return rng.uniform(-4, 2, (h, lq, lk)).astype(dt)
    if form in fill:
        hidden = ~somewhere_visible(rng.random((h, lq, lk)) < 0.6)
        return np.where(hidden, np.asarray(fill[form], dtype=dt), np.asarray(0, dtype=dt))
    return None


def _magnitudes(kind: str, dt: np.dtype, d: int) -> tuple[float, float]:
    """(q and k entry scale, value scale)."""
    fi = np.finfo(dt)
    if kind == "large_scores":
        return float(np.sqrt(2e4 * np.sqrt(d) / d)), 1.0
    if kind == "tiny_scores":
        return 1e-3, 1.0
    if kind == "huge_values":
        return 1.0, float(fi.max) * 0.9
    if kind == "tiny_values":
        return 1.0, float(fi.smallest_subnormal)
    return 1.0, 1.0


def make_case(form: str, dtype: str, kind: str, seed: int = 0,
              sizes: dict[str, int] | None = None) -> Case:
    """One case of the matrix (deterministic in its arguments)."""
    sizes = sizes or SIZES
    dt = DTYPES[dtype]
    rng = np.random.default_rng([seed, MASK_FORMS.index(form), SCALES.index(kind)])
    h, hkv, lq, lk = _shape(form, sizes)
    d, dv = sizes["d"], sizes["dv"]
    qk, vs = _magnitudes(kind, dt, d)
    q = (rng.standard_normal((h, lq, d)) * qk).astype(dt)
    if kind == "clustered":
        centres = rng.standard_normal((hkv, -(-lk // 4), d)) * 1.5
        k = np.repeat(centres, 4, axis=1)[:, :lk] + rng.standard_normal((hkv, lk, d)) * 1e-3
        k = k.astype(dt)
    else:
        k = (rng.standard_normal((hkv, lk, d)) * qk).astype(dt)
    if kind == "tiny_values":
        v = (rng.integers(-3, 4, (hkv, lk, dv)) * vs).astype(dt)
    else:
        v = (rng.uniform(-1, 1, (hkv, lk, dv)) * vs).astype(dt)
    return Case(
        queries=q, keys=k, values=v, mask=_mask(form, rng, h, lq, lk, dt),
        causal=form.startswith("causal") or form == "gqa",
        kv_heads=hkv if form == "gqa" else None, scale=1.0 / np.sqrt(d),
        label=f"{form}/{dtype}/{kind}",
    )


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


def _mpf(x: float) -> mpmath.mpf:
    return mpmath.mpf(float(x))


@dataclass
class Row:
    """Exact softmax of one query row: probabilities (None = hidden key) and values."""

    p: list[mpmath.mpf | None]
    values: np.ndarray

    @functools.cached_property
    def attn(self) -> list[mpmath.mpf]:
        with mpmath.workdps(DPS):
            return [mpmath.fsum(pi * _mpf(v) for pi, v in zip(self.p, col, strict=True)
                                if pi is not None) for col in self.values.T]


def _row(logits: list[mpmath.mpf | None], values: np.ndarray) -> Row | None:
    with mpmath.workdps(DPS):
        finite = [s for s in logits if s is not None]
        if not finite:
            return None
        top = max(finite)
        w = [None if s is None else mpmath.exp(s - top) for s in logits]
        z = mpmath.fsum(x for x in w if x is not None)
        return Row([None if x is None else x / z for x in w], values)


def exact_rows(case: Case, logits: np.ndarray | None = None) -> list[list[Row | None]]:
    """``rows[h][i]``: the exact softmax of query ``i`` of head ``h`` (None: no visible key).

    ``logits`` given: the softmax of those logits (``-inf`` = hidden); otherwise of the
    exact ``scale q.k + bias`` from the case's inputs, mask and causal alignment.
    """
    vals = case.head_values().astype(np.float64)
    h, lq = case.queries.shape[:2]
    lk = case.keys.shape[1]
    if logits is not None:
        x = np.asarray(logits, dtype=np.float64)
        return [[_row([None if s == -np.inf else _mpf(s) for s in x[a, i]], vals[a])
                 for i in range(lq)] for a in range(h)]
    q = case.queries.astype(np.float64)
    k = case.keys.astype(np.float64)[case.head_map()]
    mask = None if case.mask is None else np.broadcast_to(np.asarray(case.mask), (h, lq, lk))
    out = []
    with mpmath.workdps(DPS):
        sc = _mpf(case.scale)
        for a in range(h):
            kk = [[_mpf(t) for t in row] for row in k[a]]
            rows = []
            for i in range(lq):
                qq = [_mpf(t) for t in q[a, i]]
                logit: list[mpmath.mpf | None] = []
                for j in range(lk):
                    hidden = case.causal and j > i + lk - lq
                    bias = mpmath.mpf(0)
                    if mask is not None:
                        m = mask[a, i, j]
                        if mask.dtype == bool:
                            hidden = hidden or not m
                        elif float(m) == -np.inf:
                            hidden = True
                        else:
                            bias = _mpf(m)
                    dot = mpmath.fsum(x * y for x, y in zip(qq, kk[j], strict=True))
                    logit.append(None if hidden else sc * dot + bias)
                rows.append(_row(logit, vals[a]))
            out.append(rows)
    return out


# --------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------


def _per_query(a: object, shape: tuple[int, int]) -> np.ndarray | None:
    if a is None:
        return None
    return np.broadcast_to(np.asarray(a, dtype=np.float64), shape)


def _fmt(x: object) -> str:
    if not isinstance(x, mpmath.mpf):
        return repr(float(x))
    if x == 0 or not mpmath.isfinite(x) or abs(mpmath.log10(abs(x))) < 1000:
        return mpmath.nstr(x, 17)
    return f"10^{int(mpmath.floor(mpmath.log10(x)))}"  # printing every digit is slow


def check(claim: Claim, rows: list[list[Row | None]]) -> list[str]:
    """Every violated claim, one line each (empty: the claim holds)."""
    h, lq = len(rows), len(rows[0])
    tail_u = _per_query(claim.tail_upper, (h, lq))
    kl_u = _per_query(claim.kl_upper, (h, lq))
    err_u = _per_query(claim.error_bound, (h, lq))
    kept = None if claim.kept is None else np.asarray(claim.kept)
    out = None if claim.output is None else np.asarray(claim.output, dtype=np.float64)
    bad: list[str] = []
    if tail_u is not None and kept is None:
        return ["tail_upper without a kept set"]
    with mpmath.workdps(DPS):
        for a in range(h):
            for i in range(lq):
                r = rows[a][i]
                if r is None:  # a query that sees no key: nothing is claimable
                    continue
                at = f"head {a} query {i}"
                kin = None if kept is None else [bool(x) for x in kept[a, i]]
                tail = head = None
                if kin is not None:
                    tail = mpmath.fsum(p for p, k in zip(r.p, kin, strict=True)
                                       if p is not None and not k)
                    head = mpmath.fsum(p for p, k in zip(r.p, kin, strict=True)
                                       if p is not None and k)
                bad += _check_row(at, r, (tail, head), kin, (tail_u, kl_u, err_u), out, a, i)
    return bad


def _check_row(at: str, r: Row, mass: tuple, kin: list[bool] | None, bounds: tuple,
               out: np.ndarray | None, a: int, i: int) -> list[str]:
    """Violations of one query row; ``mass`` = exact (tail, head) of the kept set."""
    tail, head = mass
    tail_u, kl_u, err_u = bounds
    bad = []
    for name, arr in (("tail_upper", tail_u), ("kl_upper", kl_u), ("error_bound", err_u)):
        if arr is not None and np.isnan(arr[a, i]):
            bad.append(f"{at}: {name} is NaN")
    if bad:
        return bad
    # a tail bound >= 1 is trivially sound (and 1 - P(A) may round to 1 at any precision)
    if tail_u is not None and tail_u[a, i] < 1 and tail > _mpf(tail_u[a, i]):
        bad.append(f"{at}: exact tail {_fmt(tail)} > tail_upper {_fmt(tail_u[a, i])}")
    if kl_u is not None and head is not None:
        # KL = -log P(A), from whichever of tail and P(A) is accurate relative to itself
        if tail < 0.5:
            kl = -mpmath.log1p(-tail)
        else:
            kl = mpmath.inf if head == 0 else -mpmath.log(head)
        if kl > _mpf(kl_u[a, i]):
            bad.append(f"{at}: exact KL {_fmt(kl)} > kl_upper {_fmt(kl_u[a, i])}")
    if err_u is not None:
        err = _error(r, kin, None if out is None else out[a, i])
        if err > _mpf(err_u[a, i]):
            bad.append(f"{at}: exact error {_fmt(err)} > error_bound {_fmt(err_u[a, i])}")
    return bad


def _error(r: Row, kin: list[bool] | None, output: np.ndarray | None) -> mpmath.mpf:
    """Exact |Attn - output|, or (no output) |Attn - Attn_kept| by the head-tail identity
    ``Attn - Attn_H = tau (mu_T - mu_H)`` (no cancellation at any tail size)."""
    if output is not None:
        return mpmath.sqrt(mpmath.fsum((x - _mpf(o)) ** 2
                                       for x, o in zip(r.attn, output, strict=True)))
    head = [p if (p is not None and k) else 0 for p, k in zip(r.p, kin, strict=True)]
    tailw = [p if (p is not None and not k) else 0 for p, k in zip(r.p, kin, strict=True)]
    ph, pt = mpmath.fsum(head), mpmath.fsum(tailw)
    if ph == 0:
        return mpmath.inf
    if pt == 0:
        return mpmath.mpf(0)
    err2 = mpmath.mpf(0)
    for col in r.values.T:
        c = [_mpf(v) for v in col]
        mu_h = mpmath.fsum(w * x for w, x in zip(head, c, strict=True)) / ph
        mu_t = mpmath.fsum(w * x for w, x in zip(tailw, c, strict=True)) / pt
        err2 += (mu_t - mu_h) ** 2
    return pt * mpmath.sqrt(err2)
