"""Hostile model files: every one is a model or one :class:`ModelFileError` line.

GGUF files are written here byte by byte (an encoder independent of the loader's
parser), so a case can declare any count, type, shape or offset; safetensors files and
``config.json`` are mutated from the valid tiny models of ``test_model_files``.  The
fuzz tests mutate small valid files (truncation, bit flips, huge counts, wrong types)
under a hang guard (``signal.alarm``) and a memory cap (tracemalloc's peak, and
``RLIMIT_AS`` in a subprocess for the huge declared counts).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from certattn.errors import InputError
from certattn.models import Bert, Llama, ModelFileError, load

from .test_model_files import (
    MERGES,
    VOCAB,
    _llama_weights,
    gguf_tensor,
    llama_config,
    write_hf_bert,
    write_hf_llama,
)

# ---------------------------------------------------------------- a raw GGUF encoder

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
        U64: "Q", I64: "q", F64: "d"}
ALIGN = 32


def _value(t: int, v: Any) -> bytes:
    if t == STR:
        b = v.encode() if isinstance(v, str) else v
        return struct.pack("<Q", len(b)) + b
    if t == ARR:
        sub, items = v
        return struct.pack("<IQ", sub, len(items)) + b"".join(_value(sub, x) for x in items)
    return struct.pack("<" + _FMT[t], v)


def gguf_bytes(meta: dict[str, tuple[int, Any]], tensors: list[dict], *,
               counts: tuple[int, int] | None = None) -> bytes:
    """A GGUF v3 file: ``meta`` key -> (type, value); tensors: name, dims (ne0 first),
    type, data (bytes) and optionally an explicit offset."""
    info, blob = b"", b""
    for t in tensors:
        pad = (-len(blob)) % ALIGN
        blob += bytes(pad)
        offset = t.get("offset", len(blob))
        blob += t["data"]
        name = t["name"].encode()
        info += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t["dims"]))
        info += b"".join(struct.pack("<Q", d) for d in t["dims"])
        info += struct.pack("<IQ", t["type"], offset)
    kv = b"".join(_value(STR, k) + struct.pack("<I", t) + _value(t, v)
                  for k, (t, v) in meta.items())
    n_t, n_kv = counts if counts is not None else (len(tensors), len(meta))
    head = b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv) + kv + info
    return head + bytes((-len(head)) % ALIGN) + blob


def tiny_gguf(*, layers: int = 1, heads: int = 4, kv: int = 2, vocab: list[str] = VOCAB,
              merges: list[str] = MERGES, scale: float = 1.0) -> tuple[dict, list[dict]]:
    """Metadata and tensors of a valid tiny llama GGUF (q/k rows permuted as llama.cpp)."""
    cfg = llama_config(layers=layers, heads=heads, kv=kv)
    w = _llama_weights(np.random.default_rng(5), layers=layers, heads=heads, kv=kv, d=8,
                       width=heads * 8, ffn=24, vocab=len(VOCAB), bias=False, tied=False)
    meta = {
        "general.architecture": (STR, "llama"), "general.name": (STR, "tiny"),
        "llama.block_count": (U32, layers), "llama.context_length": (U32, 64),
        "llama.embedding_length": (U32, heads * 8), "llama.feed_forward_length": (U32, 24),
        "llama.attention.head_count": (U32, heads), "llama.attention.head_count_kv": (U32, kv),
        "llama.rope.freq_base": (F32, 1e4), "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "tokenizer.ggml.model": (STR, "gpt2"), "tokenizer.ggml.tokens": (ARR, (STR, vocab)),
        "tokenizer.ggml.merges": (ARR, (STR, merges)),
        "tokenizer.ggml.token_type": (ARR, (I32, [3 if t.startswith(("<", "[")) else 1
                                                  for t in vocab])),
        "tokenizer.ggml.eos_token_id": (U32, 1),
    }
    tensors = []
    for name, a in w.items():
        g, a = gguf_tensor(name, a, heads, kv)
        a = np.ascontiguousarray(a * np.float32(scale), dtype=np.float32)
        tensors.append({"name": g, "dims": list(reversed(a.shape)), "type": 0,
                        "data": a.tobytes()})
    del cfg
    return meta, tensors


def _tensor(tensors: list[dict], name: str) -> dict:
    return next(t for t in tensors if t["name"] == name)


# ---------------------------------------------------------------- the contract


@contextlib.contextmanager
def hang_guard(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body runs past ``seconds``."""
    if not hasattr(signal, "SIGALRM"):  # pragma: no cover - Windows
        yield
        return

    def stop(*_: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s: an unbounded loop?")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load_and_use(path: Path) -> Any:
    """Load ``path`` and run it on text and on ids: the model, or ModelFileError raised."""
    m = load(path)
    assert isinstance(m, (Llama, Bert))
    ids = m.encode("ab cd")
    m.forward(ids or [0])
    return m


def model_or_one_line(path: Path, seconds: int = 20) -> str | None:
    """None for a working model, else the ModelFileError's one line."""
    with hang_guard(seconds):
        try:
            load_and_use(path)
        except ModelFileError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg, repr(msg)
            return msg
    return None


# ---------------------------------------------------------------- GGUF cases


def _gguf(tmp_path: Path, mutate: Callable[[dict, list], Any] | None = None, *,
          raw: Callable[[bytes], bytes] | None = None, counts=None, **kw) -> Path:
    meta, tensors = tiny_gguf(**kw)
    if mutate is not None:
        mutate(meta, tensors)
    data = gguf_bytes(meta, tensors, counts=counts)
    if raw is not None:
        data = raw(data)
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    return path


def _set(key: str, t: int, v: Any) -> Callable[[dict, list], None]:
    def f(meta: dict, tensors: list) -> None:
        meta[key] = (t, v)
    return f


def _drop(key: str) -> Callable[[dict, list], None]:
    def f(meta: dict, tensors: list) -> None:
        del meta[key]
    return f


def _tset(name: str, **fields: Any) -> Callable[[dict, list], None]:
    def f(meta: dict, tensors: list) -> None:
        _tensor(tensors, name).update(fields)
    return f


def _half_rows(meta: dict, tensors: list) -> None:
    t = _tensor(tensors, "token_embd.weight")
    t["dims"] = [t["dims"][0], 8]
    t["data"] = t["data"][: len(t["data"]) // 2]


def _huge_weights(meta: dict, tensors: list) -> None:
    for t in tensors:
        if t["name"].endswith(("attn_q.weight", "attn_k.weight")):
            t["data"] = (np.frombuffer(t["data"], np.float32) * np.float32(1e30)).tobytes()


def _nan_weight(meta: dict, tensors: list) -> None:
    t = _tensor(tensors, "blk.0.ffn_up.weight")
    a = np.frombuffer(t["data"], np.float32).copy()
    a[3] = np.nan
    t["data"] = a.tobytes()


def _q8k_tensor(meta: dict, tensors: list) -> None:
    """A well-formed Q8_K tensor (one 292-byte block of 256 values): no dequantizer."""
    tensors.append({"name": "extra.weight", "dims": [256, 1], "type": 15,
                    "data": bytes(292)})


GGUF_CASES = {
    "magic only": (dict(raw=lambda b: b[:4]), "truncated"),
    "truncated in the header": (dict(raw=lambda b: b[:20]), "truncated"),
    "truncated in the metadata": (dict(raw=lambda b: b[:200]), "truncated"),
    "truncated in the tensor data": (dict(raw=lambda b: b[:-100]), "beyond the end"),
    "tensor count 2^60": (dict(counts=(2**60, 16)), "tensors"),
    "key count 2^60": (dict(counts=(10, 2**60)), "metadata"),
    "head_count 0": (dict(mutate=_set("llama.attention.head_count", U32, 0)), "head_count"),
    "head_count an array": (dict(mutate=_set("llama.attention.head_count", ARR, (U32, [4]))),
                            "head_count"),
    "head_count a string": (dict(mutate=_set("llama.attention.head_count", STR, "4")),
                            "head_count"),
    "head_count_kv 0": (dict(mutate=_set("llama.attention.head_count_kv", U32, 0)),
                        "key/value heads"),
    "head_count_kv not dividing": (dict(mutate=_set("llama.attention.head_count_kv", U32, 3)),
                                   "key/value heads"),
    "architecture an integer": (dict(mutate=_set("general.architecture", U32, 7)),
                                "general.architecture"),
    "block_count 2^31-1": (dict(mutate=_set("llama.block_count", U32, 2**31 - 1)), "layers"),
    "block_count 10^12": (dict(mutate=_set("llama.block_count", U64, 10**12)), "layers"),
    "block_count 0": (dict(mutate=_set("llama.block_count", U32, 0)), "block_count"),
    "context_length 0": (dict(mutate=_set("llama.context_length", U32, 0)), "context_length"),
    "rms eps NaN": (dict(mutate=_set("llama.attention.layer_norm_rms_epsilon", F32, math.nan)),
                    "layer_norm_rms_epsilon"),
    "no embedding_length": (dict(mutate=_drop("llama.embedding_length")), "embedding_length"),
    "merges naming unknown tokens": (
        dict(merges=["x y", *MERGES]), "tokenizer"),
    "tokens not strings": (dict(mutate=_set("tokenizer.ggml.tokens", ARR, (U32, [1, 2]))),
                           "tokenizer.ggml.tokens"),
    "token types of another length": (
        dict(mutate=_set("tokenizer.ggml.token_type", ARR, (I32, [1]))), "token_type"),
    "attn_q of the wrong shape": (dict(mutate=_tset("blk.0.attn_q.weight", dims=[16, 64])),
                                  "blk.0.attn_q.weight"),
    "ffn_up of the wrong shape": (dict(mutate=_tset("blk.0.ffn_up.weight", dims=[24, 32])),
                                  "blk.0.ffn_up.weight"),
    "output_norm of the wrong length": (dict(mutate=_tset("output_norm.weight", dims=[16])),
                                        "output_norm.weight"),
    "quant type Q8_K": (dict(mutate=_q8k_tensor), "type Q8_K, which cannot be dequantized"),
    "Q8_K rows not of whole blocks": (dict(mutate=_tset("blk.0.attn_q.weight", type=15)),
                                      "Q8_K block"),
    "tensor type 999": (dict(mutate=_tset("blk.0.attn_q.weight", type=999)), "type 999"),
    "tensor of 9 dimensions": (dict(mutate=_tset("blk.0.attn_q.weight", dims=[1] * 9)),
                               "dimensions"),
    "dims of 2^62": (dict(mutate=_tset("blk.0.attn_q.weight", dims=[2**62, 4])),
                     "beyond the end"),
    "offset beyond the file": (dict(mutate=_tset("blk.0.attn_q.weight", offset=10**9)),
                               "beyond the end"),
    "negative offset": (dict(mutate=_tset("blk.0.attn_q.weight", offset=2**64 - 32)),
                        "beyond the end"),
    "shape and bytes mismatch": (dict(mutate=_tset("token_embd.weight", dims=[32, 17])),
                                 "token_embd.weight"),
    "embeddings with fewer rows than the vocabulary": (dict(mutate=_half_rows), "vocabulary"),
    "a NaN weight": (dict(mutate=_nan_weight), "blk.0.ffn_up.weight"),
    "weights that overflow": (dict(scale=1.0, mutate=_huge_weights), "non-finite"),
    "alignment 0": (dict(mutate=_set("general.alignment", U32, 0)), "alignment"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_hostile_gguf_is_one_line(tmp_path: Path, case: str) -> None:
    kw, fragment = GGUF_CASES[case]
    msg = model_or_one_line(_gguf(tmp_path, **kw))
    assert msg is not None, case
    assert fragment in msg, msg


def test_tiny_gguf_encoder_writes_a_working_model(tmp_path: Path) -> None:
    """The raw encoder above writes what the loader reads (so the cases test one thing)."""
    assert model_or_one_line(_gguf(tmp_path, layers=2)) is None
    m = load(tmp_path / "m.gguf")
    assert (m.n_layers, m.n_heads, m.n_kv_heads) == (2, 4, 2)
    assert m.encode("ab cd") == [8, 7, 10]


def test_hostile_files_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from certattn.cli import main

    for case in ("key count 2^60", "head_count an array", "quant type Q8_K",
                 "block_count 10^12", "weights that overflow"):
        kw, fragment = GGUF_CASES[case]
        path = _gguf(tmp_path, **kw)
        with hang_guard(20):
            assert main(["budget", "--model", str(path), "--tokens", "8"]) == 2, case
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("certattn: error:"), err
        assert fragment in lines[0]


def test_cli_process_prints_no_warning_and_no_traceback(tmp_path: Path) -> None:
    path = _gguf(tmp_path, mutate=_huge_weights)
    proc = subprocess.run(
        [sys.executable, "-m", "certattn", "budget", "--model", str(path), "--tokens", "8"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("certattn: error:"), (
        proc.stderr)


def test_vocabulary_without_the_prose_is_refused_not_looped(tmp_path: Path) -> None:
    """A byte-level vocabulary of special tokens only encodes the built-in prose to []."""
    from certattn.budget import budget_for_model

    vocab = ["<s>", "</s>", "<pad>", "<unk>"] * 4
    vocab = [f"{t}{i}" for i, t in enumerate(vocab)]
    path = _gguf(tmp_path, vocab=vocab, merges=[])
    m = load(path)
    assert m.encode("The river town") == []
    with hang_guard(30), pytest.raises(InputError, match="encodes the built-in prose"):
        budget_for_model(m, tokens=8)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    m = load(_gguf(tmp_path))
    for ids in ([0, 16], [-1, 2]):
        with pytest.raises(InputError, match="outside the vocabulary"):
            m.forward(ids)


# ---------------------------------------------------------------- safetensors / config.json


def _llama_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    cfg = llama_config(layers=1)
    w = _llama_weights(rng, layers=1, heads=4, kv=2, d=8, width=32, ffn=24, vocab=len(VOCAB),
                       bias=False, tied=False)
    return write_hf_llama(tmp_path / "hf", w, cfg)


def _bert_folder(tmp_path: Path) -> Path:
    write_hf_bert(tmp_path / "bert", np.random.default_rng(4), layers=1)
    return tmp_path / "bert"


def _patch_config(**changes: Any) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return f


def _write_config(value: Any) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(value))
    return f


def _st_header(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _st_write(folder: Path, header: Any, body: bytes, size: int | None = None) -> None:
    h = json.dumps(header).encode()
    n = len(h) if size is None else size
    (folder / "model.safetensors").write_bytes(n.to_bytes(8, "little") + h + body)


def _patch_tensor(name: str, **fields: Any) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        header, body = _st_header(folder)
        header[name].update(fields)
        _st_write(folder, header, body)
    return f


def _raw_st(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        p = folder / "model.safetensors"
        p.write_bytes(fn(p.read_bytes()))
    return f


def _header_size(n: int) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        header, body = _st_header(folder)
        _st_write(folder, header, body, size=n)
    return f


def _header_json(value: Any) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        _, body = _st_header(folder)
        _st_write(folder, value, body)
    return f


def _st_values(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """Rewrite one float32 tensor's values in place."""
    def f(folder: Path) -> None:
        header, body = _st_header(folder)
        a, b = header[name]["data_offsets"]
        values = fn(np.frombuffer(body[a:b], np.float32).copy()).astype(np.float32)
        _st_write(folder, header, body[:a] + values.tobytes() + body[b:])
    return f


def _near_max(a: np.ndarray) -> np.ndarray:
    """Finite weights whose products overflow float32."""
    return a / np.abs(a).max() * 3e38


def _with_nan(a: np.ndarray) -> np.ndarray:
    a[1] = np.nan
    return a


BQ = "bert.encoder.layer.0.attention.self.query.weight"
EMB = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"

FOLDER_CASES = {
    "config.json a list": ("llama", _write_config([1, 2]), "config.json"),
    "config.json a string": ("bert", _write_config("bert"), "config.json"),
    "rope_scaling a string": ("llama", _patch_config(rope_scaling="linear"), "rope_scaling"),
    "max_position_embeddings null": ("llama", _patch_config(max_position_embeddings=None),
                                     "max_position_embeddings"),
    "bert max_position_embeddings null": ("bert", _patch_config(max_position_embeddings=None),
                                          "max_position_embeddings"),
    "num_attention_heads 0": ("llama", _patch_config(num_attention_heads=0),
                              "num_attention_heads"),
    "bert num_attention_heads 0": ("bert", _patch_config(num_attention_heads=0),
                                   "num_attention_heads"),
    "bert hidden_size not dividing": ("bert", _patch_config(hidden_size=13), "hidden_size"),
    "num_attention_heads an array": ("llama", _patch_config(num_attention_heads=[4]),
                                     "num_attention_heads"),
    "num_key_value_heads not dividing": ("llama", _patch_config(num_key_value_heads=3),
                                         "key/value heads"),
    "num_hidden_layers 2^31-1": ("llama", _patch_config(num_hidden_layers=2**31 - 1),
                                 "layers"),
    "bert num_hidden_layers 10^12": ("bert", _patch_config(num_hidden_layers=10**12),
                                     "layers"),
    "hidden_size a string": ("llama", _patch_config(hidden_size="32"), "hidden_size"),
    "rms_norm_eps a string": ("llama", _patch_config(rms_norm_eps="x"), "rms_norm_eps"),
    "vocab_size above the embedding rows": ("llama", _patch_config(vocab_size=1000),
                                            "vocabulary"),
    "bert vocab_size above the embedding rows": ("bert", _patch_config(vocab_size=1000),
                                                 "vocabulary"),
    "bert max positions above the position rows": (
        "bert", _patch_config(max_position_embeddings=1000), "position"),
    "header size 2^60": ("llama", _header_size(2**60), "header"),
    "header size beyond the file": ("llama", _header_size(10**6), "header"),
    "header not JSON": ("llama", _raw_st(lambda b: b[:8] + b"{" * (len(b) - 8)), "header"),
    "header a list": ("llama", _header_json([1, 2]), "header"),
    "magic-size file": ("llama", _raw_st(lambda b: b[:8]), "header"),
    "truncated file": ("llama", _raw_st(lambda b: b[:-64]), "beyond the end"),
    "empty file": ("bert", _raw_st(lambda b: b""), "header"),
    "offsets beyond the file": ("llama", _patch_tensor(Q0, data_offsets=[0, 10**9]),
                                "beyond the end"),
    "negative offsets": ("llama", _patch_tensor(Q0, data_offsets=[-64, 0]), "data_offsets"),
    "offsets not integers": ("llama", _patch_tensor(Q0, data_offsets="0-4"), "data_offsets"),
    "shape and bytes mismatch": ("llama", _patch_tensor(Q0, shape=[32, 33]), Q0),
    "shape a string": ("llama", _patch_tensor(Q0, shape="32x32"), "shape"),
    "unknown dtype": ("llama", _patch_tensor(Q0, dtype="Q8"), "dtype"),
    "entry not an object": ("llama", _patch_tensor(Q0, dtype=None), "dtype"),
    "embeddings of the wrong width": ("llama", _patch_tensor(EMB, shape=[32, 16]),
                                      "(vocab, 32)"),
    "wrong tensor shape": ("llama", _patch_tensor(Q0, shape=[16, 64]), "attn_q"),
    "a NaN weight": ("llama", _st_values(Q0, _with_nan), "blk.0.attn_q.weight"),
    "bert NaN weight": ("bert", _st_values(BQ, _with_nan), "query.weight"),
    "bert weights that overflow": ("bert", _st_values(BQ, _near_max), "non-finite"),
    "weights that overflow": ("llama", _st_values(Q0, _near_max), "non-finite"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_hostile_folder_is_one_line(tmp_path: Path, case: str) -> None:
    kind, mutate, fragment = FOLDER_CASES[case]
    folder = _llama_folder(tmp_path) if kind == "llama" else _bert_folder(tmp_path)
    mutate(folder)
    msg = model_or_one_line(folder)
    assert msg is not None, case
    assert fragment in msg, msg


def test_index_weight_map_not_an_object_is_one_line(tmp_path: Path) -> None:
    folder = _llama_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    assert "weight_map" in model_or_one_line(folder)


# ---------------------------------------------------------------- fuzz


def _check_case(path: Path) -> str | None:
    """The contract under a hang guard and a memory cap (tracemalloc's peak)."""
    limit = 64 << 20
    tracemalloc.start()
    try:
        return model_or_one_line(path, seconds=30)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, f"{path.name}: {peak} bytes traced"


BIG = (2**31 - 1, 2**32, 10**12, 2**60, 2**63, 2**64 - 1)


def _mutations(data: bytes, rng: np.random.Generator, n: int,
               counts: tuple[int, ...] = ()) -> Iterator[bytes]:
    """Truncations, bit flips and huge 8-byte counts written over ``data`` (half of them
    over the declared counts at byte offsets ``counts``)."""
    size = len(data)
    for _ in range(n):
        kind = int(rng.integers(3))
        b = bytearray(data)
        if kind == 0:
            del b[int(rng.integers(0, size)):]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, size))] ^= 1 << int(rng.integers(8))
        else:
            if counts and rng.integers(2):
                i = counts[int(rng.integers(len(counts)))]
            else:
                i = int(rng.integers(0, size - 8))
            b[i : i + 8] = BIG[int(rng.integers(len(BIG)))].to_bytes(8, "little")
        yield bytes(b)


def _fuzz_rounds() -> int:
    import os

    return 400 if os.environ.get("CERTATTN_HYPOTHESIS") == "thorough" else 30


def _both_outcomes(results: list[str | None]) -> None:
    """The mutations reach the loader: some still load, some are refused."""
    assert None in results and any(r is not None for r in results), results


def test_fuzz_gguf(tmp_path: Path) -> None:
    meta, tensors = tiny_gguf()
    data = gguf_bytes(meta, tensors)
    first_key = 24  # tensor count at 8, key count at 16, then each key's length
    rng = np.random.default_rng(20)
    path = tmp_path / "f.gguf"
    results = []
    for mutated in _mutations(data, rng, _fuzz_rounds(), counts=(8, 16, first_key)):
        path.write_bytes(mutated)
        results.append(_check_case(path))
    _both_outcomes(results)


def test_fuzz_safetensors(tmp_path: Path) -> None:
    folder = _llama_folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    rng = np.random.default_rng(21)
    results = []
    for mutated in _mutations(data, rng, _fuzz_rounds(), counts=(0,)):
        (folder / "model.safetensors").write_bytes(mutated)
        results.append(_check_case(folder))
    _both_outcomes(results)


TYPED_WRONG = [(STR, "x"), (STR, ""), (STR, "llama"), (U32, 0), (U64, 2**60), (I32, -1),
               (F32, math.nan), (F64, 1e300), (BOOL, True), (ARR, (U32, [])), (ARR, (U32, [4, 2])),
               (ARR, (STR, ["a", "b"])), (ARR, (F32, [math.inf]))]


def test_fuzz_gguf_metadata_types(tmp_path: Path) -> None:
    """Metadata values replaced by values of other types and ranges."""
    meta, tensors = tiny_gguf()
    keys = sorted(meta)
    rng = np.random.default_rng(23)
    path = tmp_path / "t.gguf"
    results = []
    for r in range(_fuzz_rounds()):
        changed = dict(meta, **{"general.unknown": TYPED_WRONG[r % len(TYPED_WRONG)]})
        for key in rng.choice(keys, size=0 if r == 0 else int(rng.integers(1, 3)),
                              replace=False):
            changed[str(key)] = TYPED_WRONG[int(rng.integers(len(TYPED_WRONG)))]
        path.write_bytes(gguf_bytes(changed, tensors))
        results.append(_check_case(path))
    _both_outcomes(results)


def test_fuzz_safetensors_header_types(tmp_path: Path) -> None:
    """Header entries (dtype, shape, data_offsets) replaced by values of other types."""
    folder = _llama_folder(tmp_path)
    header, body = _st_header(folder)
    names = sorted(header)
    rng = np.random.default_rng(24)
    results = []
    for r in range(_fuzz_rounds()):
        changed = json.loads(json.dumps(header))
        changed["__metadata__"] = {"format": WRONG[r % len(WRONG)]}  # free-form: ignored
        if r:
            entry = changed[str(rng.choice(names))]
            field = str(rng.choice(["dtype", "shape", "data_offsets"]))
            entry[field] = WRONG[int(rng.integers(len(WRONG)))]
        _st_write(folder, changed, body)
        results.append(_check_case(folder))
    _both_outcomes(results)


WRONG = [None, "x", [], {}, [4], -1, 0, 2**31 - 1, 10**12, 2**64, 1e308, -0.5, True, "nan"]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_fuzz_config(tmp_path: Path, kind: str) -> None:
    folder = _llama_folder(tmp_path) if kind == "llama" else _bert_folder(tmp_path)
    original = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(22)
    keys = sorted(original)
    results = []
    for r in range(_fuzz_rounds()):
        cfg = dict(original, unknown_key=WRONG[r % len(WRONG)])  # ignored: still a model
        for key in rng.choice(keys, size=0 if r == 0 else int(rng.integers(1, 3)),
                              replace=False):
            cfg[str(key)] = WRONG[int(rng.integers(len(WRONG)))]
        (folder / "config.json").write_text(json.dumps(cfg))
        results.append(_check_case(folder))
    _both_outcomes(results)


HUGE_SCRIPT = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from certattn.models import ModelFileError, load
out = {}
for path in sys.argv[2:]:
    try:
        load(path)
        out[path] = None
    except ModelFileError as exc:
        out[path] = str(exc)
print(json.dumps(out))
"""


def test_huge_declared_counts_under_a_memory_cap(tmp_path: Path) -> None:
    """Declared counts of 2^31-1 .. 2^64-1 under RLIMIT_AS: refused before allocating."""
    resource = pytest.importorskip("resource")
    del resource
    paths = []
    for i, case in enumerate(("tensor count 2^60", "key count 2^60", "block_count 10^12",
                              "block_count 2^31-1", "dims of 2^62")):
        d = tmp_path / str(i)
        d.mkdir()
        paths.append(str(_gguf(d, **GGUF_CASES[case][0])))
    for i, n in enumerate((2**31 - 1, 10**12)):
        d = tmp_path / f"hf{i}"
        d.mkdir()
        folder = _llama_folder(d)
        _patch_config(num_hidden_layers=n)(folder)
        paths.append(str(folder))
    import os

    limit = 4 << 30  # far below what the declared counts would take
    one_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                   "MKL_NUM_THREADS")}  # BLAS buffers per thread count too
    proc = subprocess.run([sys.executable, "-c", HUGE_SCRIPT, str(limit), *paths],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, **one_thread))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert all(isinstance(v, str) and "\n" not in v for v in out.values()), out
