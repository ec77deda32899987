"""Triton kernel for :func:`soulkit.kernels.projection.project`: ``g @ R`` with ``R`` made in registers.

Each program computes a ``[BLOCK_B, BLOCK_K]`` tile of the output, looping over ``d`` in steps of
``BLOCK_D``: it loads a ``[BLOCK_B, BLOCK_D]`` tile of ``g``, hashes ``(seed, row, col)`` into the
matching ``[BLOCK_D, BLOCK_K]`` tile of signs and accumulates their product in fp32. Global memory
traffic is ``g`` once per output column block plus the output: the ``d x k`` matrix never exists.
"""

from __future__ import annotations

import math

import torch

from ._triton_tables import HAS_TRITON, triton_usable
from .projection import check_projection_inputs, seed32

__all__ = ["project_triton", "triton_usable"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fmix32(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit(do_not_specialize=["row_offset", "seed"])
    def _project_kernel(
        g_ptr, out_ptr, B, D, K, stride_gb, stride_gd, stride_ob, stride_ok, row_offset, seed, scale,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        colmix = offs_k.to(tl.uint32) * 0x27D4EB2F
        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            g = tl.load(
                g_ptr + offs_b[:, None] * stride_gb + offs_d[None, :] * stride_gd,
                mask=(offs_b[:, None] < B) & (offs_d[None, :] < D), other=0.0,
            ).to(tl.float32)
            rows = (offs_d + row_offset).to(tl.uint32)
            a = _fmix32(rows * 0x9E3779B1 + seed.to(tl.uint32))
            h = _fmix32(a[:, None] ^ colmix[None, :])
            sign = 1.0 - 2.0 * (h >> 31).to(tl.float32)
            if IEEE:
                acc += tl.dot(g, sign, input_precision="ieee")
            else:
                acc += tl.dot(g, sign)
        acc = acc * scale
        tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_k[None, :] * stride_ok, acc,
                 mask=(offs_b[:, None] < B) & (offs_k[None, :] < K))


def project_triton(g: torch.Tensor, k: int, seed: int, *, row_offset: int = 0, tf32: bool = False) -> torch.Tensor:
    """Triton ``g @ R`` (fp32 accumulation, fp32 output). ``tf32=True`` trades precision for speed on GPU."""
    check_projection_inputs(g, k, row_offset)
    if not HAS_TRITON:
        raise RuntimeError("the Triton projection kernel needs the 'triton' package (pip install soulkit[triton])")
    if not triton_usable(g.device):
        raise RuntimeError(f"Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {g.device}")
    if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"g must be float32, float16 or bfloat16 for the Triton kernel, got {g.dtype}")
    b, d = g.shape
    out = torch.empty(b, k, dtype=torch.float32, device=g.device)
    if b == 0:
        return out
    block_b = 16 if b <= 16 else (32 if b <= 32 else 64)
    block_k, block_d = 64, 64
    grid = (triton.cdiv(b, block_b), triton.cdiv(k, block_k))
    _project_kernel[grid](
        g, out, b, d, k, g.stride(0), g.stride(1), out.stride(0), out.stride(1), row_offset, seed32(seed),
        1.0 / math.sqrt(k), BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_K=block_k, IEEE=not tf32,
    )
    return out
