"""The non-finite check every optimizer step and estimator runs before it changes anything.

:func:`first_nonfinite` answers "does any of these tensors hold a NaN or an infinity, and which
first?" with one pass over the data and one host synchronisation per device in the common case
(everything finite):

* the fast test reduces each tensor to a sum (large tensors one by one, a vectorised reduction)
  or to a 2-norm (small tensors, one foreach call for all of them). A NaN or an infinity always
  makes that result non-finite, so a finite result proves the tensor finite;
* a non-finite result can also come from huge finite values (the sum or the squares overflow),
  so it is confirmed element by element before a tensor is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import bucket, local

__all__ = ["all_finite", "first_nonfinite"]

# Tensors below this size are reduced together by one foreach call; larger ones one by one.
_SMALL = 1 << 15


def _fast_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One bool per tensor, on their (common) device: True where the fast test proves it finite."""
    small = [i for i, t in enumerate(tensors) if t.numel() < _SMALL]
    large = [i for i, t in enumerate(tensors) if t.numel() >= _SMALL]
    parts: list[tuple[list[int], torch.Tensor]] = []
    if small:
        parts.append((small, torch.stack(torch._foreach_norm([tensors[i] for i in small], 2.0))))
    if large:
        parts.append((large, torch.stack([tensors[i].sum(dtype=torch.float32 if tensors[i].dtype != torch.float64
                                                         else torch.float64) for i in large])))
    order = [i for idx, _ in parts for i in idx]
    values = torch.cat([v.to(torch.float64) for _, v in parts])
    flags = torch.isfinite(values)
    if order != list(range(len(tensors))):
        flags = torch.empty_like(flags).index_copy_(0, torch.tensor(order, device=flags.device), flags)
    return flags


def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Position of the first tensor holding a NaN or an infinity, ``None`` if all are finite.

    DTensors (FSDP2) are checked on this rank's shard. Tensors may sit on several devices.
    """
    tensors = [local(t) for t in tensors]
    if not tensors:
        return None
    by_device = bucket(t.device for t in tensors)
    flags = [_fast_flags([tensors[i] for i in idx]) for idx in by_device.values()]
    if len(flags) == 1:
        ok = flags[0].all().item()
    else:
        ok = torch.stack([f.all().cpu() for f in flags]).all().item()
    if ok:
        return None
    suspects = sorted(i for idx, f in zip(by_device.values(), flags) for i, good in zip(idx, f.tolist()) if not good)
    for i in suspects:
        if not bool(torch.isfinite(tensors[i]).all()):
            return i
    return None


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (see :func:`first_nonfinite`)."""
    return first_nonfinite(tensors) is None
