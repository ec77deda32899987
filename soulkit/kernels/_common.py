"""Small helpers shared by the torch (reference/foreach) paths of the kernel families."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "to_dtype", "write_back"]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any tensor is float64, float32 otherwise (bf16/fp16 storage is computed in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def to_dtype(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The tensors in ``dtype``; tensors already in it are returned as they are (no copy)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def write_back(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy each ``src`` into its ``dst`` where they are different tensors (one foreach call)."""
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
