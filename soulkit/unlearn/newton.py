"""One-shot influence unlearning: a single damped Newton step away from the forget set.

Removing a set F of n_F examples from a training set of n examples moves the optimum, to first order
(Koh & Liang 2017), by::

    theta_{-F} - theta  ~=  (1 / n) * H^{-1} * sum_{f in F} grad l_f(theta)

with H the Hessian of the mean training loss. SOUL (Jia et al. 2024) starts from this step and turns
it into an iterative, clipped, Sophia-driven loop; this module is the one-shot baseline. H is the
diagonal Gauss-Newton-Bartlett (``estimator="gnb"``, Sophia's estimator) or Hutchinson
(``estimator="hutchinson"``) estimate over the training data (retain + forget), plus ``damping``;
``scale`` multiplies the step (the first-order formula is ``scale=1``; a diagonal H is crude, so
users usually sweep it).

    new_model, info = newton_unlearn(model, tokenizer, forget_qa, retain=retain_qa, damping=1e-4)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..optim import differentiable_attention, gnb_diag, hutchinson_diag, module_loss_fn
from ..optim.estimators import DIAGONAL_ESTIMATORS
from ..optim.lm_targets import causal_lm_targets
from .qa import QA, QADataset, answer_logprobs, pad_token_id, qa_batches

__all__ = ["newton_unlearn"]

def _batches(records: Sequence[QA], tokenizer, batch_size: int, max_length: int):
    ds = QADataset(records, tokenizer, max_length=max_length)
    return qa_batches(ds, batch_size, pad_id=pad_token_id(tokenizer))


def newton_unlearn(model, tokenizer, forget: Sequence[QA], *, retain: Sequence[QA], estimator: str = "gnb",
                   damping: float = 1e-4, scale: float = 1.0, batch_size: int = 16, max_length: int = 128,
                   seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` moved by ``scale * (n_F / n) * (diag(H) + damping)^{-1} * mean_F grad l_f``.

    ``l_f`` is an example's mean answer-token NLL (the fine-tune's loss); ``n = len(forget) +
    len(retain)``. ``estimator`` picks the diagonal Hessian estimate: ``"gnb"`` (Gauss-Newton-Bartlett)
    or ``"hutchinson"``. Returns ``(new_model, info)`` with the step's norm and the curvature's
    statistics. ``model`` is not modified.
    """
    if estimator not in DIAGONAL_ESTIMATORS:
        raise ValueError(f"estimator must be {' or '.join(map(repr, DIAGONAL_ESTIMATORS))}, got {estimator!r}")
    if not forget:
        raise ValueError("the forget set is empty")
    if not retain:
        raise ValueError("newton_unlearn needs the retain set (the training data the Hessian is taken over)")
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (the diagonal can be ~0), got {damping}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    new = copy.deepcopy(model).eval()
    params = {n: p for n, p in new.named_parameters() if p.requires_grad}
    device = next(new.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)

    # mean forget gradient of the per-example mean token NLL
    grad = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in _batches(forget, tokenizer, batch_size, max_length):
        total, n_tokens = answer_logprobs(new, b)
        per_example_nll = -total / n_tokens
        gs = torch.autograd.grad(per_example_nll.sum(), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), gs, strict=True):
            if g is not None:
                grad[n] += g / len(forget)

    # diagonal curvature of the mean training loss
    h = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = list(_batches([*retain, *forget], tokenizer, batch_size, max_length))
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        if estimator == "gnb":
            logits = new(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            est = gnb_diag(logits[:, :-1], params, labels=causal_lm_targets(b["labels"], drop_last=True),
                           generator=gen, retain_graph=False)
        else:
            loss_fn = module_loss_fn(new, lambda call, b=b: call(**b).loss)
            with differentiable_attention(new):
                est = hutchinson_diag(loss_fn, params, generator=gen)
        for n in h:
            h[n] += est[n] / len(batches)

    n_total = len(forget) + len(retain)
    factor = scale * len(forget) / n_total
    sq = 0.0
    with torch.no_grad():
        for n, p in params.items():
            step = factor * grad[n] / (h[n].clamp_min(0) + damping)
            p.add_(step)
            sq += float(step.double().square().sum())
    flat_h = torch.cat([v.flatten() for v in h.values()])
    info = {"step_norm": sq ** 0.5, "estimator": estimator, "damping": damping, "scale": scale,
            "h_mean": float(flat_h.mean()), "h_median": float(flat_h.median()), "n_forget": len(forget),
            "n_train": n_total}
    return new, info
