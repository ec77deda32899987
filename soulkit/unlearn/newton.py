"""One-shot (or few-step) influence unlearning: a damped Newton step away from the forget set.

Removing a set F of n_F examples from a training set of n examples -- minimising ``L - (1/n) sum_F l_f``,
the mean training loss without F's terms (the influence layer's convention) -- moves the optimum, to
first order (Koh & Liang 2017), by::

    theta_{-F} - theta  ~=  (n_F / n) * (H + damping I)^{-1} * grad L_F(theta)

with H the Hessian of the mean training loss and ``L_F`` the mean loss over F. SOUL (Jia et al. 2024)
starts from this step and turns it into an iterative, clipped, Sophia-driven loop; this module is the
one-shot baseline. ``scale`` multiplies the step (the first-order formula is ``scale=1``; a crude H
needs a smaller one, so users sweep it). ``curvature`` picks H:

- ``"diagonal"``: the diagonal Gauss-Newton-Bartlett (``estimator="gnb"``, Sophia's estimator) or
  Hutchinson (``estimator="hutchinson"``) estimate over the training data (retain + forget), applied
  to every trainable parameter.
- ``"kfac"`` / ``"ekfac"``: the K-FAC / EK-FAC Gauss-Newton of the influence layer
  (:class:`~soulkit.influence.factored.FactoredInfluence`, fitted on retain + forget), one Kronecker
  block per tracked linear module (by default every ``nn.Linear``/``Conv1D`` except the LM head and
  embedding-tied weights; ``modules=`` to choose). **Only the tracked modules' weights and biases
  move**: the parameters the factors do not cover (embeddings and the tied LM head, norms) are left
  as they are -- dividing them by a diagonal would mix two curvatures in one step, whose relative
  scale no one calibrated. ``info["uncovered"]`` names them.

``steps > 1`` iterates Newton on the leave-set-out objective with H kept from the start (fitted once
at ``theta_0``): ``theta_{k+1} = theta_k - scale (H + damping I)^{-1} g_k`` with

    g_k = (n_R / n) (grad L_R(theta_k) - grad L_R(theta_0)) - (n_F / n) grad L_F(theta_0),

the gradient of ``L - (1/n) sum_F l_f`` at ``theta_k`` minus the full gradient at ``theta_0`` (zero at
an optimum, which influence functions assume; subtracting it keeps an unconverged fine-tune from being
trained further). Step 1 is the one-shot step; for a quadratic loss trained to its optimum the
iteration converges to the exact leave-set-out retrain (the fixed point has ``grad L_R = 0``) whatever
H, at a rate set by how well ``H + damping I`` matches the retain Hessian. Each extra step costs a
pass over the retain set.

    new_model, info = newton_unlearn(model, tokenizer, forget_qa, retain=retain_qa, damping=1e-4)
    new_model, info = newton_unlearn(model, tokenizer, forget_qa, retain=retain_qa, curvature="ekfac",
                                     damping=1e-3, scale=0.3)
    factors = qa_newton_factors(model, tokenizer, forget_qa, retain=retain_qa)   # fit once, sweep scale:
    new_model, info = newton_unlearn(model, tokenizer, forget_qa, retain=retain_qa, curvature="kfac",
                                     factors=factors, scale=3.0)
    # any model and loss (the factored route only):
    new_model, info = factored_newton(model, OutputLoss(output_fn, loss_on_output), forget_ds, retain_ds,
                                      method="kfac", damping=1e-3)
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..influence import OutputLoss
from ..influence.factored import FISHERS, LIKELIHOODS, FactoredInfluence
from ..influence.kfac import FACTOR_METHODS, KFACFactors
from ..optim import differentiable_attention, gnb_diag, hutchinson_diag, module_loss_fn
from ..optim.estimators import DIAGONAL_ESTIMATORS
from ..optim.lm_targets import causal_lm_targets
from .qa import IGNORE_INDEX, QA, QADataset, collate_qa, pad_token_id

__all__ = ["CURVATURES", "factored_newton", "newton_unlearn", "qa_loss", "qa_newton_factors"]

#: ``curvature`` choices of :func:`newton_unlearn`.
CURVATURES = ("diagonal", *FACTOR_METHODS)

Grads = dict[str, Tensor]


def _qa_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    # float64 logits: on answers the model is sure of, float32 ``p_y - 1`` cancels and the factored route's
    # check that the loss is a token cross-entropy (the true-Fisher sampler reads the weights off it) fails
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()


def _qa_mean_nll(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    targets = causal_lm_targets(batch["labels"], drop_last=True)
    valid = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none") * valid
    return nll.sum(1) / valid.sum(1).clamp_min(1)


def qa_loss() -> OutputLoss:
    """The fine-tune's per-example loss on :func:`~soulkit.unlearn.qa.collate_qa` batches: the mean NLL of
    the answer tokens, as an :class:`~soulkit.influence.OutputLoss` (float64 logits, then the loss)."""
    return OutputLoss(_qa_logits, _qa_mean_nll)


def _check_common(damping: float, scale: float, steps: int, batch_size: int) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0 \
            or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number > 0 (the curvature can be ~0), got {damping!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0 (it multiplies the step; 1 is the first-order "
                         f"formula), got {scale!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (1: the one-shot step), got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def _mean_gradient(model: nn.Module, params: dict[str, Tensor], loss: OutputLoss, loader: DataLoader,
                   n: int) -> Grads:
    """``(1/n) sum_j grad loss_j`` over ``loader``, for ``params`` (zeros where the loss does not reach)."""
    device = next(model.parameters()).device
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    for batch in loader:
        batch = pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)
        losses = loss(model, batch)
        gs = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
        for k, g in zip(params, gs, strict=True):
            if g is not None:
                out[k] += g / n
    return out


def _train_loader(forget: Dataset, retain: Dataset, batch_size: int, collate_fn: Callable | None) -> DataLoader:
    """The training set the curvature is taken over, retain then forget, in a fixed order."""
    return DataLoader(ConcatDataset([retain, forget]), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _iterate(params: dict[str, Tensor], grad: Callable[[str], Grads], precondition: Callable[[Grads], Grads],
             *, n_forget: int, n_retain: int, scale: float, steps: int) -> list[float]:
    """Move ``params`` in place by the Newton iteration of the module docstring; the norm of each step."""
    n = n_forget + n_retain
    g_forget = grad("forget")
    g_retain0 = grad("retain") if steps > 1 else None
    norms = []
    for k in range(steps):
        if k == 0:
            g = {name: -(n_forget / n) * v for name, v in g_forget.items()}
        else:
            assert g_retain0 is not None
            g_r = grad("retain")
            g = {name: (n_retain / n) * (g_r[name] - g_retain0[name]) - (n_forget / n) * g_forget[name]
                 for name in g_forget}
        step = precondition(g)
        sq = 0.0
        with torch.no_grad():
            for name, p in params.items():
                d = -scale * step[name]
                if not bool(torch.isfinite(d).all()):
                    raise FloatingPointError(f"the Newton step of {name!r} holds NaN or Inf: raise damping")
                p.add_(d)
                sq += float(d.double().square().sum())
        norms.append(sq ** 0.5)
    return norms


def _factored_preconditioner(model: nn.Module, fi: FactoredInfluence, factors: KFACFactors, method: str,
                             damping: float) -> tuple[dict[str, Tensor], Callable[[Grads], Grads]]:
    """The tracked modules' parameters (name -> tensor) and ``g -> (H_kfac + damping I)^{-1} g`` on them."""
    names = {id(p): k for k, p in model.named_parameters()}
    layout = []  # (module factors, weight name, bias name or None, transposed)
    params: dict[str, Tensor] = {}
    for tm in fi.tracked:
        w = names[id(tm.module.weight)]
        b = names[id(tm.module.bias)] if tm.has_bias else None
        layout.append((factors.modules[tm.name], w, b, tm.transposed))
        params[w] = tm.module.weight
        if b is not None:
            params[b] = tm.module.bias

    def precondition(g: Grads) -> Grads:
        out = {}
        for f, w, b, transposed in layout:
            G = g[w].t() if transposed else g[w]
            if b is not None:
                G = torch.cat([G, g[b].unsqueeze(1)], dim=1)
            P = f.precondition(G, method, damping)
            if b is not None:
                out[b] = P[:, -1].contiguous()
                P = P[:, :-1]
            out[w] = (P.t() if transposed else P).contiguous()
        return out

    return params, precondition


