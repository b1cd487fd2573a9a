"""``certattn.io.load_logits``: every format, and an ``InputError`` naming the file for
everything that can go wrong, before any large allocation."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest

from certattn.errors import InputError
from certattn.io import load_logits


def _npy_bytes(shape, dtype="<f8", data=b""):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_huge_claimed_shape_is_refused_without_allocating(tmp_path):
    f = tmp_path / "huge.npy"
    f.write_bytes(_npy_bytes((10**6, 10**7), data=b"\0" * 64))
    with pytest.raises(InputError, match=r"truncated or corrupt.*promises shape"):
        load_logits(f)


def test_truncated_npy(tmp_path):
    f = tmp_path / "t.npy"
    f.write_bytes(_npy_bytes((4, 4), data=b"\0" * 100))  # 128 bytes needed
    with pytest.raises(InputError, match=re.escape(str(f))):
        load_logits(f)


def test_object_arrays_are_refused(tmp_path):
    f = tmp_path / "o.npy"
    np.save(f, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        load_logits(f)


def test_npz_reads_only_the_chosen_member(tmp_path):
    f = tmp_path / "two.npz"
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("good.npy", _npy_bytes((2,), data=np.array([1.0, 2.0]).tobytes()))
        zf.writestr("bad.npy", _npy_bytes((10**9,), data=b""))
    np.testing.assert_array_equal(load_logits(f, "good"), [1.0, 2.0])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_logits(f, "bad")
    with pytest.raises(InputError, match="choose one with --key"):
        load_logits(f)
    with pytest.raises(InputError, match="no array named 'x'"):
        load_logits(f, "x")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "longdouble"])
def test_npy_dtypes_round_trip(tmp_path, dtype):
    x = np.arange(6, dtype=dtype).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    got = load_logits(tmp_path / "x.npy")
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_safetensors_ml_dtypes(tmp_path, dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from safetensors.numpy import save_file

    x = np.array([[0.0, 1.0, -2.0, 0.5]], dtype=getattr(ml_dtypes, dtype))
    save_file({"a": x}, str(tmp_path / "x.safetensors"))
    got = load_logits(tmp_path / "x.safetensors")
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got.astype(np.float32), x.astype(np.float32))


def test_safetensors_key_and_corrupt_header(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((1, 2), np.float32), "b": np.ones((1, 3), np.float32)},
              str(tmp_path / "x.safetensors"))
    assert load_logits(tmp_path / "x.safetensors", "b").shape == (1, 3)
    with pytest.raises(InputError, match="several arrays"):
        load_logits(tmp_path / "x.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(InputError, match="cannot read"):
        load_logits(tmp_path / "c.safetensors")


def test_key_on_npy_and_errors_are_value_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ValueError, match="--key applies"):
        load_logits(tmp_path / "x.npy", "a")
    with pytest.raises(InputError, match="no such file"):
        load_logits(tmp_path / "none.npy")
    with pytest.raises(InputError, match="is a directory"):
        load_logits(tmp_path)
