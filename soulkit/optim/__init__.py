"""Second-order optimizers and curvature primitives.

- :class:`Sophia`: clipped diagonal-Hessian preconditioning (GNB / Hutchinson estimators).
- :class:`AdaHessian`: Hutchinson diagonal with spatial averaging and Adam-style moments.
- Curvature: :func:`hvp`, :func:`gnvp`, :func:`hutchinson_diag`, :func:`gnb_diag`,
  :func:`exact_hessian_diag`, :func:`differentiable_attention`, :func:`module_loss_fn`,
  :func:`sampled_label_loss`.

transformers ``Trainer`` support lives in :mod:`soulkit.optim.hf_trainer` (imported on demand).
"""

from ._sampling import sampled_label_loss
from .adahessian import AdaHessian
from .curvature import (
    differentiable_attention,
    exact_hessian_diag,
    gnb_diag,
    gnvp,
    hutchinson_diag,
    hvp,
    module_loss_fn,
)
from .sophia import Sophia

__all__ = [
    "AdaHessian",
    "Sophia",
    "differentiable_attention",
    "exact_hessian_diag",
    "gnb_diag",
    "gnvp",
    "hutchinson_diag",
    "hvp",
    "module_loss_fn",
    "sampled_label_loss",
]
