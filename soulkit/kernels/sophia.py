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

from ._common import compute_dtype, to_dtype, write_back

__all__ = ["sophia_step", "sophia_step_reference", "sophia_step_foreach", "check_sophia_inputs"]


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
            # DTensor (FSDP2): count this rank's shard only (see _local); adding a DTensor count into
            # the plain win_count tensor would fail.
            win_count += (_local(ratio).abs() < 1).sum().to(win_count.dtype)
        p_c = p_c - lr * ratio
        m.copy_(m_c)
        p.copy_(p_c)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters), the tensor itself otherwise.

    Used only for the win-rate count: it stays a per-rank count without a collective, and Sophia
    divides it by the local number of elements.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _group(params, *lists):
    """Bucket the index set by (device, param dtype, state dtype) so each bucket is one foreach call."""
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        key = (p.device, p.dtype, lists[0][i].dtype, lists[1][i].dtype)
        buckets.setdefault(key, []).append(i)
    return buckets.values()


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
    for idx in _group(params, exp_avgs, hessians):
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
            # DTensor (FSDP2): count this rank's shard only (see _local); adding a DTensor count into
            # the plain win_count tensor would fail.
            slack = torch._foreach_abs([_local(r) for r in ratio])
            torch._foreach_sub_(slack, 1.0)
            win_count += torch.stack(torch._foreach_norm(slack, 0)).sum().to(win_count.dtype)
        torch._foreach_add_(p_c, ratio, alpha=-lr)
        write_back(ms, m_c)
        write_back(ps, p_c)


IMPLEMENTATIONS = ("auto", "triton", "compiled", "foreach", "reference")
# Below this many elements the one-off compile of the CPU path does not pay for itself.
COMPILE_MIN_NUMEL = 1 << 20


def resolve_implementation(device: torch.device, requested: str = "auto", numel: int = 0) -> str:
    """Map ``"auto"`` to the fastest available path: Triton on CUDA; on the CPU the inductor-compiled
    step for groups of at least ``COMPILE_MIN_NUMEL`` elements (measured faster, see
    benchmarks/results/kernels_cpu.md), foreach below that."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        from .sophia_triton import triton_usable

        return "triton" if triton_usable(device) else "foreach"
    if device.type == "cpu" and numel >= COMPILE_MIN_NUMEL:
        from .sophia_compiled import compile_available

        if compile_available():
            return "compiled"
    return "foreach"


def sophia_step(params, grads, exp_avgs, hessians, *, implementation: str = "auto", **kwargs) -> None:
    """Dispatch the Sophia step.

    ``implementation``: ``"auto"`` (Triton on CUDA; on the CPU the compiled step for groups of at
    least ``COMPILE_MIN_NUMEL`` elements, foreach below), ``"triton"``, ``"compiled"``,
    ``"foreach"`` or ``"reference"`` (plain per-tensor torch, for debugging).

    Tensors the fused paths cannot take (non-contiguous ones, and DTensors, whose wrapper has no
    raw data pointer) go to the foreach path; the rest keep the requested path.
    """
    device = params[0].device if params else torch.device("cpu")
    numel = sum(p.numel() for p in params) if implementation == "auto" else 0
    impl = resolve_implementation(device, implementation, numel)
    if impl == "reference":
        return sophia_step_reference(params, grads, exp_avgs, hessians, **kwargs)
    if impl == "foreach":
        return sophia_step_foreach(params, grads, exp_avgs, hessians, **kwargs)
    if impl == "triton":
        from .sophia_triton import sophia_step_triton as fused
    else:
        from .sophia_compiled import sophia_step_compiled as fused
    est = kwargs.get("hessian_estimates")
    lists = [params, grads, exp_avgs, hessians] + ([est] if est is not None else [])
    odd = {i for i in range(len(params)) if not all(lst[i].is_contiguous() and _local(lst[i]) is lst[i] for lst in lists)}
    if not odd:
        return fused(params, grads, exp_avgs, hessians, **kwargs)
    keep = [i for i in range(len(params)) if i not in odd]
    for sel, fn in ((keep, fused), (sorted(odd), sophia_step_foreach)):
        if sel:
            sub = dict(kwargs)
            if est is not None:
                sub["hessian_estimates"] = [est[i] for i in sel]
            fn(*[[lst[i] for i in sel] for lst in (params, grads, exp_avgs, hessians)], **sub)
