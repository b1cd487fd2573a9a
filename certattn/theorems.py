r"""The theorem registry: every statement of THEORY.md (sections 2 to 6 and 8) in one place.

Each :class:`Theorem` records an id, its THEORY section, a concise exact statement, its
source (``[paper]`` with the paper's number, or ``[derived]``), the library functions that
implement it (dotted, importable names), its SymPy proofs (``proofs/<module>.py::<func>``,
registered with ``@proof(ID, ...)``), its property tests (``tests/<file>::<test>``) and the
name of its batch check in :mod:`certattn.verify` (``certattn verify``).

This tuple is the single source of truth: ``docs/theorems.md`` is generated from it
(``python -m certattn.theorems > docs/theorems.md``), the README table from
``to_markdown(table_only=True)``, and ``tests/test_registry.py`` checks that every entry
has a proof (unless ``kind == "empirical"``), its functions import, its tests exist and
it has a verify check.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["KINDS", "THEOREMS", "Theorem", "by_id", "readme_table", "to_markdown"]

KINDS = ("identity", "bound", "closed-form", "empirical", "algorithm")

_TV = "Tzachristas et al."
_BJ = "Bathula & Joshi"


@dataclass(frozen=True)
class Theorem:
    """One registered statement."""

    id: str
    section: int
    statement: str
    source: str
    kind: str
    functions: tuple[str, ...]
    proofs: tuple[str, ...]
    tests: tuple[str, ...]
    verify: str


def _t(
    id: str,
    section: int,
    kind: str,
    statement: str,
    source: str,
    functions: str,
    proofs: str,
    tests: str,
) -> Theorem:
    """Build an entry from whitespace-separated names (``proofs`` relative to ``proofs/``,
    ``tests`` relative to ``tests/``, both ``file::name``)."""
    return Theorem(
        id=id,
        section=section,
        statement=" ".join(statement.split()),
        source=source,
        kind=kind,
        functions=tuple(f"certattn.{f}" for f in functions.split()),
        proofs=tuple(f"proofs/{p}" for p in proofs.split()),
        tests=tuple(f"tests/{t}" for t in tests.split()),
        verify=id,
    )


THEOREMS: tuple[Theorem, ...] = (
    # ---------------------------------------------------------------- 2. distribution
    _t("TV-TAIL", 2, "identity",
       "TV(P, P(.|A)) = 1 - P(A) = tau for ANY kept set A (Top-k: A = the k largest logits).",
       f"[paper] Lemma 4.1 of {_TV} (Top-k); any set [derived]",
       "distribution.tail_mass topk.certify_topk",
       "distribution.py::tv_equals_tail",
       "test_distribution.py::test_tail_mass_is_tv_for_any_kept_set"),
    _t("TV-KL", 2, "identity",
       "KL(P_hat||P) = LSE(all) - LSE(H) = -log(1 - tau); TV = 1 - exp(-KL); "
       "KL(P||P_hat) = +inf whenever tau > 0.",
       f"[paper] Thm 4.3 of {_TV}",
       "distribution.truncation_divergences distribution.kl_from_tail distribution.tv_from_kl",
       "distribution.py::kl_identity",
       "test_distribution.py::test_divergences_match_their_definitions"),
    _t("DIV-COROLLARIES", 2, "identity",
       "chi2(P_hat||P) = tau/(1-tau); squared Hellinger 1 - sqrt(1-tau); every Renyi "
       "D_alpha(P_hat||P) = -log(1-tau).",
       "[derived]",
       "distribution.truncation_divergences distribution.Divergences.renyi",
       "distribution.py::corollaries",
       "test_distribution.py::test_divergences_match_their_definitions"),
    _t("BUDGET-EQUIV", 2, "identity",
       "TV <= eps iff KL(P_hat||P) <= -log(1-eps); top-p with p = 1 - eps is exactly a TV "
       "budget eps.",
       "[derived]",
       "distribution.tv_budget_to_kl distribution.kl_budget_to_tv topk.certify_topp",
       "distribution.py::budget_equivalence",
       "test_distribution.py::test_budgets_are_interchangeable "
       "test_topk.py::test_topp_is_topk_with_eps_one_minus_p"),
    _t("TOPK-MINIMAL", 2, "algorithm",
       "certify_topk's k is never below the exact k_eps = min{k : tau_k <= eps} and exceeds it "
       "only if the exact tau_{k-1} is within relative 1e-6 of eps; its tail_mass is a sound "
       "upper bound on the exact tau_k and <= eps (tau_k - tau_{k+1} = p_{k+1} >= 0: tau_k "
       "is non-increasing in k). On every path: NumPy, compiled (numba) and generic.",
       "[derived] (rounding analysis in certattn/topk.py and certattn/_topk_numba.py)",
       "topk.certify_topk topk.certify_topp",
       "topk.py::tail_monotone topk.py::polynomial_exp_bound",
       "test_topk.py::test_sound_and_minimal_against_exact_arithmetic "
       "test_topk.py::test_bracket_kernel_on_long_rows_against_exact_arithmetic "
       "test_topk_numba.py::test_long_rows_against_exact_arithmetic "
       "test_topk_numba.py::test_the_polynomial_exp_against_mpmath"),
    # ---------------------------------------------------------------- 3. bounds
    _t("GAP-SINGLE", 3, "bound",
       "1 <= k < n, Delta_k = s_k - s_{k+1}: tau_k <= 1/(1 + (k/(n-k)) e^{Delta_k}); equality "
       "iff the logits take two levels; certifies tau_k <= eps iff "
       "Delta_k >= ln((n-k)/k) + ln((1-eps)/eps).",
       f"[paper] Thm 4.5 of {_TV}",
       "bounds.gap_bound bounds.bound_k bounds.gap_threshold bounds.tail_bound",
       "bounds.py::gap_single_equality bounds.py::gap_single_certify bounds.py::ratio_monotone",
       "test_bounds.py::test_gap_single_equality_on_two_level_rows "
       "test_bounds.py::test_gap_threshold_is_the_solved_form "
       "test_bounds.py::test_every_gap_bound_is_sound_against_exact_arithmetic"),
    _t("GAP-EXACT-HEAD", 3, "bound",
       "tau_k <= (n-k) e^{s_{k+1}} / (sum_{i<=k} e^{s_i} + (n-k) e^{s_{k+1}}), never looser "
       "than GAP-SINGLE.",
       "[derived]",
       "bounds.gap_exact_head_bound",
       "bounds.py::exact_head_dominates",
       "test_bounds.py::test_bound_ordering "
       "test_bounds.py::test_every_gap_bound_is_sound_against_exact_arithmetic"),
    _t("GAP-MULTI", 3, "bound",
       "cut points k = j_0 < ... < j_m < n, j_{m+1} = n: tau_k <= X/(k + X), "
       "X = sum_r (j_{r+1} - j_r) e^{-(s_k - s_{j_r + 1})}; m = 0 is GAP-SINGLE; the library "
       "picks the m cuts minimising X by dynamic programming.",
       f"[paper] names it ({_TV}); form [derived]",
       "bounds.multigap_bound bounds.tail_bound",
       "bounds.py::multigap_m0 bounds.py::multigap_all_and_split",
       "test_bounds.py::test_checkpoint_dp_is_the_optimal_cut_choice "
       "test_bounds.py::test_bound_ordering"),
    _t("GAP-UNIFORM", 3, "bound",
       "if s_i - s_{i+1} >= delta for every k <= i < n then tau_k <= 1/(1 + k(e^delta - 1)), "
       "independent of n.",
       "[derived]",
       "bounds.uniform_gap_bound",
       "bounds.py::uniform_gap",
       "test_bounds.py::test_uniform_gap_on_arithmetic_progression"),
    _t("BLOCK-BOUNDS", 3, "bound",
       "blocks B_b of n_b keys with l_b <= s_i <= u_b, kept blocks S: "
       "tau <= sum_{b not in S} n_b e^{u_b} / (sum_{b in S} n_b e^{l_b} + "
       "sum_{b not in S} n_b e^{u_b}) and the mirror lower bound (l and u swapped); both "
       "attained by block-constant logits; greedy by v_b = n_b(eps e^{l_b} + (1-eps) e^{u_b}) "
       "is exact in blocks and within max n_b of optimal in keys.",
       f"[paper] eq. 4.4 of {_TV} (named); form [derived]",
       "blocks.block_tail_bounds blocks.greedy_block_set blocks.smallest_block_count "
       "blocks.key_block_bounds",
       "bounds.py::block_equality bounds.py::block_monotone bounds.py::block_knapsack_form",
       "test_bounds.py::test_block_bounds_sandwich_the_exact_tail "
       "test_bounds.py::test_block_bounds_equality_on_block_constant_logits "
       "test_bounds.py::test_greedy_blocks_optimal_in_blocks_and_within_one_block_in_keys"),
    _t("BLOCK-SCORE", 3, "bound",
       "every key k of a cell (|k - c| <= r, kmin <= k <= kmax) has "
       "scale q.k <= scale (q.c + |q| r) (ball, Cauchy-Schwarz) and "
       "scale q.k <= scale sum_j max(q_j kmin_j, q_j kmax_j) (box, Quest); mirrored lower "
       "bounds; the intersection takes the tighter.",
       "[derived]",
       "cells.ball_score_upper cells.ball_score_lower cells.box_score_upper "
       "cells.box_score_lower cells.ball_box_score_upper blocks.key_block_bounds",
       "search.py::ball_bound search.py::box_bound",
       "test_cells.py::test_block_score_bounds_hold_exactly "
       "test_cells.py::test_block_score_ball_equality_case "
       "test_cells.py::test_block_score_box_attained_at_corner"),
    # ---------------------------------------------------------------- 4. output
    _t("OUT-BOUNDED", 4, "bound",
       "|Attn - Attn_k| <= 2 C tau when every |v_j| <= C.",
       f"[paper] Prop 5.1 of {_TV}",
       "output.output_bounds",
       "output.py::bounded_weights",
       "test_output.py::test_every_bound_is_sound_against_exact_arithmetic"),
    _t("OUT-HEAD-TAIL", 4, "identity",
       "Attn - Attn_k = tau (mu_T - mu_H), exactly, for any kept set and any norm.",
       f"[paper] Thm 5.2 of {_TV}",
       "output.head_tail_terms",
       "output.py::head_tail_identity",
       "test_output.py::test_head_tail_identity_is_exact"),
    _t("OUT-DIAMETER", 4, "bound",
       "|Attn - Attn_k| <= tau max_{j in T} |v_j - mu_H| <= tau diam_{H,T} <= tau diam(V) "
       "<= 2 C tau, diam_{H,T} = max_{i in H, j in T} |v_i - v_j|.",
       f"[paper] Prop 5.3 of {_TV}; chain [derived]",
       "output.output_bounds",
       "output.py::diameter_convex",
       "test_output.py::test_diameter_chain"),
    _t("OUT-BEST", 4, "bound",
       "|Attn - Attn_k| <= min{tau diam_{H,T}, sqrt(tau/(1-tau)) sqrt(Var_P V), 2 C tau} "
       "(Euclidean norm); smallest_k_for_output inverts it for a budget delta.",
       f"[paper] Thm 5.6 of {_TV}",
       "output.output_bounds output.smallest_k_for_output attention.certify_attention",
       "output.py::variance_step",
       "test_output.py::test_variance_decomposition_and_best "
       "test_output.py::test_smallest_k_for_output_is_minimal_and_sound "
       "test_attention.py::test_error_bound_against_exact_arithmetic"),
    _t("OUT-VAR-DECOMP", 4, "identity",
       "Var_P(V) = (1-tau) Var_H + tau Var_T + tau(1-tau) |mu_T - mu_H|^2, hence "
       "|Attn - Attn_k| = sqrt(tau/(1-tau)) sqrt(between-group variance).",
       "[derived]",
       "output.variance_decomposition",
       "output.py::variance_decomposition",
       "test_output.py::test_variance_decomposition_and_best"),
    _t("DELTA-ERROR", 4, "bound",
       "Delta Attention: kept sets H_i, H_a, S_j = Attn_{H_j}(q_j), D_a = Attn(q_a), "
       "O_i = S_i + (D_a - S_a): O_i - Attn(q_i) = tau_a (mu_T,a - mu_H,a) - "
       "tau_i (mu_T,i - mu_H,i), exactly, hence |O_i - Attn(q_i)| <= "
       "tau_a max_{j in T_a} |v_j - mu_H,a| + tau_i max_{j in T_i} |v_j - mu_H,i| "
       "<= tau_a diam_a + tau_i diam_i (any norm).",
       "[derived] from OUT-HEAD-TAIL (Thm 5.2 of Tzachristas et al.); the method: "
       "Willette, Lee & Hwang (Delta Attention, NeurIPS 2025)",
       "approx.delta.delta_correct approx.delta.delta_rows",
       "delta.py::delta_error_identity delta.py::delta_error_bound_steps",
       "test_approx_delta.py::test_delta_error_is_sound_against_exact_arithmetic "
       "test_approx_delta.py::test_certificate_triggered_dense_rows "
       "test_approx_delta.py::test_anchor_rows_and_the_tail_equal_dense_exactly"),
    # ---------------------------------------------------------------- 5. Gaussian
    _t("GAUSS-TILT", 5, "closed-form",
       "if s ~ N(mu, sigma^2), the e^s-weighted law of s is N(mu + sigma^2, sigma^2).",
       "[derived]",
       "gaussian.tilted_normal",
       "gaussian.py::tilt",
       "test_gaussian.py::test_tilted_law_against_integration"),
    _t("GAUSS-THRESHOLD", 5, "closed-form",
       "keeping s >= t discards the mass Phi((t - mu - sigma^2)/sigma) and keeps the fraction "
       "Phi_c((t - mu)/sigma) (population limit); mu cancels.",
       "[derived]",
       "gaussian.discarded_mass gaussian.kept_fraction",
       "gaussian.py::threshold",
       "test_gaussian.py::test_threshold_against_integration"),
    _t("GAUSS-TOPFRAC", 5, "closed-form",
       "keeping the top fraction rho leaves tau = Phi(Phi^{-1}(1 - rho) - sigma).",
       "[derived]",
       "gaussian.top_fraction_tail_mass gaussian.keps_eps",
       "gaussian.py::top_fraction",
       "test_gaussian.py::test_top_fraction_against_integration "
       "test_gaussian.py::test_monotonicity"),
    _t("GAUSS-KEPS", 5, "closed-form",
       "k_eps / n -> Phi_c(sigma + Phi^{-1}(eps)); inverses "
       "sigma = max(0, -Phi^{-1}(rho) - Phi^{-1}(eps)) and eps = Phi_c(Phi^{-1}(rho) + sigma).",
       f"[paper] the k_eps rule of {_TV}; inverses [derived]",
       "gaussian.keps_fraction gaussian.keps_sigma gaussian.keps_eps gaussian.predict_k",
       "gaussian.py::keps_rule",
       "test_gaussian.py::test_rule_reference_values "
       "test_gaussian.py::test_rule_solves_top_fraction "
       "test_gaussian.py::test_eps_inverse_round_trip "
       "test_gaussian.py::test_rule_against_monte_carlo_large_n"),
    _t("GAUSS-FINITE-N", 5, "closed-form",
       "n i.i.d. N(mu, sigma^2) scores, fixed t: E sum_{s_i<t} e^{s_i} = "
       "n e^{mu+sigma^2/2} Phi((t-mu-sigma^2)/sigma), E #{s_i >= t} = n Phi_c((t-mu)/sigma), "
       "sd(Z)/E Z = sqrt((e^{sigma^2} - 1)/n) for Z = sum_i e^{s_i}.",
       "[derived]",
       "gaussian.expected_tail_sum gaussian.expected_kept_count gaussian.partition_rel_sd",
       "gaussian.py::finite_n",
       "test_gaussian.py::test_threshold_against_integration "
       "test_gaussian.py::test_partition_rel_sd"),
    _t("GAUSS-LIMITS", 5, "closed-form",
       "entropy of softmax(s) -> log n - sigma^2/2; participation ratio "
       "1/sum p_i^2 -> n e^{-sigma^2}.",
       "[derived]",
       "gaussian.entropy_limit gaussian.participation_ratio_limit",
       "gaussian.py::limits",
       "test_gaussian.py::test_limits_against_integration_and_large_rows"),
    _t("GAUSS-VALIDITY", 5, "empirical",
       "the k_eps rule is within 0.022 (absolute) of the Monte Carlo mean of the exact "
       "k_eps/n when sqrt((e^{sigma^2}-1)/n) <= 0.5 and sigma/sqrt(2 ln n) <= 0.75; beyond, it "
       "under-predicts (n = 128, sigma = 3, eps = 0.01: 0.33 measured vs 0.25). Empirical: "
       "no symbolic proof.",
       "[derived] empirical (calibrated by Monte Carlo)",
       "gaussian_mc.gaussian_validity gaussian_mc.monte_carlo_keps",
       "",
       "test_gaussian.py::test_validity_diagnostic test_gaussian.py::test_reference_table"),
    # ---------------------------------------------------------------- 6. search
    _t("SEARCH-SOUND", 6, "algorithm",
       "certified search over cells (scored set S, kept A in S, unscored cells R): "
       "tau(A) <= (sum_{S\\A} e^{s_i} + sum_{j in R} n_j e^{U_j}) / "
       "(sum_S e^{s_i} + sum_{j in R} n_j e^{U_j}); the search stops when this is <= eps, so "
       "the exact tail of the kept set <= reported tail bound <= eps.",
       f"[paper] Algorithm 2 (MC-Search) and Thm 7.2 of {_TV}; details [derived]",
       "search.certified_search search.search_cells",
       "search.py::ratio_monotone search.py::tail_as_ratio",
       "test_search.py::test_search_sound_exact test_search.py::test_search_causal_mask "
       "test_search.py::test_search_adversarial_magnitudes"),
    _t("BLOCK-MASS", 6, "bound",
       "n scores s_i <= U with mean mu and variance <= v, b = U - mu: "
       "sum_i e^{s_i} <= n e^{mu} (v e^b + b^2 e^{-v/b}) / (v + b^2) (Bennett), attained by "
       "two-level scores at mu + b and mu - v/b; capped by n e^U.",
       "[derived] (Bennett's inequality)",
       "cells.bennett_log_mass cells.CellTree.log_mass_upper",
       "search.py::bennett_mass",
       "test_cells.py::test_block_mass_bennett_bound "
       "test_cells.py::test_block_mass_bennett_attained_by_two_points"),
    _t("QUANT-SCORE", 6, "bound",
       "keys quantized per channel in groups (b-bit codes c, lo <= k <= lo + (2^b - 1) step, "
       "khat = fl(lo + step c)): |k_ij - khat_ij| <= delta_ij = step_j (1/2 + 2^(b+2) u) + "
       "2 u |khat_ij|, and for every query scale (q.khat_i - rho_i) <= s_i <= "
       "scale (q.khat_i + rho_i), rho_i = min(sum_j |q_j| delta_ij, |q| r_i) with "
       "r_i >= |k_i - khat_i|; on nested grids (c the top b bits of B-bit codes, h = B - b) "
       "khat = fl(lo + step (2^h c + (2^h - 1)/2)) and delta_ij = step_j ((2^h - 1)/2 + "
       "1/2 + 2^(B+2) u) + 2 u |khat_ij|; certified search with these per-key bounds "
       "(method quant) is SEARCH-SOUND with one-key cells.",
       "[derived] (quantization as in KIVI/Twilight; pages as in Quest)",
       "quant.quantize_keys quant.QuantKeys.score_bounds quant.QuantKeys.error_bound "
       "quant.QuantKeys.page_upper search.search_quant",
       "quant.py::grid_rounding quant.py::code_margin quant.py::coordinate_bound "
       "quant.py::score_sum quant.py::paged_frontier quant.py::nested_run",
       "test_quant.py::test_quant_error_and_score_bounds_hold_exactly "
       "test_quant.py::test_quant_nested_grids_share_metadata_and_hold_at_run_edges "
       "test_quant.py::test_quant_adversarial_keys "
       "test_quant.py::test_search_quant_sound_exact"),
    # ---------------------------------------------------------------- 8. geometry
    _t("GEO-METRIC", 8, "identity",
       "p(y|theta) = N(mu(theta), Sigma): Fisher metric g = J^T Sigma^{-1} J, "
       "J = d mu/d theta; with variance parameters add 1/2 tr(Sigma^{-1} d_i Sigma "
       "Sigma^{-1} d_j Sigma).",
       "[derived]",
       "geometry.metric.pullback_metric geometry.metric.gaussian_fisher_metric "
       "geometry.metric.PullbackMetric geometry.metric.GaussianFamilyMetric",
       "geometry.py::metric_from_fisher_information",
       "test_geometry_curvature.py::test_metric_with_variance_term "
       "test_geometry_curvature.py::test_pullback_metric_general_cov"),
    _t("GEO-GAUSS-EQ", 8, "identity",
       "Gauss equation g(R(d_i,d_j)d_k,d_l) = <II_jk,II_il> - <II_ik,II_jl> with "
       "II_ij = (I - J g^{-1} J^T Sigma^{-1}) d_i d_j mu agrees with the Christoffel/Riemann "
       "route of g (and Brioschi in 2-D).",
       "[derived]",
       "geometry.curvature.gauss_route geometry.curvature.second_fundamental_form "
       "geometry.curvature.metric_route geometry.curvature.riemann_from_metric "
       "geometry.curvature.brioschi",
       "geometry.py::gauss_equation_matches_metric_route",
       "test_geometry_curvature.py::test_gauss_route_equals_metric_route"),
    _t("GEO-ORACLES", 8, "closed-form",
       "sphere radius r: K = 1/r^2; univariate normal N(m, s^2) (metric diag(1,2)/s^2): "
       "K = -1/2; N(mu, s^2 I_d): sectional -1/(2d); Poincare half-plane: -1; cylinder: 0; "
       "g -> lambda g gives K -> K/lambda.",
       "[derived]",
       "geometry.oracles.sphere_map geometry.oracles.sphere_metric "
       "geometry.oracles.half_plane_metric geometry.oracles.normal_family_metric "
       "geometry.oracles.cylinder_map geometry.curvature.gaussian_curvature "
       "geometry.curvature.christoffel",
       "geometry.py::oracle_sphere_halfplane_scaling geometry.py::oracle_univariate_normal "
       "geometry.py::oracle_isotropic_normal geometry.py::oracle_cylinder",
       "test_geometry_curvature.py::test_sphere_positive_every_route "
       "test_geometry_curvature.py::test_half_plane_negative_and_scaling "
       "test_geometry_curvature.py::test_normal_family_constant_negative "
       "test_geometry_curvature.py::test_univariate_normal_is_minus_half "
       "test_geometry_curvature.py::test_cylinder_bent_but_flat "
       "test_geometry_curvature.py::test_covariance_scaling"),
    _t("GEO-UNGATED-FLAT", 8, "identity",
       "ungated mu = sum_i alpha_i U_i is affine in alpha: in the simplex chart "
       "g = D^T Sigma^{-1} D is constant and R = 0; under alpha = softmax(q1, q2, 0) (n = 3) "
       "K = 0 too.",
       f"[paper] {_BJ} (arXiv 2604.14702); charts [derived]",
       "geometry.maps.ungated_simplex geometry.maps.softmax_chart_attention",
       "geometry.py::ungated_flat_simplex_chart geometry.py::ungated_flat_softmax_chart",
       "test_geometry_attention.py::test_ungated_flat_in_simplex_chart "
       "test_geometry_attention.py::test_ungated_flat_in_softmax_chart "
       "test_geometry_attention.py::test_ungated_stack_ending_in_three_token_layer_is_flat"),
    _t("GEO-SCOPE", 8, "closed-form",
       "with 4 keys and a 2-D query an ungated head can be curved: logits (q1, q2, 0, q1+q2), "
       "U = I_4 give K(0) = -4.",
       "[derived]",
       "geometry.maps.SoftmaxAttention",
       "geometry.py::ungated_four_keys_curved",
       "test_geometry_attention.py::test_scope_four_keys_two_dim_query_is_curved "
       "test_geometry_attention.py::test_scope_generic_four_key_heads_are_curved"),
    _t("GEO-HEADWISE", 8, "identity",
       "mu = s(theta) m(theta), m affine, scalar s > 0, Sigma = I: "
       "II_ij = -(nu.m) s^2 d_i d_j (1/s), so sign K = sign det Hess(1/s); "
       "s = sigmoid(affine in alpha) gives K = 0.",
       "[derived]",
       "geometry.maps.Gated geometry.gating.headwise_second_fundamental_form "
       "geometry.maps.SigmoidGate",
       "geometry.py::headwise_second_fundamental_form geometry.py::headwise_sigmoid_affine_flat",
       "test_geometry_attention.py::test_headwise_criterion_sign "
       "test_geometry_attention.py::test_headwise_sigmoid_of_affine_is_flat"),
    _t("GEO-SPHERE-GATE", 8, "closed-form",
       "n = 3, U = I_3, s(alpha) = c/|alpha| (0 < c < 1/sqrt 3), Sigma = sigma^2 I: "
       "K = sigma^2/c^2 and scalar curvature S = 2K.",
       "[derived]",
       "geometry.maps.SphereCapGate geometry.gating.sphere_cap_curvature",
       "geometry.py::sphere_cap_gate",
       "test_geometry_attention.py::test_sphere_cap_gate"),
    _t("GEO-SIGMOID-GATE", 8, "closed-form",
       "alpha = softmax(q1, q2, 0), s = sigmoid(t(q1+q2) + b), U = I, Sigma = I: "
       "K(0) = 27 t^2 (6t-1)(1+e^b)^4 e^{-2b} / ((1+e^b)^2 + 18 t^2)^2, positive iff t > 1/6.",
       "[derived]",
       "geometry.gating.sigmoid_gate_curvature_at_zero geometry.gating.sigmoid_gate_map "
       "geometry.maps.gated_attention",
       "geometry.py::sigmoid_gate_curvature_at_zero",
       "test_geometry_attention.py::test_sigmoid_gate_curvature_at_zero "
       "test_geometry_attention.py::test_sigmoid_gate_sign_change_at_one_sixth"),
    _t("GEO-DEPTH", 8, "closed-form",
       "mu_L = (prod_l s_l) m, s_l = exp(-beta phi_l), grad phi_l(theta_0) = 0 and "
       "phi_l(theta_0) = 0: K_L(theta_0) = (nu.m)^2 beta^2 det(sum_l Hess phi_l) / det g_0; "
       "tied layers K_L = L^2 K_1; aligned superadditive; opposite cancel; without "
       "phi_l(theta_0) = 0 the L^2 law fails (K_L/K_1 = L^2 e^{2 beta (L-1) c}).",
       f"[paper] amplification with depth ({_BJ}); details [derived]",
       "geometry.maps.Compose geometry.maps.structured_depth_map "
       "geometry.maps.ExpQuadraticGate geometry.gating.depth_curvature",
       "geometry.py::depth_tied_layers geometry.py::depth_needs_normalisation",
       "test_geometry_attention.py::test_depth_tied_layers_square_law "
       "test_geometry_attention.py::test_depth_aligned_layers_superadditive "
       "test_geometry_attention.py::test_depth_opposite_layers_cancel "
       "test_geometry_attention.py::test_depth_law_needs_normalisation"),
    _t("GEO-PROXY", 8, "identity",
       "the finite-difference proxy |f(x+hu) - 2f(x) + f(x-hu)| / |f(x+hu) - f(x-hu)| "
       "(~ h|D^2 f[u,u]| / (2|Df u|)) is > 0 on the flat ungated softmax-chart head: it "
       "measures the parametrisation, not intrinsic curvature.",
       "[derived]",
       "geometry.proxy.nonlinearity_proxy geometry.proxy.mean_proxy "
       "geometry.proxy.normal_curvature",
       "geometry.py::proxy_positive_on_flat",
       "test_geometry_empirical.py::test_proxy_positive_on_flat_ungated_head "
       "test_geometry_empirical.py::test_normal_curvature_of_sphere"),
    # ---------------------------------------------------------------- 2. masks (last:
    # certattn verify seeds each check by its position here, so the others' seeds stay)
    _t("MASK-HIDDEN", 2, "bound",
       "keys masked by a finite additive fill (<= half the mask dtype's minimum) are never "
       "kept but keep their exact mass X (visible mass Z, kept set K visible, r = X/Z): "
       "tau_full = tau_V/(1+r) + r/(1+r) <= tau_V + r, Attn - Attn_V = r/(1+r) (mu_H - mu_V), "
       "so |Attn - out| <= |Attn_V - out| + min(h, 1)(max_H |v_j| + max_V |v_j|) with "
       "r <= h = sum_{j hidden} e^{s_j - M}, M the largest visible logit.",
       "[derived]",
       "masks.hidden_mass masks.hidden_tail masks.hidden_error attention.certify_attention "
       "search.certified_search",
       "distribution.py::hidden_tail_bound distribution.py::hidden_output_identity",
       "test_attention.py::test_float16_fill_with_a_huge_hidden_score "
       "test_attention.py::test_float32_min_fills_keep_a_positive_tail "
       "test_attention.py::test_hidden_mass_sound_on_random_and_extreme_fills "
       "test_search.py::test_search_float32_min_fills_keep_a_positive_tail "
       "test_approx_delta.py::test_dense_rows_and_delta_cover_keys_hidden_by_a_float16_fill"),
)

_BY_ID = {t.id: t for t in THEOREMS}
if len(_BY_ID) != len(THEOREMS):  # pragma: no cover - caught at import
    raise RuntimeError("duplicate theorem id in the registry")


def by_id() -> dict[str, Theorem]:
    """The registry as a dict keyed by id (in registry order)."""
    return dict(_BY_ID)


_SECTIONS = {
    2: "Distribution level",
    3: "Bounds from ordered logits and blocks",
    4: "Output level",
    5: "Gaussian score model",
    6: "Certified search",
    8: "Curvature of attention outputs",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _names(items: tuple[str, ...]) -> str:
    return "<br>".join(f"`{i}`" for i in items) if items else "none (empirical)"


def readme_table() -> str:
    """The README's table: id, statement, source and where (up to three functions)."""
    head = ["| id | statement | source | where |", "|---|---|---|---|"]
    rows = []
    for t in THEOREMS:
        names = [f"`{f.removeprefix('certattn.')}`" for f in t.functions[:3]]
        where = ", ".join(names) + (", ..." if len(t.functions) > 3 else "")
        rows.append(f"| {t.id} | {_cell(t.statement)} | {_cell(t.source)} | {where or '-'} |")
    return "\n".join(head + rows) + "\n"


