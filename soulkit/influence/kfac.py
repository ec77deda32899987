"""K-FAC and EK-FAC factors of the Gauss-Newton / Fisher matrix, one block per tracked module.

For a linear module with inputs ``a`` and output gradients ``s`` the Fisher block of the mean
training loss, ``F = E_j[vec(G_j) vec(G_j)^T]`` with ``G_j = sum_t s_{j,t} a_{j,t}^T``, is approximated
by (Martens & Grosse 2015)

    F ~ A (x) S,     A = sum_tokens a a^T / N_tokens,     S = sum_tokens s s^T / N_sequences,

and preconditioning a gradient ``G`` ``[out, in]`` is two small eigendecompositions away:
``A = Q_A diag(l_A) Q_A^T``, ``S = Q_S diag(l_S) Q_S^T``,

    (F + lambda I)^{-1} G = Q_S [(Q_S^T G Q_A) / (l_S l_A^T + lambda)] Q_A^T.

EK-FAC (George et al. 2018) keeps the eigenbasis and refits the eigenvalues in a second pass,
``Lambda[o, i] = E_j[(Q_S^T G_j Q_A)[o, i]^2]``, which is exact on the diagonal of ``F`` in that
basis. Covariances are accumulated in float32, decomposed in float64; the factors are kept in
float64 and saved as safetensors with a JSON description.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._io import atomic_directory, atomic_write_bytes, atomic_write_text

__all__ = ["FACTOR_METHODS", "KFACFactors", "ModuleFactors", "default_damping"]

FACTOR_METHODS = ("kfac", "ekfac")
#: Relative damping used when the user gives neither ``l2`` nor ``damping``: per module, this
#: fraction of the mean eigenvalue of its curvature block (kronfluence's heuristic too).
DEFAULT_RELATIVE_DAMPING = 0.1
_FORMAT = "soulkit-kfac-v1"
_FILES = ("factors.json", "factors.safetensors")
_TENSORS = ("a_vecs", "a_vals", "s_vecs", "s_vals", "corrected")


@dataclass
class ModuleFactors:
    """One module's factors: eigenbases and eigenvalues of ``A`` (``[in, in]``) and ``S`` (``[out, out]``),
    and for EK-FAC the refitted eigenvalues ``corrected`` ``[out, in]``."""

    a_vecs: Tensor
    a_vals: Tensor
    s_vecs: Tensor
    s_vals: Tensor
    corrected: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.s_vecs.shape[0]), int(self.a_vecs.shape[0])

    def eigenvalues(self, method: str) -> Tensor:
        """``[out, in]`` eigenvalues of the block in the Kronecker eigenbasis."""
        if method == "ekfac":
            if self.corrected is None:
                raise RuntimeError("these factors have no EK-FAC eigenvalue correction; fit with solver='ekfac'")
            return self.corrected
        return torch.outer(self.s_vals, self.a_vals)

    def precondition(self, G: Tensor, method: str, damping: float) -> Tensor:
        """``(F + damping I)^{-1} G`` for ``G`` ``[..., out, in]``, in G's precision (float32 for half
        precision): the four rotations are the cost, and float32 halves it against float64; the
        eigenvalues are divided in float64."""
        dt = torch.float64 if G.dtype == torch.float64 else torch.float32
        qs, qa = self.s_vecs.to(dt), self.a_vecs.to(dt)
        rot = (qs.T @ G.to(dt) @ qa).to(torch.float64) / (self.eigenvalues(method) + damping)
        return (qs @ rot.to(dt) @ qa.T).to(G.dtype)


def default_damping(factors: ModuleFactors, method: str) -> float:
    """:data:`DEFAULT_RELATIVE_DAMPING` times the block's mean eigenvalue (a floor of 1e-12)."""
    return max(DEFAULT_RELATIVE_DAMPING * float(factors.eigenvalues(method).mean()), 1e-12)


def _eig(cov: Tensor, what: str) -> tuple[Tensor, Tensor]:
    cov = cov.to(torch.float64)
    if not bool(torch.isfinite(cov).all()):
        raise FloatingPointError(f"the {what} covariance holds NaN or Inf (a non-finite activation or gradient)")
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    # eigh returns column-major vectors and a store reads them back row-major; matmuls of the two layouts can
    # round differently, so one layout keeps scores from factors fitted here and read back bit-identical
    return vals.clamp_min(0.0), vecs.contiguous()


