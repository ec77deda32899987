"""Sampled-label cross-entropy: the building block of the Gauss-Newton-Bartlett (GNB) estimator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sampled_label_loss"]


def sampled_label_loss(
    logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
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
    if keep is not None:
        flat = flat[keep.to(flat.device)]
    n_terms = flat.shape[0]
    if n_terms == 0:
        raise ValueError("no terms left for the sampled-label loss (all positions masked)")
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    loss_sum = F.cross_entropy(flat.float(), sampled, reduction="sum")
    return loss_sum, int(n_terms)
