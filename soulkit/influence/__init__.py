"""Influence functions with calibrated sign and scale.

``scores[i, j]`` predicts ``loss_i(theta without j) - loss_i(theta)`` (loss units; positive: example
``j`` helps query ``i``), from inverse-Hessian-vector products of the training objective
``mean loss + (l2/2) ||theta||^2``.

- :class:`InfluenceAnalyzer` -- ``fit(train)``, ``scores(train, queries)``, ``self_scores(train)``;
  ``loo="first_order"`` (Koh & Liang) or ``"newton"`` (Woodbury on the removed example's own
  Gauss-Newton block); its options are the fields of :class:`InfluenceConfig`.
- :class:`OutputLoss` -- a loss written as ``loss_on_output(output_fn(model, batch), batch)``, which
  Gauss-Newton curvature and Newton-corrected leave-one-out need.
- Transformer LMs: ``solver="kfac"`` / ``"ekfac"`` (and ``"identity"`` with ``modules=``) take the
  factored route (:mod:`.factored`, :mod:`.kfac`, :mod:`.modules`): K-FAC / EK-FAC curvature from module
  hooks, scores per sequence or per training token (``scores(train, queries, per_token=True)``),
  low-rank queries (``query_rank``), factors saved as safetensors (``save_factors``/``load_factors``).
  ``fit(train, store=...)`` / ``scores(..., store=...)`` write factors and chunked scores into an
  :class:`InfluenceStore` as they go, resume a killed run from it and refuse one made for another model,
  data set or options (:class:`StoreMismatchError`); under ``torchrun`` the ranks split the work
  (:mod:`.store`).
- Solvers (:mod:`.solvers`): :class:`ExactSolver`, :class:`CGSolver`, :class:`LissaSolver`,
  :class:`ArnoldiSolver`, :class:`DiagonalSolver`, :class:`IdentitySolver` (names in :data:`SOLVERS`);
  :class:`ConvergenceError`, :class:`ConvergenceWarning`; ``solver="optimizer_state"``:
  :class:`OptimizerStateSolver` (:mod:`.optimizer_state`), the training optimizer's own diagonal
  curvature (Sophia's ``h``, AdaHessian's or Adam's second moment) as the preconditioner.
- Per-example gradients (:mod:`.gradients`): :func:`per_example_grads`, :func:`iter_per_example_grads`,
  :func:`projected_per_example_grads`.
- Metrics (:mod:`.metrics`): :func:`loo_correlation`, :func:`lds`, :func:`brittleness`;
  plots (:mod:`.plots`): :func:`scatter_predicted_vs_actual`, :func:`scatter_panels`.

The machinery behind these stays in its modules: :class:`~.gradients.BoundLoss`,
:class:`~.gradients.ParamSpace`, :func:`~.gradients.flatten_tensors` / :func:`~.gradients.unflatten_tensor`
(:mod:`.gradients`), :class:`~.hessian.CurvatureOperator` (:mod:`.hessian`), :func:`~.solvers.make_solver`
(:mod:`.solvers`). Curvature comes from :mod:`soulkit.optim` (``hvp``, ``gnvp`` and the diagonal
estimators).
"""

from .analyzer import InfluenceAnalyzer, InfluenceConfig
from .gradients import OutputLoss, iter_per_example_grads, per_example_grads, projected_per_example_grads
from .metrics import BrittlenessResult, LDSResult, LOOCorrelation, brittleness, lds, loo_correlation
from .optimizer_state import OptimizerStateSolver, load_optimizer_state
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
)
from .store import InfluenceStore, StoreMismatchError

__all__ = [
    "SOLVERS",
    "ArnoldiSolver",
    "BrittlenessResult",
    "CGSolver",
    "ConvergenceError",
    "ConvergenceWarning",
    "DiagonalSolver",
    "ExactSolver",
    "IdentitySolver",
    "InfluenceAnalyzer",
    "InfluenceConfig",
    "InfluenceStore",
    "LDSResult",
    "LOOCorrelation",
    "LissaSolver",
    "OptimizerStateSolver",
    "OutputLoss",
    "Solver",
    "StoreMismatchError",
    "brittleness",
    "iter_per_example_grads",
    "lds",
    "load_optimizer_state",
    "loo_correlation",
    "per_example_grads",
    "projected_per_example_grads",
    "scatter_panels",
    "scatter_predicted_vs_actual",
]
