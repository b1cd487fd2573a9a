"""certattn: certified sparse attention.

Sound, per-query budgets for sparse attention: which keys to keep so that the softmax
loses at most a given total-variation mass, what any kept set loses, and what that costs
at the output.  Every bound holds for the exact softmax of the given logits (THEORY
section 7; the error model is :mod:`certattn._fp`).

Certificates
------------
certify_topk        smallest sound Top-k per row (TV-TAIL, TV-KL; exact up to a margin)
certify_topp        top-p: the same certificate with eps = 1 - p
certify_kept        any kept set: sound tail and KL bounds (TV-TAIL, any set)
certify_scores      per-query certificates from queries and keys, in bounded memory
certify_attention   any selection policy end to end: kept set, output, error bound
certified_search    score few keys, certify eps (SEARCH-SOUND)
policies            TopK, TopP, FixedK, WindowSinks, Pages, CertifiedBlocks, Search

Distribution (exact values)
---------------------------
tail_mass, log_partition, topk_mask, truncation_divergences, kl_from_tail, tv_from_kl

Logit-only bounds
-----------------
tail_bound, gap_bound, gap_exact_head_bound, multigap_bound, uniform_gap_bound, bound_k,
gap_threshold, TAIL_BOUNDS

Blocks and cells
----------------
block_tail_bounds, greedy_block_set, smallest_block_count, key_block_bounds,
ball_score_upper, box_score_upper, ball_box_score_upper, kmeans_cells, cell_tree

Output level
------------
output_bounds, head_tail_terms, variance_decomposition, smallest_k_for_output

Submodules (imported on first use): gaussian, gaussian_mc, geometry, models, budget, io,
verify, theorems, plots, reproduce.
"""


from . import policies
from .attention import AttentionCertificate, ScoreCertificate, certify_attention, certify_scores
from .blocks import (
    BlockScoreBounds,
    BlockSelection,
    BlockTailBounds,
    block_tail_bounds,
    greedy_block_set,
    key_block_bounds,
    smallest_block_count,
)
from .bounds import (
    TAIL_BOUNDS,
    bound_k,
    gap_bound,
    gap_exact_head_bound,
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
    "TAIL_BOUNDS",
    "AttentionCertificate",
    "BlockScoreBounds",
    "BlockSelection",
    "BlockTailBounds",
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
    "bound_k",
    "box_score_upper",
    "cell_tree",
    "certified_search",
    "certify_attention",
    "certify_kept",
    "certify_scores",
    "certify_topk",
    "certify_topp",
    "gap_bound",
    "gap_exact_head_bound",
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
    {"budget", "cli", "corpus", "errors", "gaussian", "gaussian_mc", "geometry", "io",
     "models", "plots", "reproduce", "theorems", "verify"}
)


_RENAMED = {"BOUNDS": "TAIL_BOUNDS", "certified_k": "bound_k",
            "exact_head_bound": "gap_exact_head_bound"}


def __getattr__(name: str) -> object:
    if name in _RENAMED:  # deprecated names (0.1)
        import warnings

        warnings.warn(f"certattn.{name} is deprecated; use {_RENAMED[name]}",
                      DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
