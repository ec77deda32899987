"""Hessian-diagonal estimators shared by the optimizers and the curvature primitives.

* **Seeds.** Every random draw of soulkit's estimators comes from a generator seeded by
  :func:`derive_seed` of a user seed and integer parts that name the draw (for the optimizers:
  parameter index, step, sample), so a run resumed from a ``state_dict`` draws exactly the same
  numbers as an uninterrupted one, whatever the order of the calls.
* **Rademacher probes** (:func:`rademacher_like`): +1/-1 with equal probability.
* **Hutchinson** (:func:`hutchinson`): ``mean_s u_s * (H u_s)``, the core of
  :func:`~soulkit.optim.hutchinson_diag`, ``Sophia.accumulate_hutchinson`` and AdaHessian's refresh.
* **GNB** (Gauss-Newton-Bartlett, Sophia): labels drawn from the model's own softmax
  (:func:`sample_from_logits`), the summed cross-entropy against them (:func:`sampled_label_loss`)
  and its gradient (:func:`sampled_label_grads`); the estimate is ``grad**2 / B``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DIAGONAL_ESTIMATORS",
    "derive_seed",
    "hutchinson",
    "rademacher_like",
    "sample_from_logits",
    "sampled_label_grads",
    "sampled_label_loss",
    "seeded_generator",
    "state_dtype",
]

#: The Hessian-diagonal estimators by name, as the unlearning code and the CLI offer them.
DIAGONAL_ESTIMATORS = ("gnb", "hutchinson")

_MASK64 = (1 << 64) - 1
#: First part of the seed of a label-sampling draw (parameter indices, the first part of a probe's
#: seed, are never negative).
LABEL_STREAM = -1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from ``seed`` and the integer ``parts`` naming one draw (splitmix64 chained).

    Different parts give independent-looking seeds; the same parts give the same seed on any machine.
    """
    h = _splitmix64(int(seed) & _MASK64)
    for v in parts:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def seeded_generator(
    device: torch.device, seed: int, *parts: int, cache: dict[torch.device, torch.Generator] | None = None
) -> torch.Generator:
    """A generator on ``device`` seeded with ``derive_seed(seed, *parts)``; reuses the one in ``cache``."""
    gen = cache.get(device) if cache is not None else None
    if gen is None:
        gen = torch.Generator(device=device)
        if cache is not None:
            cache[device] = gen
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """+1/-1 with equal probability, with the shape, dtype and device of ``p``."""
    bits = torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=torch.int8)
    return bits.to(p.dtype).mul_(2).sub_(1)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors, their own dtype otherwise: the dtype estimates are kept in."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def hutchinson(
    hvp_of: Callable[[list[torch.Tensor | None], bool], Sequence[torch.Tensor | None]],
    probe: Callable[[int, int], torch.Tensor],
    params: Sequence[torch.Tensor],
    n_samples: int | Sequence[int] = 1,
) -> list[torch.Tensor | None]:
    """Hutchinson estimate of the Hessian diagonal, ``mean_s u_s * (H u_s)``, per tensor of ``params``.

    Args:
        hvp_of: ``hvp_of(us, last)`` returns ``H u`` for the probes ``us`` (one per parameter, ``None``
            for a parameter that takes no part in this sample; its result is ignored); ``None`` where
            that row of ``H`` is zero. ``last`` is true on the final sample (a graph may be freed).
        probe: ``probe(j, s)``: the Rademacher probe of parameter ``j`` in sample ``s``.
        params: the parameters (their shapes and dtypes).
        n_samples: probes per parameter: one number, or one per parameter.

    Returns:
        one estimate per parameter, in :func:`state_dtype`, or ``None`` where every ``H u`` was
        ``None``. Each sample's product is divided by its parameter's ``n_samples`` before it is added.
    """
    counts = [n_samples] * len(params) if isinstance(n_samples, int) else list(n_samples)
    if len(counts) != len(params) or any(not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"n_samples must be an int >= 1 or one per parameter, got {n_samples!r}")
    total = max(counts, default=0)
    acc: list[torch.Tensor | None] = [None] * len(params)
    for s in range(total):
        us = [probe(j, s) if counts[j] > s else None for j in range(len(params))]
        hus = hvp_of(us, s == total - 1)
        for j, (p, u, hu) in enumerate(zip(params, us, hus)):
            if u is None or hu is None:
                continue
            est = hu.to(state_dtype(p)) * u  # not in place: hu may alias u
            if counts[j] > 1:
                est.div_(counts[j])
            acc[j] = est if acc[j] is None else acc[j].add_(est)
    return acc


