"""certattn inside Hugging Face transformers: certify a model's attention in place.

Needs the ``[hf]`` extra (PyTorch and transformers >= 4.53; on a CPU machine
``pip install torch==2.13.0`` first, which is the 200 MB CPU build).  Nothing in the
certificate core imports this package.

transformers routes the attention of most of its architectures through a registry
(``transformers.AttentionInterface``); :func:`register` adds certattn's attention
function and its mask function under one name, and the context managers switch a model to
it and back:

observe              exact attention (bit-identical to ``eager``), certificates recorded
sparse               the model run on a policy's kept set, with the kept fraction and tails
delta_sparse         Delta Attention: a sparse base plus anchor-row output corrections
evaluate             dense vs sparse: next-token KL, top-1 agreement, perplexity, time
generate_agreement   greedy tokens equal to the dense ones before the first divergence
calibrate            the largest eps whose measured next-token KL meets a target (Calibration)
load                 ``"smollm2"``, ``"minilm"``, a Hugging Face folder or a GGUF file

Examples
--------
>>> from certattn.hf import load, observe                       # doctest: +SKIP
>>> model, tok = load("smollm2")                                # doctest: +SKIP
>>> with observe(model, eps=0.01) as rec:                       # doctest: +SKIP
...     model(torch.tensor([tok.encode("The capital of France is")]))
>>> rec.summary()                                               # doctest: +SKIP
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the [hf] extra is not installed (no module named {exc.name!r}): "
        "pip install torch==2.13.0, then the package with its [hf] extra"
    ) from exc

from ._attention import LayerCall, Recorder, SparseStats, observe, register, sparse
from ._calibrate import Calibration, calibrate
from ._delta import DeltaCorrection, delta_sparse
from ._evaluate import evaluate, generate_agreement, load

__all__ = [
    "Calibration",
    "DeltaCorrection",
    "LayerCall",
    "Recorder",
    "SparseStats",
    "calibrate",
    "delta_sparse",
    "evaluate",
    "generate_agreement",
    "load",
    "observe",
    "register",
    "sparse",
]
