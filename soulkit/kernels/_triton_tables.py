"""Pointer and block tables for multi-tensor Triton kernels (one launch for many tensors).

A kernel receives, per tensor list, an int64 table of data pointers; and per program, the index
of its tensor and the offset of its block inside that tensor. Tensors of any sizes then share a
single launch of ``n_blocks`` programs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

try:  # triton is an optional dependency
    import triton  # noqa: F401
    import triton.language as tl

    HAS_TRITON = True
    TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False
    TL_DTYPES = {}

__all__ = ["HAS_TRITON", "TL_DTYPES", "BLOCK", "triton_usable", "pointer_table", "block_tables", "check_launchable"]

BLOCK = 1024


def triton_usable(device: torch.device) -> bool:
    """True where the Triton kernels can run: CUDA tensors, or any tensor under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return device.type == "cpu"
    return device.type == "cuda"


def pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


def block_tables(numels: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tensor index per block, start offset per block, number of blocks) for ``BLOCK``-sized blocks."""
    tensor_idx: list[int] = []
    starts: list[int] = []
    for i, n in enumerate(numels):
        nb = (n + BLOCK - 1) // BLOCK
        tensor_idx.extend([i] * nb)
        starts.extend(range(0, nb * BLOCK, BLOCK))
    return (
        torch.tensor(tensor_idx, dtype=torch.int32).to(device, non_blocking=True),
        torch.tensor(starts, dtype=torch.int64).to(device, non_blocking=True),
        len(tensor_idx),
    )


def check_launchable(lists: Mapping[str, Sequence[torch.Tensor]], kernel: str) -> torch.device:
    """Every tensor contiguous, on one device where Triton runs, of a supported dtype; else raise
    naming the list and index. Returns the device."""
    if not HAS_TRITON:
        raise RuntimeError(f"the Triton {kernel} kernel needs the 'triton' package (pip install soulkit[triton])")
    first = next(iter(lists.values()))
    device = first[0].device
    for name, lst in lists.items():
        for i, t in enumerate(lst):
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}; the Triton kernel needs every tensor on {device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] is not contiguous; pass .contiguous() tensors or use the foreach path")
            if t.dtype not in TL_DTYPES:
                raise TypeError(f"{name}[{i}] has unsupported dtype {t.dtype}")
    if not triton_usable(device):
        raise RuntimeError(f"Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not on {device}")
    return device
