"""SOUL's optimizer as released: a reproduction of the "Sophia" in OPTML-Group/SOUL's ``src/optim/sophia.py``.

This is **not** the Sophia of the paper (that is :class:`soulkit.optim.Sophia`). It is what SOUL's released
unlearning code (Jia et al. 2024) runs, reproduced update for update so that its results can be checked
against the paper's optimizer, against AdamW and against plain sign-momentum (:class:`soulkit.optim.Signum`).

What the released ``step(closure=None, bs=5120)`` does, per parameter with a gradient ``g`` (the trainer's
gradient, already clipped to norm 1), in this order::

    h <- b2 * h + (1 - b2) * g * g                  # update_hessian(): every step, from g itself
    m <- b1 * m + (1 - b1) * g                      # update_exp_avg(): first momentum update
    theta <- theta * (1 - lr * wd)                  # decoupled weight decay
    m <- b1 * m + (1 - b1) * g                      # second momentum update, inside the step proper
    theta <- theta - lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)

with ``bs = 5120`` (the default of the ``bs`` argument of ``step``, which the trainer never passes),
``eps = 1e-15``, no bias correction of ``m`` or ``h``, and SOUL's TOFU settings betas ``(0.9, 0.95)``,
``rho = 0.04`` (so ``rho * bs = 204.8``) and weight decay 0.1 (the defaults here).

**The double momentum update.** ``step`` calls ``update_exp_avg()`` (``exp_avg.mul_(beta1).add_(grad,
alpha=1-beta1)`` over every parameter) and then the per-tensor update runs the same line again on the same
gradient, so each step does::

    m_t = b1 * (b1 * m_{t-1} + (1 - b1) * g_t) + (1 - b1) * g_t
        = b1**2 * m_{t-1} + (1 - b1) * (1 + b1) * g_t        (= b1**2 m + (1 - b1**2) g)

i.e. an EMA with coefficient ``b1**2`` (0.81 for b1 = 0.9) instead of ``b1``; after the first step
``m_1 = (1 - b1**2) g_1`` (0.19 g) instead of ``(1 - b1) g_1`` (0.1 g). ``double_momentum=True`` (default)
reproduces this; ``double_momentum=False`` updates ``m`` once per step, as intended.

**The Hessian.** ``h`` is the EMA of the squared (clipped) gradient refreshed on every step, with no
sampled labels, no Hutchinson probe and no refresh interval. With ``rho * bs = 204.8`` and per-coordinate
gradients far below 1 the ratio ``|m| / (204.8 h)`` is above 1 almost everywhere (``h ~ g**2``, so the ratio
is ~ ``1 / (204.8 |g|)``): nearly every coordinate is clipped and the update is close to sign-momentum with
step ``lr``. :meth:`SoulReleasedSophia.win_rate` reports the fraction that is not clipped.

Each operation is written as separate elementwise multiplies and adds (no fused multiply-add), so the
update is the formula above rounded operation by operation, the same on every CPU; the tests check it
against a hand computation bit for bit. Differences from the released code, none of which changes a
number in SOUL's runs: ``maximize`` negates the gradient in both momentum updates (the release negates it
only in the second and never uses ``maximize``); hyperparameters are validated (a non-finite lr, betas
outside [0, 1), ``rho <= 0``, ``bs < 1`` are ``ValueError``); sparse gradients are a ``TypeError``;
``bs`` is a constructor/param-group option rather than an argument of ``step``. A non-finite gradient is
not checked (as released): it propagates into ``m``, ``h`` and the weights.

SOUL builds the optimizer over two param groups, weight decay on all weights but biases and LayerNorm/RMSNorm
weights; :func:`soulkit.optim.factory.weight_decay_groups` makes the equivalent split (by ``dim() < 2``).
The Unlearner passes one group (every parameter decayed), as it does for AdamW; at SOUL's lr (5e-6) the
decay factor per step is 1 - 5e-7, so the difference is far below the other effects compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["SoulReleasedSophia"]


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_common(lr: Any, weight_decay: Any) -> None:
    """``lr`` and ``weight_decay``: finite numbers >= 0 (shared with :class:`soulkit.optim.Signum`)."""
    if not _finite_number(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not _finite_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


def check_beta(value: Any, name: str) -> None:
    if not _finite_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_group(group: dict[str, Any]) -> None:
    check_common(group["lr"], group["weight_decay"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        check_beta(b, f"betas[{i}]")
    if not _finite_number(group["rho"]) or group["rho"] <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {group['rho']!r}")
    bs = group["bs"]
    if not _finite_number(bs) or bs < 1:
        raise ValueError(f"bs must be a finite number >= 1, got {bs!r}")
    if not _finite_number(group["eps"]) or group["eps"] <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {group['eps']!r}")


def check_params(groups: list[dict[str, Any]], who: str) -> None:
    for group in groups:
        for p in group["params"]:
            if not p.is_floating_point() and not p.is_complex():
                raise TypeError(f"{who} needs floating-point parameters, got {p.dtype}")



def stepped_params(optimizer: Optimizer, group: dict[str, Any], buffers: tuple[str, ...]):
    """Per parameter of ``group`` with a dense gradient: ``(param, grad, *buffers)``, after counting the step.

    The gradient is negated under ``group["maximize"]``; the state (``step`` and zero ``buffers``) is
    created on first use; complex tensors are viewed as real. Sparse gradients raise ``TypeError``.
    """
    name = type(optimizer).__name__
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise TypeError(f"{name} does not support sparse gradients")
        state = optimizer.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            for b in buffers:
                state[b] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        views = (p, -p.grad if group["maximize"] else p.grad, *(state[b] for b in buffers))
        yield tuple(torch.view_as_real(t) for t in views) if torch.is_complex(p) else views

class SoulReleasedSophia(Optimizer):
    """SOUL's released "Sophia" (see the module docstring for the exact update and how it differs from
    the paper's Sophia).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate: the largest per-coordinate step (SOUL's TOFU runs: 5e-6 / 1e-5).
        betas: ``(b1, b2)``: momentum and squared-gradient EMA coefficients (SOUL: (0.9, 0.95)).
        rho: clipping scale, multiplied by ``bs`` in the denominator (SOUL: 0.04).
        weight_decay: decoupled weight decay ``theta *= 1 - lr * weight_decay`` (SOUL: 0.1).
        bs: the "batch size" the released ``step`` multiplies ``rho`` by; its default 5120 is what
            SOUL's runs used (nothing passes another value).
        eps: added to the denominator (released: 1e-15).
        double_momentum: update ``m`` twice per step, as the released code does (default); ``False``
            updates it once.
        maximize: maximise the objective (the gradient is negated everywhere).

    ``state_dict()`` / ``load_state_dict()`` carry ``m``, ``h`` and the step count per parameter; a
    ``closure`` passed to :meth:`step` is evaluated (with grad enabled) before the update and its loss
    returned.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), rho: float = 0.04, weight_decay: float = 0.1, *,
                 bs: float = 5120, eps: float = 1e-15, double_momentum: bool = True,
                 maximize: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, rho=rho,
                        weight_decay=weight_decay, bs=bs, eps=eps, double_momentum=bool(double_momentum),
                        maximize=bool(maximize))
        _check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        check_params(self.param_groups, "SoulReleasedSophia")
        self._win: list[tuple[torch.Tensor, int] | None] = [None] * len(self.param_groups)

    def win_rate(self) -> list[float]:
        """Per group, the fraction of coordinates whose update was not clipped (``|m| / (rho*bs*h + eps)
        < 1``) at the latest step; ``nan`` for a group that has not stepped. One host sync."""
        out = []
        for w in self._win:
            out.append(float(w[0]) / w[1] if w is not None and w[1] else math.nan)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self._win) != len(self.param_groups):  # add_param_group after construction
            self._win.extend([None] * (len(self.param_groups) - len(self._win)))
        for gi, group in enumerate(self.param_groups):
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            scale = group["rho"] * group["bs"]  # a Python float, as released (rho * bs * h)
            unclipped = None
            total = 0
            for param, g, m, h in stepped_params(self, group, ("exp_avg", "hessian")):
                # h <- b2 h + (1 - b2) g g
                h.mul_(b2).add_(g * g * (1 - b2))
                gm = g * (1 - b1)
                if group["double_momentum"]:
                    m.mul_(b1).add_(gm)  # update_exp_avg()
                if wd != 0:
                    param.mul_(1 - lr * wd)
                m.mul_(b1).add_(gm)
                ratio = m.abs().div_(h * scale + group["eps"]).clamp_(max=1.0)
                count = (ratio < 1).sum()
                unclipped = count if unclipped is None else unclipped + count
                total += ratio.numel()
                param.add_(m.sign().mul_(ratio).mul_(-lr))
            if unclipped is not None:
                self._win[gi] = (unclipped, total)
        return loss
