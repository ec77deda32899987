"""The Sophia parameter update (Liu et al. 2023), as a per-tensor reference and a foreach path.

Per element, with ``g`` already negated when maximising:

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    h <- beta2 * h + (1 - beta2) * h_hat          (only when an estimate h_hat is given)
    p <- p - lr * clamp((m / bias_correction1) / max(rho * h, eps), -1, 1)

``clamp(x / d, -1, 1) == sign(x) * min(|x| / d, 1)`` because ``d >= eps > 0``.

Arithmetic runs in the *compute dtype* (float64 for float64 tensors, float32 otherwise) and each
result is rounded once into the storage dtype of the parameter and of the state, so bf16/fp16
parameters with fp32 state get a full-precision update. Optionally counts the coordinates whose
ratio was not clipped (the "win rate" numerator) into a device tensor, without a host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import bucket, compute_dtype, local, to_dtype, write_back

__all__ = ["check_sophia_inputs", "fold_hessian_ema", "sophia_step_foreach", "sophia_step_reference"]


def check_sophia_inputs(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    hessian_estimates: Sequence[torch.Tensor] | None = None,
) -> None:
    """Raise a ValueError/TypeError naming the offending list and index before any work is done."""
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "hessians": hessians}
    if hessian_estimates is not None:
        lists["hessian_estimates"] = hessian_estimates
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but params has {n}")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; Sophia needs floating-point parameters")
        for name, lst in lists.items():
            t = lst[i]
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; a floating-point tensor is needed")


def sophia_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    bias_correction1: float = 1.0,
    hessian_estimates: Sequence[torch.Tensor] | None = None,
    beta2: float = 0.99,
    win_count: torch.Tensor | None = None,
) -> None:
    """Plain-torch, one tensor at a time: the definition the fast paths are tested against."""
    check_sophia_inputs(params, grads, exp_avgs, hessians, hessian_estimates)
    for i, (p, g, m, h) in enumerate(zip(params, grads, exp_avgs, hessians)):
        cdt = compute_dtype(p.dtype, m.dtype)
        p_c, g_c, m_c, h_c = p.to(cdt), g.to(cdt), m.to(cdt), h.to(cdt)
        if maximize:
            g_c = -g_c
        if weight_decay != 0:
            p_c = p_c * (1 - lr * weight_decay)
        m_c = m_c * beta1 + g_c * (1 - beta1)
        if hessian_estimates is not None:
            h_c = h_c * beta2 + hessian_estimates[i].to(cdt) * (1 - beta2)
            h.copy_(h_c)
        ratio = (m_c / bias_correction1) / torch.clamp(rho * h_c, min=eps)
        ratio = ratio.clamp(-1.0, 1.0)
        if win_count is not None:
            # DTensor (FSDP2): count this rank's shard only (a per-rank count without a collective, divided
            # by the local number of elements); adding a DTensor count into the plain win_count would fail.
            win_count += (local(ratio).abs() < 1).sum().to(win_count.dtype)
        p_c = p_c - lr * ratio
        m.copy_(m_c)
        p.copy_(p_c)


def sophia_step_foreach(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    bias_correction1: float = 1.0,
    hessian_estimates: Sequence[torch.Tensor] | None = None,
    beta2: float = 0.99,
    win_count: torch.Tensor | None = None,
) -> None:
    """The same math with ``torch._foreach_*`` ops: a handful of launches per (device, dtype) bucket."""
    check_sophia_inputs(params, grads, exp_avgs, hessians, hessian_estimates)
    keys = ((p.device, p.dtype, m.dtype, h.dtype) for p, m, h in zip(params, exp_avgs, hessians))
    for idx in bucket(keys).values():
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        hs = [hessians[i] for i in idx]
        cdt = compute_dtype(ps[0].dtype, ms[0].dtype)
        p_c, m_c, h_c = to_dtype(ps, cdt), to_dtype(ms, cdt), to_dtype(hs, cdt)
        g_c = to_dtype([grads[i] for i in idx], cdt)
        if maximize:
            g_c = torch._foreach_neg(g_c)
        if weight_decay != 0:
            torch._foreach_mul_(p_c, 1 - lr * weight_decay)
        torch._foreach_mul_(m_c, beta1)
        torch._foreach_add_(m_c, g_c, alpha=1 - beta1)
        if hessian_estimates is not None:
            e_c = to_dtype([hessian_estimates[i] for i in idx], cdt)
            torch._foreach_mul_(h_c, beta2)
            torch._foreach_add_(h_c, e_c, alpha=1 - beta2)
            write_back(hs, h_c)
        denom = torch._foreach_mul(h_c, rho)
        torch._foreach_clamp_min_(denom, eps)
        if bias_correction1 != 1.0:
            ratio = torch._foreach_div(m_c, bias_correction1)
            torch._foreach_div_(ratio, denom)
        else:
            ratio = torch._foreach_div(m_c, denom)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        if win_count is not None:
            # |ratio| - 1 is exactly 0 where clipped and negative where not: an L0 norm counts the latter.
            # DTensor (FSDP2): this rank's shard only, as in the reference.
            slack = torch._foreach_abs([local(r) for r in ratio])
            torch._foreach_sub_(slack, 1.0)
            win_count += torch.stack(torch._foreach_norm(slack, 0)).sum().to(win_count.dtype)
        torch._foreach_add_(p_c, ratio, alpha=-lr)
        write_back(ms, m_c)
        write_back(ps, p_c)


def fold_hessian_ema(
    hessians: Sequence[torch.Tensor], hessian_estimates: Sequence[torch.Tensor], beta2: float
) -> None:
    """``h <- beta2 * h + (1 - beta2) * h_hat`` on its own, for Hessians whose parameter does not
    step now (the update kernels fold the estimate of a stepping parameter inside their pass).

    Each estimate is first rounded to its ``h``'s dtype; half-precision ``h`` is computed in float32
    and rounded once.
    """
    if len(hessians) != len(hessian_estimates):
        raise ValueError(f"hessian_estimates has {len(hessian_estimates)} tensors but hessians has {len(hessians)}")
    if not hessians:
        return
    hc = [h.float() if h.dtype in (torch.bfloat16, torch.float16) else h for h in hessians]
    ec = [e.to(h.dtype).to(c.dtype) for e, h, c in zip(hessian_estimates, hessians, hc)]
    torch._foreach_mul_(hc, beta2)
    torch._foreach_add_(hc, ec, alpha=1 - beta2)
    write_back(list(hessians), hc)
