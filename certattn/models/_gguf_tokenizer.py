"""``tokenizers`` tokenizers rebuilt from GGUF metadata: byte-level BPE (``gpt2``) and
SentencePiece BPE (``llama``)."""

from __future__ import annotations

from typing import Any

_CONTROL = 3  # llama.cpp token type of control (special) tokens


def _field(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise KeyError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def _list(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], n: int | None = None,
          default: Any = ...) -> list[Any]:
    """Metadata list ``key`` of ``kind`` items (and ``n`` of them), else a ValueError."""
    value = _field(meta, key) if default is ... or key in meta else default
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{key} is not a list of {getattr(kind, '__name__', 'numbers')}")
    if n is not None and len(value) != n:
        raise ValueError(f"{key} has {len(value)} entries for {n} tokens")
    return value


def _tokens(meta: dict[str, Any]) -> tuple[list[str], list[int]]:
    tokens = _list(meta, "tokenizer.ggml.tokens", str)
    return tokens, _list(meta, "tokenizer.ggml.token_type", int, len(tokens))


def _build(make: Any) -> Any:
    """Run a ``tokenizers`` constructor, its errors (plain Exceptions) as ValueError."""
    try:
        return make()
    except Exception as exc:  # tokenizers raises its own Exception types
        raise ValueError(f"tokenizers refused it ({exc})") from None


def gguf_bpe_tokenizer(meta: dict[str, Any]) -> Any:
    """Byte-level BPE tokenizer described by a GGUF file (``tokenizer.ggml.model == 'gpt2'``).

    SmolLM2's GGUF states pre-tokenizer ``smollm``; llama.cpp then splits every digit
    apart before the GPT-2 regex, which is what the original SmolLM2 ``tokenizer.json``
    does with ``Digits(individual_digits=True)`` followed by ``ByteLevel``. Control tokens
    (``<|im_start|>``, ``<|endoftext|>``, ...) are added as special tokens, so they stay whole.
    No BOS is prepended (``tokenizer.ggml.add_bos_token`` is False for SmolLM2).

    Parameters
    ----------
    meta : dict
        The GGUF file's metadata (:func:`certattn.models._gguf.read_gguf`).

    Returns
    -------
    tokenizers.Tokenizer

    Raises
    ------
    KeyError, ValueError
        Missing metadata, or metadata of the wrong type or length.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(meta, "tokenizer.ggml.model")
    if kind == "llama":
        return gguf_spm_tokenizer(meta)
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
            "SentencePiece 'llama')"
        )
    tokens, types = _tokens(meta)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in _list(meta, "tokenizer.ggml.merges", str)]
    for m in merges:
        if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab:
            raise ValueError(f"tokenizer.ggml.merges has {' '.join(m)!r}, not of the vocabulary")
    tokenizer = _build(lambda: Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False)))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, t in zip(tokens, types, strict=True)
        if t == _CONTROL
    ]
    _build(lambda: tokenizer.add_special_tokens(special))
    return tokenizer


def gguf_spm_tokenizer(meta: dict[str, Any]) -> Any:
    """SentencePiece BPE tokenizer described by a GGUF file (``tokenizer.ggml.model == 'llama'``).

    As llama.cpp's SPM tokenizer (and Hugging Face's converted ``LlamaTokenizerFast``):
    spaces become ``▁``, a ``▁`` is prepended (unless ``tokenizer.ggml.add_space_prefix``
    is False), adjacent pieces merge by the score of the merged piece (highest first:
    the BPE merge list is ordered by it), characters outside the vocabulary fall back to
    ``<0xXX>`` byte tokens.  BOS is added by the model (``add_bos_token``), not here.

    Parameters
    ----------
    meta : dict
        The GGUF file's metadata.

    Returns
    -------
    tokenizers.Tokenizer

    Raises
    ------
    KeyError, ValueError
        Missing metadata, or metadata of the wrong type or length.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens, types = _tokens(meta)
    scores = _list(meta, "tokenizer.ggml.scores", (int, float), len(tokens),
                   default=[0.0] * len(tokens))
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
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is not None and (isinstance(unk, bool) or not isinstance(unk, int)
                            or not 0 <= unk < len(tokens)):
        raise ValueError(f"tokenizer.ggml.unknown_token_id {unk!r} is not a token")
    unk_tok = tokens[unk] if unk is not None else None
    tokenizer = _build(lambda: Tokenizer(models.BPE(
        vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk_tok,
        fuse_unk=True, byte_fallback=True,
    )))
    steps = [normalizers.Replace(" ", "\u2581")]
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)):
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
    _build(lambda: tokenizer.add_special_tokens(special))
    return tokenizer
