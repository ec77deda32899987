"""Seeded random projection of gradient blocks without materialising the projection matrix.

``project(g, k, seed)`` computes ``g @ R`` for ``g`` of shape ``[batch, d]`` and a Rademacher
matrix ``R`` of shape ``[d, k]`` with entries ``+-1/sqrt(k)`` (Johnson-Lindenstrauss: inner
products are preserved in expectation, ``E[(gR)(g'R)^T] = g g'^T``). ``R`` is never stored:
entry ``(i, j)`` is a pure function of ``(seed, i, j)`` (a 32-bit integer hash), so

* the same seed gives the same projection on any device and in any chunking;
* ``d`` can exceed memory: project column blocks ``g[:, a:b]`` with ``row_offset=a`` and add
  the results (:func:`project_chunks` does this for an iterable of blocks);
* the torch path generates ``R`` in row chunks of bounded size; the Triton kernel generates each
  tile in registers; on the CPU an inductor-compiled generator fuses the ~15 integer ops of the
  hash into one loop (the eager chain allocates an int64 temporary per op and is ~20x slower).

The hash (murmur3's 32-bit finaliser applied twice) is written once for torch (int64 arithmetic
masked to 32 bits) and once for Triton (uint32 arithmetic); the tests check they agree bit for bit.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_projection_inputs", "seed32", "rademacher_matrix", "project_reference", "project_compiled", "projection_signs"]

_M32 = 0xFFFFFFFF
_GOLD = 0x9E3779B1
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_JMUL = 0x27D4EB2F


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * _C1) & _M32
    h = h ^ (h >> 13)
    h = (h * _C2) & _M32
    return h ^ (h >> 16)


def seed32(seed: int) -> int:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed & _M32


def projection_signs(rows: torch.Tensor, cols: torch.Tensor, seed: int) -> torch.Tensor:
    """The sign (+1/-1, int64) of ``R[rows[:, None], cols[None, :]]`` for int64 index tensors."""
    s = seed32(seed)
    a = _fmix32(((rows.to(torch.int64) & _M32) * _GOLD + s) & _M32)
    b = ((cols.to(torch.int64) & _M32) * _JMUL) & _M32
    h = _fmix32(a[:, None] ^ b[None, :])
    return 1 - 2 * (h >> 31)


def rademacher_matrix(
    d: int, k: int, seed: int, *, row_offset: int = 0, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Materialise rows ``row_offset .. row_offset + d`` of ``R`` (for tests and small problems)."""
    rows = torch.arange(row_offset, row_offset + d, device=device, dtype=torch.int64)
    cols = torch.arange(k, device=device, dtype=torch.int64)
    return projection_signs(rows, cols, seed).to(dtype) / math.sqrt(k)


def check_projection_inputs(g: torch.Tensor, k: int, row_offset: int) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        raise ValueError(f"g must be a 2-D tensor [batch, d], got {getattr(g, 'shape', type(g))}")
    if not g.is_floating_point() or g.is_complex():
        raise TypeError(f"g must be a real floating-point tensor, got {g.dtype}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(row_offset, int) or row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    if row_offset + g.shape[1] > 2**32:
        raise ValueError("row indices must stay below 2**32 (d + row_offset too large)")


def project_reference(g: torch.Tensor, k: int, seed: int, *, row_offset: int = 0, chunk_rows: int = 4096) -> torch.Tensor:
    """Torch path: ``g @ R`` with ``R`` generated in row chunks of ``chunk_rows`` x ``k``.

    Peak extra memory is ``chunk_rows * k`` elements, independent of ``d``. Accumulates in
    float32 (float64 for float64 input) and returns that dtype.
    """
    check_projection_inputs(g, k, row_offset)
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = torch.zeros(g.shape[0], k, dtype=acc_dtype, device=g.device)
    d = g.shape[1]
    for start in range(0, d, chunk_rows):
        stop = min(d, start + chunk_rows)
        r = rademacher_matrix(stop - start, k, seed, row_offset=row_offset + start, dtype=acc_dtype, device=g.device)
        out.addmm_(g[:, start:stop].to(acc_dtype), r)
    return out


def _signed_scale(rows: torch.Tensor, cols: torch.Tensor, seed: int, scale: torch.Tensor) -> torch.Tensor:
    # projection_signs(rows, cols, seed) * scale, written out so that inductor fuses it into one loop
    a = _fmix32(((rows & _M32) * _GOLD + seed) & _M32)
    b = ((cols & _M32) * _JMUL) & _M32
    h = _fmix32(a[:, None] ^ b[None, :])
    return (1 - 2 * (h >> 31)).to(scale.dtype) * scale


_compiled_generator = None


def _generator():
    global _compiled_generator
    if _compiled_generator is None:
        _compiled_generator = torch.compile(_signed_scale, dynamic=True, fullgraph=True)
    return _compiled_generator


def project_compiled(
    g: torch.Tensor, k: int, seed: int, *, row_offset: int = 0, chunk_rows: int = 4096
) -> torch.Tensor:
    """:func:`project_reference` with each ``chunk_rows x k`` block of ``R`` generated by compiled code.

    Bit-identical to :func:`project_reference` (same hash, same scale ``1/sqrt(k)`` rounded in the
    accumulation dtype, same chunked ``addmm``); the first call compiles (seconds).
    """
    check_projection_inputs(g, k, row_offset)
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    # 1/sqrt(k) rounded exactly as the eager reference's  (+-1).to(dtype) / sqrt(k)  rounds it
    scale = torch.ones((), dtype=acc_dtype, device=g.device) / math.sqrt(k)
    cols = torch.arange(k, device=g.device, dtype=torch.int64)
    gen = _generator()
    out = torch.zeros(g.shape[0], k, dtype=acc_dtype, device=g.device)
    d = g.shape[1]
    for start in range(0, d, chunk_rows):
        stop = min(d, start + chunk_rows)
        rows = torch.arange(row_offset + start, row_offset + stop, device=g.device, dtype=torch.int64)
        out.addmm_(g[:, start:stop].to(acc_dtype), gen(rows, cols, seed32(seed), scale))
    return out
