r"""The Gaussian score model: closed forms for Top-k truncation of i.i.d. normal logits.

Model (THEORY.md section 5): the logits of one row are i.i.d. ``s_i ~ N(mu, sigma^2)``.
All population-limit statements are **[derived]** except the ``k_eps`` rule, which is
**[paper]** (Tzachristas et al., arXiv 2512.07647).  With :math:`\Phi` the standard normal
CDF and :math:`\Phi_c = 1 - \Phi`:

* GAUSS-TILT: the attention-weighted (``e^s``-tilted) law of a score is
  :math:`N(\mu + \sigma^2, \sigma^2)`.
* GAUSS-THRESHOLD: keeping the scores ``s >= t`` discards the mass
  :math:`\Phi((t - \mu - \sigma^2)/\sigma)` and keeps the fraction
  :math:`\rho = \Phi_c((t - \mu)/\sigma)` of the keys; ``mu`` cancels between the two.
* GAUSS-TOPFRAC: keeping the top fraction ``rho`` leaves
  :math:`\tau = \Phi(\Phi^{-1}(1 - \rho) - \sigma)`.
* GAUSS-KEPS: :math:`k_\varepsilon / n \to \Phi_c(\sigma + \Phi^{-1}(\varepsilon))`, and
  its inverses in ``sigma`` and in ``eps``.
* GAUSS-LIMITS: entropy :math:`\to \log n - \sigma^2/2`, participation ratio
  :math:`1/\sum_i p_i^2 \to n e^{-\sigma^2}`.
* GAUSS-FINITE-N: exact finite-``n`` expectations at a fixed threshold, and the exact
  relative standard deviation of the partition function.

Every function is vectorised (NumPy broadcasting), array-agnostic (any array-API
namespace; Python scalars give NumPy), computes in float64 and returns the input's
floating dtype (float64 for Python scalars).  Probabilities deep in the tails are
handled with ``log=True``: probability inputs *and* outputs are then natural logarithms,
computed with ``log_ndtr`` / ``ndtri_exp`` so that nothing underflows.

Finite ``n`` and Monte Carlo live in :mod:`certattn.gaussian_mc`; real rows are served by
:func:`estimate_sigma` and :func:`predict_k`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat as compat

from ._array import log_ndtr, namespace, ndtr, ndtri, ndtri_exp
from ._results import Unpackable
from ._validate import valid_rows
from .errors import InputError

__all__ = [
    "RowMoments",
    "discarded_mass",
    "entropy_limit",
    "estimate_sigma",
    "expected_kept_count",
    "expected_tail_sum",
    "keps_eps",
    "keps_fraction",
    "keps_sigma",
    "kept_fraction",
    "participation_ratio_limit",
    "partition_rel_sd",
    "predict_k",
    "tilted_normal",
    "top_fraction_tail_mass",
]

Array = Any


# --------------------------------------------------------------------------
# Array plumbing
# --------------------------------------------------------------------------


def _prepare(
    *values: Any, names: tuple[str, ...] = ()
) -> tuple[ModuleType, Any, Any, list[Array]]:
    """Namespace, device, output dtype and float64 broadcast copies of ``values``.

    ``names`` name the arguments in the error raised for a value that is not real numbers
    or that does not broadcast with the others.
    """
    names = names or tuple(f"argument {i + 1}" for i in range(len(values)))
    for v, name in zip(values, names, strict=True):
        if isinstance(v, bool | str | bytes) or (
            not compat.is_array_api_obj(v) and not _real_like(v)
        ):
            raise InputError(f"{name} must be real numbers, got {v!r}"[:200])
        if compat.is_array_api_obj(v):
            xv = compat.array_namespace(v)
            if not (xv.isdtype(v.dtype, "real floating") or xv.isdtype(v.dtype, "integral")):
                raise InputError(f"{name} must be real numbers, got dtype {v.dtype}")
    xp, dev = namespace(*values)
    floats = [
        v.dtype
        for v in values
        if compat.is_array_api_obj(v) and xp.isdtype(v.dtype, "real floating")
    ]
    out_dtype = xp.result_type(*floats) if floats else xp.float64
    conv = []
    for v in values:
        if compat.is_array_api_obj(v):
            conv.append(xp.astype(xp.asarray(v), xp.float64))
        else:
            conv.append(xp.asarray(v, dtype=xp.float64, device=dev))
    try:
        return xp, dev, out_dtype, list(xp.broadcast_arrays(*conv))
    except ValueError:
        shapes = ", ".join(f"{n} {tuple(c.shape)}" for n, c in zip(names, conv, strict=True))
        raise InputError(f"the arguments do not broadcast together: {shapes}") from None


def _real_like(v: Any) -> bool:
    """A Python number or a (nested) sequence of them, no complex, bool or string."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    if isinstance(v, list | tuple):
        return all(_real_like(e) for e in v)
    try:
        import numpy as np

        return np.asarray(v).dtype.kind in "iuf"
    except Exception:
        return False


