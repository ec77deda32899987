"""The AdaHessian parameter update (Yao et al., AAAI 2021), as a per-tensor reference and a foreach path.

Per element, with ``g`` negated when maximising, ``D`` the (spatially averaged) Hutchinson estimate
of the Hessian diagonal and ``t`` the parameter's step count (1 on its first update)::

    p <- p * (1 - lr * weight_decay)                       # decoupled, as AdamW
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * D * D
    p <- p - lr * (m / (1 - beta1**t)) / ((sqrt(v / (1 - beta2**t)))**hessian_power + eps)

The weight decay multiplies the parameter *before* the update, which is the same as the paper's
reference ``p <- p - lr * (m_hat / denom + weight_decay * p)`` (both use the pre-update ``p``).

Arithmetic runs in the *compute dtype* (float64 for float64 tensors, float32 otherwise); each
result is rounded once into the storage dtype of the parameter and of the state, so bf16/fp16
parameters with float32 state get a full-precision update. Both functions take lists of tensors;
``steps`` holds one step count per tensor (already incremented). This module imports nothing else
from soulkit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import bucket, compute_dtype, to_dtype, write_back

__all__ = [
    "adahessian_step_reference",
    "adahessian_step_foreach",
    "check_adahessian_inputs",
]


def check_adahessian_inputs(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_hessian_diag_sqs: Sequence[torch.Tensor],
    hessian_diags: Sequence[torch.Tensor],
    steps: Sequence[int],
) -> None:
    """Raise a ValueError/TypeError naming the offending list and index before any work is done."""
    n = len(params)
    lists = {
        "grads": grads,
        "exp_avgs": exp_avgs,
        "exp_hessian_diag_sqs": exp_hessian_diag_sqs,
        "hessian_diags": hessian_diags,
    }
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but params has {n}")
    if len(steps) != n:
        raise ValueError(f"steps has {len(steps)} entries but params has {n}")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; AdaHessian needs floating-point parameters")
        if int(steps[i]) < 1:
            raise ValueError(f"steps[{i}] must be >= 1 (the count after this update), got {steps[i]!r}")
        for name, lst in lists.items():
            t = lst[i]
            if t.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}"
                )
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; a floating-point tensor is needed")


def adahessian_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_hessian_diag_sqs: Sequence[torch.Tensor],
    hessian_diags: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    hessian_power: float = 1.0,
    maximize: bool = False,
) -> None:
    """Plain torch, one tensor at a time: the definition the foreach path is tested against.

    Updates ``params``, ``exp_avgs`` (m) and ``exp_hessian_diag_sqs`` (v) in place.
    """
    check_adahessian_inputs(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, steps)
    for p, g, m, v, d, t in zip(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, steps):
        cdt = compute_dtype(p.dtype, m.dtype, v.dtype)
        p_c, g_c, m_c, v_c, d_c = p.to(cdt), g.to(cdt), m.to(cdt), v.to(cdt), d.to(cdt)
        if weight_decay != 0:
            p_c = p_c * (1 - lr * weight_decay)
        m_c = m_c * beta1 + g_c * (-(1 - beta1) if maximize else (1 - beta1))
        v_c = v_c * beta2 + d_c * d_c * (1 - beta2)
        bc1 = 1 - beta1 ** int(t)
        bc2 = 1 - beta2 ** int(t)
        denom = (v_c / bc2).sqrt()
        if hessian_power != 1:
            denom = denom.pow(hessian_power)
        denom = denom + eps
        p_c = p_c - (lr / bc1) * (m_c / denom)
        m.copy_(m_c)
        v.copy_(v_c)
        p.copy_(p_c)


def adahessian_step_foreach(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_hessian_diag_sqs: Sequence[torch.Tensor],
    hessian_diags: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    hessian_power: float = 1.0,
    maximize: bool = False,
) -> None:
    """The same math as :func:`adahessian_step_reference` with ``torch._foreach_*`` ops."""
    check_adahessian_inputs(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, steps)
    keys = ((p.device, p.dtype, m.dtype, v.dtype) for p, m, v in zip(params, exp_avgs, exp_hessian_diag_sqs))
    for idx in bucket(keys).values():
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_hessian_diag_sqs[i] for i in idx]
        cdt = compute_dtype(ps[0].dtype, ms[0].dtype, vs[0].dtype)
        p_c, m_c, v_c = to_dtype(ps, cdt), to_dtype(ms, cdt), to_dtype(vs, cdt)
        g_c = to_dtype([grads[i] for i in idx], cdt)
        d_c = to_dtype([hessian_diags[i] for i in idx], cdt)
        if weight_decay != 0:
            torch._foreach_mul_(p_c, 1 - lr * weight_decay)
        torch._foreach_mul_(m_c, beta1)
        torch._foreach_add_(m_c, g_c, alpha=-(1 - beta1) if maximize else (1 - beta1))
        torch._foreach_mul_(v_c, beta2)
        torch._foreach_addcmul_(v_c, d_c, d_c, value=1 - beta2)
        bc1 = [1 - beta1 ** int(steps[i]) for i in idx]
        bc2 = [1 - beta2 ** int(steps[i]) for i in idx]
        denom = torch._foreach_div(v_c, bc2)
        torch._foreach_sqrt_(denom)
        if hessian_power != 1:
            torch._foreach_pow_(denom, hessian_power)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p_c, m_c, denom, [-lr / b for b in bc1])
        write_back(ms, m_c)
        write_back(vs, v_c)
        write_back(ps, p_c)
