"""Issue 20 (items 10, 11): extreme inputs stay quiet, bad options are one clear error.

No RuntimeWarning on logits near the float64 exponent limit or keys of 1e300; ``bits``,
``group`` and ``kv_heads`` are checked exactly (no silent coercion of 4.5, "4", True);
lazy (dask) arrays are refused in one line where no lazy path exists.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import certattn
from certattn.errors import InputError
from certattn.policies import Search

# --------------------------------------------------------------------------
# RuntimeWarnings
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
@pytest.mark.parametrize("row", [[709.0, 709.5, 710.0, 711.0], [709.7] * 64])
def test_certify_topk_near_exp_overflow_is_quiet_and_sound(kernel, row, monkeypatch):
    """exp(709.x) summed overflows float64: the row goes to the shifted path, silently."""
    if kernel == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("CERTATTN_KERNEL", kernel)
    x = np.array(row)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cert = certattn.certify_topk(x, 0.01)
    p = np.exp(x - x.max())
    p /= p.sum()
    kept = np.asarray(cert.kept_mask())
    assert p[~kept].sum() <= float(cert.tail_upper) <= 0.01
    same = certattn.certify_topk(x - 700.0, 0.01)  # a shift changes nothing exact
    assert int(cert.k) == int(same.k)


@pytest.mark.parametrize("method", ["ours", "mc", "tree", "gap", "quant", "paged"])
@pytest.mark.parametrize("size", [1e300, 1e200, 1e160])
def test_certified_search_huge_keys_is_quiet(method, size):
    """Keys of 1e300 leaked overflow warnings (norms, k-means scatter); now: a sound
    result or one InputError, nothing on the warnings channel."""
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(4, 8)), rng.normal(size=(40, 8)) * size, rng.normal(size=(40, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            r = certattn.certified_search(q, k, v, 0.01, method=method)
        except InputError as exc:
            assert "too large" in str(exc)
            return
    assert np.all(np.asarray(r.tail_upper) <= 0.01)


# --------------------------------------------------------------------------
# bits and group: exact integers, checked at once
# --------------------------------------------------------------------------

_BAD_BITS = [4.5, "4", 3, True, 0, np.float64(4.0)]
_BAD_GROUP = [2.5, True, 0, -3, "32", np.float32(8.0)]


@pytest.mark.parametrize("bits", _BAD_BITS)
def test_search_policy_rejects_bad_bits_at_construction(bits):
    with pytest.raises(InputError, match="bits must be one of"):
        Search(0.01, method="quant", bits=bits)


@pytest.mark.parametrize("group", _BAD_GROUP)
def test_search_policy_rejects_bad_group_at_construction(group):
    with pytest.raises(InputError, match="group must be a positive integer"):
        Search(0.01, method="paged", group=group)


@pytest.mark.parametrize(("bits", "group"), [(b, None) for b in _BAD_BITS]
                         + [(None, g) for g in _BAD_GROUP])
def test_certified_search_and_quantize_keys_reject_bad_bits_and_group(bits, group):
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(3, 8)), rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    with pytest.raises(InputError, match=r"bits must be one of|group must be a positive"):
        certattn.certified_search(q, k, v, 0.01, method="quant", bits=bits, group=group)
    from certattn.quant import quantize_keys

    with pytest.raises(InputError, match=r"bits must be one of|group must be a positive"):
        quantize_keys(k, 4 if bits is None else bits, group=group if group is not None else 32)


def test_integer_like_bits_and_group_are_accepted():
    """NumPy integers are integers: accepted, and the same as Python ints."""
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(3, 8)), rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    a = certattn.certified_search(q, k, v, 0.01, method="quant", bits=np.int64(8),
                                  group=np.int32(4))
    b = certattn.certified_search(q, k, v, 0.01, method="quant", bits=8, group=4)
    np.testing.assert_array_equal(np.asarray(a.kept), np.asarray(b.kept))
    assert Search(0.01, method="quant", bits=np.int8(2)).bits == 2


# --------------------------------------------------------------------------
# kv_heads
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [True, False, 2.5, "2", [0, True]])
def test_kv_heads_not_an_int_or_a_map_is_one_input_error(kv_heads):
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(4, 5, 8)), rng.normal(size=(2, 6, 8))
    with pytest.raises(InputError, match="kv_heads must be") as info:
        certattn.certify_scores(q, k, 0.01, kv_heads=kv_heads)
    assert "\n" not in str(info.value)


def test_kv_heads_numpy_integer_is_a_count():
    rng = np.random.default_rng(4)
    q, k = rng.normal(size=(4, 5, 8)), rng.normal(size=(2, 6, 8))
    a = certattn.certify_scores(q, k, 0.01, kv_heads=np.int64(2))
    b = certattn.certify_scores(q, k, 0.01, kv_heads=2)
    np.testing.assert_array_equal(np.asarray(a.k), np.asarray(b.k))


# --------------------------------------------------------------------------
# dask arrays where no lazy path exists
# --------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["certify_scores", "certify_attention", "certified_search"])
def test_dask_arrays_refused_in_one_line_where_not_lazy(function):
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(5)
    q = da.from_array(rng.normal(size=(2, 4, 8)), chunks=2)
    k = da.from_array(rng.normal(size=(2, 10, 8)))
    v = da.from_array(rng.normal(size=(2, 10, 8)))
    args = (q, k, 0.01) if function == "certify_scores" else (q, k, v, 0.01)
    with pytest.raises(InputError, match=rf"{function} does not run on dask arrays") as info:
        getattr(certattn, function)(*args)
    msg = str(info.value)
    assert "\n" not in msg and "compute()" in msg and "certify_topk" in msg
