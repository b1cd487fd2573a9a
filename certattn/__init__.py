"""certattn: certified Top-k sparse attention.

Sound, per-query budgets for sparse attention: how many keys to keep so that the
softmax loses at most a given total-variation mass, and what that costs at the output.
"""

from . import policies
from .attention import AttentionCertificate, ScoreCertificate, certify_attention, certify_scores
from .blocks import (
    BlockSelection,
    block_tail_bounds,
    greedy_block_set,
    key_block_bounds,
    smallest_block_count,
)
from .bounds import (
    BOUNDS,
    certified_k,
    exact_head_bound,
    gap_bound,
    gap_threshold,
    multigap_bound,
    tail_bound,
    uniform_gap_bound,
)
from .cells import (
    CellTree,
    ball_box_score_upper,
    ball_score_upper,
    box_score_upper,
    cell_tree,
    kmeans_cells,
)
from .distribution import (
    Divergences,
    kl_from_tail,
    log_partition,
    tail_mass,
    topk_mask,
    truncation_divergences,
    tv_from_kl,
)
from .kept import KeptCertificate, certify_kept
from .output import (
    HeadTail,
    OutputBounds,
    VarianceDecomposition,
    head_tail_terms,
    output_bounds,
    smallest_k_for_output,
    variance_decomposition,
)
from .search import SearchResult, certified_search
from .topk import TopkCertificate, certify_topk, certify_topp

__version__ = "0.1.0"

__all__ = [
    "BOUNDS",
    "AttentionCertificate",
    "BlockSelection",
    "CellTree",
    "Divergences",
    "HeadTail",
    "KeptCertificate",
    "OutputBounds",
    "ScoreCertificate",
    "SearchResult",
    "TopkCertificate",
    "VarianceDecomposition",
    "__version__",
    "ball_box_score_upper",
    "ball_score_upper",
    "block_tail_bounds",
    "box_score_upper",
    "cell_tree",
    "certified_k",
    "certified_search",
    "certify_attention",
    "certify_kept",
    "certify_scores",
    "certify_topk",
    "certify_topp",
    "exact_head_bound",
    "gap_bound",
    "gap_threshold",
    "greedy_block_set",
    "head_tail_terms",
    "key_block_bounds",
    "kl_from_tail",
    "kmeans_cells",
    "log_partition",
    "multigap_bound",
    "output_bounds",
    "policies",
    "smallest_block_count",
    "smallest_k_for_output",
    "tail_bound",
    "tail_mass",
    "topk_mask",
    "truncation_divergences",
    "tv_from_kl",
    "uniform_gap_bound",
    "variance_decomposition",
]

# Submodules named in the README, reachable as attributes without slowing `import certattn`
# (imported on first use; none of them is needed by the core above).
_LAZY = frozenset(
    {"budget", "gaussian", "gaussian_mc", "geometry", "io", "models", "plots", "reproduce",
     "theorems", "verify"}
)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
