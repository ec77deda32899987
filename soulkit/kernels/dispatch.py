"""One dispatcher for every kernel family: which implementation runs a call.

The references and the fast paths live in their own modules (``sophia.py``, ``adahessian.py`` and
``projection.py`` hold the plain-torch references and the foreach paths; ``*_compiled.py`` and
``*_triton.py`` the fused ones) and never import this module, so the package has no import cycle.

Implementations, per family:

* Sophia step: ``"triton"`` (CUDA), ``"compiled"`` (inductor, CPU), ``"foreach"``, ``"reference"``.
* AdaHessian step: ``"triton"`` (CUDA), ``"foreach"``, ``"reference"``.
* Projection: ``"triton"`` (CUDA), ``"compiled"`` (CPU), ``"torch"`` (the eager reference).

``"auto"`` picks Triton on CUDA; on the CPU the compiled step for Sophia groups of at least
:data:`COMPILE_MIN_NUMEL` elements and the compiled projection; foreach otherwise. Tensors a fused
path cannot take (non-contiguous ones, and DTensors, whose wrapper has no raw data pointer) go to
the foreach path; the rest keep the requested one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._common import compile_available, local
from .adahessian import adahessian_step_foreach, adahessian_step_reference
from .projection import check_projection_inputs, project_compiled, project_reference
from .sophia import sophia_step_foreach, sophia_step_reference

__all__ = [
    "ADAHESSIAN_IMPLEMENTATIONS",
    "COMPILE_MIN_NUMEL",
    "PROJECTION_IMPLEMENTATIONS",
    "SOPHIA_IMPLEMENTATIONS",
    "adahessian_step",
    "implementation_from_flags",
    "project",
    "project_chunks",
    "resolve_implementation",
    "sophia_step",
    "triton_usable",
]

SOPHIA_IMPLEMENTATIONS = ("auto", "triton", "compiled", "foreach", "reference")
ADAHESSIAN_IMPLEMENTATIONS = ("auto", "triton", "foreach", "reference")
PROJECTION_IMPLEMENTATIONS = ("auto", "triton", "compiled", "torch")
# Below this many elements in a group the one-off compile of the CPU Sophia step does not pay for
# itself (benchmarks/results/kernels_cpu.md).
COMPILE_MIN_NUMEL = 1 << 20


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA with triton installed, or the CPU under
    ``TRITON_INTERPRET=1``); imports triton only where it could be used."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from ._triton_tables import triton_usable as usable

    return usable(device)


def resolve_implementation(
    device: torch.device, requested: str = "auto", numel: int = 0, *, family: str = "sophia"
) -> str:
    """Map ``"auto"`` to the fastest available path of ``family`` (``"sophia"`` or ``"adahessian"``)
    for tensors on ``device`` holding ``numel`` elements in all; other names are checked and returned."""
    choices = {"sophia": SOPHIA_IMPLEMENTATIONS, "adahessian": ADAHESSIAN_IMPLEMENTATIONS}.get(family)
    if choices is None:
        raise ValueError(f"family must be 'sophia' or 'adahessian', got {family!r}")
    if requested not in choices:
        raise ValueError(f"implementation must be one of {choices}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "triton" if triton_usable(device) else "foreach"
    if family == "sophia" and device.type == "cpu" and numel >= COMPILE_MIN_NUMEL and compile_available():
        return "compiled"
    return "foreach"


def implementation_from_flags(foreach: bool | None, fused: bool | None, device: torch.device) -> str:
    """An optimizer's ``torch.optim``-style flags as an implementation name.

    ``fused=True``: the Triton kernel (an error where it cannot run); ``foreach=False``: the plain
    per-tensor reference (for debugging); ``foreach=True``: the foreach path; ``None``: ``"auto"``.
    """
    if fused:
        if not triton_usable(device):
            raise RuntimeError(
                f"fused=True needs the Triton kernel, which runs on CUDA (with the 'triton' package), "
                f"not on {device}; leave fused=None for the best available path"
            )
        return "triton"
    if foreach is False:
        return "reference"
    return "auto" if foreach is None else "foreach"


def _fusable(t: torch.Tensor) -> bool:
    return t.is_contiguous() and local(t) is t


def _split_run(
    fused: Callable[..., Any],
    fallback: Callable[..., Any],
    lists: Sequence[Sequence[Any]],
    tensor_lists: int,
    list_kwargs: dict[str, Sequence[torch.Tensor] | None],
    kwargs: dict[str, Any],
) -> None:
    """Run ``fused`` on the positions whose tensors it can take and ``fallback`` on the others.

    ``lists``: the positional per-tensor lists (the first ``tensor_lists`` of them hold tensors);
    ``list_kwargs``: keyword arguments that are per-tensor lists too (or None).
    """
    checked = list(lists[:tensor_lists]) + [v for v in list_kwargs.values() if v is not None]
    n = len(lists[0])
    odd = [i for i in range(n) if not all(_fusable(lst[i]) for lst in checked)]
    if not odd:
        fused(*lists, **list_kwargs, **kwargs)
        return
    bad = set(odd)
    for sel, fn in (([i for i in range(n) if i not in bad], fused), (odd, fallback)):
        if sel:
            sub = {k: (None if v is None else [v[i] for i in sel]) for k, v in list_kwargs.items()}
            fn(*[[lst[i] for i in sel] for lst in lists], **sub, **kwargs)


def sophia_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    *,
    implementation: str = "auto",
    hessian_estimates: Sequence[torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """The Sophia step (:func:`~soulkit.kernels.sophia.sophia_step_reference`) by ``implementation``:
    ``"auto"``, ``"triton"``, ``"compiled"``, ``"foreach"`` or ``"reference"`` (see the module docstring)."""
    device = params[0].device if params else torch.device("cpu")
    numel = sum(p.numel() for p in params) if implementation == "auto" else 0
    impl = resolve_implementation(device, implementation, numel)
    if impl == "reference":
        return sophia_step_reference(params, grads, exp_avgs, hessians, hessian_estimates=hessian_estimates, **kwargs)
    if impl == "foreach":
        return sophia_step_foreach(params, grads, exp_avgs, hessians, hessian_estimates=hessian_estimates, **kwargs)
    if impl == "triton":
        from .sophia_triton import sophia_step_triton as fused
    else:
        from .sophia_compiled import sophia_step_compiled as fused
    _split_run(fused, sophia_step_foreach, [params, grads, exp_avgs, hessians], 4,
               {"hessian_estimates": hessian_estimates}, kwargs)


def adahessian_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_hessian_diag_sqs: Sequence[torch.Tensor],
    hessian_diags: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    implementation: str = "auto",
    **kwargs: Any,
) -> None:
    """The AdaHessian step (:func:`~soulkit.kernels.adahessian.adahessian_step_reference`) by
    ``implementation``: ``"auto"``, ``"triton"``, ``"foreach"`` or ``"reference"``."""
    device = params[0].device if params else torch.device("cpu")
    impl = resolve_implementation(device, implementation, family="adahessian")
    lists = [params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, steps]
    if impl == "reference":
        return adahessian_step_reference(*lists, **kwargs)
    if impl == "foreach":
        return adahessian_step_foreach(*lists, **kwargs)
    from .adahessian_triton import adahessian_step_triton

    _split_run(adahessian_step_triton, adahessian_step_foreach, lists, 5, {}, kwargs)


def project(
    g: torch.Tensor, k: int, seed: int, *, row_offset: int = 0, implementation: str = "auto"
) -> torch.Tensor:
    """``g @ R`` for ``g`` ``[batch, d]`` and the seeded Rademacher matrix ``R`` ``[d, k]``
    (:mod:`soulkit.kernels.projection`).

    ``implementation``: ``"auto"`` (Triton on CUDA; elsewhere the compiled generator when a C++
    compiler is available, the eager torch reference otherwise), ``"triton"``, ``"compiled"`` or
    ``"torch"`` (the eager reference, for debugging). All give the same signs; results agree to
    rounding (Triton's tile order differs) and ``"compiled"`` equals ``"torch"`` bit for bit.
    """
    check_projection_inputs(g, k, row_offset)
    if implementation not in PROJECTION_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {PROJECTION_IMPLEMENTATIONS}, got {implementation!r}")
    auto = implementation == "auto"
    if implementation == "triton" or (auto and g.device.type == "cuda" and triton_usable(g.device)):
        from .projection_triton import project_triton

        return project_triton(g, k, seed, row_offset=row_offset)
    if implementation == "compiled" or (auto and g.device.type == "cpu"):
        if compile_available():
            return project_compiled(g, k, seed, row_offset=row_offset)
        if implementation == "compiled":
            raise RuntimeError("implementation='compiled' needs a C++ compiler for inductor (none found)")
    return project_reference(g, k, seed, row_offset=row_offset)


def project_chunks(blocks: Iterable[torch.Tensor], k: int, seed: int, **kwargs: Any) -> torch.Tensor:
    """Project ``[batch, d_i]`` column blocks of one long gradient and sum: ``cat(blocks, 1) @ R``.
    ``kwargs`` go to :func:`project`."""
    out = None
    offset = 0
    for blk in blocks:
        part = project(blk, k, seed, row_offset=offset, **kwargs)
        out = part if out is None else out.add_(part)
        offset += blk.shape[1]
    if out is None:
        raise ValueError("blocks is empty")
    return out