class CovarianceAccumulator:
    """Running sums of ``a a^T`` over tokens and ``s s^T`` over sequences, per module (float32)."""

    def __init__(self, dims: Mapping[str, tuple[int, int]], device: torch.device) -> None:
        self.a = {n: torch.zeros(i, i, device=device) for n, (_, i) in dims.items()}
        self.s = {n: torch.zeros(o, o, device=device) for n, (o, _) in dims.items()}
        self.tokens = 0
        self.sequences = 0

    def add_inputs(self, name: str, a: Tensor, mask: Tensor | None) -> None:
        flat = a.reshape(-1, a.shape[-1]) if mask is None else a[mask]
        self.a[name].addmm_(flat.T, flat)

    def add_output_grads(self, name: str, s: Tensor, weight: float = 1.0) -> None:
        flat = s.reshape(-1, s.shape[-1])
        self.s[name].addmm_(flat.T, flat, alpha=weight)

    def factors(self) -> dict[str, ModuleFactors]:
        if self.tokens == 0 or self.sequences == 0:
            raise ValueError("no training tokens were seen: the training set is empty or fully masked")
        out = {}
        for name in self.a:
            a_vals, a_vecs = _eig(self.a[name] / self.tokens, f"input ({name})")
            s_vals, s_vecs = _eig(self.s[name] / self.sequences, f"output-gradient ({name})")
            out[name] = ModuleFactors(a_vecs, a_vals, s_vecs, s_vals)
        return out