def factored_newton(model: nn.Module, loss: OutputLoss, forget: Dataset, retain: Dataset, *, method: str = "ekfac",
                    damping: float = 1e-3, scale: float = 1.0, steps: int = 1, modules: Any = None,
                    factors: KFACFactors | None = None, fisher: str = "true", likelihood: str = "categorical",
                    fisher_samples: int = 1, batch_size: int = 16, collate_fn: Callable | None = None,
                    seed: int = 0, progress: bool | None = False) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` moved by the Newton step (or ``steps`` iterations) of the module docstring, with
    ``H`` the K-FAC (``method="kfac"``) or EK-FAC (``"ekfac"``) Gauss-Newton of the mean training loss.

    Args:
        model: the trained model (not modified).
        loss: its per-example loss as an :class:`~soulkit.influence.OutputLoss` (outputs, then ``[B]``
            losses); the training objective is the mean over ``forget + retain``.
        forget, retain: ``Dataset`` s of the examples to remove and to keep (together: the training set).
        damping: ``lambda`` in ``(H + lambda I)^{-1}``, > 0, in the units of the curvature's eigenvalues.
        scale: multiplies each step, > 0.
        steps: Newton iterations (1: the one-shot step).
        modules: the tracked linear modules (names or types; default every ``nn.Linear``/``Conv1D`` but
            the LM head and embedding-tied weights). Only their parameters move.
        factors: factors fitted before on ``forget + retain`` (e.g. by
            :meth:`~soulkit.influence.InfluenceAnalyzer.save_factors`; EK-FAC factors serve ``"kfac"``
            too), instead of fitting them here; checked against the tracked modules and the count.
        fisher, likelihood, fisher_samples, seed: how the factors are fitted
            (:class:`~soulkit.influence.factored.FactoredInfluence`).
        batch_size, collate_fn: the ``DataLoader`` of every pass.

    Returns ``(new_model, info)``: ``info`` holds the step norms, the options, ``covered`` / ``uncovered``
    parameter names and counts, and ``fit_seconds``.
    """
    if method not in FACTOR_METHODS:
        raise ValueError(f"method must be one of {FACTOR_METHODS}, got {method!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    _check_common(damping, scale, steps, batch_size)
    n_forget, n_retain = len(forget), len(retain)  # type: ignore[arg-type]
    if n_forget == 0:
        raise ValueError("the forget set is empty")
    if n_retain == 0:
        raise ValueError("the retain set is empty: the curvature is taken over forget + retain")
    new = copy.deepcopy(model).eval()
    loader = functools.partial(DataLoader, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    fi = FactoredInfluence(new, loss, method=method, modules=modules, damping=damping, fisher=fisher,
                           likelihood=likelihood, fisher_samples=fisher_samples, batch_size=batch_size, seed=seed,
                           progress=progress)
    t0 = time.perf_counter()
    if factors is None:
        fi.fit(_train_loader(forget, retain, batch_size, collate_fn))
        assert fi.factors is not None
        factors = fi.factors
    else:
        if not isinstance(factors, KFACFactors):
            raise TypeError(f"factors must be KFACFactors (or None to fit them), got {type(factors).__name__}")
        factors.check_matches(fi.dims)
        if method == "ekfac" and factors.method != "ekfac":
            raise ValueError("these factors were fitted with 'kfac'; method='ekfac' needs EK-FAC factors: refit")
        fitted_on = int(factors.meta.get("sequences", -1))
        if fitted_on != n_forget + n_retain:
            raise ValueError(f"the factors were fitted on {fitted_on} sequences but forget + retain has "
                             f"{n_forget + n_retain}: fit them on the training set")
    fit_seconds = time.perf_counter() - t0
    params, precondition = _factored_preconditioner(new, fi, factors, method, damping)
    sets = {"forget": (forget, n_forget), "retain": (retain, n_retain)}

    def grad(which: str) -> Grads:
        data, n = sets[which]
        return _mean_gradient(new, params, loss, loader(data), n)

    norms = _iterate(params, grad, precondition, n_forget=n_forget, n_retain=n_retain, scale=scale, steps=steps)
    uncovered = [k for k, p in new.named_parameters() if p.requires_grad and k not in params]
    n_cov = sum(p.numel() for p in params.values())
    n_all = sum(p.numel() for p in new.parameters() if p.requires_grad)
    info = {"curvature": method, "damping": damping, "scale": scale, "steps": steps, "step_norm": norms[0],
            "step_norms": norms, "n_forget": n_forget, "n_train": n_forget + n_retain, "covered": list(params),
            "uncovered": uncovered, "covered_fraction": n_cov / max(n_all, 1), "fit_seconds": fit_seconds}
    return new, info


def _diagonal_curvature(model: nn.Module, params: dict[str, Tensor], loader: DataLoader, estimator: str,
                        gen: torch.Generator) -> Grads:
    """Mean over batches of the ``estimator``'s Hessian-diagonal estimate on QA batches."""
    device = next(model.parameters()).device
    h = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
    for b in batches:
        if estimator == "gnb":
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            est = gnb_diag(logits[:, :-1], params, labels=causal_lm_targets(b["labels"], drop_last=True),
                           generator=gen, retain_graph=False)
        else:
            loss_fn = module_loss_fn(model, lambda call, b=b: call(**b).loss)
            with differentiable_attention(model):
                est = hutchinson_diag(loss_fn, params, generator=gen)
        for n in h:
            h[n] += est[n] / len(batches)
    return h


def _qa_data(tokenizer, forget: Sequence[QA], retain: Sequence[QA], max_length: int
             ) -> tuple[QADataset, QADataset, Callable]:
    if not forget:
        raise ValueError("the forget set is empty")
    if not retain:
        raise ValueError("newton_unlearn needs the retain set (the training data the Hessian is taken over)")
    return (QADataset(forget, tokenizer, max_length=max_length), QADataset(retain, tokenizer, max_length=max_length),
            functools.partial(collate_qa, pad_id=pad_token_id(tokenizer)))


def qa_newton_factors(model, tokenizer, forget: Sequence[QA], *, retain: Sequence[QA], method: str = "ekfac",
                      modules: Any = None, batch_size: int = 16, max_length: int = 128, seed: int = 0,
                      progress: bool | None = False) -> KFACFactors:
    """The K-FAC / EK-FAC factors :func:`newton_unlearn` fits (same data order, loss and seed), to fit once and
    pass as ``factors=`` to several calls (a sweep over ``scale`` or ``damping``; EK-FAC factors serve
    ``curvature="kfac"`` too). ``model`` is not modified."""
    if method not in FACTOR_METHODS:
        raise ValueError(f"method must be one of {FACTOR_METHODS}, got {method!r}")
    forget_ds, retain_ds, collate = _qa_data(tokenizer, forget, retain, max_length)
    fi = FactoredInfluence(model, qa_loss(), method=method, modules=modules, batch_size=batch_size, seed=seed,
                           progress=progress)
    fi.fit(_train_loader(forget_ds, retain_ds, batch_size, collate))
    assert fi.factors is not None
    return fi.factors


def newton_unlearn(model, tokenizer, forget: Sequence[QA], *, retain: Sequence[QA], curvature: str = "diagonal",
                   estimator: str = "gnb", damping: float = 1e-4, scale: float = 1.0, steps: int = 1,
                   modules: Any = None, factors: KFACFactors | None = None, batch_size: int = 16,
                   max_length: int = 128, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` moved by ``scale * (n_F / n) * (H + damping I)^{-1} * mean_F grad l_f`` (and, with
    ``steps > 1``, further Newton iterations; see the module docstring).

    ``l_f`` is an example's mean answer-token NLL (the fine-tune's loss, :func:`qa_loss`); ``n =
    len(forget) + len(retain)``. ``curvature``: ``"diagonal"`` (``estimator`` picks the estimate:
    ``"gnb"`` or ``"hutchinson"``; every parameter moves) or ``"kfac"`` / ``"ekfac"``
    (:func:`factored_newton`: the tracked linear modules move, embeddings and norms do not; ``modules``
    and pre-fitted ``factors`` as there). Returns ``(new_model, info)`` with the step's norm and the
    curvature's statistics. ``model`` is not modified.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(map(repr, CURVATURES))}, got {curvature!r}")
    if estimator not in DIAGONAL_ESTIMATORS:
        raise ValueError(f"estimator must be {' or '.join(map(repr, DIAGONAL_ESTIMATORS))}, got {estimator!r}")
    if curvature == "diagonal" and (modules is not None or factors is not None):
        raise ValueError("modules and factors are options of curvature='kfac' or 'ekfac', not 'diagonal'")
    _check_common(damping, scale, steps, batch_size)
    forget_ds, retain_ds, collate = _qa_data(tokenizer, forget, retain, max_length)
    if curvature != "diagonal":
        return factored_newton(model, qa_loss(), forget_ds, retain_ds, method=curvature, damping=damping,
                               scale=scale, steps=steps, modules=modules, factors=factors, batch_size=batch_size,
                               collate_fn=collate, seed=seed)

    new = copy.deepcopy(model).eval()
    params = {n: p for n, p in new.named_parameters() if p.requires_grad}
    device = next(new.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    loader = functools.partial(DataLoader, batch_size=batch_size, shuffle=False, collate_fn=collate)
    h = _diagonal_curvature(new, params, _train_loader(forget_ds, retain_ds, batch_size, collate), estimator, gen)
    sets = {"forget": (forget_ds, len(forget)), "retain": (retain_ds, len(retain))}

    def grad(which: str) -> Grads:
        data, n = sets[which]
        return _mean_gradient(new, params, qa_loss(), loader(data), n)

    def precondition(g: Grads) -> Grads:
        return {n: g[n] / (h[n].clamp_min(0) + damping) for n in g}

    norms = _iterate(params, grad, precondition, n_forget=len(forget), n_retain=len(retain), scale=scale,
                     steps=steps)
    flat_h = torch.cat([v.flatten() for v in h.values()])
    info = {"curvature": "diagonal", "step_norm": norms[0], "step_norms": norms, "estimator": estimator,
            "damping": damping, "scale": scale, "steps": steps, "h_mean": float(flat_h.mean()),
            "h_median": float(flat_h.median()), "n_forget": len(forget), "n_train": len(forget) + len(retain)}
    return new, info
