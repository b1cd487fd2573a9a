"""The compiled (numba) path of certify_topk: sound and minimal against exact arithmetic,
the same k as the NumPy path, bounded memory on long rows, and the path switch.

Every kernel branch is reached on purpose: the fused pass and its settling (ordinary
rows, from any prediction), the polynomial exp against mpmath, the full histogram kernel
on the fused terms (``STEER`` off), tiled rows settled tile by tile (``STREAM_KEYS`` and
``TILE_KEYS`` lowered), the streamed kernel with numba's own ``exp`` (the same, ``STEER``
off), its shifted terms (huge logits, tiny eps), zooming into
a crowded bin, bins of equal keys, and a cut in the overflow bin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import given

import certattn

from .test_topk import DTYPE_CASES, EPS, _check_contract, _long_rows, dtype_case, logit_rows

numba = pytest.importorskip("numba")

import certattn._topk_numba as nbk  # noqa: E402


def _certify(x, eps, kernel, **kw):
    old = os.environ.get("CERTATTN_KERNEL")
    os.environ["CERTATTN_KERNEL"] = kernel
    try:
        return certattn.certify_topk(x, eps, **kw)
    finally:
        if old is None:
            del os.environ["CERTATTN_KERNEL"]
        else:
            os.environ["CERTATTN_KERNEL"] = old


# Which kernel branch runs: (STEER, STREAM_KEYS, TILE_KEYS)
MODES = {
    "fused": (True, nbk.STREAM_KEYS, nbk.TILE_KEYS),  # a row of terms, settled
    "full": (False, nbk.STREAM_KEYS, nbk.TILE_KEYS),  # the full kernel on that row
    "tiled": (True, 0, 64),  # every row longer than 64 keys tiled, settled tile by tile
    "streamed": (False, 0, 64),  # the full kernel streaming (math.exp), no row buffer
}


@pytest.fixture(params=list(MODES))
def mode(request, monkeypatch):
    steer, stream, tile = MODES[request.param]
    monkeypatch.setattr(nbk, "STEER", steer)
    monkeypatch.setattr(nbk, "STREAM_KEYS", stream)
    monkeypatch.setattr(nbk, "TILE_KEYS", tile)
    return request.param


def _agree_and_exact(x, eps, **kw):
    """Both paths: the contract against mpmath per row, and the same k."""
    a = _certify(x, eps, "numba", **kw)
    b = _certify(x, eps, "numpy", **kw)
    np.testing.assert_array_equal(np.asarray(a.k), np.asarray(b.k))
    np.testing.assert_array_equal(np.asarray(a.n_valid), np.asarray(b.n_valid))
    ta, tb = np.asarray(a.tail_upper), np.asarray(b.tail_upper)
    np.testing.assert_allclose(ta, tb, rtol=1e-12, atol=1e-300)
    rows = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
    ks, tails = np.asarray(a.k).ravel(), ta.ravel()
    masked = np.asarray(a.masked).ravel()
    for i in range(rows.shape[0]):
        if not masked[i]:
            _check_contract(rows[i].astype(np.float64), eps, int(ks[i]), float(tails[i]))
    return a


@given(row=logit_rows(), eps=EPS)
def test_sound_minimal_and_equal_to_numpy_on_short_rows(row, eps):
    _agree_and_exact(row, eps)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [1e-12, 1e-4, 0.01, 0.2, 0.999999])
def test_long_rows_against_exact_arithmetic(mode, seed, eps):
    _agree_and_exact(_long_rows(seed), eps)


@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_every_dtype_against_exact_arithmetic(mode, dtype):
    x, eps = dtype_case(dtype)
    _agree_and_exact(x, eps)


@pytest.mark.parametrize("fill", [-np.inf, -1e4, -720.0])
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_causal_rows_against_exact_arithmetic(mode, fill, eps):
    rng = np.random.default_rng(5)
    n = 2048
    x = rng.normal(0, 3, (6, n)).astype(np.float32)
    for i, valid in enumerate([1, 3, 17, 600, 1500, n - 1]):
        x[i, valid:] = fill
    cert = _agree_and_exact(x, eps)
    np.testing.assert_array_equal(cert.n_valid, np.isfinite(x).sum(axis=1))


@pytest.mark.parametrize("eps", [1e-9, 1e-3, 0.01, 0.0625, 0.3, 0.5])
def test_keys_on_bin_edges_and_ties(mode, eps):
    """Distances that are exact multiples of 1/8 nat (every key on a bin edge), in runs
    of ties, so the cut falls on a bin edge for some eps."""
    n = 2048
    grid = -(np.arange(n) % 97) / 8.0  # 97 distinct values, each tied about 21 times
    rows = np.stack([grid, np.sort(grid), grid + 3.0, np.where(grid < -5, -np.inf, grid)])
    _agree_and_exact(rows.astype(np.float32), eps)


@pytest.mark.parametrize("eps", [1e-300, 1e-30, 1e-3])
def test_rows_that_overflow_the_bins(mode, monkeypatch, eps):
    """Keys far past the last bin (and, with the bins cut to one, the cut itself in the
    overflow bin: the kernel zooms into it)."""
    rng = np.random.default_rng(8)
    n = 2048
    far = np.r_[rng.normal(0, 2, n // 2), rng.normal(-400, 50, n // 2)]
    rows = np.stack([far, rng.normal(0, 40, n), rng.permutation(far)])
    _agree_and_exact(rows, eps)
    monkeypatch.setattr(nbk, "first_bins", lambda n, eps: 1)
    _agree_and_exact(rows, eps)


@pytest.mark.parametrize("eps", [1e-3, 0.01, 0.3])
def test_crowded_bins_zoom_and_equal_keys(mode, eps):
    """More than CAP keys in one 1/8-nat bin: the kernel splits it (zoom levels), and a
    bin of equal keys is added in row order."""
    rng = np.random.default_rng(9)
    n = 4 * nbk.kernels().CAP + 100
    dense = rng.uniform(-0.1, 0.0, n)  # every key within 1/8 nat of the maximum
    ties = np.r_[np.full(n - 5, -2.0), [0.0, -0.5, -1.0, -1.5, -3.0]]
    fine = -rng.uniform(0, 1e-9, n) + 7.0  # distances far below a sub-bin at level 1
    _agree_and_exact(np.stack([dense, ties, fine]), eps)
    # distances a few subnormal spacings apart: windows whose width is subnormal
    tiny = -np.arange(n) * 5e-324
    _agree_and_exact(np.stack([tiny, tiny[::-1], -np.arange(n) % 3 * 5e-324]), eps)


@pytest.mark.parametrize(
    ("row", "eps"),
    [
        (np.array([3e38, -3e38, 0.0, 3e38], dtype=np.float32), 0.01),
        (np.array([-1.7e308, -1.6e308, -np.inf]), 0.4),
        (np.array([0.0, -1.0, -2.0, -700.5, -800.0]), 5e-324),
        (np.array([0.0, -1.0, -2.0, -np.inf]), 0.0),
        (np.array([0.0, 0.0, 0.0]), 2.0 / 3.0),
    ],
)
def test_extreme_rows_against_exact_arithmetic(mode, row, eps):
    _agree_and_exact(np.tile(row, (3, 1)), eps)


@pytest.mark.parametrize("eps", [0.2, 1e-300])
def test_float64_extremes_against_exact_arithmetic(mode, eps):
    """Logits of +-1.7e308: s - max overflows to -inf (weight 0 either way)."""
    x = np.tile(np.array([1.7e308, -1.7e308, 0.0, 1.6e308, 1.7e308]), (2, 1))
    cert = _certify(x, eps, "numba")
    for i in range(2):
        _check_contract(x[i], eps, int(cert.k[i]), float(cert.tail_upper[i]))


def test_numpy_path_float64_extremes_without_warning():
    _certify(np.array([1.7e308, -1.7e308, 0.0]), 0.2, "numpy")


def test_fully_masked_rows_and_bad_input(mode):
    x = np.array([[0.0, 1.0], [-np.inf, -np.inf], [2.0, -np.inf]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"fully masked.*row 1"):
        _certify(x, 0.1, "numba")
    cert = _certify(x, 0.1, "numba", masked_rows="skip")
    assert cert.k.tolist() == [2, 0, 1]
    assert cert.masked.tolist() == [False, True, False]
    assert float(cert.tail_upper[1]) == 0.0
    with pytest.raises(ValueError, match="NaN at key 1"):
        _certify(np.array([0.0, np.nan]), 0.1, "numba")
    with pytest.raises(ValueError, match=r"\+inf in row 1 at key 0"):
        _certify(np.array([[0.0, 1.0], [np.inf, 0.0]]), 0.1, "numba")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("key", [0, 1000, 2046, 2047])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_in_long_rows_are_caught(mode, dtype, key, bad):
    """The fused pass has no row maximum: NaN must reach its sum of terms (numba's ``max``
    returns its first argument when that is NaN), ``+inf`` must make it infinite, and the
    full kernel then reports the row.  Every position of the vector loop and its tail."""
    rng = np.random.default_rng(key)
    x = rng.normal(0, 3, (3, 2048)).astype(dtype)
    x[2, key] = bad
    what = "NaN" if np.isnan(bad) else r"\+inf"
    with pytest.raises(ValueError, match=rf"{what} in row 2 at key {key}"):
        _certify(x, 0.01, "numba")
    e = np.empty(2048)
    z, _ = nbk.kernels()._terms_pass(x[2], e)
    assert (np.isnan(z) if np.isnan(bad) else z == np.inf)


def test_large_batches_agree_with_numpy_path_on_every_row():
    """The benchmark's batch shape (fewer rows): k identical row by row, both sigmas."""
    rng = np.random.default_rng(0)
    for sigma in (3.0, 6.0):
        x = (rng.standard_normal((256, 4096)) * sigma).astype(np.float32)
        for eps in (1e-6, 0.01, 0.5):
            a = _certify(x, eps, "numba")
            b = _certify(x, eps, "numpy")
            np.testing.assert_array_equal(a.k, b.k)
            np.testing.assert_allclose(a.tail_upper, b.tail_upper, rtol=1e-12)


