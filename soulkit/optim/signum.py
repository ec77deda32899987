"""Signum: sign-momentum (Bernstein et al. 2018), the baseline a fully clipped Sophia reduces to.

Per element, with decoupled weight decay::

    m     <- beta * m + (1 - beta) * g
    theta <- theta * (1 - lr * weight_decay) - lr * sign(m)

Every coordinate moves by exactly ``lr`` (or not at all where ``m == 0``). Sophia whose ratio
``|m| / (rho * h)`` exceeds 1 everywhere (win rate 0) takes this step, and so does SOUL's released
optimizer (:class:`soulkit.optim.SoulReleasedSophia`) in most coordinates; comparing against Signum
separates the effect of the curvature from that of sign steps. No bias correction (``sign`` does not
depend on the scale of ``m``). As in :class:`~soulkit.optim.SoulReleasedSophia`, every operation is a
separate multiply or add, so the result is the formula rounded operation by operation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .soul_released import check_beta, check_common, check_params, stepped_params

__all__ = ["Signum"]


def _check_group(group: dict[str, Any]) -> None:
    check_common(group["lr"], group["weight_decay"])
    check_beta(group["beta"], "beta")


class Signum(Optimizer):
    """Sign-momentum with decoupled weight decay (see the module docstring for the update).

    Args:
        params: parameters or parameter groups.
        lr: learning rate: the size of every coordinate's step.
        beta: momentum coefficient in [0, 1) (0: signSGD).
        weight_decay: decoupled weight decay ``theta *= 1 - lr * weight_decay``.
        maximize: maximise the objective (the gradient is negated).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
                 beta: float = 0.9, weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=bool(maximize))
        _check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        check_params(self.param_groups, "Signum")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, lr, wd = group["beta"], group["lr"], group["weight_decay"]
            for param, g, m in stepped_params(self, group, ("exp_avg",)):
                m.mul_(beta).add_(g * (1 - beta))
                if wd != 0:
                    param.mul_(1 - lr * wd)
                param.add_(m.sign().mul_(-lr))
        return loss
