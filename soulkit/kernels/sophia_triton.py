"""Fused Sophia step in Triton: one launch per (dtype) bucket of a parameter group.

A *pointer table* holds the addresses of every tensor of the bucket; a block table maps each
program to (tensor, offset), so many small tensors cost one launch, not one each. Each element
is read once and written once: p, g, m, h in and p, m out (24 bytes per fp32 parameter, the
floor), plus h in/out and the estimate on refresh steps when the Hessian EMA is folded into
the same pass. Arithmetic runs in fp32 (fp64 for fp64 tensors) and is rounded once to the
storage dtype, the same math as :func:`soulkit.kernels.sophia.sophia_step_reference`.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (slow; used by the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import bucket
from ._triton_tables import (
    BLOCK,
    HAS_TRITON,
    TL_DTYPES,
    block_tables,
    check_launchable,
    pointer_table,
    triton_usable,
)
from .sophia import check_sophia_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["HAS_TRITON", "sophia_step_triton", "triton_usable"]


if HAS_TRITON:

    @triton.jit
    def _sophia_kernel(
        p_tab, g_tab, m_tab, h_tab, e_tab, numel_tab, blk_tensor, blk_start, win_ptr,
        lr, beta1, rho, decay, eps, bc1, beta2, gsign,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, E_DTYPE: tl.constexpr,
        C_DTYPE: tl.constexpr, HAS_EST: tl.constexpr, COUNT_WIN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        start = tl.load(blk_start + pid)
        n = tl.load(numel_tab + t)
        offs = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        mask = offs < n
        p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(m_tab + t).to(tl.pointer_type(S_DTYPE))
        h_ptr = tl.load(h_tab + t).to(tl.pointer_type(S_DTYPE))

        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DTYPE) * gsign
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        m = m * beta1 + g * (1.0 - beta1)
        if HAS_EST:
            e_ptr = tl.load(e_tab + t).to(tl.pointer_type(E_DTYPE))
            e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
            h = h * beta2 + e * (1.0 - beta2)
            tl.store(h_ptr + offs, h.to(S_DTYPE), mask=mask)
        denom = tl.maximum(h * rho, eps)
        ratio = (m / bc1) / denom
        ratio = tl.minimum(tl.maximum(ratio, -1.0), 1.0)
        if COUNT_WIN:
            won = (tl.abs(ratio) < 1.0) & mask
            tl.atomic_add(win_ptr, tl.sum(won.to(tl.int64), axis=0))
        p = p * decay - lr * ratio
        tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def sophia_step_triton(
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
    """The Sophia step of :func:`~soulkit.kernels.sophia.sophia_step_reference`, fused in Triton.

    All tensors must be contiguous and on one device; tensors are bucketed by dtype and each
    bucket is one kernel launch. Raises before launching anything if an input is invalid.
    """
    check_sophia_inputs(params, grads, exp_avgs, hessians, hessian_estimates)
    if not params:
        return
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "hessians": hessians}
    if hessian_estimates is not None:
        lists["hessian_estimates"] = hessian_estimates
    device = check_launchable(lists, "Sophia")
    if win_count is not None and (win_count.dtype != torch.int64 or win_count.device != device):
        raise ValueError(f"win_count must be an int64 tensor on {device}")

    keys = (
        (params[i].dtype, grads[i].dtype, exp_avgs[i].dtype, hessians[i].dtype,
         hessian_estimates[i].dtype if hessian_estimates is not None else None)
        for i in range(len(params))
    )
    buckets = bucket(keys)
    dummy_win = win_count if win_count is not None else torch.zeros((), dtype=torch.int64, device=device)
    for (p_dt, g_dt, m_dt, h_dt, e_dt), idx in buckets.items():
        if m_dt != h_dt:
            raise TypeError(f"exp_avgs[{idx[0]}] and hessians[{idx[0]}] must share a dtype for the Triton kernel")
        numels = [params[i].numel() for i in idx]
        blk_tensor, blk_start, n_blocks = block_tables(numels, device)
        if n_blocks == 0:
            continue
        c_dt = tl.float64 if torch.float64 in (p_dt, m_dt) else tl.float32
        p_tab = pointer_table([params[i] for i in idx], device)
        e_tab = pointer_table([hessian_estimates[i] for i in idx], device) if hessian_estimates is not None else p_tab
        _sophia_kernel[(n_blocks,)](
            p_tab, pointer_table([grads[i] for i in idx], device), pointer_table([exp_avgs[i] for i in idx], device),
            pointer_table([hessians[i] for i in idx], device), e_tab,
            torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True),
            blk_tensor, blk_start, dummy_win,
            float(lr), float(beta1), float(rho), float(1 - lr * weight_decay), float(eps), float(bias_correction1),
            float(beta2), -1.0 if maximize else 1.0,
            P_DTYPE=TL_DTYPES[p_dt], G_DTYPE=TL_DTYPES[g_dt], S_DTYPE=TL_DTYPES[m_dt],
            E_DTYPE=TL_DTYPES[e_dt] if e_dt is not None else TL_DTYPES[p_dt], C_DTYPE=c_dt,
            HAS_EST=hessian_estimates is not None, COUNT_WIN=win_count is not None, BLOCK_SIZE=BLOCK,
        )
