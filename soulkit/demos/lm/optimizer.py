"""The optimizer of one arm: :func:`make_optimizer` builds torch's AdamW or soulkit's Sophia from an
:class:`~soulkit.demos.lm.config.OptimizerSpec` (the only place the demo constructs an optimizer)."""

from __future__ import annotations

from typing import Any

import torch

from .config import OptimizerSpec

__all__ = ["make_optimizer", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(spec: OptimizerSpec, model: torch.nn.Module, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW (torch's, default foreach/fused choice) or soulkit's Sophia; no decay on biases and norms."""
    groups = param_groups(model, spec.weight_decay)
    if spec.kind == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.resolved_betas, weight_decay=spec.weight_decay)
    from ...optim import Sophia

    return Sophia(
        groups, lr=spec.lr, betas=spec.resolved_betas, rho=spec.rho, weight_decay=spec.weight_decay,
        hessian_update_interval=spec.hessian_update_interval, seed=seed,
        hessian_bias_correction=spec.hessian_bias_correction,
    )

