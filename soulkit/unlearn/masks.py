"""Weight-saliency masks: unlearn by moving only the weights that matter for the forget set.

    from soulkit.unlearn.masks import salun_mask, wagle_mask, MaskedWeights
    mask = salun_mask(model, forget_batches, ratio=0.5)          # name -> bool tensor, True = may move
    masked = MaskedWeights(model, mask)
    ... loss.backward(); masked.mask_grads(); clip; opt.step(); masked.restore() ...

Both masks are computed once, at the weights unlearning starts from, and keep the top ``ratio`` fraction
of all trainable weights by a score (one threshold across every parameter tensor, as the published
code does); the kept weights are ``True``.

* **SalUn** (Fan et al., ICLR 2024): ``score = |g_f|``, with ``g_f`` the gradient of the forget loss
  summed over the forget batches (the gradient of the sum of the batch-mean losses, as SalUn accumulates
  ``param.grad`` batch after batch before taking the absolute value). The forget loss is the answer-token
  NLL of the forget QA (:func:`~soulkit.unlearn.objectives.sequence_nll`): its gradient is gradient
  ascent's up to the sign, which ``|.|`` drops. Checked against the published code (OPTML-Group
  Unlearn-Saliency, ``generate_mask.py``): it ranks ``-|g|`` in ascending order and keeps ranks below
  ``int(n * ratio)``, i.e. it keeps the **largest** gradient magnitudes (some ports drop the minus sign
  and keep the smallest).
* **WAGLE** (Jia et al., NeurIPS 2024): ``score = |(theta - g_r / mu) * g_f|``, with ``g_r`` the summed
  gradient of the retain NLL. This is the weight attribution the paper derives from a bi-level view
  (how much the forget loss changes when a weight is removed, with the retain loss' response to that
  removal approximated through a Hessian ``mu * I``); it is the score of the released code (ranked the
  same way: largest kept). Chosen over an ad-hoc ``|theta g_f| - gamma |theta g_r|`` because it is
  the published method's own formula. ``mu`` defaults to 1e-6, the value of the released TOFU configs;
  at that value the ``theta`` term is negligible wherever ``|g_r| >> 1e-6 |theta|`` and the score is
  essentially ``|g_r * g_f| / mu``; a large ``mu`` tends to ``|theta * g_f|`` (SNIP on the forget loss).

Exactly ``max(1, floor(ratio * n))`` of the ``n`` weights are kept (ties at the threshold are broken
by :func:`torch.topk`). Applying a mask (:class:`MaskedWeights`): the gradients of masked-out weights are
zeroed before clipping and the optimizer step, and after the step the masked-out weights are written
back from a copy taken at the start, so that weight decay or an optimizer's own state (momentum, a
Hessian estimate, sign steps) cannot move them either: they stay bit-identical under every optimizer.
Masks are saved as safetensors (:func:`save_mask` / :func:`load_mask`), never pickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_bytes
from .objectives import sequence_nll

__all__ = ["MASKS", "MaskedWeights", "check_mask_ratio", "gradient_sums", "load_mask", "salun_mask",
           "save_mask", "top_fraction", "wagle_mask"]

#: The weight-saliency masks (``UnlearnConfig.mask``, ``soulkit unlearn --mask``).
MASKS = ("salun", "wagle")
#: WAGLE's ``mu`` in the released TOFU configs.
WAGLE_MU = 1e-6

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


def check_mask_ratio(ratio: Any, what: str = "mask_ratio") -> float:
    """``ratio`` as a float in (0, 1]; otherwise a ``ValueError`` naming ``what``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0.0 < ratio <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def check_mask_name(name: Any, what: str = "mask") -> str:
    if name not in MASKS:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(MASKS)}")
    return name


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters to mask")
    return params


def gradient_sums(model, batches: Iterable[Mapping[str, torch.Tensor]], loss_fn: LossFn = sequence_nll,
                  *, what: str = "batches") -> dict[str, torch.Tensor]:
    """``sum over batches of grad loss_fn(model, batch)`` for every trainable parameter (by name), in
    float32 (float64 for float64 parameters), at the model's current weights and in eval mode. The
    parameters' ``.grad`` are not touched (``torch.autograd.grad``); the model is left in its mode."""
    params = _trainable(model)
    names, tensors = list(params), list(params.values())
    sums = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            for n, p in params.items()}
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ValueError(f"the loss on {what} is not finite ({float(loss)}): no mask can be computed")
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    sums[n].add_(g.to(sums[n].dtype))
            n_batches += 1
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError(f"{what} are empty: no gradient to compute a mask from")
    return sums