def sample_from_logits(logits: torch.Tensor, *, generator: torch.Generator | None = None,
                       uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One class index per row of ``logits`` ``[N, vocab]``, drawn from ``softmax(logits)``.

    Inverse-CDF sampling: one uniform ``u`` per row, scaled by the row's total mass, and the first
    class whose cumulative probability exceeds it (``searchsorted(..., side="right")``, so a class
    of probability 0 is never drawn). Same distribution as ``torch.multinomial(softmax(logits), 1)``,
    on the CPU costs about as much as a small LM's forward pass (``benchmarks/results/hvp.md``,
    rows ``label-sampling-*``): the GNB refresh is meant to add one backward, nothing more.
    The cumulative sum is taken in float32 (float64 logits stay float64).

    ``uniforms`` (``[N]``, in [0, 1)) replaces the generator's draws: row ``i`` then gets the label of
    ``uniforms[i]``, whatever the other rows are, so that a batch split over data-parallel ranks can
    draw exactly the labels the whole batch would (each rank passes its rows of the global batch's
    uniforms).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, vocab], got shape {tuple(logits.shape)}")
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cdf = torch.softmax(logits.to(cdt), dim=-1).cumsum_(dim=-1)
    if uniforms is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdt, device=cdf.device)
    else:
        if generator is not None:
            raise ValueError("give either generator or uniforms, not both")
        if uniforms.shape != (cdf.shape[0],):
            raise ValueError(f"uniforms must have shape [N] = ({cdf.shape[0]},), got {tuple(uniforms.shape)}")
        u = uniforms.to(device=cdf.device, dtype=cdt).unsqueeze(-1)
    u = u * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, side="right")
    # u can round up to the total mass; fall back to the last class that has any (never a -inf logit's)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), side="left")
    return torch.minimum(idx, last).squeeze(-1)


def sampled_label_loss(
    logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of ``logits`` against labels drawn from the model's own softmax.

    Returns ``(loss_sum, n_terms)``: the *sum* over the kept terms (so micro-batches of a gradient
    accumulation can be added up) and the number of terms B. The GNB estimate of the Hessian
    diagonal is ``B * grad(loss_sum / B) ** 2 == grad(loss_sum) ** 2 / B``.

    Args:
        logits: ``[..., vocab]`` scores with their autograd graph (typically the training forward's).
        mask: optional boolean ``[...]``; ``False`` terms are left out (padding, prompt tokens).
        labels: alternatively, the training labels; positions equal to ``ignore_index`` are left out.
            Only their positions are used, never their values.
        generator: seeds the label sampling.
        uniforms: alternatively, one uniform in [0, 1) per position (shape ``logits.shape[:-1]``): the
            label of each kept position is drawn with its own (:func:`sample_from_logits`).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., vocab]")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    keep = None
    if mask is not None and labels is not None:
        raise ValueError("give either mask or labels, not both")
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}")
        keep = mask.reshape(-1).to(torch.bool)
    elif labels is not None:
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}"
            )
        keep = labels.reshape(-1) != ignore_index
    flat_u = None
    if uniforms is not None:
        if uniforms.shape != logits.shape[:-1]:
            raise ValueError(
                f"uniforms shape {tuple(uniforms.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}"
            )
        flat_u = uniforms.reshape(-1)
    if keep is not None:
        flat = flat[keep.to(flat.device)]
        flat_u = flat_u[keep.to(flat_u.device)] if flat_u is not None else None
    n_terms = flat.shape[0]
    if n_terms == 0:
        raise ValueError("no terms left for the sampled-label loss (all positions masked)")
    with torch.no_grad():
        sampled = sample_from_logits(flat.detach(), generator=generator, uniforms=flat_u)
    # half-precision logits are lifted to float32; float64 ones keep their precision
    loss_sum = F.cross_entropy(flat if flat.dtype == torch.float64 else flat.float(), sampled, reduction="sum")
    return loss_sum, int(n_terms)


def sampled_label_grads(
    logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
) -> tuple[list[torch.Tensor | None], int]:
    """Gradients of the summed sampled-label loss (:func:`sampled_label_loss`) w.r.t. ``params``, and B.

    The GNB estimate of the Hessian diagonal of the *mean* loss is ``grad**2 / B``; summed gradients
    of several micro-batches may be added first and squared once. ``None`` for a parameter the logits
    do not depend on. ``retain_graph`` keeps the forward graph for the training loss's backward.
    """
    loss_sum, n_terms = sampled_label_loss(
        logits, mask=mask, labels=labels, ignore_index=ignore_index, generator=generator
    )
    grads = torch.autograd.grad(loss_sum, list(params), retain_graph=retain_graph, allow_unused=True)
    return list(grads), n_terms