def _out(xp: ModuleType, x: Array, dtype: Any) -> Array:
    return xp.astype(xp.asarray(x), dtype)


def _check(xp: ModuleType, bad: Array, what: str) -> None:
    if bool(xp.any(bad)):
        raise InputError(what)


def _check_n(xp: ModuleType, n: Array) -> None:
    _check(xp, xp.isnan(n) | xp.isinf(n) | (n < 1.0), "n must be finite and >= 1")


def _check_finite(xp: ModuleType, x: Array, name: str) -> None:
    _check(xp, xp.isnan(x) | xp.isinf(x), f"{name} must be finite")


def _check_t(xp: ModuleType, t: Array) -> None:
    _check(xp, xp.isnan(t), "t must not be NaN (+-inf are allowed thresholds)")


def _check_sigma(xp: ModuleType, sigma: Array, *, positive: bool = False) -> None:
    bad = (sigma <= 0.0) if positive else (sigma < 0.0)
    _check(xp, bad | xp.isnan(sigma) | xp.isinf(sigma),
           f"sigma must be finite and {'> 0' if positive else '>= 0'}")


def _check_prob(xp: ModuleType, p: Array, name: str, *, log: bool, upper_open: bool) -> None:
    """``p`` in [0, 1] (or [0, 1) if ``upper_open``); in log space, in [-inf, 0]."""
    hi = 0.0 if log else 1.0
    lo_bad = xp.isnan(p) | ((p < 0.0) if not log else (p == xp.inf))
    hi_bad = (p >= hi) if upper_open else (p > hi)
    rng = "[0, 1)" if upper_open else "[0, 1]"
    what = f"log {name} must lie in log {rng}" if log else f"{name} must lie in {rng}"
    _check(xp, lo_bad | hi_bad, what)


def _ndtri(p: Array, *, log: bool) -> Array:
    r""":math:`\Phi^{-1}(p)`, or :math:`\Phi^{-1}(e^p)` in log space."""
    return ndtri_exp(p) if log else ndtri(p)


def _ndtr(x: Array, *, log: bool) -> Array:
    r""":math:`\Phi(x)`, or :math:`\log\Phi(x)` in log space."""
    return log_ndtr(x) if log else ndtr(x)


# --------------------------------------------------------------------------
# Population limit
# --------------------------------------------------------------------------


def tilted_normal(mu: Any, sigma: Any) -> tuple[Array, Array]:
    r"""Mean and standard deviation of the attention-weighted score law (GAUSS-TILT).

    If :math:`s \sim N(\mu, \sigma^2)`, the law with density proportional to
    :math:`e^s \varphi((s-\mu)/\sigma)` is :math:`N(\mu + \sigma^2, \sigma^2)`
    (exponential tilting; Theorem GAUSS-TILT, [derived]).

    Returns
    -------
    (mean, sd) : arrays, ``mu + sigma**2`` and ``sigma``.
    """
    xp, _, dtype, (mu_, sig) = _prepare(mu, sigma, names=("mu", "sigma"))
    _check_finite(xp, mu_, "mu")
    _check_sigma(xp, sig)
    return _out(xp, mu_ + sig * sig, dtype), _out(xp, sig, dtype)


def discarded_mass(t: Any, sigma: Any, *, mu: Any = 0.0, log: bool = False) -> Array:
    r"""Attention mass of the scores below a threshold, population limit (GAUSS-THRESHOLD).

    .. math:: \tau(t) = \Phi\!\left(\frac{t - \mu - \sigma^2}{\sigma}\right)

    the mass the tilted law :math:`N(\mu+\sigma^2, \sigma^2)` puts below ``t``
    (Theorem GAUSS-THRESHOLD, [derived]).

    Parameters
    ----------
    t : array_like
        Threshold; the kept set is ``{s >= t}``.
    sigma : array_like
        Score standard deviation, ``> 0``.
    mu : array_like
        Score mean.
    log : bool
        Return :math:`\log\tau` (accurate where ``tau`` underflows).
    """
    xp, _, dtype, (t_, sig, mu_) = _prepare(t, sigma, mu, names=("t", "sigma", "mu"))
    _check_sigma(xp, sig, positive=True)
    _check_t(xp, t_)
    _check_finite(xp, mu_, "mu")
    return _out(xp, _ndtr((t_ - mu_ - sig * sig) / sig, log=log), dtype)


