"""Fused AdaHessian step in Triton: one launch per dtype bucket, per-tensor bias corrections.

Same math as :func:`soulkit.kernels.adahessian.adahessian_step_reference`; reads p, g, m, v, D
and writes p, m, v once each. Per-tensor step counts (so per-tensor bias corrections) travel in
a small table beside the pointer tables. Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import bucket
from ._triton_tables import BLOCK, HAS_TRITON, TL_DTYPES, block_tables, check_launchable, pointer_table
from .adahessian import check_adahessian_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["adahessian_step_triton"]

if HAS_TRITON:

    @triton.jit
    def _adahessian_kernel(
        p_tab, g_tab, m_tab, v_tab, d_tab, numel_tab, bc1_tab, bc2_tab, blk_tensor, blk_start,
        lr, beta1, beta2, eps, decay, gsign, power,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, D_DTYPE: tl.constexpr,
        C_DTYPE: tl.constexpr, POWER_MODE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        start = tl.load(blk_start + pid)
        n = tl.load(numel_tab + t)
        bc1 = tl.load(bc1_tab + t).to(C_DTYPE)
        bc2 = tl.load(bc2_tab + t).to(C_DTYPE)
        offs = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        mask = offs < n
        p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(m_tab + t).to(tl.pointer_type(S_DTYPE))
        v_ptr = tl.load(v_tab + t).to(tl.pointer_type(S_DTYPE))
        d_ptr = tl.load(d_tab + t).to(tl.pointer_type(D_DTYPE))
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        p = p * decay
        m = m * beta1 + g * (gsign * (1.0 - beta1))
        v = v * beta2 + d * d * (1.0 - beta2)
        denom = tl.sqrt(v / bc2)
        if POWER_MODE == 0:  # hessian_power == 0: SGD with momentum
            denom = tl.full(denom.shape, 1.0, C_DTYPE)
        elif POWER_MODE == 2:  # general power; 0 ** k = 0 for k > 0
            denom = tl.where(denom > 0, tl.exp(tl.log(tl.where(denom > 0, denom, 1.0)) * power), 0.0)
        denom = denom + eps
        p = p - (lr / bc1) * (m / denom)
        tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(S_DTYPE), mask=mask)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


def adahessian_step_triton(
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
    """The AdaHessian step fused in Triton. All tensors contiguous, on one device."""
    check_adahessian_inputs(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, steps)
    if not params:
        return
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs,
             "exp_hessian_diag_sqs": exp_hessian_diag_sqs, "hessian_diags": hessian_diags}
    device = check_launchable(lists, "AdaHessian")
    power_mode = 0 if hessian_power == 0 else (1 if hessian_power == 1 else 2)
    keys = (tuple(t.dtype for t in ts) for ts in zip(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags))
    for (p_dt, g_dt, m_dt, v_dt, d_dt), idx in bucket(keys).items():
        if m_dt != v_dt:
            raise TypeError(f"exp_avgs[{idx[0]}] and exp_hessian_diag_sqs[{idx[0]}] must share a dtype")
        numels = [params[i].numel() for i in idx]
        blk_tensor, blk_start, n_blocks = block_tables(numels, device)
        if n_blocks == 0:
            continue
        wide = torch.float64 in (p_dt, m_dt)
        bc_dtype = torch.float64 if wide else torch.float32
        bc1 = torch.tensor([1 - beta1 ** int(steps[i]) for i in idx], dtype=bc_dtype).to(device, non_blocking=True)
        bc2 = torch.tensor([1 - beta2 ** int(steps[i]) for i in idx], dtype=bc_dtype).to(device, non_blocking=True)
        _adahessian_kernel[(n_blocks,)](
            pointer_table([params[i] for i in idx], device), pointer_table([grads[i] for i in idx], device),
            pointer_table([exp_avgs[i] for i in idx], device),
            pointer_table([exp_hessian_diag_sqs[i] for i in idx], device),
            pointer_table([hessian_diags[i] for i in idx], device),
            torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True), bc1, bc2, blk_tensor, blk_start,
            float(lr), float(beta1), float(beta2), float(eps), float(1 - lr * weight_decay),
            -1.0 if maximize else 1.0, float(hessian_power),
            P_DTYPE=TL_DTYPES[p_dt], G_DTYPE=TL_DTYPES[g_dt], S_DTYPE=TL_DTYPES[m_dt], D_DTYPE=TL_DTYPES[d_dt],
            C_DTYPE=tl.float64 if wide else tl.float32, POWER_MODE=power_mode, BLOCK_SIZE=BLOCK,
        )