def _terms(x):
    """The fused pass's terms and sums of each row of ``x`` (float32 or float64)."""
    kern = nbk.kernels()
    e = np.empty(x.shape, dtype=np.float64)
    z = np.empty(x.shape[0])
    nr = np.empty(x.shape[0], dtype=np.int64)
    for i in range(x.shape[0]):
        z[i], nr[i] = kern._terms_pass(x[i], e[i])
    return e, z, nr


def _settle_rows(x, eps, guess):
    """``(ok, k)`` per row from the settling alone, starting from the prediction
    ``guess`` (``log(cut / B)``) on every row."""
    kern = nbk.kernels()
    n = x.shape[1]
    gamma = 2.0 * (n + 4096) * 2.0**-53 + 2100 * 2.0**-53
    e, z, nr = _terms(x)
    bufs = (*(np.empty(4) for _ in range(5)), np.empty(kern._gather_cap(n) + 9),
            np.empty(256, np.int64), np.empty(256))
    out = []
    for i in range(x.shape[0]):
        state = np.array([guess, 0.5])
        ok, k, _ = kern._settle(
            x[i], e[i], False, z[i], nr[i], eps, gamma, np.exp(-650.0) / eps, np.exp(700.0),
            n * np.exp(-699.0), n * 2.0**-1073, state, *bufs,
        )
        out.append((bool(ok), int(k)))
    return out