def kept_fraction(t: Any, sigma: Any, *, mu: Any = 0.0, log: bool = False) -> Array:
    r"""Fraction of keys with score ``>= t``, population limit (GAUSS-THRESHOLD).

    .. math:: \rho(t) = \Phi_c\!\left(\frac{t - \mu}{\sigma}\right)
              = \Phi\!\left(\frac{\mu - t}{\sigma}\right)

    With ``log=True`` returns :math:`\log\rho`.
    """
    xp, _, dtype, (t_, sig, mu_) = _prepare(t, sigma, mu, names=("t", "sigma", "mu"))
    _check_sigma(xp, sig, positive=True)
    _check_t(xp, t_)
    _check_finite(xp, mu_, "mu")
    return _out(xp, _ndtr((mu_ - t_) / sig, log=log), dtype)


def top_fraction_tail_mass(rho: Any, sigma: Any, *, log: bool = False) -> Array:
    r"""Mass discarded by keeping the top fraction ``rho`` of the keys (GAUSS-TOPFRAC).

    .. math:: \tau(\rho) = \Phi(\Phi^{-1}(1 - \rho) - \sigma) = \Phi_c(\Phi^{-1}(\rho) + \sigma)

    (Theorem GAUSS-TOPFRAC, [derived]: the threshold ``t = mu + sigma Phi^{-1}(1-rho)`` in
    :func:`discarded_mass`).  The second form is used: it is accurate for tiny ``rho``.

    Parameters
    ----------
    rho : array_like
        Kept fraction in ``[0, 1]`` (``log rho`` in ``[-inf, 0]`` when ``log=True``).
    sigma : array_like
        Score standard deviation, ``>= 0``.
    log : bool
        Log space: ``rho`` is given as ``log rho`` and ``log tau`` is returned.
    """
    xp, _, dtype, (r, sig) = _prepare(rho, sigma, names=("rho", "sigma"))
    _check_prob(xp, r, "rho", log=log, upper_open=False)
    _check_sigma(xp, sig)
    return _out(xp, _ndtr(-(_ndtri(r, log=log) + sig), log=log), dtype)


def keps_fraction(eps: Any, sigma: Any, *, log: bool = False) -> Array:
    r"""The k_eps rule: fraction of keys Top-k must keep for tail mass ``eps`` (GAUSS-KEPS).

    .. math:: k_\varepsilon / n \to \Phi_c(\sigma + \Phi^{-1}(\varepsilon))

    (Theorem GAUSS-KEPS, [paper]; it solves ``top_fraction_tail_mass(rho, sigma) = eps``.)
    A population limit: see :func:`certattn.gaussian_mc.gaussian_validity` for when it
    describes finite rows.  ``sigma = 0`` gives ``1 - eps``.

    Parameters
    ----------
    eps : array_like
        Tail-mass budget in ``[0, 1)`` (``log eps`` when ``log=True``).
    sigma : array_like
        Score standard deviation, ``>= 0``.
    log : bool
        Log space: ``eps`` is given as ``log eps``, ``log(k_eps/n)`` is returned.
    """
    xp, _, dtype, (e, sig) = _prepare(eps, sigma, names=("eps", "sigma"))
    _check_prob(xp, e, "eps", log=log, upper_open=True)
    _check_sigma(xp, sig)
    return _out(xp, _ndtr(-(sig + _ndtri(e, log=log)), log=log), dtype)


