"""Data parallelism for the :class:`~soulkit.unlearn.unlearner.Unlearner` under ``torch.distributed``.

``Unlearner(..., parallel="ddp")`` or ``parallel="fsdp2"``, in a script started by ``torchrun`` (one
process per device) after ``torch.distributed.init_process_group``:

* every rank builds the same global forget/retain batches (the data order is a function of the seed
  and the step) and takes its rows ``rank::world`` (:func:`~soulkit.unlearn.qa.shard_batch`); the
  objectives divide by the *global* batch's counts, so the gradients DDP / FSDP2 average are those of
  the global batch, and the run follows the single-process trajectory (up to rounding);
* the model being unlearned (the Unlearner's copy) is wrapped in ``DistributedDataParallel``
  (``"ddp"``) or sharded in place with ``torch.distributed.fsdp.fully_shard`` per decoder block and at
  the root (``"fsdp2"``); the frozen reference model of NPO-style objectives is a full copy per rank
  under DDP and sharded the same way under FSDP2 (it only runs forward passes);
* checkpoints and the final model are written by rank 0 only, in the single-process format (FSDP2's
  sharded weights and optimizer state are gathered into full tensors first), so a run resumes on any
  number of ranks, or in one process.

:class:`Local` is the same interface for one process without ``torch.distributed``: the loop has one
code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from .qa import shard_batch

__all__ = ["PARALLEL", "Local", "Distributed", "make_parallel"]

#: The values of ``Unlearner(parallel=...)`` besides ``None`` (one process).
PARALLEL = ("ddp", "fsdp2")


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "full_tensor")


def _gathered(v: Any, keep: bool) -> Any:
    """A DTensor's full tensor, on the CPU (an all-gather: every rank calls it), or ``None`` when not kept;
    anything else as it is."""
    if not _is_dtensor(v):
        return v
    full = v.full_tensor()
    return full.cpu() if keep else None


class Local:
    """One process: batches are whole, the model is not wrapped, every rank-0-only write happens."""

    kind: str | None = None
    rank, world = 0, 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """This rank's part of a global batch (here the batch itself)."""
        return batch

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a per-row tensor of the global batch (``rank::world``)."""
        return t[self.rank::self.world]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls for forward passes (here ``model`` itself)."""
        return model

    def wrap_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        return reference

    def gradient_sync(self, net: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """A context in which a backward accumulates local gradients only (``sync=False``)."""
        return contextlib.nullcontext()

    def all_true(self, flag: bool) -> bool:
        return bool(flag)

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value over the ranks."""
        return list(values)

    def barrier(self) -> None:
        pass

    def full_state_dict(self, model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict with full (unsharded) tensors; a collective under FSDP2 (every rank calls
        it), where the gathered tensors go to the CPU one by one, and ranks with ``keep=False`` (those that
        write nothing) drop them and get ``{}``."""
        return model.state_dict()

    def load_full_state_dict(self, model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Load full tensors (a checkpoint's) into ``model``, sharding them where its parameters are."""
        model.load_state_dict(dict(weights), strict=False)

    def full_optimizer_state(self, opt: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
        """``opt.state_dict()`` with full tensors; a collective under FSDP2 (as :meth:`full_state_dict`)."""
        return opt.state_dict()

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """``opt.load_state_dict`` of a full state dict (sharded to the parameters' placements)."""
        opt.load_state_dict(state)


class Distributed(Local):
    """DDP (``kind="ddp"``) or FSDP2 (``kind="fsdp2"``) over the default process group."""

    def __init__(self, kind: str):
        if kind not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL} or None, got {kind!r}")
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"parallel={kind!r} needs an initialised torch.distributed process group: start the "
                               "script with torchrun and call torch.distributed.init_process_group() before "
                               "building the Unlearner (or pass parallel=None for one process)")
        self.kind = kind
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._mesh = None

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return shard_batch(batch, self.rank, self.world)

    def _device_mesh(self, device: torch.device):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(device.type, (self.world,))
        return self._mesh

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        from .objectives import decoder_blocks

        mesh = self._device_mesh(next(model.parameters()).device)
        try:
            blocks = decoder_blocks(model)
        except ValueError:
            blocks = []  # not a Llama/GPT-2 layout: one group for the whole model
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.kind == "fsdp2":
            return self._shard(model)
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def wrap_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        # forward passes only, nothing to synchronise: DDP keeps a full copy per rank, FSDP2 shards it
        return self._shard(reference) if self.kind == "fsdp2" else reference

    def gradient_sync(self, net: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        # DDP all-reduces on the last micro-batch only; FSDP2 reduce-scatters each one (its sharded
        # gradients accumulate), which is exact as well
        if sync or self.kind != "ddp":
            return contextlib.nullcontext()
        return net.no_sync()

    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def mean(self, values: list[float]) -> list[float]:
        if not values:
            return []
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def full_state_dict(self, model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        if self.kind != "fsdp2":
            return model.state_dict()
        # full_tensor() is an all-gather: every rank calls it, for the same keys in the same order
        gathered = {k: _gathered(v, keep) for k, v in model.state_dict().items()}
        return gathered if keep else {}

    def _like(self, full: torch.Tensor, like: Any) -> torch.Tensor:
        if not _is_dtensor(like):
            return full
        from torch.distributed.tensor import DTensor, distribute_tensor

        # every rank holds the same full tensor (read from the same checkpoint): no communication needed;
        # the shard is copied out so that the full tensor on the device can be freed at once
        dt = distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                               src_data_rank=None)
        return DTensor.from_local(dt.to_local().clone(), like.device_mesh, like.placements, run_check=False,
                                  shape=dt.shape, stride=dt.stride())

    def load_full_state_dict(self, model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        if self.kind != "fsdp2":
            return super().load_full_state_dict(model, weights)
        current = model.state_dict()
        model.load_state_dict({k: self._like(v, current[k]) for k, v in weights.items()}, strict=False)

    def full_optimizer_state(self, opt: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
        sd = opt.state_dict()
        if self.kind != "fsdp2":
            return sd
        sd["state"] = {i: {k: _gathered(v, keep) for k, v in s.items()} for i, s in sorted(sd["state"].items())}
        return sd if keep else {}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.kind != "fsdp2":
            return super().load_optimizer_state(opt, state)
        params = [p for g in opt.param_groups for p in g["params"]]
        state = dict(state)
        state["state"] = {
            i: {k: self._like(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() > 0 and
                v.shape == params[i].shape else v for k, v in s.items()}
            for i, s in state["state"].items()
        }
        opt.load_state_dict(state)


def make_parallel(kind: str | None) -> Local:
    """:class:`Local` for ``None``, :class:`Distributed` for ``"ddp"`` / ``"fsdp2"``."""
    return Local() if kind is None else Distributed(kind)