def test_the_settling_certifies_ordinary_rows():
    """Guard: ordinary rows are settled by the fast branch (the full kernel would agree
    as well, so only this shows that the fast branch is the one exercised)."""
    x = (np.random.default_rng(4).standard_normal((64, 4096)) * 3).astype(np.float32)
    settled = [ok for ok, _ in _settle_rows(x, 0.01, -6.0)]
    assert sum(settled) >= 60


@pytest.mark.parametrize("guess", [-40.0, -6.0, 0.0, 12.0])
def test_the_settling_search_recovers_from_any_prediction(guess):
    """A prediction far off the cut (below, at, above it) costs rounds, not soundness:
    every row is settled, with the same k whatever the prediction, equal to the NumPy
    path's (itself checked against exact arithmetic in tests/test_topk.py)."""
    rng = np.random.default_rng(9)
    n = 2048
    x = np.stack([
        rng.normal(0, 1, n), rng.normal(0, 3, n), rng.normal(0, 8, n),
        rng.standard_t(2, n) * 3, np.r_[rng.normal(0, 1, n - 3), [14.0, 13.0, 12.5]],
        np.where(rng.random(n) < 0.5, -np.inf, rng.normal(0, 2, n)),
    ])
    for eps in (1e-6, 0.01, 0.3):
        ref = _certify(x, eps, "numpy").k
        for i, (ok, k) in enumerate(_settle_rows(x, eps, guess)):
            assert ok, (guess, eps, i)  # the search converges within its rounds
            assert k == ref[i], (guess, eps, i)


