"""Language steering with a sparse autoencoder, and the attention heads it moves.

The seed paper (Chou et al., *Causal Language Control in Multilingual Transformers via
Sparse Feature Steering*) picks, per target language, the SAE feature of a residual
stream whose activation differs most from English, changes that one feature at one layer,
and measures how often the generated text switches language and how much meaning it
keeps.  This package builds the same pipeline on a transformers causal LM (SmolLM2 here)
and adds certattn's own measure: the total variation between steered and unsteered
attention distributions per (layer, head).

Needs the ``[steer]`` extra (torch, transformers, langdetect).  Nothing in the
certificate core imports it.

corpus              aligned paragraphs of the Debian Reference in five languages
collect_residuals   residual-stream activations after one decoder layer
TopKSAE             a TopK sparse autoencoder (train, save, load)
rank_features       features by normalised activation difference, target minus English
steering            a context manager adding ``c`` times a direction at one layer
feature_steering    one SAE feature added or clamped at one layer
head_tv             TV between steered and unsteered attention, per (layer, head)
ablate_heads        a context manager removing heads' outputs
run_grid            success, meaning and fluency over layers and coefficients
"""

from __future__ import annotations

try:
    import langdetect  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the [steer] extra is not installed (no module named {exc.name!r}): "
        "pip install torch==2.13.0, then the package with its [steer] extra"
    ) from exc

from .corpus import LANGS, corpus
from .experiment import detect_language, run_grid
from .heads import ablate_heads, head_tv
from .sae import TopKSAE, train_sae
from .steering import (
    collect_residuals,
    feature_steering,
    mean_difference,
    rank_features,
    steering,
)

__all__ = [
    "LANGS",
    "TopKSAE",
    "ablate_heads",
    "collect_residuals",
    "corpus",
    "detect_language",
    "feature_steering",
    "head_tv",
    "mean_difference",
    "rank_features",
    "run_grid",
    "steering",
    "train_sae",
]
