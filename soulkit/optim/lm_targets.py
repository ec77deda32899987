"""Next-token alignment of labels for causal LMs: the one label shift the optimizers' GNB refresh
(:mod:`soulkit.optim.hf_trainer`) and the unlearning objectives (:mod:`soulkit.unlearn.qa`) share.

A causal LM's logits at position ``t`` predict token ``t + 1``, so the target of position ``t`` is
``labels[..., t + 1]`` and the last position has none::

    targets = causal_lm_targets(labels)                       # [..., T], last = ignore_index
    targets = causal_lm_targets(labels, drop_last=True)       # [..., T-1], pairs with logits[..., :-1, :]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_targets"]


def causal_lm_targets(labels: torch.Tensor, ignore_index: int = -100, *, drop_last: bool = False) -> torch.Tensor:
    """Targets aligned with a causal LM's logits: position ``t`` predicts ``labels[..., t + 1]``.

    ``drop_last=False``: the same length as ``labels``, the last position set to ``ignore_index``, as
    transformers' ``ForCausalLMLoss`` builds them (pairs with the full logits). ``drop_last=True``:
    ``labels[..., 1:]``, one shorter (pairs with ``logits[..., :-1, :]``; ``ignore_index`` is unused).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise ValueError("labels must be a tensor of shape [..., seq_len]")
    if drop_last:
        return labels[..., 1:]
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