def test_rows_unlike_their_predecessors():
    """Consecutive rows of different families (each prediction from the previous row is
    wrong) against exact arithmetic and the NumPy path."""
    rng = np.random.default_rng(11)
    n = 2048
    families = [
        lambda: rng.normal(0, 1, n), lambda: rng.normal(0, 8, n),
        lambda: rng.standard_t(2, n) * 4, lambda: np.r_[rng.normal(0, 1, n - 1), [30.0]],
        lambda: np.round(rng.normal(0, 2, n) * 2) / 2,
    ]
    x = np.stack([families[i % len(families)]() for i in range(15)]).astype(np.float32)
    for eps in (1e-4, 0.01, 0.2):
        _agree_and_exact(x, eps)


POLY_ARGS = [
    -700.0, -699.99, 0.0, 5e-324, -5e-324, 1e-300, 0.3465735902799726, -0.3465735902799726,
    0.34657359027997264, 1.0397207708399179, 709.0, 709.43, 709.7, 709.78,
]


def _poly_exp(a):
    kern = nbk.kernels()
    return np.array([kern._exp_poly(float(v)) for v in np.atleast_1d(a)])


def test_the_polynomial_exp_against_mpmath():
    """(The bound itself is derived in proofs/topk.py::polynomial_exp_bound.)  On the
    reduction's worst arguments (``|r|`` at ln 2 / 2 for every exponent), the
    floor, the top of the range and random ones: within ``EXP_POLY_ERR`` of the exact
    ``exp``; ``inf`` where ``exp`` overflows."""
    mpmath = pytest.importorskip("mpmath")
    from certattn._fp import EXP_POLY_ERR

    mpmath.mp.prec = 120
    rng = np.random.default_rng(0)
    k = np.arange(-1009, 1024)
    half = 0.5 * np.log(2)
    a = np.concatenate([
        k * np.log(2) + half * (1 - 1e-15), k * np.log(2) - half * (1 - 1e-15),
        rng.uniform(-700, 709.7, 3000), POLY_ARGS,
    ])
    a = a[(a >= -700.0) & (a <= 709.78)]
    got = _poly_exp(a)
    for ai, gi in zip(a, got, strict=True):
        exact = mpmath.exp(mpmath.mpf(float(ai)))
        if exact > mpmath.mpf(np.finfo(np.float64).max):
            assert gi == np.inf
            continue
        assert np.isfinite(gi), ai
        assert abs(mpmath.mpf(float(gi)) / exact - 1) <= EXP_POLY_ERR, ai
    assert _poly_exp(710.0)[0] == np.inf


