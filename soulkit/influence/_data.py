"""Data plumbing for the influence layer: datasets/loaders, batch pytrees, caching.

A *batch* is whatever a ``DataLoader`` yields (a tensor, a tuple/list/dict of tensors, nested);
it goes unchanged to the user's ``loss_fn(model, batch)``. Every tensor leaf with at least one
dimension is taken to be batched along dim 0, and all of them must agree on the batch size.
Non-tensor leaves (strings, ints) are passed through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

__all__ = ["DataSource", "as_loader", "batch_size_of", "cast_batch", "slice_batch", "in_dims_of"]

Batch = Any


def as_loader(data: Any, *, name: str, batch_size: int) -> Iterable[Batch]:
    """A ``DataLoader`` over ``data`` in a fixed order (positions index the scores).

    ``Dataset`` (or a list of dict examples) -> ``DataLoader(data, batch_size, shuffle=False)``; a
    ``DataLoader`` is used as is,
    after checking that it neither shuffles nor drops the last batch.
    """
    if isinstance(data, DataLoader):
        sampler = getattr(data, "sampler", None)
        batch_sampler = getattr(data, "batch_sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        if isinstance(sampler, RandomSampler) or isinstance(inner, RandomSampler):
            raise ValueError(
                f"{name} is a DataLoader that shuffles (RandomSampler): scores are indexed by position, so "
                "the order must be fixed; build it with shuffle=False (or pass the Dataset)"
            )
        if getattr(data, "drop_last", False) or getattr(batch_sampler, "drop_last", False):
            raise ValueError(
                f"{name} is a DataLoader with drop_last=True: every example must be seen; use drop_last=False"
            )
        if not isinstance(data.dataset, IterableDataset):
            try:
                if len(data.dataset) == 0:  # type: ignore[arg-type]
                    raise ValueError(f"{name} is empty (its dataset has 0 examples)")
            except TypeError:
                pass
        return data
    if isinstance(data, Dataset):
        if not isinstance(data, IterableDataset):
            try:
                size = len(data)  # type: ignore[arg-type]
            except TypeError:
                size = None
            if size == 0:
                raise ValueError(f"{name} is empty (0 examples)")
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, list) and data and all(isinstance(x, Mapping) for x in data):
        return DataLoader(data, batch_size=batch_size, shuffle=False)  # a list of dict examples (HF style)
    raise TypeError(
        f"{name} must be a torch.utils.data.Dataset or DataLoader, got {type(data).__name__} "
        "(wrap tensors with torch.utils.data.TensorDataset)"
    )


def batch_size_of(batch: Batch, *, name: str) -> int:
    """The common leading dimension of the batch's tensor leaves."""
    leaves, _ = pytree.tree_flatten(batch)
    sizes = [(i, t.shape[0]) for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() > 0]
    if not sizes:
        raise TypeError(
            f"a batch of {name} holds no tensor with a batch dimension (got {type(batch).__name__}); "
            "loss_fn batches must contain tensors batched along dim 0"
        )
    first = sizes[0][1]
    bad = [(i, s) for i, s in sizes if s != first]
    if bad:
        raise ValueError(
            f"a batch of {name} has tensor leaves with different leading sizes: leaf 0 has {first}, "
            f"leaf {bad[0][0]} has {bad[0][1]}; every tensor in a batch must be batched along dim 0"
        )
    return int(first)


def cast_batch(batch: Batch, *, dtype: torch.dtype | None, device: torch.device) -> Batch:
    """Floating-point tensor leaves to ``dtype`` (if given), all tensor leaves to ``device``."""

    def f(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if t.device != device else t

    return pytree.tree_map(f, batch)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of every batched tensor leaf; other leaves are kept."""
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)


def in_dims_of(batch: Batch) -> Any:
    """``vmap`` in_dims for a batch: 0 for batched tensor leaves, None elsewhere."""
    leaves, spec = pytree.tree_flatten(batch)
    dims = [0 if isinstance(t, Tensor) and t.dim() > 0 else None for t in leaves]
    return pytree.tree_unflatten(dims, spec)


def unsqueeze_example(example: Batch) -> Batch:
    """Give one (vmapped) example a leading batch dimension of 1."""
    return pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)


def _nbytes(batch: Batch) -> int:
    leaves, _ = pytree.tree_flatten(batch)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


class DataSource:
    """A fixed-order pass over a dataset, with the batches kept in memory when they fit.

    Batches are moved to ``device`` and their floating-point leaves cast to ``dtype``. The first
    full pass counts the examples (``n``) and, while the total stays under ``cache_bytes``, keeps
    the prepared batches so that later passes (one per Hessian-vector product) skip collation.
    """

    def __init__(
        self,
        data: Any,
        *,
        name: str,
        batch_size: int,
        dtype: torch.dtype | None,
        device: torch.device,
        cache_bytes: int,
    ) -> None:
        self.name = name
        self.loader = as_loader(data, name=name, batch_size=batch_size)
        self.dtype, self.device = dtype, device
        self.cache_bytes = cache_bytes
        self._cache: list[tuple[Batch, int]] | None = None
        self._n: int | None = None

    def __iter__(self) -> Iterator[tuple[Batch, int]]:
        """Yield ``(batch, batch_size)``."""
        if self._cache is not None:
            yield from self._cache
            return
        keep: list[tuple[Batch, int]] | None = []
        total_bytes, n = 0, 0
        for raw in self.loader:
            b = batch_size_of(raw, name=self.name)
            if b == 0:
                continue
            batch = cast_batch(raw, dtype=self.dtype, device=self.device)
            n += b
            if keep is not None:
                total_bytes += _nbytes(batch)
                if total_bytes <= self.cache_bytes:
                    keep.append((batch, b))
                else:
                    keep = None
            yield batch, b
        if n == 0:
            raise ValueError(f"{self.name} is empty (0 examples)")
        self._n = n
        if keep is not None:
            self._cache = keep

    @property
    def n(self) -> int:
        """Number of examples (one pass over the data the first time)."""
        if self._n is None:
            for _ in self:
                pass
        assert self._n is not None
        return self._n

    @property
    def n_batches(self) -> int:
        if self._cache is not None:
            return len(self._cache)
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return math.inf  # type: ignore[return-value]
