"""Second-order optimizers and curvature primitives.

- :class:`Sophia`: clipped diagonal-Hessian preconditioning (GNB / Hutchinson estimators).
- :class:`AdaHessian`: Hutchinson diagonal with spatial averaging and Adam-style moments.
- Curvature: :func:`hvp`, :func:`gnvp`, :func:`hutchinson_diag`, :func:`gnb_diag`,
  :func:`exact_hessian_diag`, :func:`differentiable_attention`, :func:`sampled_label_loss`.
"""

from ._sampling import sampled_label_loss
from .sophia import Sophia

__all__ = ["Sophia", "sampled_label_loss"]

try:  # modules written alongside; re-exported when present
    from .adahessian import AdaHessian  # noqa: F401

    __all__.append("AdaHessian")
except ImportError:  # pragma: no cover
    pass
try:
    from .curvature import (  # noqa: F401
        differentiable_attention,
        exact_hessian_diag,
        gnb_diag,
        gnvp,
        hutchinson_diag,
        hvp,
        module_loss_fn,
    )

    __all__ += [
        "hvp", "gnvp", "hutchinson_diag", "gnb_diag", "exact_hessian_diag", "differentiable_attention",
        "module_loss_fn",
    ]
except ImportError:  # pragma: no cover
    pass