def to_markdown(table_only: bool = False) -> str:
    """The registry as Markdown: one table (``table_only``) or the full ``docs/theorems.md``."""
    head = ["| id | section | kind | statement | source |", "|---|---|---|---|---|"]
    rows = [
        f"| {t.id} | {t.section} | {t.kind} | {_cell(t.statement)} | {_cell(t.source)} |"
        for t in THEOREMS
    ]
    if table_only:
        return "\n".join(head + rows) + "\n"
    out = [
        "# Theorem registry",
        "",
        "<!-- Generated from certattn/theorems.py: do not edit by hand. Regenerate with",
        "     python -m certattn.theorems > docs/theorems.md -->",
        "",
        "Every statement of THEORY.md (sections 2 to 6 and 8) with its id, source, the",
        "functions that implement it, its SymPy proofs (`python -m proofs`), its property",
        "tests and its batch check (`certattn verify --only ID`).",
        "",
        "## Summary",
        "",
        *head,
        *rows,
    ]
    for sec, title in _SECTIONS.items():
        out += ["", f"## {sec}. {title}"]
        for t in (t for t in THEOREMS if t.section == sec):
            out += [
                "",
                f"### {t.id}",
                "",
                f"- **Statement** ({t.kind}): {t.statement}",
                f"- **Source**: {t.source}",
                f"- **Functions**: {_names(t.functions)}",
                f"- **Proofs**: {_names(t.proofs)}",
                f"- **Tests**: {_names(t.tests)}",
                f"- **Verify**: `certattn verify --only {t.verify}`",
            ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(to_markdown(table_only="--table" in sys.argv[1:]))
