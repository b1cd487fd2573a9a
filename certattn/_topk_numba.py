r"""Compiled fast path of :func:`certattn.certify_topk` (``pip install "certattn[fast]"``).

Which path runs
---------------
``CERTATTN_KERNEL`` chooses, per call: ``auto`` (default: the compiled path when numba
imports and the call has at least ``AUTO_KEYS`` = 2^16 keys in all, or rows longer than
``STREAM_KEYS``, which the compiled path tiles in bounded memory -- else NumPy), ``numba``
(compiled; an error if numba is missing) or
``numpy`` (the NumPy path of :mod:`certattn._topk_numpy`, which stays the reference and
the fallback). Only NumPy inputs take either; ``array`` and ``triton`` choose the device
kernels (:func:`certattn._backends.device_kernel`: the sort-free array kernel, CuPy's and
torch CUDA's path, and the Triton kernel). Both paths certify the same quantity with the
same acceptance test, so ``k`` agrees exactly except where the computed tail of ``k - 1``
keys lies within rounding (about :math:`(n + 200) u` relative: the sums, and the two
paths' ``exp``) of the acceptance threshold itself, a band inside the certificate's
margin; ``tail_upper`` agrees within a relative :math:`2 n u + 400 u`. Either answer is
sound and minimal up to the margin.

The kernel (per row)
--------------------
Rows of at most ``STREAM_KEYS`` keys (the ordinary case) take the *fused* pass and are
*settled* from its terms; whatever that cannot settle goes to the *full* kernel on the
same terms.  Longer rows are *tiled*: the same passes run tile by tile
(``TILE_KEYS`` keys), each recomputing the tile's terms (the same function of the same
logits: the same terms), so no buffer grows with the row; what they cannot settle is
streamed by the full kernel with ``math.exp``.

Fused pass.  One vectorised loop over the row, the only read of the logits: each key's
term
:math:`\hat e_i = \widehat{\exp}(\min(\max(s_i, -700), 710))` by the polynomial exp
below, stored in a row buffer (``n`` float64, cache-resident), their float64 sum
:math:`\hat Z` and the number of raised keys (masked ones are counted apart, only in rows
that have raised keys).  NaN propagates into :math:`\hat Z` and ``+inf`` makes it
infinite: such rows, and rows with :math:`\hat Z \notin [e^{-650}/\varepsilon, e^{700}]`
(they need the shifted terms of :mod:`certattn.topk`), go to the full kernel, which
finds the row maximum, reports NaN / ``+inf`` (the caller raises) or shifts.

Settling.  The budget :math:`B` (step 4 below) is known exactly now, and the cut term
(the largest term of the tail) is searched in log space relative to it.  Each round puts
4 *term* thresholds, and one vectorised pass over the stored terms sums those below each;
the exact budget narrows a bracket :math:`[\ell, h)` with :math:`\hat T(\ell) \le B <
\hat T(h)`.  The first round puts them at ``centre + spread * SETTLE_OFFSETS``, where
``centre`` and ``spread`` are running means of :math:`\log(\text{cut}/B)` and of its
deviation over the rows settled so far (rows of one head are alike: for Gaussian rows
the cut varies by about 0.2 nat, on SmolLM2 heads by more), and gathers its bracket at
once.  Later rounds also count, and narrow the bracket known so far within
:math:`[B/n, \hat Z]`, where the cut term must lie (:math:`B < \hat T_{t+1} \le
(t+1)\,\text{cut}`): once both ends have positive sums, 4 thresholds close around the
point where :math:`\log \hat T` interpolated linearly in :math:`\log \tau` reaches
:math:`\log B` (``SPLIT_AROUND``), else evenly in log space (5 times narrower), until it
holds at most ``max(128, min(n/8, 512), n/32)`` keys (at most ``SETTLE_ROUNDS`` rounds;
resolving a term costs about 20 times a key of a counting pass).  The gather is one pass
(``vcompresspd`` through ``llvm.masked.compressstore``) that also counts the terms below
the bracket; the gathered terms are split into bins linear in the term (monotone), whole
bins join the tail while the running sum stays within budget, and the bin holding the
cut is sorted and added one term at a time.

Full kernel (rows that need shifted terms, rows holding NaN or ``+inf``, ``eps = 0``,
and whatever the settling leaves):

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
* **Terms, fused pass.**  Logits are exact float64 values (float32 widens exactly) and
  :math:`c = 0`: no subtraction is rounded, so a term errs only by its ``exp``.
  *The polynomial exp* (:func:`_topk_numba_kernels._exp_poly`), for
  :math:`a \in [-700, 710]`: :math:`n = \mathrm{rint}(a \log_2 e)` (by adding and
  subtracting :math:`1.5 \cdot 2^{52}`; any integer works, this one keeps
  :math:`|n| \le 1025` and :math:`|r| \le R = 0.347`);
  :math:`\hat r = \mathrm{fl}(\mathrm{fl}(a - n C_1) - \mathrm{fl}(n C_2))` with
  Cody-Waite constants :math:`C_1` (32 significant bits: :math:`n C_1` is exact) and
  :math:`C_2 = \mathrm{fl}(\log 2 - C_1)` (:math:`|\log 2 - C_1 - C_2| \le 2^{-86}`), so
  :math:`|\hat r - r| \le u|a - nC_1| + u|nC_2| + u|\hat r| + 1025 \cdot 2^{-86}
  \le 0.7u` for :math:`r = a - n\log 2`; then :math:`p(\hat r)`, the degree-11 Taylor
  polynomial of :math:`e^{\hat r}` (coefficients :math:`1/i!` rounded) by Horner, times
  :math:`2^{n-1}` (built from its bits) times 2, both exact as the result is normal
  (:math:`e^{-700} \gg 2^{-1022}`), or ``inf`` past :math:`\log f_{max}` (the row is
  then shifted).  Truncation: :math:`R^{12}/12!\, e^{R} \le 9.0\cdot 10^{-15}`
  absolute, :math:`\le 114.8u` relative to :math:`e^{r} \ge e^{-R}`.  Horner with
  rounded coefficients: :math:`\gamma_{23} \sum_i R^i/i! \le 23.001u\, e^{R}`
  absolute, :math:`\le 46.1u` relative (a fused multiply-add, which ``contract``
  allows, rounds once instead of twice: inside the bound).  With the reduction's
  :math:`0.7u`: :math:`|\hat e - e^a| \le 162u\, e^a`, stated as
  ``EXP_POLY_ERR`` :math:`= 192u` in :mod:`certattn._fp`, inside the
  :math:`\gamma_e = 2100u` that the acceptance test already grants every term (there
  it covers a rounded subtraction plus 4 ulps; here there is no subtraction).  A test
  checks the bound against mpmath on the reduction's worst arguments; the observed
  worst is about 79u.  The exp is compiled with ``contract`` only: no reassociation,
  which would undo the reduction and the rounding trick (numba sets fast-math flags
  per function, and the sums around it get ``reassoc`` only).
* **Terms, tiled rows.**  The fused pass's function, tile by tile: the same bound, and
  every pass sees the same terms (the function is deterministic), so the sums, counts
  and gathered terms of different passes are of one set of terms.
* **Terms, full kernel.**  The fused pass's terms when a row of them is kept (the same
  bound); for longer rows and the shifted terms of step 3, numba's ``math.exp``
  (the C library's float64 ``exp``; glibc's is within 1 ulp, and we assume only what the
  error model of :mod:`certattn.topk` already assumes of NumPy's: within 4 ulps, i.e. a
  relative :math:`8u`, inside :math:`\gamma_e = 2100u`) on the same exponents
  :math:`s_i` or :math:`(s_i - m) + \text{shift}` (the rounding of the two operations
  is the part of :math:`\gamma_e` derived in :mod:`certattn.topk`).  Raised terms
  over-estimate by at most :math:`e^{-699}` each, as there.
* **Sums.**  :math:`\hat Z` (class masses, each a sequential sum, then summed) and
  :math:`\hat T` (class masses, then single terms) are float64 sums of :math:`m \le n`
  non-negative terms in *some* order; the bound :math:`1.01\,m u` of
  :mod:`certattn.topk` holds for every order and parenthesisation (Higham, Lemma 3.1:
  the error is at most :math:`\gamma_{h}\sum|x_i|` for a summation tree of height
  :math:`h \le m - 1`).  The fused pass's :math:`\hat Z` and the settling's sums below
  the thresholds are split over SIMD lanes: the loops that form them are compiled with
  ``fastmath={"reassoc"}`` and nothing else (no ``nnan``/``ninf``/``contract``), which
  licenses exactly a change of summation order.
* **Thresholds and bin edges** never enter a certified value: any set of :math:`t`
  keys gives a sound bound (its exact mass is at least that of the :math:`t` smallest).
  The full kernel's bins are monotone in the logit (``fl`` is monotone, and
  :math:`\lfloor 8 d\rfloor` is exact), so its tail is the :math:`t` smallest logits up
  to ties.  The settling compares the terms themselves, so its tail is the :math:`t`
  smallest *terms*; the polynomial exp may order two keys whose exact terms differ by
  less than :math:`2 \cdot 192u` relative against their logits, and swapping such a
  pair moves the tail by less than that relative amount of one term, far inside the
  margin: minimality holds up to the margin, as stated in :mod:`certattn.topk`.
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
:math:`\varepsilon = 0.01`, under 1 MiB for any eps), at most ``max(512, n/32)`` gathered
terms, and for rows up to ``STREAM_KEYS`` keys one float64 row of terms (at most 8 MiB;
rows of 2^18 and 2^20 keys take 20-22 ms per 2^24 keys, against 42-57 ms on the NumPy
path and 220 ms streamed; at 2^22 keys a row of terms no longer fits the caches).
Longer rows keep one tile of terms (64 KiB) and at most ``TILED_GATHER`` gathered terms
(512 KiB): no scratch grows with the row length (tracemalloc: under 1 MiB for a 2^22-key
float32 row, a test; 159 MiB on the NumPy path for 2^24 keys).  Four rows of 2^22 keys:
50 / 33 ms on 1 / 2 threads against 65 / 37 ms on the NumPy path (the streamed full
kernel alone took 112 ms on 2 threads).
Half precision is widened to float32 per chunk first (4 bytes a key, as on the NumPy
path), and a non-contiguous chunk is copied once.  Chunks run on the NumPy path's worker
pool (``CERTATTN_NUM_THREADS``); the kernels release the GIL (``nogil=True``), so chunks
run in parallel with no second thread pool or numba threading layer to configure
(numba's ``prange`` was not benchmarked against it).

Compilation cache
-----------------
Kernels compile once per dtype (an explicit float32 or float64 signature, made at the
first use of that dtype; the first-ever compile takes about 6 s) and are cached on disk by
numba (``cache=True``): next to this file in ``__pycache__``, or, where that is
read-only, in numba's user-wide cache directory; ``NUMBA_CACHE_DIR`` overrides both.  A
fresh process then loads the kernel it needs from disk (numba's import and the load:
0.25 s on the idle 2-core machine, 0.4 s with certattn's import; a ``NUMBA_CACHE_DIR``
that cannot be created falls back to numba's other cache locations).  Where numba finds
no writable cache directory at all, the kernels are compiled in memory in each process
instead of failing (about 6 s a process; not exercised by the tests, which run where
``__pycache__`` is writable); ``CERTATTN_NUMBA_CACHE=0`` turns the disk cache off.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._backends import KERNELS
from ._fp import EXP_ABS_ERR
from ._fp import EXP_FLOOR as FLOOR  # exponents below are raised to it (masked keys too)

# The kernels' own constants (CAP, SUB_BINS, MAX_LEVELS, ...) live in
# _topk_numba_kernels.py: numba's disk cache is keyed on the file that defines a kernel,
# so a constant imported from here could change without recompiling (a stale kernel).
# These are read at call time, in Python, and reach the kernels as arguments.
MAX_BINS = 8192  # bins of the first level (1/8 nat each)
STREAM_KEYS = 1 << 20  # longer rows are tiled (no row of terms: 8 MiB at most)
TILE_KEYS = 1 << 13  # keys per tile of a long row (64 KiB of terms)
STEER = True  # try the settling (tests turn it off to reach the full kernel)
CACHE = os.environ.get("CERTATTN_NUMBA_CACHE", "1") != "0"

_KERNELS: Any = None


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "certattn_kernel", default=None
)


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """``var`` set to ``value`` within the block (per thread, undone on exit)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def forced(kernel: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, take path ``kernel`` (``"numba"`` or ``"numpy"``) whatever
    ``CERTATTN_KERNEL`` says (``certattn verify`` checks both paths this way)."""
    return _scoped(_FORCED, kernel)


def choice() -> str:
    """The path ``CERTATTN_KERNEL`` asks for (or :func:`forced`): ``"auto"``, ``"numba"``
    or ``"numpy"``."""
    want = _FORCED.get() or os.environ.get("CERTATTN_KERNEL", "auto").strip().lower() or "auto"
    if want not in KERNELS:
        raise ValueError(f"CERTATTN_KERNEL must be {', '.join(KERNELS)}, got {want!r}")
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


AUTO_KEYS = 1 << 16
"""``auto`` takes the compiled path (numba installed) from this many keys per call: a
(16, 4096) batch.  Once loaded, the compiled path is faster at every size (3.3-3.8x from
256 keys to 2^18, 4-5x above); what a process pays once is the load (importing numba
and its disk-cached kernel, about 0.4 s).  Below 2^16 keys a call costs under 0.5 ms on
either path and saves at most 0.35 ms, so over a thousand such calls would be needed to
repay the load, and they stay on NumPy; from 2^16 up the compiled path serves every call
(``benchmarks/certify_speed.py --break-even`` measures both)."""


_CALL_KEYS: contextvars.ContextVar[int] = contextvars.ContextVar("certattn_keys", default=0)


def call_size(keys: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``auto`` decides by ``keys`` (the whole call's scores) when that
    is larger than a chunk: an attention-level call that certifies its scores chunk by
    chunk takes one path for all of them, decided by the call alone."""
    return _scoped(_CALL_KEYS, int(keys))


def chunk_function(rows: int | None = None, n: int | None = None) -> Any:
    """The per-chunk function of the compiled path, or None for the NumPy path.

    With ``CERTATTN_KERNEL=auto`` and the call's size given, calls of fewer than
    :data:`AUTO_KEYS` keys (with rows of at most ``STREAM_KEYS``) stay on NumPy: importing
    numba and loading a cached kernel costs about 0.4 s once per process (the first
    compile on a machine about 6 s), against 3-5x faster certification once loaded.  The
    choice depends on the installation and on the call's size only (an attention-level
    call's, within :func:`call_size`; a dask array's, whatever its chunks), never on what
    the process did before, so a row's certificate is reproducible bit for bit.
    """
    want = choice()
    if want in ("numpy", "array", "triton"):  # array, triton: certattn._backends.device_kernel
        return None
    if want == "auto" and rows is not None and n is not None:
        if max(rows * n, _CALL_KEYS.get()) < AUTO_KEYS and n <= STREAM_KEYS:
            return None
    if kernels() is None:
        if want == "numba":
            raise ImportError(
                'CERTATTN_KERNEL=numba but numba is not installed: pip install "certattn[fast]"'
            )
        return None
    return certify_chunk


def _kernel_constants() -> dict[str, float]:
    """The numeric module-level constants of ``_topk_numba_kernels.py`` (``LN2_HI``,
    ``CAP``, ...), read from its source without importing numba: for the proofs and the
    tests of the error analysis."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).with_name("_topk_numba_kernels.py").read_text())
    out: dict[str, float] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    out[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return out


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
    tile = 0 if eps == 0.0 else n if n <= STREAM_KEYS else TILE_KEYS
    block(x, tile, STEER, *args, k, tail, n_valid, top)
    return k, tail, n_valid, top
