r"""Compiled fast path of :func:`certattn.certify_topk` (``pip install "certattn[fast]"``).

Which path runs
---------------
``CERTATTN_KERNEL`` chooses, per call: ``auto`` (default: the compiled path when numba
imports and the call is large enough to repay numba's start-up -- at least
``AUTO_KEYS`` keys in all, or rows longer than ``STREAM_KEYS``, which the compiled path
streams in bounded memory -- else NumPy), ``numba`` (compiled; an error if numba is
missing) or ``numpy``
(the NumPy path of :mod:`certattn._topk_numpy`, which stays the reference and the
fallback).  Only NumPy inputs take either; other array libraries (CuPy included: no GPU
kernel here, the CuPy path stays the generic sort kernel of :mod:`certattn.topk`) are
unchanged.  Both paths certify the same quantity with the same acceptance test, so ``k``
agrees exactly except where the computed tail of ``k - 1`` keys lies within rounding
(about :math:`n u` relative) of the acceptance threshold itself, a band inside the
certificate's margin; ``tail_upper`` agrees within a relative :math:`2 n u`.  Either
answer is sound and minimal up to the margin.

The kernel (per row)
--------------------
Rows of at least ``STEER_MIN_KEYS`` keys and at most ``STREAM_KEYS`` (the ordinary case)
take the *steered* pass first; whatever it cannot settle goes to the *full* kernel.

Steered pass.  Per block of rows (``BLOCK_KEYS`` keys, cache-resident) NumPy computes
the row maxima (NaN-propagating: such rows are skipped, the caller raises), the terms
:math:`\hat e_i` (exactly those of the NumPy path) and their row sums :math:`\hat Z`.
If :math:`\hat Z \notin [e^{-650}/\varepsilon, e^{700}]` the row goes to the full kernel.
Otherwise a strided sample of ``STEER_SAMPLE`` keys, histogrammed in 1/8-nat bins of
:math:`m - s_i`, places 8 thresholds where its scaled cumulative tail crosses
``FRACTIONS`` of the estimated budget; one vectorised pass sums the terms below each
threshold (float64) and counts them; the budget (below) picks the two neighbouring
thresholds around the cut, and one branch-free pass gathers the terms between them.
These are split into ``SUB_BINS`` bins linear in the term (monotone); whole bins join
the tail while the running sum stays within budget, and the bin holding the cut is
sorted and added one term at a time.  A cut outside the thresholds, or between two
that hold too many keys, gets 8 new thresholds where it must lie (up to
``STEER_ROUNDS`` passes).

Full kernel (short, long or shifted rows, and the steered pass's leftovers):

1. One pass: row maximum :math:`m`, valid keys, NaN / ``+inf`` (such rows are skipped;
   the caller raises).
2. One pass: each key's term :math:`\hat e_i` (below), added to a float64 mass and a
   count per *bin* of the distance :math:`d_i = \mathrm{fl}(m - s_i)`: bin
   :math:`b = \lfloor 8 d_i \rfloor` (1/8 nat wide) for :math:`d_i < D`, one overflow
   bin for :math:`d_i \ge D`, and a *raised* class for the keys whose exponent is below
   ``FLOOR`` = -700 (masked keys included).  :math:`D = N_0/8` with
   :math:`N_0 = \lceil 8(\log n - \log\varepsilon + 2)\rceil` bins (at least 64, at most
   ``MAX_BINS``): keys past :math:`D` weigh at most :math:`n e^{-D} \hat Z \le
   e^{-2}\varepsilon \hat Z` together, so the cut never lies there in practice (it is
   handled anyway).  :math:`\hat Z` is the float64 sum of the class masses.
3. If :math:`\hat Z \notin [e^{-650}/\varepsilon, e^{700}]`, pass 2 is redone with the
   shifted terms (``c = m - shift``) of :mod:`certattn.topk`.
4. The budget and the acceptance test are those of :func:`certattn.topk._certify_rows`,
   verbatim: :math:`z_{lo} = \hat Z(1-\gamma) - \alpha`, accept a tail :math:`\hat T`
   iff :math:`\hat T(1+\gamma) + \alpha \le \varepsilon z_{lo}`.
5. Walk from the bottom (raised class, overflow bin, bins :math:`N_0-1, \dots, 0`):
   a whole class joins the tail while the running float64 sum stays within budget; the
   first one that does not fit is *resolved*: its keys are gathered (one pass over the
   row, at most ``CAP`` of them), sorted and added smallest first until one does not
   fit.  A larger bin is split into ``SUB_BINS`` sub-bins (one more pass) and the walk
   descends into it, up to ``MAX_LEVELS`` levels; a bin whose keys all have the same
   distance is added in row order (its terms are equal up to rounding).

The bins are monotone in the logit (``fl`` is monotone, and :math:`\lfloor 8 d\rfloor`
is exact), so every class is a contiguous range of the sorted row and the tail is the
:math:`t` smallest logits, as in the other kernels; ties go anywhere (the tail depends on
the multiset only).  The histogram only *steers*: the certified :math:`\hat T` is a
float64 sum of exactly the terms of the tail keys, accumulated in some order.

Error analysis (covered by the margin of :mod:`certattn.topk`)
--------------------------------------------------------------
* **Terms.**  Mode "NumPy terms" (rows up to ``STREAM_KEYS`` keys, the ordinary case):
  :math:`\hat e_i` is NumPy's float64 ``exp`` of :math:`\max(s_i, -700)`, the very
  values of the NumPy path (computed per block of rows in a small per-thread buffer).
  Longer rows, and the shifted terms of step 3, use numba's ``math.exp`` (the C
  library's float64 ``exp``; glibc's is within 1 ulp, and we assume only what the error
  model of :mod:`certattn.topk` already assumes of NumPy's: within 4 ulps, i.e. a
  relative :math:`8u`, inside :math:`\gamma_e = 2100u`) on the same exponents
  :math:`s_i` or :math:`(s_i - m) + \text{shift}` (the rounding of the two operations
  is the part of :math:`\gamma_e` derived in :mod:`certattn.topk`).  Raised terms
  over-estimate by at most :math:`e^{-699}` each, as there.
* **Sums.**  :math:`\hat Z` (class masses, each a sequential sum, then summed) and
  :math:`\hat T` (class masses, then single terms) are float64 sums of :math:`m \le n`
  non-negative terms in *some* order; the bound :math:`1.01\,m u` of
  :mod:`certattn.topk` holds for every order and parenthesisation (Higham, Lemma 3.1:
  the error is at most :math:`\gamma_{h}\sum|x_i|` for a summation tree of height
  :math:`h \le m - 1`).  The steered pass's :math:`\hat Z` is NumPy's row sum
  (pairwise), and its sums below the thresholds are split over SIMD lanes: the loop
  that forms them is compiled with ``fastmath={"reassoc"}`` and nothing else (no
  ``nnan``/``ninf``/``contract``), which licenses exactly a change of summation order.
* **Thresholds and bin edges** never enter a certified value: a key sent to the
  wrong bin by rounding of :math:`m - s_i` is still in a contiguous class
  (monotonicity; thresholds compare the logits themselves), and any set of
  :math:`t` keys gives a sound bound anyway (its exact mass is at least that of the
  :math:`t` smallest).  Minimality needs the set to be the :math:`t` smallest up to
  ties, which monotonicity gives.
* **Acceptance.**  Same test, same :math:`\gamma = 2(n + 4096)u + 2100u` and
  :math:`\alpha` (per row: :math:`n e^{-699}` if the row has raised terms or is shifted,
  else :math:`n 2^{-1073}`; the NumPy path decides per chunk, which only ever enlarges
  :math:`\alpha`; likewise the NumPy path shifts a whole chunk when one of its rows
  needs it, this kernel only that row), so the soundness and margin statements of
  :mod:`certattn.topk` (TV-TAIL, TV-KL) hold for this kernel unchanged.

Memory and threads
------------------
Per worker thread and chunk: the bins (``MAX_LEVELS`` x ``max(N_0 + 1, SUB_BINS)``
counts and masses, ``MAX_LEVELS`` x ``SUB_BINS`` distance ranges: 64 KiB for
:math:`\varepsilon = 0.01`, under 1 MiB for any eps), at most ``max(CAP, n/32)`` gathered
terms, and for rows up to ``STREAM_KEYS`` keys a float64 term buffer of at most
``BLOCK_KEYS`` keys (1 MiB, NumPy's, kept per thread).  Longer rows are streamed
(``math.exp`` in the kernel, no term buffer): no scratch grows with the row length
(tracemalloc: 71 KiB for a 2^24-key float32 row, against 159 MiB on the NumPy path).
Half precision is widened to float32 per chunk first (4 bytes a key, as on the NumPy
path), and a non-contiguous chunk is copied once.  Chunks run on the NumPy path's worker
pool (``CERTATTN_NUM_THREADS``); the kernels release the GIL (``nogil=True``), so chunks
run in parallel with no second thread pool or numba threading layer to configure
(numba's ``prange`` was not benchmarked against it).

Compilation cache
-----------------
Kernels compile once per dtype (an explicit float32 or float64 signature, made at the
first use of that dtype; the first-ever compile takes 10-30 s) and are cached on disk by
numba (``cache=True``): next to this file in ``__pycache__``, or, where that is
read-only, in numba's user-wide cache directory; ``NUMBA_CACHE_DIR`` overrides both.  A
fresh process then loads the kernel it needs from disk (numba's import and the load:
about a second on a busy 2-core machine).  Where numba finds no writable cache directory
at all, the kernels are compiled in memory in each process instead of failing (that
fallback is not exercised by the tests); ``CERTATTN_NUMBA_CACHE=0`` turns the disk cache
off.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ._fp import EXP_ABS_ERR
from ._fp import EXP_FLOOR as FLOOR  # exponents below are raised to it (masked keys too)

CAP = 512  # most keys of one bin gathered and sorted
SUB_BINS = 256  # sub-bins when a bin is split
MAX_LEVELS = 8  # levels of splitting (the last resolves by sorting, whatever the size)
MAX_BINS = 8192  # bins of the first level (1/8 nat each)
BLOCK_KEYS = 1 << 17  # keys per block of NumPy terms (1 MiB of float64)
STREAM_KEYS = BLOCK_KEYS  # longer rows compute their terms in the kernel (no row buffer)
STEER_SAMPLE = 128  # keys sampled per row to steer the vectorised pass
STEER_MIN_KEYS = 1024  # shorter rows go straight to the histogram kernel
STEER = True  # try the steered pass (tests turn it off to reach the full kernel)
CACHE = os.environ.get("CERTATTN_NUMBA_CACHE", "1") != "0"

_KERNELS: Any = None


def choice() -> str:
    """The path ``CERTATTN_KERNEL`` asks for: ``"auto"``, ``"numba"`` or ``"numpy"``."""
    want = os.environ.get("CERTATTN_KERNEL", "auto").strip().lower() or "auto"
    if want not in ("auto", "numba", "numpy"):
        raise ValueError(f"CERTATTN_KERNEL must be auto, numba or numpy, got {want!r}")
    return want


def kernels() -> Any:
    """The compiled kernels module, or None if numba is not installed."""
    global _KERNELS, CACHE
    if _KERNELS is None:
        try:
            import numba  # noqa: F401
        except ImportError:
            return None
        try:
            from . import _topk_numba_kernels as mod
        except RuntimeError as err:  # numba: "cannot cache ... no locator available"
            if "cache" not in str(err):
                raise
            CACHE = False  # no writable cache directory: compile in memory
            from . import _topk_numba_kernels as mod
        _KERNELS = mod
    return _KERNELS


AUTO_KEYS = 1 << 24  # `auto` takes the compiled path from this many keys per call


def chunk_function(rows: int | None = None, n: int | None = None) -> Any:
    """The per-chunk function of the compiled path, or None for the NumPy path.

    With ``CERTATTN_KERNEL=auto`` and the call's size given, small calls stay on NumPy:
    importing numba and loading its cached kernels costs about a second per process (and
    the first compile on a machine 10-30 s), against a 1.2-1.9x speed-up measured here.
    """
    want = choice()
    if want == "numpy":
        return None
    if want == "auto" and rows is not None and n is not None:
        if rows * n < AUTO_KEYS and n <= STREAM_KEYS:
            return None
    if kernels() is None:
        if want == "numba":
            raise ImportError(
                'CERTATTN_KERNEL=numba but numba is not installed: pip install "certattn[fast]"'
            )
        return None
    return certify_chunk


def first_bins(n: int, eps: float) -> int:
    """Bins of the first level: :math:`\\lceil 8(\\log n - \\log\\varepsilon + 2)\\rceil`."""
    if eps <= 0.0:
        return 64
    want = math.ceil(8.0 * (math.log(max(n, 1)) - math.log(eps) + 2.0))
    return int(min(MAX_BINS, max(64, want)))


def certify_chunk(
    chunk: np.ndarray, eps: float, gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(k, tail_pre, n_valid, top)`` of a float32 or float64 ``(rows, n)`` chunk, as
    the per-chunk function of :func:`certattn.topk._certify_rows` returns them."""
    from . import _topk_numpy as npk

    x = np.ascontiguousarray(chunk)
    block = kernels().certify_block(x.dtype)
    r, n = x.shape
    k = np.empty(r, dtype=np.int64)
    tail = np.empty(r, dtype=np.float64)
    n_valid = np.empty(r, dtype=np.int64)
    top = np.empty(r, dtype=np.float64)
    if eps > 0.0:
        z_min, z_max = math.exp(-650.0) / eps, math.exp(700.0)
        shift = max(0.0, -math.log(eps) - 600.0)
    else:
        z_min = z_max = shift = 0.0
    args = (eps, gamma, z_min, z_max, shift, n * math.exp(FLOOR + 1.0), n * EXP_ABS_ERR,
            first_bins(n, eps))
    if n > STREAM_KEYS or eps == 0.0:
        block(x, np.empty((1, 0)), top, top, False, False, *args, k, tail, n_valid, top)
        return k, tail, n_valid, top
    step = max(1, BLOCK_KEYS // n)
    zs = np.empty(step)
    for i in range(0, r, step):
        j = min(r, i + step)
        xb = x[i:j]
        np.max(xb, axis=1, out=top[i:j])  # NaN propagates: the kernel skips such rows
        lowest = float(xb.min())
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: shifted terms
            e = npk.terms(xb, None if lowest >= FLOOR else FLOOR)
            z = np.sum(e, axis=1, out=zs[: j - i])
        block(xb, e, top[i:j], z, True, STEER, *args, k[i:j], tail[i:j], n_valid[i:j],
              top[i:j])
    return k, tail, n_valid, top
