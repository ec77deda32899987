"""Second-order optimizers and curvature primitives.

- :class:`Sophia`: clipped diagonal-Hessian preconditioning (GNB / Hutchinson estimators).
- :class:`AdaHessian`: Hutchinson diagonal with spatial averaging and Adam-style moments.
- :class:`SoulReleasedSophia`: SOUL's released "Sophia" reproduced exactly (squared-gradient EMA every
  step, ``rho * 5120``, double momentum update); :class:`Signum`: sign-momentum, its fully clipped limit.
- Curvature: :func:`hvp`, :func:`gnvp`, :func:`hutchinson_diag`, :func:`gnb_diag`,
  :func:`exact_hessian_diag`, :func:`module_loss_fn`; :func:`differentiable_attention` puts
  attention on a twice-differentiable path; :func:`sampled_label_loss` is the GNB building block.
- :func:`make_optimizer`: an optimizer by name (``OPTIMIZERS``), as the CLI and benchmarks build them.

transformers ``Trainer`` support lives in :mod:`soulkit.optim.hf_trainer` (imported on demand).
"""

from .adahessian import AdaHessian
from .attention import differentiable_attention
from .curvature import exact_hessian_diag, gnb_diag, gnvp, hutchinson_diag, hvp, module_loss_fn
from .estimators import sampled_label_loss
from .factory import OPTIMIZERS, make_optimizer
from .signum import Signum
from .sophia import Sophia
from .soul_released import SoulReleasedSophia

__all__ = [
    "AdaHessian",
    "OPTIMIZERS",
    "Signum",
    "Sophia",
    "SoulReleasedSophia",
    "differentiable_attention",
    "exact_hessian_diag",
    "gnb_diag",
    "gnvp",
    "hutchinson_diag",
    "hvp",
    "make_optimizer",
    "module_loss_fn",
    "sampled_label_loss",
]