def test_kernel_setting(monkeypatch):
    x = np.random.default_rng(1).normal(0, 3, (4, 300))
    monkeypatch.setenv("CERTATTN_KERNEL", "bogus")
    with pytest.raises(ValueError, match="CERTATTN_KERNEL"):
        certattn.certify_topk(x, 0.1)
    monkeypatch.setenv("CERTATTN_KERNEL", "numpy")
    assert nbk.chunk_function() is None
    monkeypatch.setenv("CERTATTN_KERNEL", "auto")
    assert nbk.chunk_function() is nbk.certify_chunk
    assert nbk.chunk_function(4, 300) is None  # small calls stay on NumPy under auto
    assert nbk.chunk_function(1 << 12, 1 << 12) is nbk.certify_chunk
    assert nbk.chunk_function(16, 4096) is nbk.certify_chunk  # AUTO_KEYS = 2^16: compiled
    assert nbk.chunk_function(15, 4096) is None
    assert nbk.chunk_function(1, nbk.STREAM_KEYS + 1) is nbk.certify_chunk  # long rows stream
    monkeypatch.setattr(nbk, "kernels", lambda: None)  # as without numba
    assert nbk.chunk_function() is None  # auto falls back to NumPy quietly
    np.testing.assert_array_equal(certattn.certify_topk(x, 0.1).k, _certify(x, 0.1, "numpy").k)
    monkeypatch.setenv("CERTATTN_KERNEL", "numba")
    with pytest.raises(ImportError, match=r"certattn\[fast\]"):
        certattn.certify_topk(x, 0.1)


def test_compiled_path_really_runs(monkeypatch):
    calls = []
    real = nbk.certify_chunk
    monkeypatch.setattr(nbk, "certify_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("CERTATTN_KERNEL", "numba")
    certattn.certify_topk(np.zeros((3, 50), dtype=np.float32), 0.1)
    assert calls
    calls.clear()
    monkeypatch.setenv("CERTATTN_KERNEL", "numpy")
    certattn.certify_topk(np.zeros((3, 50), dtype=np.float32), 0.1)
    assert not calls


def test_one_compiled_signature_per_dtype_cached_on_disk():
    kern = nbk.kernels()
    for dt in (np.float16, np.float32, np.float64):  # half precision widens to float32
        _certify(np.zeros((2, 40), dtype=dt), 0.1, "numba")
    for dt in ("float32", "float64"):
        block = kern.certify_block(dt)
        assert block is kern.certify_block(np.dtype(dt))  # made once
        assert [str(s[0].dtype) for s in block.signatures] == [dt]  # nothing else compiled
        if nbk.CACHE:  # compiled once, kept on disk (an index file in numba's cache dir)
            where = block.stats.cache_path
            assert any(
                f.startswith("_topk_numba_kernels._certify_block") and f.endswith(".nbi")
                for f in os.listdir(where)
            )


def test_long_row_memory_stays_small():
    """Peak extra memory of a 2^22-key row on the compiled path (streamed: no buffer
    grows with the row; tracemalloc sees NumPy's allocations and numba's)."""
    n = 1 << 22
    x = np.random.default_rng(3).normal(0, 3, (1, n)).astype(np.float32)
    _certify(x[:, :4096], 0.01, "numba")  # compile / load outside the measurement
    tracemalloc.start()
    try:
        cert = _certify(x, 0.01, "numba")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), f"peak extra memory {peak / 2**20:.1f} MiB for a 16 MiB row"
    assert 0 < int(cert.k[0]) < n


@pytest.mark.skipif(not nbk.CACHE, reason="numba's disk cache turned off")
def test_a_fresh_process_loads_the_kernels_from_disk():
    """After this process compiled (or loaded) the float32 kernel, a fresh one finds it
    in numba's disk cache and compiles nothing (numba's cache statistics, no timing)."""
    _certify(np.zeros((2, 8), dtype=np.float32), 0.1, "numba")
    code = (
        "import numpy as np, certattn, certattn._topk_numba as nbk\n"
        "certattn.certify_topk(np.zeros((2, 8), dtype=np.float32), 0.1)\n"
        "st = nbk.kernels().certify_block('float32').stats\n"
        "print(sum(st.cache_hits.values()), sum(st.cache_misses.values()))\n"
    )
    env = dict(os.environ, CERTATTN_KERNEL="numba")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        timeout=600,
    ).stdout.split()
    hits, misses = map(int, out)
    assert hits == 1 and misses == 0


