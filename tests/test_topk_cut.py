"""TopkCertificate.cut: the k-th largest valid logit, the same for every kernel, and the
set ``logits >= cut`` (ties at the cut kept) is bounded by ``tail_upper``."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from certattn import certify_topk
from certattn._topk_numba import forced, kernels
from certattn.topk import topk_cut


def _tied_logits(seed: int = 0) -> np.ndarray:
    """Rows with many exact ties (logits on a grid of 0.5), masked keys, a masked row."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0.0, 2.0, (3, 40, 200)) * 2.0) / 2.0
    x[0, :, 150:] = -np.inf  # masked keys
    x[1, 7] = -np.inf  # a fully masked row
    x[2, :, :5] = 6.0  # a tie at the top
    return x.astype(np.float32)


def _exact_dropped(row: np.ndarray, kept: np.ndarray) -> mpmath.mpf:
    fin = np.isfinite(row)
    with mpmath.workdps(50):
        e = [mpmath.exp(mpmath.mpf(float(v))) for v in row[fin]]
        d = [mpmath.exp(mpmath.mpf(float(v))) for v in row[fin & ~kept]]
        return mpmath.fsum(d) / mpmath.fsum(e)


def test_cut_is_the_kth_largest_valid_logit_and_keeps_ties():
    x = _tied_logits()
    c = certify_topk(x, 0.05, masked_rows="skip")
    cut = np.asarray(c.cut)
    assert cut.dtype == np.float64 and cut.shape == c.k.shape
    assert np.isposinf(cut[1, 7]) and c.k[1, 7] == 0  # masked row: keeps nothing
    for idx in np.ndindex(c.k.shape):
        row, k = x[idx], int(c.k[idx])
        if k:
            assert cut[idx] == np.sort(row[np.isfinite(row)])[::-1][k - 1]
    keep = x >= cut[..., None]
    assert (keep >= np.asarray(c.kept_mask())).all()  # the Top-k set, and more on ties
    assert (keep.sum(-1) >= c.k).all() and (keep.sum(-1) > c.k).any()  # ties exist here
    assert not (keep & ~np.isfinite(x)).any()  # never a masked key


@pytest.mark.parametrize("eps", [0.2, 0.01])
def test_tail_upper_bounds_the_mass_dropped_below_the_cut(eps):
    x = _tied_logits(1)
    c = certify_topk(x, eps, masked_rows="skip")
    keep = x >= np.asarray(c.cut)[..., None]
    rng = np.random.default_rng(2)
    rows = np.argwhere(~np.asarray(c.masked))
    for idx in rows[rng.choice(len(rows), 25, replace=False)]:
        idx = tuple(idx)
        assert mpmath.mpf(float(c.tail_upper[idx])) >= _exact_dropped(x[idx], keep[idx])


def test_eps_zero_cuts_at_the_smallest_valid_logit():
    x = _tied_logits(3)
    c = certify_topk(x, 0.0, masked_rows="skip")
    valid = np.isfinite(x)
    low = np.where(valid, x, np.inf).min(-1).astype(np.float64)
    assert np.array_equal(np.asarray(c.cut), low)  # +inf on the masked row, as min gives


def test_every_kernel_gives_the_same_cut():
    torch = pytest.importorskip("torch")
    x = _tied_logits(4)
    ref = certify_topk(x, 0.05, masked_rows="skip")
    with forced("numpy"):
        numpy_path = certify_topk(x, 0.05, masked_rows="skip")
    generic = certify_topk(torch.from_numpy(x), 0.05, masked_rows="skip")
    got = [numpy_path, generic]
    if kernels() is not None:
        with forced("numba"):
            got.append(certify_topk(x, 0.05, masked_rows="skip"))
    for c in got:
        k = np.asarray(c.k.cpu() if hasattr(c.k, "cpu") else c.k)
        cut = np.asarray(c.cut.cpu() if hasattr(c.cut, "cpu") else c.cut)
        same = k == ref.k  # the kernels agree on k up to the margin: compare where they do
        assert same.mean() > 0.99
        assert np.array_equal(cut[same], np.asarray(ref.cut)[same])
    assert np.array_equal(np.asarray(topk_cut(x, ref.k)), np.asarray(ref.cut))


def test_half_precision_and_dask_cuts():
    da = pytest.importorskip("dask.array")
    x = _tied_logits(5)
    c = certify_topk(x.astype(np.float16), 0.05, masked_rows="skip")
    assert np.array_equal(np.asarray(c.cut), topk_cut(x, c.k))  # values on a 0.5 grid: exact
    lazy = certify_topk(da.from_array(x, chunks=(1, 20, 200)), 0.05, masked_rows="skip")
    assert np.array_equal(lazy.cut.compute(), certify_topk(x, 0.05, masked_rows="skip").cut)
