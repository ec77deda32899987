"""A resumable on-disk store for the factored influence route, and its sharding over torch.distributed ranks.

:class:`InfluenceStore` is a directory that :meth:`FactoredInfluence.fit` and ``.scores`` (and so
:class:`~soulkit.influence.InfluenceAnalyzer` with ``store=``) fill as the work proceeds, every file written
atomically (a temporary file, fsynced, renamed), tensors as safetensors (no pickle)::

    store.json                          fingerprints: {"factors": {...}, "scores": {...}}
    covariances.safetensors             K-FAC sums of a a^T and s s^T (all ranks), with the token/sequence counts
    eigendecompositions.safetensors     eigenvectors and eigenvalues of A and S per module
    eigenvalue_corrections.safetensors  EK-FAC's refitted eigenvalues per module
    train_gradients.safetensors         with ``projection``: every training example's projected gradient per
                                        module, which lets scores skip the training pass (``train_statistics``)
    partial/<phase>.rank<r>-of-<w>.safetensors   a rank's running sums of an unfinished pass (next batch in
                                        the metadata), every ``checkpoint_seconds``
    scores/chunk-<c>.safetensors        scores of training batches [c * chunk_batches, (c + 1) * chunk_batches)
    scores.safetensors                  the assembled ``scores`` [queries, train] (``per_token`` [.., T])

A killed run, rerun with the same arguments, loads every finished phase, continues an unfinished pass from
its last partial checkpoint and scores only the missing chunks. Everything it recomputes is computed by the
same operations on the same values (the pseudo-label draws are seeded by the global batch index), so its
scores are bit-identical to an uninterrupted run's. ``store.json`` holds what the results depend on (a digest
of the model's weights, of the batches of the training and query data, and the options); a store made for
anything else is refused with :class:`StoreMismatchError` naming what differs, never mixed.

Under ``torchrun`` (an initialised default process group) the work is data parallel (:class:`Sharding`):
rank ``r`` of ``w`` takes the training batches ``k`` with ``k % w == r`` for the factor passes, whose sums
are all-reduced, and the score chunks ``c`` with ``c % w == r``, each rank writing its own chunk files;
rank 0 writes the shared files and assembles the scores. The store must then be on a file system every
rank sees. Each rank must be given the whole, identically ordered data set (checked by digest).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .._io import atomic_write_bytes, atomic_write_json

__all__ = ["InfluenceStore", "Sharding", "StoreMismatchError", "data_fingerprint", "model_fingerprint",
           "tensors_digest"]

FORMAT = "soulkit-influence-store-v1"
META_FILE = "store.json"
SCORES_FILE = "scores.safetensors"
PHASE_FILES = {"covariances": "covariances.safetensors", "eigendecompositions": "eigendecompositions.safetensors",
               "eigenvalue_corrections": "eigenvalue_corrections.safetensors",
               "train_gradients": "train_gradients.safetensors"}
_OWNED = (META_FILE, SCORES_FILE, *PHASE_FILES.values(), "partial", "scores")


class StoreMismatchError(ValueError):
    """The store was made for another model, data set or options."""


# ---- sharding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sharding:
    """This process's share of the work: rank ``rank`` of ``world`` (1 process: ``Sharding(0, 1)``)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Sharding:
        """The default process group's rank and size when one is initialised (``torchrun``), else one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def owns(self, index: int) -> bool:
        """Whether batch (or chunk) ``index`` is this rank's: ``index % world == rank``."""
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum_(self, tensors: Iterable[Tensor]) -> None:
        """Sum each tensor over the ranks in place; rank 0's result is then broadcast, so that every rank
        holds the same bits (the eigendecompositions that follow run on every rank)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            dist.broadcast(t, src=0)

    def check_same(self, digest: str, what: str) -> None:
        """Raise ``ValueError`` unless every rank computed the same ``digest`` (the same data, in the same order)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        v = torch.tensor([int(digest[:15], 16)], dtype=torch.int64)
        lo, hi = v.clone(), v.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if int(lo) != int(hi):
            raise ValueError(f"the ranks were given different {what}: every rank must get the whole data set, "
                             "in the same order (sharding is done here)")


# ---- fingerprints -----------------------------------------------------------------------------


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's class and its state dict (every parameter and buffer)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    h.update(tensors_digest(model.state_dict()).encode())
    return h.hexdigest()