def test_fast_math_flags_stay_apart():
    """Each compiled function allows one licence at most: ``reassoc`` (sums, order-free
    bound) or ``contract`` (the polynomial exp, whose bound counts two roundings per
    multiply-add); ``reassoc`` on the exp would undo its Cody-Waite reduction."""
    import ast
    import inspect

    src = inspect.getsource(nbk.kernels())
    flags = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                for kw in getattr(dec, "keywords", []):
                    if kw.arg == "fastmath":
                        flags.append((node.name, ast.literal_eval(kw.value)))
    assert ("_exp_poly", {"contract"}) in flags
    assert all(f in ({"reassoc"}, {"contract"}) for _, f in flags), flags
    assert {name for name, f in flags if f == {"contract"}} == {"_exp_poly"}


def test_attention_calls_choose_the_path_once_by_their_size(monkeypatch):
    """certify_scores certifies chunk by chunk; under ``auto`` the whole call's size
    decides (one path for every chunk), and k equals certify_topk on the materialised
    scores on the NumPy path."""
    rng = np.random.default_rng(6)
    q = rng.normal(size=(2, 300, 16))
    k = rng.normal(size=(2, 300, 16)) * 2
    monkeypatch.setenv("CERTATTN_KERNEL", "auto")
    monkeypatch.setattr(nbk, "AUTO_KEYS", 2 * 300 * 300)  # this call, not one chunk
    calls = []
    real = nbk.certify_chunk
    monkeypatch.setattr(nbk, "certify_chunk", lambda *a: calls.append(a[0].shape) or real(*a))
    cert = certattn.certify_scores(q, k, 0.01, causal=True, chunk_elems=300 * 50)
    assert len(calls) > 1 and all(r * n < nbk.AUTO_KEYS for r, n in calls)
    scores = np.where(np.tril(np.ones((300, 300), bool)), q @ k.swapaxes(-1, -2) / 4.0, -np.inf)
    ref = _certify(scores, 0.01, "numpy")
    np.testing.assert_array_equal(np.asarray(cert.k), ref.k)
    calls.clear()
    certattn.certify_topk(scores[0, :50], 0.01)  # one chunk's size alone: NumPy
    assert not calls


def test_verify_checks_the_compiled_path_too(monkeypatch):
    """``certattn verify --only TOPK-MINIMAL`` on NumPy runs cases on both paths."""
    from certattn.verify import run_verify

    calls = []
    real = nbk.certify_chunk
    monkeypatch.setattr(nbk, "certify_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("CERTATTN_KERNEL", "numpy")  # forced() overrides it per case
    (res,) = run_verify(2000, ids=["TOPK-MINIMAL"], progress=False)
    assert res.passed and calls


def test_dask_blocks_take_the_whole_arrays_path(monkeypatch):
    """A dask array's blocks take the path of the whole array under ``auto`` (chunking
    changes nothing): compiled for every block of an array of AUTO_KEYS keys or more,
    however small its blocks, NumPy for every block of a smaller array."""
    da = pytest.importorskip("dask.array")
    monkeypatch.setenv("CERTATTN_KERNEL", "auto")
    calls = []
    real = nbk.certify_chunk
    monkeypatch.setattr(nbk, "certify_chunk", lambda *a: calls.append(a[0].shape) or real(*a))
    x = np.random.default_rng(7).normal(0, 3, (32, 4096)).astype(np.float32)
    ref, ref_small = _certify(x, 0.01, "numba").k, _certify(x[:8], 0.01, "numpy").k
    calls.clear()
    lazy = certattn.certify_topk(da.from_array(x, chunks=(4, 4096)), 0.01)
    np.testing.assert_array_equal(lazy.k.compute(scheduler="sync"), ref)
    assert len(calls) == 8 and all(r * n < nbk.AUTO_KEYS for r, n in calls)
    calls.clear()
    small = certattn.certify_topk(da.from_array(x[:8], chunks=(4, 4096)), 0.01)
    np.testing.assert_array_equal(small.k.compute(scheduler="sync"), ref_small)
    assert not calls