class KFACFactors:
    """The factors of every tracked module, with what they were fitted on; saved and loaded as a directory.

    Args:
        modules: module name -> :class:`ModuleFactors`.
        method: ``"kfac"`` or ``"ekfac"`` (``ekfac`` factors also serve ``kfac``).
        meta: JSON-serialisable facts of the fit (sequences, tokens, fisher, likelihood, ...).
    """

    def __init__(self, modules: Mapping[str, ModuleFactors], method: str, meta: Mapping | None = None) -> None:
        if method not in FACTOR_METHODS:
            raise ValueError(f"method must be one of {FACTOR_METHODS}, got {method!r}")
        self.modules = dict(modules)
        self.method = method
        self.meta = dict(meta or {})

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: f.shape for n, f in self.modules.items()}

    def check_matches(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Raise ``ValueError`` naming the difference if these factors are not for modules ``shapes``."""
        mine = self.shapes()
        missing = [n for n in shapes if n not in mine]
        extra = [n for n in mine if n not in shapes]
        if missing or extra:
            raise ValueError(f"the factors are for other modules: missing {missing[:5]}, not tracked here {extra[:5]}")
        bad = [(n, mine[n], tuple(s)) for n, s in shapes.items() if mine[n] != tuple(s)]
        if bad:
            n, got, want = bad[0]
            raise ValueError(f"the factors of module {n!r} have shape {got} but the model's is {want}: another model")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` and ``factors.json`` as the directory ``directory``, swapped in
        whole (an interruption leaves the old factors or the new ones). A directory holding other files
        is refused rather than replaced."""
        from safetensors.torch import save

        d = Path(directory)
        if d.exists():
            other = sorted(p.name for p in d.iterdir() if p.name not in _FILES) if d.is_dir() else [d.name]
            if other:
                raise ValueError(f"{d} holds other files ({', '.join(other[:5])}); save factors into an empty "
                                 "or a factor directory")
        desc = {"format": _FORMAT, "method": self.method, "modules": {n: list(s) for n, s in self.shapes().items()},
                "meta": self.meta}
        with atomic_directory(d) as tmp:
            atomic_write_bytes(tmp / _FILES[1], save(self.tensors()))
            atomic_write_text(tmp / _FILES[0], json.dumps(desc, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> KFACFactors:
        """Read a directory written by :meth:`save` (safetensors: no pickle)."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta_path, tensor_path = d / "factors.json", d / "factors.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"{d} holds no saved factors (factors.json and factors.safetensors)")
        desc = json.loads(meta_path.read_text())
        if desc.get("format") != _FORMAT:
            raise ValueError(f"{meta_path} is not a soulkit factor file (format {desc.get('format')!r})")
        return cls.from_tensors(load_file(str(tensor_path), device=str(device)), desc["modules"], desc["method"],
                                desc.get("meta"), source=str(tensor_path))

    def tensors(self) -> dict[str, Tensor]:
        """Every factor as ``"<module>/<a_vecs|a_vals|s_vecs|s_vals|corrected>"`` -> CPU tensor (what is saved)."""
        out = {}
        for name, f in self.modules.items():
            for key in _TENSORS:
                t = getattr(f, key)
                if t is not None:
                    out[f"{name}/{key}"] = t.detach().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], method: str,
                     meta: Mapping | None = None, *, source: str = "the factors") -> KFACFactors:
        """The inverse of :meth:`tensors`, checked against the modules' ``[out, in]`` ``shapes``."""
        modules = {}
        for name, (out_f, in_f) in shapes.items():
            try:
                f = ModuleFactors(*(tensors[f"{name}/{k}"] for k in _TENSORS[:4]),
                                  corrected=tensors.get(f"{name}/corrected"))
            except KeyError as e:
                raise ValueError(f"{source} lacks the tensor {e.args[0]!r}: the file is incomplete") from None
            if f.shape != (out_f, in_f):
                raise ValueError(f"{source}: module {name!r} has shape {f.shape}, its description says "
                                 f"{(out_f, in_f)}")
            modules[name] = f
        return cls(modules, method, meta)


def correction_sums(dims: Mapping[str, tuple[int, int]], device: torch.device) -> dict[str, Tensor]:
    """Zeroed accumulators of the EK-FAC eigenvalue refit, ``[out, in]`` per module (float64)."""
    return {n: torch.zeros(o, i, dtype=torch.float64, device=device) for n, (o, i) in dims.items()}


def add_correction(total: Tensor, factors: ModuleFactors, a: Tensor, s: Tensor, weight: float = 1.0) -> None:
    """Add ``sum_j (Q_S^T G_j Q_A)^2`` of one batch (``a`` ``[B, T, in]``, ``s`` ``[B, T, out]``) to ``total``."""
    qa, qs = factors.a_vecs.to(a.dtype), factors.s_vecs.to(s.dtype)
    rot = torch.bmm((s @ qs).transpose(1, 2), a @ qa)  # [B, out, in]
    # the batch's sum in rot's precision (float64 for float64 inputs), accumulated into the float64 total:
    # a float64 copy of every per-example rotation would cost more than the rotation itself
    total.add_(rot.square().sum(0).to(torch.float64), alpha=weight)


def with_corrections(factors: Mapping[str, ModuleFactors], sums: Mapping[str, Tensor], sequences: int,
                     ) -> dict[str, ModuleFactors]:
    out = {}
    for name, f in factors.items():
        c = sums[name] / sequences
        if not bool(torch.isfinite(c).all()):
            raise FloatingPointError(f"the EK-FAC eigenvalues of {name!r} hold NaN or Inf")
        out[name] = ModuleFactors(f.a_vecs, f.a_vals, f.s_vecs, f.s_vals, corrected=c)
    return out


def low_rank(Q: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``Q`` ``[m, out, in]`` as ``U @ V^T`` with ``U`` ``[m, out, r]``, ``V`` ``[m, in, r]`` (randomized SVD, seeded;
    exact, by a full SVD, when ``rank`` reaches ``min(out, in)``)."""
    m, out_f, in_f = Q.shape
    if rank >= min(out_f, in_f):
        U, S, Vh = torch.linalg.svd(Q.to(torch.float64), full_matrices=False)
        return (U * S.unsqueeze(1)).to(Q.dtype), Vh.transpose(1, 2).to(Q.dtype)
    Us, Vs = [], []
    devices = [Q.device] if Q.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # svd_lowrank draws from the global RNG: same Q, same factors
        torch.manual_seed(0)
        for q in Q:
            U, S, V = torch.svd_lowrank(q, q=rank, niter=4)
            Us.append(U * S)
            Vs.append(V)
    return torch.stack(Us), torch.stack(Vs)


def stack_names(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
