"""certattn: certified Top-k sparse attention.

Sound, per-query budgets for sparse attention: how many keys to keep so that the
softmax loses at most a given total-variation mass, and what that costs at the output.
"""

from .distribution import (
    Divergences,
    kl_from_tail,
    log_partition,
    tail_mass,
    topk_mask,
    truncation_divergences,
    tv_from_kl,
)
from .topk import TopkCertificate, certify_topk, certify_topp

__version__ = "0.1.0"

__all__ = [
    "Divergences",
    "TopkCertificate",
    "__version__",
    "certify_topk",
    "certify_topp",
    "kl_from_tail",
    "log_partition",
    "tail_mass",
    "topk_mask",
    "truncation_divergences",
    "tv_from_kl",
]
