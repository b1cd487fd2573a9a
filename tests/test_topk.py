"""certify_topk / certify_topp: sound, minimal, invariant; on every backend.

The contract (issue "Certified Top-k core"): for the exact softmax of the given logits,
k is never below the exact minimal k_eps, and exceeds it only when the exact tail of
k - 1 keys lies within a relative 1e-6 of eps; tail_mass is a sound upper bound on the
exact tail of the kept set and never exceeds eps.
"""

from __future__ import annotations

import os

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import certattn
from certattn._array import device_of, to_numpy
from certattn._topk_generic import cut_sorted as _cut_sorted
from certattn.topk import _certify_rows

from ._exact import exact_min_k, exact_tail_of_set, exact_tails

DTYPES = [np.float16, np.float32, np.float64]


@st.composite
def logit_rows(draw, max_n: int = 40, dtypes=DTYPES):
    """Rows with ties, -inf masks, extreme ranges, in float16/32/64."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["grid", "wide", "extreme", "gauss"]))
    if kind == "grid":  # many ties
        vals = draw(st.lists(st.integers(-40, 40), min_size=n, max_size=n))
        row = np.array(vals, dtype=np.float64) / 4
    elif kind == "wide":
        row = np.array(
            draw(st.lists(st.floats(-60, 60, allow_nan=False), min_size=n, max_size=n))
        )
    elif kind == "extreme":
        big = float(np.finfo(dtype).max) / 2
        choices = st.sampled_from([-big, -1e4, -700.0, -40.0, 0.0, 1.0, 30.0, 1e4, big])
        row = np.array(draw(st.lists(choices, min_size=n, max_size=n)))
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        sigma = draw(st.sampled_from([0.1, 1.0, 3.0, 8.0]))
        row = np.random.default_rng(seed).normal(0, sigma, n)
    finfo = np.finfo(dtype)
    row = np.clip(row, -float(finfo.max), float(finfo.max)).astype(dtype)
    mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if mask.all():
        mask[draw(st.integers(0, n - 1))] = False
    row[mask & (draw(st.floats(0, 1)) < 0.5)] = -np.inf
    assume(np.isfinite(row).any())
    return row


EPS = st.one_of(
    st.sampled_from([0.0, 1e-300, 1e-12, 1e-3, 0.01, 0.1, 0.5, 0.999999]),
    st.floats(0, 0.999, exclude_max=True),
)


def _check_contract(row: np.ndarray, eps: float, k: int, tail_bound: float) -> None:
    tails = exact_tails(row)
    k_exact = next(j for j, t in enumerate(tails) if t <= mpmath.mpf(eps))
    assert k >= k_exact, f"unsound: k={k} < exact k_eps={k_exact}"
    if k > k_exact:
        assert tails[k - 1] >= mpmath.mpf(eps) * (1 - mpmath.mpf("1e-6")), "not minimal"
    assert tail_bound <= eps
    assert mpmath.mpf(tail_bound) >= tails[k], "tail_mass below the exact tail"


@given(row=logit_rows(), eps=EPS)
def test_sound_and_minimal_against_exact_arithmetic(row, eps):
    cert = certattn.certify_topk(row, eps)
    _check_contract(row, eps, int(cert.k), float(cert.tail_upper))
    assert int(cert.n_valid) == int(np.isfinite(row).sum())


@given(rows=st.lists(logit_rows(max_n=24, dtypes=[np.float64]), min_size=1, max_size=6), eps=EPS)
def test_fast_and_generic_kernels_agree_and_are_sound(rows, eps):
    """The NumPy bracket kernel and the generic sort kernel both satisfy the contract."""
    assume(eps > 0)
    n = max(len(r) for r in rows)
    batch = np.full((len(rows), n), -np.inf)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
    import array_api_compat.numpy as xnp

    import certattn._topk_numpy as npk

    valid = np.isfinite(batch).sum(axis=1)
    saved = npk.cut_bracket
    saved_kernel = os.environ.get("CERTATTN_KERNEL")
    for kernel in ("bracket", "sorted"):
        os.environ["CERTATTN_KERNEL"] = "numpy"  # the NumPy kernels (numba: test_topk_numba)
        try:
            if kernel == "sorted":
                npk.cut_bracket = lambda x, e, c, b: _cut_sorted(e, b, xnp)
            k, tail, n_valid, _ = _certify_rows(batch, eps, xp=xnp, progress=None)
            np.testing.assert_array_equal(n_valid, valid)
        finally:
            npk.cut_bracket = saved
            if saved_kernel is None:
                os.environ.pop("CERTATTN_KERNEL", None)
            else:
                os.environ["CERTATTN_KERNEL"] = saved_kernel
        for i, r in enumerate(rows):
            _check_contract(r, eps, int(k[i]), float(tail[i]))


@given(row=logit_rows(dtypes=[np.float64]), e1=EPS, e2=EPS)
def test_monotone_in_eps(row, e1, e2):
    lo, hi = sorted((e1, e2))
    assert certattn.certify_topk(row, lo).k >= certattn.certify_topk(row, hi).k


@given(row=logit_rows(), eps=EPS, seed=st.integers(0, 2**32 - 1))
def test_invariant_to_permuting_keys(row, eps, seed):
    perm = np.random.default_rng(seed).permutation(row.size)
    a = certattn.certify_topk(row, eps)
    b = certattn.certify_topk(row[perm], eps)
    assert int(a.k) == int(b.k)


@given(
    vals=st.lists(st.integers(-200, 200), min_size=1, max_size=40),
    shift=st.integers(-50, 50),
    eps=EPS,
)
def test_invariant_to_exact_constant_shift(vals, shift, eps):
    """Logits on a 1/8 grid shifted by an integer: the shift is exact in float64."""
    row = np.array(vals, dtype=np.float64) / 8
    a = certattn.certify_topk(row, eps)
    b = certattn.certify_topk(row + shift, eps)
    assert int(a.k) == int(b.k)


@given(row=logit_rows(), eps=EPS)
def test_kept_set_is_topk_and_its_exact_tail_is_certified(row, eps):
    cert = certattn.certify_topk(row, eps)
    kept = np.asarray(cert.kept_mask())
    assert kept.sum() == int(cert.k)
    assert not kept[row == -np.inf].any()
    if kept.any() and (~kept & np.isfinite(row)).any():
        assert row[kept].min() >= row[~kept & np.isfinite(row)].max()
    assert exact_tail_of_set(row, kept) <= mpmath.mpf(float(cert.tail_upper))
    idx = np.asarray(cert.kept_indices())
    assert sorted(idx[idx >= 0].tolist()) == sorted(np.flatnonzero(kept).tolist())


def test_topp_is_topk_with_eps_one_minus_p():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (5, 50))
    a = certattn.certify_topp(x, 0.9)
    b = certattn.certify_topk(x, 1 - 0.9)
    np.testing.assert_array_equal(a.k, b.k)
    with pytest.raises(ValueError, match="p must be"):
        certattn.certify_topp(x, 0.0)


def test_eps_zero_keeps_every_valid_key():
    row = np.array([0.0, -np.inf, -1000.0, 3.0])
    cert = certattn.certify_topk(row, 0.0)
    assert int(cert.k) == 3 and float(cert.tail_upper) == 0.0


def test_float32_cumsum_pitfall_long_near_uniform_rows():
    """Rows where float32 cumsum never reaches 1 - eps (THEORY section 7)."""
    rng = np.random.default_rng(7)
    x = (rng.normal(0, 0.05, (4, 4096))).astype(np.float32)
    eps = 1e-4
    cert = certattn.certify_topk(x, eps)
    for i in range(2):
        _check_contract(x[i], eps, int(cert.k[i]), float(cert.tail_upper[i]))
    assert (cert.k > 4000).all()


def test_tiny_eps_on_long_rows_is_minimal():
    rng = np.random.default_rng(3)
    row = rng.normal(0, 30, 300)
    for eps in (1e-300, 1e-200, 1e-30):
        cert = certattn.certify_topk(row, eps)
        _check_contract(row, eps, int(cert.k), float(cert.tail_upper))


def test_batched_axis_and_shape():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, (3, 7, 4))  # keys on axis 1
    cert = certattn.certify_topk(x, 0.05, axis=1)
    assert cert.k.shape == (3, 4)
    ref = certattn.certify_topk(np.moveaxis(x, 1, -1), 0.05)
    np.testing.assert_array_equal(cert.k, ref.k)
    assert cert.kept_mask().shape == x.shape
    assert (cert.kept_mask().sum(axis=1) == cert.k).all()


def test_masked_rows_policy():
    x = np.array([[0.0, 1.0], [-np.inf, -np.inf], [2.0, -np.inf]])
    with pytest.raises(ValueError, match=r"fully masked.*row 1"):
        certattn.certify_topk(x, 0.1)
    cert = certattn.certify_topk(x, 0.1, masked_rows="skip")
    assert cert.k.tolist() == [2, 0, 1]
    assert cert.masked.tolist() == [False, True, False]
    assert float(cert.tail_upper[1]) == 0.0


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.array([0.0, np.nan]), "NaN at key 1"),
        (np.array([[0.0, 1.0], [np.inf, 0.0]]), r"\+inf in row 1 at key 0"),
        (np.zeros((2, 0)), "empty key axis"),
        (np.array([1, 2, 3]), "floating-point"),
        (np.array(["a", "b"]), "floating-point|array of numbers"),
    ],
)
def test_bad_logits_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        certattn.certify_topk(bad, 0.1)


@pytest.mark.parametrize("eps", [-0.1, 1.0, 2.0, float("nan"), "x", None, True])
def test_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps"):
        certattn.certify_topk(np.zeros(3), eps)


def test_bfloat16_input_is_sound():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (3, 64)).astype(ml_dtypes.bfloat16)
    cert = certattn.certify_topk(x, 0.01)
    for i in range(3):
        row = x[i].astype(np.float64)
        _check_contract(row, 0.01, int(cert.k[i]), float(cert.tail_upper[i]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backends_agree_and_stay_on_device(backend, dtype):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 3, (4, 6, 33)).astype(dtype)
    x[0, 0, :5] = -np.inf
    xb = backend.asarray(x)
    cert = certattn.certify_topk(xb, 0.02)
    ref = certattn.certify_topk(x, 0.02)
    for field in ("k", "tail_upper", "kl_upper", "n_valid", "masked"):
        arr = getattr(cert, field)
        assert device_of(arr) == device_of(xb), field
        assert type(arr) is type(xb) or backend.name == "numpy"
    np.testing.assert_array_equal(to_numpy(cert.k), ref.k)
    np.testing.assert_allclose(to_numpy(cert.tail_upper), ref.tail_upper, rtol=1e-9)
    kept = cert.kept_mask()
    assert device_of(kept) == device_of(xb)
    np.testing.assert_array_equal(to_numpy(kept), ref.kept_mask())
    np.testing.assert_array_equal(to_numpy(cert.kept_indices()), ref.kept_indices())


@pytest.mark.parametrize("case", ["huge", "tiny-eps"])
def test_backends_agree_on_the_shifted_path(backend, case):
    """Row sums out of range send every namespace through the shifted (c = max) terms."""
    rng = np.random.default_rng(12)
    x = rng.normal(0, 3, (3, 40))
    x[1, 30:] = -np.inf
    eps = 0.05
    if case == "huge":
        x = x + 1e4
    else:
        eps = 1e-290
    cert = certattn.certify_topk(backend.asarray(x), eps)
    assert device_of(cert.k) == device_of(backend.asarray(x))
    ref = certattn.certify_topk(x, eps)
    np.testing.assert_array_equal(to_numpy(cert.k), ref.k)
    for i in range(x.shape[0]):
        _check_contract(x[i], eps, int(to_numpy(cert.k)[i]), float(to_numpy(cert.tail_upper)[i]))


def test_real_attention_rows_are_certified_exactly():
    """Rows of real MiniLM attention (the shipped sample) against exact arithmetic."""
    from certattn.models import load_sample

    att = load_sample()[0]
    logits = np.asarray(att.logits, dtype=np.float32)
    rows = logits.reshape(-1, logits.shape[-1])[::97][:12]
    for eps in (1e-3, 1e-2, 0.1):
        cert = certattn.certify_topk(rows, eps)
        for i in range(rows.shape[0]):
            _check_contract(rows[i], eps, int(cert.k[i]), float(cert.tail_upper[i]))


def test_exact_min_k_reference_itself():
    """Sanity of the reference: two equal keys, eps just below and above 1/2."""
    assert exact_min_k([0.0, 0.0], 0.5) == 1
    assert exact_min_k([0.0, 0.0], 0.4999) == 2


@pytest.fixture
def numpy_kernel(monkeypatch):
    """Pin the NumPy path (the compiled one, when numba is installed, is the default and
    has its own tests in test_topk_numba.py)."""
    monkeypatch.setenv("CERTATTN_KERNEL", "numpy")


def _long_rows(seed: int) -> np.ndarray:
    """Rows long enough for the NumPy bracket kernel, of every shape that can fool it."""
    import certattn._topk_numpy as npk

    rng = np.random.default_rng(seed)
    n = 4 * npk.SAMPLE  # long enough for the sampled bracket (stride 4)
    rows = [
        rng.normal(0, 1, n),
        rng.normal(0, 3, n),
        rng.normal(0, 8, n),
        np.round(rng.normal(0, 2, n) * 2) / 2,  # heavy ties on a grid
        np.r_[rng.normal(0, 1, n - 3), [14.0, 13.0, 12.5]],  # a few dominant keys
        np.where(rng.random(n) < 0.5, -np.inf, rng.normal(0, 2, n)),  # half masked
        np.r_[np.full(n - 1, -5.0), 0.0],  # one key and a flat floor
        rng.standard_cauchy(n),  # heavy tails
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [1e-12, 1e-4, 0.01, 0.2, 0.999999])
def test_bracket_kernel_on_long_rows_against_exact_arithmetic(numpy_kernel, seed, eps):
    x = _long_rows(seed)
    cert = certattn.certify_topk(x, eps)
    for i in range(x.shape[0]):
        _check_contract(x[i], eps, int(cert.k[i]), float(cert.tail_upper[i]))


DTYPE_CASES = ["float16", "bfloat16", "float64-huge", "float64-tiny-eps", "float32-ragged-n"]


def dtype_case(dtype: str) -> tuple[np.ndarray, float]:
    """Long rows in another dtype, and their eps: huge offsets take the shifted (c = max)
    path, a tiny eps lifts the terms clear of underflow, and a key axis that is not a
    multiple of 8 leaves padding in packed bits."""
    x = _long_rows(2).astype(np.float64)
    eps = 0.01
    if dtype == "float32-ragged-n":
        x = np.concatenate([x, x[:, :13] - 0.5], axis=1).astype(np.float32)
    elif dtype == "float16":
        x = np.clip(x, -6e4, 6e4).astype(np.float16)
    elif dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        x = x.astype(ml_dtypes.bfloat16)
    elif dtype == "float64-huge":
        x = x + 1e4  # every row sum overflows exp: c = row max
    else:
        eps = 1e-290  # below e^-600: terms are lifted clear of underflow
    return x, eps


@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_bracket_kernel_in_every_dtype_against_exact_arithmetic(numpy_kernel, dtype):
    """Long rows in the other dtypes (:func:`dtype_case`)."""
    x, eps = dtype_case(dtype)
    cert = certattn.certify_topk(x, eps)
    for i in range(x.shape[0]):
        _check_contract(x[i].astype(np.float64), eps, int(cert.k[i]), float(cert.tail_upper[i]))


@pytest.mark.parametrize("fill", [-np.inf, -1e4, -720.0])
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_bracket_kernel_on_causal_rows_against_exact_arithmetic(numpy_kernel, fill, eps):
    """Prefix-valid rows (causal masks): -inf, a large negative number or an exponent in
    the subnormal range after the prefix; terms below e^-700 are raised before exp."""
    rng = np.random.default_rng(5)
    n = 2048
    x = rng.normal(0, 3, (6, n)).astype(np.float32)
    for i, valid in enumerate([1, 3, 17, 600, 1500, n - 1]):
        x[i, valid:] = fill
    cert = certattn.certify_topk(x, eps)
    for i in range(x.shape[0]):
        _check_contract(x[i], eps, int(cert.k[i]), float(cert.tail_upper[i]))
    np.testing.assert_array_equal(cert.n_valid, np.isfinite(x).sum(axis=1))


@pytest.mark.parametrize("half_widths", [(0,), (1,), (0, 1), (1, 2, 3)])
def test_bracket_misses_fall_back_soundly(numpy_kernel, monkeypatch, half_widths):
    """A bracket too narrow to hold the crossing must be detected and redone."""
    import certattn._topk_numpy as npk

    monkeypatch.setattr(npk, "HALF_WIDTHS", half_widths)
    x = _long_rows(3)
    for eps in (1e-3, 0.05):
        cert = certattn.certify_topk(x, eps)
        for i in range(x.shape[0]):
            _check_contract(x[i], eps, int(cert.k[i]), float(cert.tail_upper[i]))


def test_long_rows_take_the_bracket_path(numpy_kernel, monkeypatch):
    """Guard: the long-row tests above must exercise the bracket, not the sort fallback."""
    import certattn._topk_numpy as npk

    calls = []
    real = npk.bracket_pass
    monkeypatch.setattr(npk, "bracket_pass", lambda *a: calls.append(1) or real(*a))
    certattn.certify_topk(_long_rows(0), 0.01)
    assert calls


@pytest.mark.parametrize(
    "p", [0.020486761968097345, 0.33531220734681516, 1e-17, 2.0**-60, 0.9, 1.0]
)
def test_topp_budget_never_rounds_above_one_minus_p(p):
    """fl(1 - p) can exceed the exact 1 - p: the certificate must use a budget <= 1 - p."""
    from fractions import Fraction

    cert = certattn.certify_topp(np.array([0.0, -1.0, -30.0]), p)
    assert Fraction(cert.eps) <= 1 - Fraction(p)
    assert Fraction(float(cert.tail_upper)) <= 1 - Fraction(p)


@given(
    bits=st.integers(1, 40).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=5)
    )
)
def test_packed_bit_helpers_match_numpy(bits):
    """Positions and row counts read from packed bits equal np.nonzero / sum (any n)."""
    import certattn._topk_numpy as npk

    mask = np.array(bits, dtype=bool)
    packed = np.packbits(mask, axis=1)
    flat = npk.packed_positions(packed, mask.shape[1])
    np.testing.assert_array_equal(flat, np.flatnonzero(mask))
    np.testing.assert_array_equal(npk.popcount_rows(packed), mask.sum(axis=1))
    # The lookup-table fallback (NumPy < 2 has no bitwise_count) agrees too.
    np.testing.assert_array_equal(
        npk.POPCOUNT8[packed].sum(axis=1, dtype=np.int64), mask.sum(axis=1)
    )


@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.5, 3.0, 30.0]),
    masked=st.booleans(),
    frac=st.floats(1e-6, 1.0),
)
def test_sample_rank_matches_a_full_prefix_sum(seed, scale, masked, frac):
    """The blocked two-level search finds the crossing rank of one full cumsum."""
    import certattn._topk_numpy as npk

    rng = np.random.default_rng(seed)
    samp = np.sort(rng.normal(0, scale, (7, npk.SAMPLE)), axis=1)
    if masked:
        samp[:, : npk.SAMPLE // 3] = -np.inf
        samp[0] = -np.inf  # a sample with no valid key at all
    c = np.zeros((7, 1))
    total = np.exp(samp).sum(axis=1)
    thr = frac * total
    j = npk.sample_rank(samp, c, thr)
    assert np.all((0 <= j) & (j <= npk.SAMPLE))
    ref = (np.cumsum(np.exp(samp), axis=1) <= thr[:, None]).sum(axis=1)
    # Single precision inside: the rank may differ by one where a prefix sum sits
    # within rounding of the threshold.
    assert np.all(np.abs(j - ref) <= 1)


def _certify_in_child(conn) -> None:
    x = np.random.default_rng(1).normal(0, 3, (512, 2048)).astype(np.float32)
    conn.send(np.asarray(certattn.certify_topk(x, 0.01).k).tolist())


@pytest.mark.skipif(
    "fork" not in __import__("multiprocessing").get_all_start_methods(),
    reason="needs the fork start method",
)
def test_worker_threads_survive_fork(monkeypatch):
    """The kept worker pool does not exist in a forked child: the child starts its own."""
    import multiprocessing

    monkeypatch.setenv("CERTATTN_NUM_THREADS", "2")
    x = np.random.default_rng(1).normal(0, 3, (512, 2048)).astype(np.float32)
    want = np.asarray(certattn.certify_topk(x, 0.01).k).tolist()  # the parent's pool runs
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_certify_in_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "the forked child hung on the parent's worker pool"
        assert parent.recv() == want
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_small_batches_stay_on_the_calling_thread(monkeypatch):
    """A thread hand-off costs more than a small batch: those never reach the pool."""
    import certattn._topk_numpy as npk

    monkeypatch.setenv("CERTATTN_NUM_THREADS", "2")
    used = []
    real = npk.pool
    monkeypatch.setattr(npk, "pool", lambda w: used.append(w) or real(w))
    certattn.certify_topk(np.zeros((64, 1024), dtype=np.float32), 0.01)
    assert not used
    certattn.certify_topk(np.zeros((1024, 1024), dtype=np.float32), 0.01)
    assert used == [2]


@pytest.mark.parametrize("kernel", ["numpy", "auto"])
def test_a_rows_certificate_depends_on_that_row_alone(kernel, monkeypatch):
    """Every decision of the kernel (raised exponents, shifted terms) is per row: a row
    certified among others (a fully masked row, a row of huge logits, a causal row)
    gets bit for bit the certificate it gets alone (found by the dask work)."""
    monkeypatch.setenv("CERTATTN_KERNEL", kernel)
    rng = np.random.default_rng(12)
    x = rng.normal(0, 3, (6, 700))
    x[1, :] = -np.inf  # fully masked
    x[2, 300:] = -np.inf  # causal-like
    x[3] = rng.normal(0, 3, 700) * 1e3 + 5e3  # row sum beyond e^700: the shifted terms
    x[4, :5] = -800.0  # exponents below the floor
    for eps in (0.01, 1e-300):
        cert = certattn.certify_topk(x, eps, masked_rows="skip")
        for i in range(6):
            one = certattn.certify_topk(x[i : i + 1], eps, masked_rows="skip")
            assert int(one.k[0]) == int(cert.k[i])
            assert float(one.tail_upper[0]) == float(cert.tail_upper[i]), (i, eps)
