"""An optimizer by name: :data:`OPTIMIZERS` and :func:`make_optimizer`, the one place the CLI, the
demos, the unlearner and the benchmarks turn a name and hyperparameters into an optimizer; and
:func:`weight_decay_groups`, the usual split that leaves biases and norm weights undecayed.

    from soulkit.optim import make_optimizer
    from soulkit.optim.factory import weight_decay_groups
    opt = make_optimizer("sophia", weight_decay_groups(model, 0.1), lr=3e-4, weight_decay=0.1, rho=0.04)

The registry maps a name to the optimizer class (any callable ``params, lr=..., weight_decay=...``
building a ``torch.optim.Optimizer`` can be registered). The options an optimizer accepts are the
keyword parameters of that callable, so a misspelt or foreign option (``rho`` for AdamW) is an
error naming the ones it does take, before anything is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .adahessian import AdaHessian
from .signum import Signum
from .sophia import Sophia
from .soul_released import SoulReleasedSophia

__all__ = ["OPTIMIZERS", "make_optimizer", "optimizer_options", "weight_decay_groups"]

#: name -> optimizer class (or builder with the same signature). ``lr`` and ``weight_decay`` are
#: passed to every one, ``seed`` to those that take it (AdamW draws no random numbers).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sophia": Sophia,
    "adahessian": AdaHessian,
    # SOUL's released optimizer, reproduced (not the paper's Sophia), and the sign-momentum it is close to
    "soul-released": SoulReleasedSophia,
    "signum": Signum,
}

# Arguments make_optimizer fills in itself; everything else of a builder's signature is an option.
_GIVEN = ("params", "lr", "weight_decay", "seed")


def _builder(name: str) -> Callable[..., torch.optim.Optimizer]:
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def _parameters(builder: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(builder).parameters)


def optimizer_options(name: str) -> tuple[str, ...] | None:
    """The options (keyword arguments besides ``lr``, ``weight_decay`` and ``seed``) the optimizer
    ``name`` takes, in its signature's order; ``None`` if its builder accepts any (``**kwargs``).
    An unknown name is a ``ValueError`` naming the registered ones."""
    params = _parameters(_builder(name))
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return tuple(n for n, p in params.items()
                 if n not in _GIVEN and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def make_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *, lr: float,
                   weight_decay: float = 0.0, seed: int = 0, **options: Any) -> torch.optim.Optimizer:
    """The optimizer registered as ``name`` in :data:`OPTIMIZERS` over ``params`` (tensors or param
    groups), with ``lr``, ``weight_decay``, ``seed`` (where the optimizer takes one) and ``options``
    (e.g. ``betas``; Sophia: ``rho``, ``hessian_update_interval``...).

    Raises ``ValueError`` for an unknown name and ``TypeError`` for options the optimizer does not
    take, each naming the allowed ones.
    """
    builder = _builder(name)
    allowed = optimizer_options(name)
    if allowed is not None:
        unknown = [k for k in options if k not in allowed]
        if unknown:
            which = ", ".join(repr(k) for k in unknown)
            raise TypeError(f"optimizer {name!r} takes no option {which}; its options are: {', '.join(allowed)}")
    if "seed" in _parameters(builder):
        options["seed"] = seed
    return builder(params, lr=lr, weight_decay=weight_decay, **options)


def weight_decay_groups(model: torch.nn.Module | Iterable[torch.Tensor],
                        weight_decay: float) -> list[dict[str, Any]]:
    """Param groups with ``weight_decay`` on matrices and embeddings (``dim() >= 2``) and none on
    biases and norm weights (``dim() < 2``); parameters that do not require grad are left out.

    The decayed group comes first and is always there; the undecayed one only when it has parameters.
    """
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
