"""The optimizer of one arm: :func:`arm_optimizer` turns an :class:`~soulkit.demos.lm.config.OptimizerSpec`
into the arguments of :func:`soulkit.optim.make_optimizer` (torch's AdamW or soulkit's Sophia), with no
weight decay on biases and norms (:func:`soulkit.optim.factory.weight_decay_groups`). The demo builds
its optimizers nowhere else."""

from __future__ import annotations

import torch

from ...optim.factory import make_optimizer, weight_decay_groups
from .config import OptimizerSpec

__all__ = ["arm_optimizer"]


def arm_optimizer(spec: OptimizerSpec, model: torch.nn.Module, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW (torch's, default foreach/fused choice) or soulkit's Sophia; no decay on biases and norms."""
    options = {"betas": spec.resolved_betas}
    if spec.kind == "sophia":
        options.update(rho=spec.rho, hessian_update_interval=spec.hessian_update_interval,
                       hessian_bias_correction=spec.hessian_bias_correction)
    return make_optimizer(spec.kind, weight_decay_groups(model, spec.weight_decay), lr=spec.lr,
                          weight_decay=spec.weight_decay, seed=seed, **options)