def data_fingerprint(batches: Iterable[Any]) -> tuple[str, int, int]:
    """``(digest, examples, batches)`` of a fixed-order pass: every tensor leaf of every batch and the batch
    boundaries (which seed the pseudo-label draws) go into the SHA-256; non-tensor leaves by their ``repr``."""
    from ._data import batch_size_of

    h = hashlib.sha256()
    n = k = 0
    for batch in batches:
        b = batch_size_of(batch, name="data")
        if b == 0:
            continue
        leaves, spec = pytree.tree_flatten(batch)
        h.update(f"batch {k} of {b}: {spec}|".encode())
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                _hash_tensor(h, str(i), leaf)
            else:
                h.update(repr(leaf).encode())
        n += b
        k += 1
    return h.hexdigest(), n, k


# ---- the store --------------------------------------------------------------------------------


def _differences(old: Mapping, new: Mapping) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class InfluenceStore:
    """A directory of factors and scores that a run writes as it goes and a rerun resumes from (see the module
    docstring for its layout).

    Args:
        directory: the store's directory (created on first use; a directory holding other files is refused).
        chunk_batches: training batches per score chunk (the unit a killed scoring run resumes from).
        checkpoint_seconds: a factor pass saves its running sums at most this often (``0``: after every batch;
            each save writes every module's covariance, so keep it in minutes for large models).
    """

    def __init__(self, directory: str | os.PathLike, *, chunk_batches: int = 16,
                 checkpoint_seconds: float = 300.0) -> None:
        if isinstance(chunk_batches, bool) or not isinstance(chunk_batches, int) or chunk_batches < 1:
            raise ValueError(f"chunk_batches must be an integer >= 1, got {chunk_batches!r}")
        c = checkpoint_seconds
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"checkpoint_seconds must be a finite number >= 0, got {c!r}")
        self.directory = Path(directory)
        self.chunk_batches, self.checkpoint_seconds = chunk_batches, float(c)

    @classmethod
    def of(cls, store: InfluenceStore | str | os.PathLike | None) -> InfluenceStore | None:
        """``store`` as an :class:`InfluenceStore` (a path gets the default options), or ``None``."""
        if store is None or isinstance(store, InfluenceStore):
            return store
        if isinstance(store, (str, os.PathLike)):
            return cls(store)
        raise TypeError(f"store must be a directory path or an InfluenceStore, got {type(store).__name__}")

    def __repr__(self) -> str:
        return f"InfluenceStore({str(self.directory)!r}, chunk_batches={self.chunk_batches})"

    # ---- metadata ----

    def _meta(self) -> dict[str, Any]:
        p = self.directory / META_FILE
        if not p.is_file():
            return {}
        meta = json.loads(p.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise StoreMismatchError(f"{p} is not a soulkit influence store (format {meta.get('format')!r})")
        return meta

    def _check_foreign(self) -> None:
        d = self.directory
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"the influence store {d} is a file; give a directory")
        if d.is_dir() and not (d / META_FILE).is_file():
            other = sorted(p.name for p in d.iterdir()
                           if p.name not in _OWNED and not p.name.startswith("."))  # "." : atomic writes' temps
            if other:
                raise FileExistsError(f"{d} holds other files ({', '.join(other[:5])}), not an influence store; "
                                      "give an empty or new directory")

    def claim(self, section: str, fingerprint: Mapping[str, Any], sharding: Sharding = Sharding()) -> None:
        """Record ``fingerprint`` for ``section`` (``"factors"`` or ``"scores"``), or check it against the one
        recorded: a store made for anything else raises :class:`StoreMismatchError` before anything is
        written. Rank 0 writes; every rank checks."""
        self._check_foreign()
        self._meta()  # not a store of another format (every rank raises alike, before the barrier)
        fingerprint = json.loads(json.dumps(dict(fingerprint)))
        if sharding.rank == 0:
            meta = self._meta() or {"format": FORMAT}
            if section not in meta:
                meta[section] = fingerprint
                atomic_write_json(self.directory / META_FILE, meta)
        sharding.barrier()
        old = self._meta().get(section)
        if old != fingerprint:
            diff = _differences(old or {}, fingerprint)
            what = {"model": "another model", "train": "other training data", "queries": "other queries",
                    "factors": "other factors"}
            said = [what.get(k, k) for k in diff]
            raise StoreMismatchError(
                f"the influence store {self.directory} holds {section} made for {', '.join(said)} "
                f"(differs in: {', '.join(diff)}); use another store directory or clear this one (--overwrite)")

    def clear(self, sharding: Sharding = Sharding()) -> None:
        """Remove what this store holds (only its own files; a directory of other files is refused). Rank 0
        removes; every rank waits for it."""
        self._check_foreign()
        if sharding.rank == 0 and self.directory.is_dir():
            for name in _OWNED:
                p = self.directory / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        sharding.barrier()

    # ---- tensors ----

    def _write(self, path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> None:
        from safetensors.torch import save

        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_bytes(path, save(data, metadata={"json": json.dumps(dict(meta or {}))}))

    def _read(self, path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta

    def has(self, phase: str) -> bool:
        """Whether the phase (a key of ``PHASE_FILES``) is complete in the store."""
        return (self.directory / PHASE_FILES[phase]).is_file()

    def save_phase(self, phase: str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None,
                   sharding: Sharding = Sharding()) -> None:
        """Rank 0 writes a complete phase's tensors; then the ranks' partial files of it are removed."""
        if sharding.rank == 0:
            self._write(self.directory / PHASE_FILES[phase], tensors, meta)
            partial = self.directory / "partial"
            for p in partial.glob(f"{phase}.rank*.safetensors"):
                p.unlink(missing_ok=True)
            if partial.is_dir() and not any(partial.iterdir()):
                partial.rmdir()
        sharding.barrier()

    def load_phase(self, phase: str, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self._read(self.directory / PHASE_FILES[phase], device)

    def _partial(self, phase: str, sharding: Sharding) -> Path:
        return self.directory / "partial" / f"{phase}.rank{sharding.rank}-of-{sharding.world}.safetensors"

    def save_partial(self, phase: str, sharding: Sharding, tensors: Mapping[str, Tensor],
                     meta: Mapping[str, Any]) -> None:
        """This rank's running sums of an unfinished pass (``meta`` says where to continue)."""
        self._write(self._partial(phase, sharding), tensors, meta)

    def load_partial(self, phase: str, sharding: Sharding, device: torch.device | str = "cpu",
                     ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """This rank's last partial checkpoint of ``phase`` at the same world size, or ``None``."""
        p = self._partial(phase, sharding)
        return self._read(p, device) if p.is_file() else None

    # ---- scores ----

    def _chunk(self, c: int) -> Path:
        return self.directory / "scores" / f"chunk-{c:06d}.safetensors"

    def chunks_done(self) -> set[int]:
        """Indices of the score chunks already written."""
        d = self.directory / "scores"
        return {int(p.name[6:12]) for p in d.glob("chunk-*.safetensors")} if d.is_dir() else set()

    def save_chunk(self, c: int, start: int, tensors: Mapping[str, Tensor]) -> None:
        """Scores of chunk ``c``, whose first training example is ``start``."""
        n = int(next(iter(tensors.values())).shape[1])
        self._write(self._chunk(c), tensors, {"start": start, "count": n})

    def has_scores(self) -> bool:
        return (self.directory / SCORES_FILE).is_file()

    def load_scores(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        return self._read(self.directory / SCORES_FILE, device)[0]

    def assemble_scores(self, n: int, sharding: Sharding = Sharding()) -> None:
        """Rank 0 joins the chunks (checked to cover training examples ``0..n-1`` in order) into
        ``scores.safetensors`` and removes them; every rank waits for it."""
        sharding.barrier()
        if sharding.rank == 0 and not self.has_scores():
            parts = [self._read(self._chunk(c)) for c in sorted(self.chunks_done())]
            at = 0
            for c, (_, meta) in enumerate(parts):
                if meta.get("start") != at:
                    raise RuntimeError(f"the score chunks in {self.directory / 'scores'} do not cover the training "
                                       f"set: chunk {c} starts at {meta.get('start')}, expected {at}")
                at += int(meta["count"])
            if at != n:
                raise RuntimeError(f"the score chunks in {self.directory / 'scores'} cover {at} training examples, "
                                   f"not {n}")
            out = {"scores": torch.cat([t["scores"] for t, _ in parts], dim=1)}
            if "per_token" in parts[0][0]:
                width = max(t["per_token"].shape[-1] for t, _ in parts)
                out["per_token"] = torch.cat([torch.nn.functional.pad(t["per_token"], (0, width - t["per_token"]
                                                                                      .shape[-1]))
                                              for t, _ in parts], dim=1)
            self._write(self.directory / SCORES_FILE, out, {"n_train": n})
            shutil.rmtree(self.directory / "scores", ignore_errors=True)
        sharding.barrier()


class CheckpointClock:
    """When a pass should save its running sums: at most every ``seconds`` (``0``: every batch)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last = seconds, time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False
