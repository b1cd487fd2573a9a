"""``tokenizers`` tokenizers rebuilt from GGUF metadata: byte-level BPE (``gpt2``) and
SentencePiece BPE (``llama``)."""

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
    if kind == "llama":
        return gguf_spm_tokenizer(reader)
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
            "SentencePiece 'llama')"
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


def gguf_spm_tokenizer(reader: Any) -> Any:
    """SentencePiece BPE tokenizer described by a GGUF file (``tokenizer.ggml.model == 'llama'``).

    As llama.cpp's SPM tokenizer (and Hugging Face's converted ``LlamaTokenizerFast``):
    spaces become ``▁``, a ``▁`` is prepended (unless ``tokenizer.ggml.add_space_prefix``
    is False), adjacent pieces merge by the score of the merged piece (highest first:
    the BPE merge list is ordered by it), characters outside the vocabulary fall back to
    ``<0xXX>`` byte tokens.  BOS is added by the model (``add_bos_token``), not here.

    Parameters
    ----------
    reader : gguf.GGUFReader

    Returns
    -------
    tokenizers.Tokenizer
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    scores_field = reader.fields.get("tokenizer.ggml.scores")
    scores = list(scores_field.contents()) if scores_field is not None else [0.0] * len(tokens)
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    normal = {tok for tok, t in zip(tokens, types, strict=True) if t == 1}
    merges = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-float(scores[vocab[piece]]), vocab[left], vocab[right], left,
                               right))
    merges.sort()
    unk = reader.fields.get("tokenizer.ggml.unknown_token_id")
    unk_tok = tokens[int(unk.contents())] if unk is not None else None
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk_tok,
        fuse_unk=True, byte_fallback=True,
    ))
    prefix = reader.fields.get("tokenizer.ggml.add_space_prefix")
    steps = [normalizers.Replace(" ", "\u2581")]
    if prefix is None or bool(prefix.contents()):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, t in zip(tokens, types, strict=True)
        if t == _CONTROL
    ]
    tokenizer.add_special_tokens(special)
    return tokenizer