def keps_sigma(rho: Any, eps: Any, *, log: bool = False) -> Array:
    r"""Score spread at which the rule keeps the fraction ``rho`` (inverse of GAUSS-KEPS in sigma).

    .. math:: \sigma(\rho, \varepsilon) = \max\{0, -\Phi^{-1}(\rho) - \Phi^{-1}(\varepsilon)\}

    i.e. the ``sigma`` at which a reduction ``n/k = 1/rho`` is reached with budget ``eps``.
    For ``rho >= 1 - eps`` even uniform logits (``sigma = 0``) reach it and ``0`` is
    returned.  ``log=True``: ``rho`` and ``eps`` are given as logs.
    """
    xp, _, dtype, (r, e) = _prepare(rho, eps, names=("rho", "eps"))
    _check_prob(xp, r, "rho", log=log, upper_open=False)
    _check_prob(xp, e, "eps", log=log, upper_open=True)
    s = -_ndtri(r, log=log) - _ndtri(e, log=log)
    return _out(xp, xp.where(s > 0.0, s, xp.zeros_like(s)), dtype)


def keps_eps(rho: Any, sigma: Any, *, log: bool = False) -> Array:
    r"""Budget that keeping the fraction ``rho`` certifies (inverse of GAUSS-KEPS in eps).

    .. math:: \varepsilon(\rho, \sigma) = \Phi_c(\Phi^{-1}(\rho) + \sigma)

    This is :func:`top_fraction_tail_mass` (the rule is its level set); provided under
    this name for the inverse direction.
    """
    return top_fraction_tail_mass(rho, sigma, log=log)


def entropy_limit(n: Any, sigma: Any) -> Array:
    r"""Attention entropy of ``n`` i.i.d. normal logits, population limit (GAUSS-LIMITS).

    .. math:: H(P) \approx \log n - \sigma^2/2

    (Theorem GAUSS-LIMITS, [derived]: ``H = log Z - E_P[s]`` with ``Z ~ n e^{mu+sigma^2/2}``
    and ``E_P[s] = mu + sigma^2`` by GAUSS-TILT.)  Valid while the partition function
    concentrates; in nats.
    """
    xp, _, dtype, (n_, sig) = _prepare(n, sigma, names=("n", "sigma"))
    _check_n(xp, n_)
    _check_sigma(xp, sig)
    return _out(xp, xp.log(n_) - 0.5 * sig * sig, dtype)


def participation_ratio_limit(n: Any, sigma: Any) -> Array:
    r"""Participation ratio :math:`1/\sum_i p_i^2`, population limit (GAUSS-LIMITS).

    .. math:: 1/\textstyle\sum_i p_i^2 \approx n e^{-\sigma^2}

    (``sum p_i^2 = sum e^{2 s_i} / Z^2 ~ n E e^{2s} / (n E e^s)^2 = e^{sigma^2}/n``.)
    """
    xp, _, dtype, (n_, sig) = _prepare(n, sigma, names=("n", "sigma"))
    _check_n(xp, n_)
    _check_sigma(xp, sig)
    return _out(xp, n_ * xp.exp(-sig * sig), dtype)


# --------------------------------------------------------------------------
# Finite n: exact expectations at a fixed threshold
# --------------------------------------------------------------------------


def expected_tail_sum(n: Any, t: Any, sigma: Any, *, mu: Any = 0.0, log: bool = False) -> Array:
    r"""Exact :math:`E \sum_{s_i < t} e^{s_i}` for ``n`` i.i.d. normal scores (GAUSS-FINITE-N).

    .. math:: E\sum_{s_i<t} e^{s_i}
              = n\, e^{\mu + \sigma^2/2}\, \Phi\!\left(\frac{t-\mu-\sigma^2}{\sigma}\right)

    Exact for every ``n`` (linearity of expectation; Theorem GAUSS-FINITE-N, [derived]).
    ``t = +inf`` gives :math:`E Z = n e^{\mu+\sigma^2/2}`.  ``log=True`` returns the log.
    """
    xp, _, dtype, (n_, t_, sig, mu_) = _prepare(n, t, sigma, mu, names=("n", "t", "sigma", "mu"))
    _check_n(xp, n_)
    _check_sigma(xp, sig, positive=True)
    _check_t(xp, t_)
    _check_finite(xp, mu_, "mu")
    out = xp.log(n_) + mu_ + 0.5 * sig * sig + log_ndtr((t_ - mu_ - sig * sig) / sig)
    return _out(xp, out if log else xp.exp(out), dtype)


def expected_kept_count(n: Any, t: Any, sigma: Any, *, mu: Any = 0.0) -> Array:
    r"""Exact :math:`E\,\#\{i : s_i \ge t\} = n \Phi_c((t-\mu)/\sigma)` (GAUSS-FINITE-N)."""
    xp, _, dtype, (n_, t_, sig, mu_) = _prepare(n, t, sigma, mu, names=("n", "t", "sigma", "mu"))
    _check_n(xp, n_)
    _check_sigma(xp, sig, positive=True)
    _check_t(xp, t_)
    _check_finite(xp, mu_, "mu")
    return _out(xp, n_ * ndtr((mu_ - t_) / sig), dtype)


