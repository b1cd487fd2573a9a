"""A ``tokenizers`` byte-level BPE tokenizer rebuilt from GGUF metadata."""

from __future__ import annotations

from typing import Any

_CONTROL = 3  # llama.cpp token type of control (special) tokens


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata lacks {key!r}")
    return field.contents()


def gguf_bpe_tokenizer(reader: Any) -> Any:
    """Byte-level BPE tokenizer described by a GGUF file (``tokenizer.ggml.model == 'gpt2'``).

    SmolLM2's GGUF states pre-tokenizer ``smollm``; llama.cpp then splits every digit
    apart before the GPT-2 regex, which is what the original SmolLM2 ``tokenizer.json``
    does with ``Digits(individual_digits=True)`` followed by ``ByteLevel``. Control tokens
    (``<|im_start|>``, ``<|endoftext|>``, ...) are added as special tokens, so they stay whole.
    No BOS is prepended (``tokenizer.ggml.add_bos_token`` is False for SmolLM2).

    Parameters
    ----------
    reader : gguf.GGUFReader
        Open reader of the GGUF file.

    Returns
    -------
    tokenizers.Tokenizer
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, not {kind!r}"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = reader.fields.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre is not None and pre.contents() in ("smollm", "starcoder", "refact"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type")
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, t in zip(tokens, types, strict=True)
        if t == _CONTROL
    ]
    tokenizer.add_special_tokens(special)
    return tokenizer
