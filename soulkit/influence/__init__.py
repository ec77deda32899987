"""Influence functions with calibrated sign and scale.

``scores[i, j]`` predicts ``loss_i(theta without j) - loss_i(theta)`` (loss units; positive: example
``j`` helps query ``i``), from inverse-Hessian-vector products of the training objective
``mean loss + (l2/2) ||theta||^2``.

- :class:`InfluenceAnalyzer` -- ``fit(train)``, ``scores(train, queries)``, ``self_scores(train)``;
  ``loo="first_order"`` (Koh & Liang) or ``"newton"`` (Woodbury on the removed example's own
  Gauss-Newton block).
- Solvers (:mod:`.solvers`): :class:`ExactSolver`, :class:`CGSolver`, :class:`LissaSolver`,
  :class:`ArnoldiSolver`, :class:`DiagonalSolver`, :class:`IdentitySolver`; :class:`ConvergenceError`.
- Per-example gradients (:mod:`.gradients`): :func:`per_example_grads`, :func:`iter_per_example_grads`,
  :class:`OutputLoss`, :func:`flatten_tensors`, :func:`unflatten_tensor`.
- Metrics (:mod:`.metrics`): :func:`loo_correlation`, :func:`lds`, :func:`brittleness`;
  plots (:mod:`.plots`): :func:`scatter_predicted_vs_actual`, :func:`scatter_panels`.

Curvature comes from :mod:`soulkit.optim` (``hvp``, ``gnvp`` and the diagonal estimators).
"""

from .analyzer import InfluenceAnalyzer, InfluenceConfig
from .gradients import (
    BoundLoss,
    OutputLoss,
    ParamSpace,
    flatten_tensors,
    iter_per_example_grads,
    per_example_grads,
    projected_per_example_grads,
    unflatten_tensor,
)
from .hessian import CurvatureOperator
from .metrics import BrittlenessResult, LDSResult, LOOCorrelation, brittleness, lds, loo_correlation
from .plots import scatter_panels, scatter_predicted_vs_actual
from .solvers import (
    SOLVERS,
    ArnoldiSolver,
    CGSolver,
    ConvergenceError,
    ConvergenceWarning,
    DiagonalSolver,
    ExactSolver,
    IdentitySolver,
    LissaSolver,
    Solver,
    make_solver,
)

__all__ = [
    "SOLVERS",
    "ArnoldiSolver",
    "BoundLoss",
    "BrittlenessResult",
    "CGSolver",
    "ConvergenceError",
    "ConvergenceWarning",
    "CurvatureOperator",
    "DiagonalSolver",
    "ExactSolver",
    "IdentitySolver",
    "InfluenceAnalyzer",
    "InfluenceConfig",
    "LDSResult",
    "LOOCorrelation",
    "LissaSolver",
    "OutputLoss",
    "ParamSpace",
    "Solver",
    "brittleness",
    "flatten_tensors",
    "iter_per_example_grads",
    "lds",
    "loo_correlation",
    "make_solver",
    "per_example_grads",
    "projected_per_example_grads",
    "scatter_panels",
    "scatter_predicted_vs_actual",
    "unflatten_tensor",
]
