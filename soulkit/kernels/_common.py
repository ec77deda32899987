"""Helpers shared by the kernel families: dtypes, bucketing of tensor lists, DTensor shards, inductor."""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Iterable

import torch

__all__ = ["bucket", "compile_available", "compute_dtype", "local", "to_dtype", "write_back"]


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


def bucket(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """Positions grouped by key, in first-seen order: ``bucket(["a", "b", "a"]) == {"a": [0, 2], "b": [1]}``.

    The kernels key tensors by (device, dtypes) so that each bucket is one foreach call or one launch.
    """
    out: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


_COMPILE_OK: bool | None = None


def compile_available() -> bool:
    """Whether inductor can build CPU code here (a C++ compiler is present); checked once."""
    global _COMPILE_OK
    if _COMPILE_OK is None:
        _COMPILE_OK = any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return _COMPILE_OK
