"""arm_optimizer: AdamW or Sophia for an arm, no weight decay on biases and norms."""

import torch

from soulkit.demos.lm.config import OptimizerSpec
from soulkit.demos.lm.optimizer import arm_optimizer
from soulkit.optim import Sophia
from soulkit.optim.factory import weight_decay_groups


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2, bias=False))


def test_param_groups_decay_only_matrices():
    m = _model()
    m[0].bias.requires_grad_(False)
    decay, no_decay = weight_decay_groups(m, 0.3)
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(3, 4), (2, 3)]
    assert [p.shape for p in no_decay["params"]] == [(3,), (3,)]  # the norm's weight and bias; frozen bias left out
    (only,) = weight_decay_groups(torch.nn.Linear(2, 2, bias=False), 0.1)  # nothing to exempt: one group
    assert only["weight_decay"] == 0.1 and len(only["params"]) == 1


def test_adamw_and_sophia():
    m = _model()
    adamw = arm_optimizer(OptimizerSpec("adamw", 2e-3, weight_decay=0.05), m)
    assert type(adamw) is torch.optim.AdamW
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert adamw.param_groups[0]["lr"] == 2e-3 and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    spec = OptimizerSpec("sophia", 1e-3, rho=0.2, betas=(0.9, 0.98), hessian_update_interval=4)
    sophia = arm_optimizer(spec, m, seed=7)
    assert isinstance(sophia, Sophia)
    g = sophia.param_groups[0]
    assert (g["lr"], g["rho"], g["betas"], g["weight_decay"]) == (1e-3, 0.2, (0.9, 0.98), 0.1)
    assert sophia.param_groups[1]["weight_decay"] == 0.0