def top_fraction(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """``True`` for the ``max(1, floor(ratio * n))`` largest of all ``n`` scores (one threshold across
    every tensor), ``False`` elsewhere; same names and shapes as ``scores``."""
    ratio = check_mask_ratio(ratio)
    if not scores:
        raise ValueError("no scores to build a mask from")
    # one threshold over every weight: the scores are concatenated on the CPU (4 bytes a weight in float32)
    flat = torch.cat([s.detach().reshape(-1).cpu() for s in scores.values()])
    if not torch.isfinite(flat).all():
        raise ValueError("the saliency scores are not all finite (a non-finite gradient?): no mask can be computed")
    n = flat.numel()
    k = max(1, math.floor(ratio * n))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(flat, k, largest=True, sorted=False).indices] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def salun_mask(model, forget_batches: Iterable[Mapping[str, torch.Tensor]], ratio: float, *,
               loss_fn: LossFn = sequence_nll) -> dict[str, torch.Tensor]:
    """SalUn's mask: keep the ``ratio`` fraction of weights with the largest ``|g_f|`` (see the module
    docstring); ``forget_batches`` are :func:`~soulkit.unlearn.qa.collate_qa` batches of the forget QA."""
    ratio = check_mask_ratio(ratio)
    g_f = gradient_sums(model, forget_batches, loss_fn, what="the forget batches")
    return top_fraction({n: g.abs() for n, g in g_f.items()}, ratio)


def wagle_mask(model, forget_batches: Iterable[Mapping[str, torch.Tensor]],
               retain_batches: Iterable[Mapping[str, torch.Tensor]], ratio: float, *, mu: float = WAGLE_MU,
               loss_fn: LossFn = sequence_nll) -> dict[str, torch.Tensor]:
    """WAGLE's mask: keep the ``ratio`` fraction of weights with the largest ``|(theta - g_r / mu) * g_f|``
    (see the module docstring)."""
    ratio = check_mask_ratio(ratio)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
    g_f = gradient_sums(model, forget_batches, loss_fn, what="the forget batches")
    g_r = gradient_sums(model, retain_batches, loss_fn, what="the retain batches")
    params = _trainable(model)
    scores = {n: ((params[n].detach().to(g_f[n].dtype) - g_r[n] / mu) * g_f[n]).abs() for n in g_f}
    return top_fraction(scores, ratio)


def _check_against_model(mask: Mapping[str, torch.Tensor], model, where: str) -> dict[str, torch.nn.Parameter]:
    params = _trainable(model)
    if set(mask) != set(params):
        missing, unknown = sorted(set(params) - set(mask)), sorted(set(mask) - set(params))
        raise ValueError(f"{where} does not fit the model's trainable parameters: missing {missing[:3]}, "
                         f"unknown {unknown[:3]}")
    for n, m in mask.items():
        if m.dtype != torch.bool or tuple(m.shape) != tuple(params[n].shape):
            raise ValueError(f"{where}: {n} must be a bool tensor of shape {tuple(params[n].shape)}, got "
                             f"{m.dtype} {tuple(m.shape)}")
    return params


def save_mask(path: str | os.PathLike, mask: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
              ) -> Path:
    """Write ``mask`` (name -> bool tensor) as a safetensors file, atomically; ``metadata`` (str -> str)
    goes into its header."""
    from safetensors.torch import save as safetensors_bytes

    tensors = {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in mask.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=dict(metadata or {})))
    return Path(path)


def load_mask(path: str | os.PathLike, model=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The mask and header metadata saved by :func:`save_mask`; with ``model``, checked to cover exactly
    its trainable parameters with bool tensors of their shapes, and moved to their devices."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        mask = {n: f.get_tensor(n) for n in f.keys()}
    if model is not None:
        params = _check_against_model(mask, model, str(path))
        mask = {n: m.to(params[n].device) for n, m in mask.items()}
    return mask, metadata


class MaskedWeights:
    """Keeps the masked-out weights of ``model`` where they are: :meth:`mask_grads` zeroes their
    gradients (call it after the backward passes, before clipping and the optimizer step), and
    :meth:`restore` writes them back, bit for bit, from the values they had when this object was made
    (call it after each optimizer step). ``mask``: name -> bool tensor over the trainable parameters."""

    def __init__(self, model, mask: Mapping[str, torch.Tensor]):
        params = _check_against_model(mask, model, "the mask")
        self._entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        kept = total = 0
        for n, p in params.items():
            out = ~mask[n].to(p.device)
            kept += int(mask[n].sum())
            total += p.numel()
            if bool(out.any()):
                self._entries.append((p, out, p.detach()[out].clone()))
        self.kept, self.total = kept, total

    @property
    def fraction(self) -> float:
        """The fraction of weights that may move."""
        return self.kept / self.total

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, out, _ in self._entries:
            if p.grad is not None:
                p.grad.masked_fill_(out, 0)

    @torch.no_grad()
    def restore(self) -> None:
        for p, out, frozen in self._entries:
            p.masked_scatter_(out, frozen)
