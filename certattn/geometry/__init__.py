"""Fisher-Rao curvature of ungated and gated attention outputs.

Bathula & Joshi, "Gating Enables Curvature" (arXiv 2604.14702); derivations in
THEORY.md section 8.  A head output ``mu(theta)`` is the mean of ``N(mu, Sigma)``;
the Fisher metric is ``g = J^T Sigma^{-1} J`` (Theorem GEO-METRIC) and its intrinsic
curvature is computed by the Gauss equation (from ``J`` and the Hessian of ``mu``) or
from the metric alone (Christoffel symbols and Riemann tensor), Theorem GEO-GAUSS-EQ.

Sign convention: ``R(X,Y)Z = nabla_X nabla_Y Z - nabla_Y nabla_X Z - nabla_[X,Y] Z``,
``riemann[..., l, i, j, k] = R^l_{ijk}``, sectional ``K(u,v) = g(R(u,v)v,u)/|u^v|^2``:
the sphere is positive (see :mod:`.curvature`).

Scope (Theorem GEO-UNGATED-FLAT vs GEO-SCOPE): the flatness of ungated attention is a
statement about the affine-coefficient model (``mu`` affine in the attention weights
``alpha``, parametrised by at most ``n - 1`` free coordinates of the simplex, e.g. the
simplex chart or ``softmax(q1, q2, 0)`` with 3 keys).  With more keys than parameters
plus one (``n = 4`` keys and a 2-D query) or input-dependent values an ungated head CAN
be curved.
"""

from .curvature import (
    Curvature,
    brioschi,
    christoffel,
    curvature,
    gauss_route,
    gaussian_curvature,
    metric_route,
    second_fundamental_form,
)
from .derivatives import hessian_fd, jacobian_fd
from .experiment import ExperimentResults, RunResult, run_experiment
from .gating import depth_curvature, sigmoid_gate_curvature_at_zero, sphere_cap_curvature
from .maps import (
    AffineMap,
    Compose,
    ExpQuadraticGate,
    FunctionMap,
    Gated,
    MeanMap,
    SigmoidGate,
    SoftmaxAttention,
    SphereCapGate,
    gated_attention,
    softmax_chart_attention,
    structured_depth_map,
    ungated_simplex,
)
from .metric import ExplicitMetric, GaussianFamilyMetric, Metric, PullbackMetric, pullback_metric
from .proxy import nonlinearity_proxy, normal_curvature

__all__ = [
    "AffineMap",
    "Compose",
    "Curvature",
    "ExpQuadraticGate",
    "ExperimentResults",
    "ExplicitMetric",
    "FunctionMap",
    "Gated",
    "GaussianFamilyMetric",
    "MeanMap",
    "Metric",
    "PullbackMetric",
    "RunResult",
    "SigmoidGate",
    "SoftmaxAttention",
    "SphereCapGate",
    "brioschi",
    "christoffel",
    "curvature",
    "depth_curvature",
    "gated_attention",
    "gauss_route",
    "gaussian_curvature",
    "hessian_fd",
    "jacobian_fd",
    "metric_route",
    "nonlinearity_proxy",
    "normal_curvature",
    "pullback_metric",
    "run_experiment",
    "second_fundamental_form",
    "sigmoid_gate_curvature_at_zero",
    "softmax_chart_attention",
    "sphere_cap_curvature",
    "structured_depth_map",
    "ungated_simplex",
]