def partition_rel_sd(n: Any, sigma: Any) -> Array:
    r"""Exact relative standard deviation of the partition function :math:`Z = \sum_i e^{s_i}`.

    .. math:: \mathrm{sd}(Z)/E Z = \sqrt{(e^{\sigma^2} - 1)/n}

    (Theorem GAUSS-FINITE-N: ``Var e^s = e^{2mu+sigma^2}(e^{sigma^2}-1)``, independent
    terms.)  Small values mean the population limit applies; see
    :func:`certattn.gaussian_mc.gaussian_validity`.
    """
    xp, _, dtype, (n_, sig) = _prepare(n, sigma, names=("n", "sigma"))
    _check_n(xp, n_)
    _check_sigma(xp, sig)
    return _out(xp, xp.sqrt(xp.expm1(sig * sig) / n_), dtype)


# --------------------------------------------------------------------------
# Real rows: sigma estimation and rule-guided budgets
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RowMoments(Unpackable):
    """Per-row ``mu``, ``sigma`` and ``n_valid`` of :func:`estimate_sigma`.

    Unpacks as ``mu, sigma, n_valid = estimate_sigma(...)`` (it returned a tuple in 0.1).
    """

    mu: Array
    sigma: Array
    n_valid: Array


def estimate_sigma(logits: Any, *, axis: int = -1) -> RowMoments:
    r"""Per-row mean, standard deviation and count of the valid (finite) logits.

    ``-inf`` entries are masked keys and are ignored.  The standard deviation is the
    unbiased sample one (``ddof = 1``; ``0`` for a single valid key).  Computed in float64.

    Returns
    -------
    RowMoments
        ``mu``, ``sigma`` (float64) and ``n_valid`` (int64) of the batch shape, in the
        input's namespace and on its device.

    Raises
    ------
    ValueError
        On NaN or ``+inf`` logits, or a row with no valid key (the library's common
        messages, with the position).
    """
    x, count, xp, _ = valid_rows(logits, axis)
    valid = x > -xp.inf
    zero = xp.zeros_like(x)
    nf = xp.astype(count, xp.float64)
    mu = xp.sum(xp.where(valid, x, zero), axis=-1) / nf
    dev2 = xp.where(valid, (x - mu[..., None]) ** 2, zero)
    denom = xp.where(count > 1, nf - 1.0, xp.ones_like(nf))
    sigma = xp.sqrt(xp.sum(dev2, axis=-1) / denom)
    return RowMoments(mu, sigma, count)


def predict_k(logits: Any, eps: float, *, axis: int = -1) -> Array:
    r"""Rule-guided Top-k budget per row: ``ceil(n_valid * Phi_c(sigma_hat + Phi^{-1}(eps)))``.

    ``sigma_hat`` is the sample standard deviation of the row's valid logits
    (:func:`estimate_sigma`) and the fraction is the GAUSS-KEPS rule
    (:func:`keps_fraction`).  A *prediction*, not a certificate: on Gaussian rows it is
    accurate while :func:`certattn.gaussian_mc.gaussian_validity` holds and
    under-predicts as ``sigma`` nears ``sqrt(2 ln n)``; on real attention rows (heavier
    upper tails than normal) it can be far off either way.  Use it as a starting guess
    for an exact certificate (``certattn.certify_topk``).

    Returns
    -------
    Array
        int64, the batch shape, in ``[1, n_valid]``, in the input's namespace and device.
    """
    try:
        ok = not isinstance(eps, bool | str | bytes) and 0.0 <= float(eps) < 1.0
    except (TypeError, ValueError):  # not a number (or an array of several)
        ok = False
    if not ok:
        raise InputError(f"eps must be a number in [0, 1), got {eps!r}")
    _, sigma, count = estimate_sigma(logits, axis=axis)
    xp, _ = namespace(sigma)
    frac = keps_fraction(float(eps), sigma)
    nf = xp.astype(count, xp.float64)
    # A relative slack of 1e-12 keeps exact products (e.g. 0.5 * 128) from rounding up.
    k = xp.ceil(nf * frac * (1.0 - 1e-12))
    k = xp.clip(k, 1.0, nf)
    return xp.astype(k, xp.int64)
