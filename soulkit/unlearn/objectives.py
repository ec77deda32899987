"""Unlearning objectives: the loss an unlearner minimises on a forget batch (and a retain batch).

Every objective is a callable configured by a dataclass::

    obj = make_objective("npo", beta=0.1, retain_loss="nll")
    forget_records = obj.prepare_forget(forget_records)           # IDK swaps answers for refusals
    out = obj(model, forget_batch, retain_batch, reference=frozen_reference(original))
    out.loss.backward()                                           # out.metrics: plain floats for logging

Batches are :func:`soulkit.unlearn.qa.collate_qa` dicts; only answer tokens (labels != -100) count.
Notation used in the docstrings, for one forget pair ``(x, y)`` with ``|y|`` answer tokens:

- ``log pi(y|x)``: the answer's log-likelihood, **summed** over its tokens;
- ``L_forget`` / ``L_retain``: the standard LM loss, cross-entropy averaged over every answer token of
  the batch (:func:`sequence_nll`);
- ``KL_retain``: ``KL(pi_ref || pi_theta)`` of the full next-token distributions, averaged over the
  retain batch's answer tokens (:func:`retain_kl`).

A batch may be one data-parallel rank's share of a global batch (:func:`soulkit.unlearn.qa.shard_batch`):
every mean then divides the share's sum by the *global* count over the world size, so that the ranks'
losses (and gradients), averaged as DDP/FSDP average them, are exactly the global batch's.

The reference model (``reference``) is a frozen copy of the model before unlearning. It is run under
``torch.no_grad`` in eval mode (its mode is restored afterwards); it never receives gradients and is
never updated. :func:`frozen_reference` makes one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .qa import QA, answer_logits, answer_logprobs, mean_denominator

__all__ = [
    "ObjectiveOutput",
    "Objective",
    "GradientAscent",
    "GradDiff",
    "NPO",
    "SimNPO",
    "IDK",
    "KLRetain",
    "RMU",
    "RMU_TOKENS",
    "decoder_blocks",
    "layer_activations",
    "DEFAULT_REFUSALS",
    "OBJECTIVES",
    "RETAIN_LOSSES",
    "make_objective",
    "sequence_nll",
    "retain_kl",
    "frozen_reference",
]

RETAIN_LOSSES = ("nll", "kl")

DEFAULT_REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information about that.",
    "I don't have an answer to that.",
    "I can't answer that.",
    "I'm not able to answer that question.",
    "That's not something I know.",
    "I don't have that information.",
    "I'm afraid I don't know.",
    "I have no idea.",
    "Sorry, I don't know the answer to that.",
    "I'm unable to help with that question.",
    "I don't have any knowledge about that.",
    "That is beyond what I know.",
    "I can't say.",
    "I'm not familiar with that.",
    "I have no details on that.",
    "I wish I could tell you, but I don't know.",
    "I'm not certain of the answer.",
    "I don't recall anything about that.",
    "That's unknown to me.",
    "I couldn't tell you.",
    "I lack the information to answer that.",
    "I'm not aware of the answer.",
    "I have nothing to say on that.",
    "That question is outside my knowledge.",
    "I really don't know.",
    "I'm clueless about that.",
    "No idea, sorry.",
    "I cannot provide an answer to that.",
)


@dataclasses.dataclass
class ObjectiveOutput:
    """The loss to minimise (a differentiable scalar) and detached metrics for logging.

    Metric keys used by the built-in objectives: ``loss``, ``forget_nll`` (token-mean NLL of the forget
    batch's answers; for IDK the refusal answers), ``retain_nll``, ``retain_kl``, ``npo``, ``log_ratio``
    (mean of ``log pi_theta(y|x) - log pi_ref(y|x)``), ``simnpo``; :class:`KLRetain` adds ``inner_loss``
    (the wrapped objective's loss) and sets ``retain_kl`` to its anchor term; :class:`RMU` logs ``rmu_forget`` and
    ``rmu_retain`` (its two activation distances, the latter before ``alpha``).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# helpers


def _check_batch(batch: Any, what: str) -> None:
    if not isinstance(batch, Mapping):
        raise ValueError(f"{what} must be a dict from collate_qa, got {type(batch).__name__}")
    missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
    if missing:
        raise ValueError(f"{what} lacks {missing}; build it with soulkit.unlearn.qa.collate_qa")
    if batch["labels"].shape != batch["input_ids"].shape:
        raise ValueError(f"{what}: labels shape {tuple(batch['labels'].shape)} != input_ids shape "
                         f"{tuple(batch['input_ids'].shape)}")


@contextlib.contextmanager
def _frozen(reference) -> Iterator[None]:
    """``no_grad`` and eval mode for the reference model; its previous mode is restored."""
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        reference.train(was_training)


def _check_reference(model, reference) -> None:
    if reference is model:
        raise ValueError("reference must be a separate frozen copy of the original model (e.g. "
                         "frozen_reference(model) before unlearning), not the model being unlearned")
    p_model = next(model.parameters(), None)
    p_ref = next(reference.parameters(), None)
    if p_model is not None and p_model is p_ref:
        raise ValueError("reference shares parameters with the model being unlearned; pass a deep copy "
                         "(frozen_reference(model))")


def frozen_reference(model):
    """A deep copy of ``model`` in eval mode with ``requires_grad=False`` everywhere: the reference."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _mean(total: torch.Tensor, batch, kind: str, local, what: str) -> torch.Tensor:
    """``total / count``: the batch's own count of ``kind`` (``local``), or for a rank's share of a
    global batch (:func:`~soulkit.unlearn.qa.shard_batch`) the global count over the world size, so
    that the ranks' values average to the global batch's mean."""
    n = mean_denominator(batch, kind, local)
    if float(n) == 0:
        what_kind = "answer tokens (every label is -100)" if kind == "answer_tokens" else "rows"
        raise ValueError(f"{what} has no {what_kind}")
    return total / n


def _nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, what: str, batch=None
                     ) -> torch.Tensor:
    n = valid.sum()
    tok = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return _mean((tok * valid).sum(), batch, "answer_tokens", n, what)


def sequence_nll(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL over all answer tokens of ``batch``: the standard causal-LM loss.

    ``sum over answer tokens of -log p(token | prefix) / number of answer tokens`` (differentiable).
    """
    _check_batch(batch, "batch")
    logits, targets, valid = answer_logits(model, batch)
    return _nll_from_logits(logits, targets, valid, "batch", batch)


def _kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, valid: torch.Tensor, what: str, batch=None
                    ) -> torch.Tensor:
    n = valid.sum()
    logq = torch.log_softmax(logits, dim=-1)
    logp = torch.log_softmax(ref_logits.to(logits.device), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # KL(p_ref || q_theta) per position
    return _mean((kl * valid).sum(), batch, "answer_tokens", n, what)


def retain_kl(model, reference, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``KL(pi_ref || pi_theta)`` of the next-token distributions, averaged over ``batch``'s answer tokens.

    Full-vocabulary KL ``sum_v p_ref(v) (log p_ref(v) - log p_theta(v))`` at each answer position;
    the reference is run under ``no_grad`` (gradients flow into ``model`` only).
    """
    _check_batch(batch, "batch")
    _check_reference(model, reference)
    logits, _, valid = answer_logits(model, batch)
    with _frozen(reference):
        ref_logits, _, _ = answer_logits(reference, batch)
    return _kl_from_logits(logits, ref_logits, valid, "batch", batch)


def _retain_term(kind: str, model, reference, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """The retain loss (``"nll"`` or ``"kl"``) from one forward pass of ``model`` on the retain batch."""
    logits, targets, valid = answer_logits(model, batch)
    nll = _nll_from_logits(logits, targets, valid, "retain_batch", batch)
    if kind == "nll":
        return nll, {"retain_nll": nll.item()}
    with _frozen(reference):
        ref_logits, _, _ = answer_logits(reference, batch)
    kl = _kl_from_logits(logits, ref_logits, valid, "retain_batch", batch)
    return kl, {"retain_nll": nll.item(), "retain_kl": kl.item()}


def _forget_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    total, n = answer_logprobs(model, batch)
    if bool((n == 0).any()):
        bad = torch.nonzero(n == 0).flatten().tolist()
        raise ValueError(f"forget_batch rows {bad} have no answer tokens (every label is -100)")
    return total, n


def _check_positive(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number > 0, got {value!r}")


def _check_nonneg(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number >= 0, got {value!r}")


def _check_finite(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number, got {value!r}")


def _check_retain_loss(obj: object, optional: bool) -> None:
    value = obj.retain_loss
    allowed = (*RETAIN_LOSSES, None) if optional else RETAIN_LOSSES
    if value not in allowed:
        raise ValueError(f"{type(obj).__name__}.retain_loss must be one of {list(allowed)}, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# objectives


class Objective(ABC):
    """An unlearning loss. Call it as ``obj(model, forget_batch, retain_batch=None, reference=None)``.

    ``needs_retain`` / ``needs_reference`` say which optional inputs the configured objective uses; a
    missing one raises ``ValueError``. ``prepare_forget`` rewrites the forget records before they are
    tokenised (identity here; IDK replaces answers by refusals) -- unlearners call it once up front.
    """

    name: ClassVar[str] = "objective"

    @property
    def needs_retain(self) -> bool:
        return False

    @property
    def needs_reference(self) -> bool:
        return False

    def prepare_forget(self, records: Sequence[QA]) -> list[QA]:
        """The forget records this objective trains on (identity by default; inputs are not modified)."""
        return list(records)

    def trainable_parameters(self, model) -> list[str] | None:
        """Names (``model.named_parameters()``) of the only parameters to train, or ``None``: all of them.

        The Unlearner freezes every other parameter (RMU trains a few MLP weights)."""
        return None

    def __call__(self, model, forget_batch: Mapping[str, torch.Tensor],
                 retain_batch: Mapping[str, torch.Tensor] | None = None, reference=None) -> ObjectiveOutput:
        _check_batch(forget_batch, "forget_batch")
        if self.needs_retain:
            if retain_batch is None:
                raise ValueError(f"objective {self.name!r} ({self!r}) needs a retain_batch")
            _check_batch(retain_batch, "retain_batch")
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"objective {self.name!r} ({self!r}) needs a reference model (a frozen copy "
                                 f"of the original model: frozen_reference(model))")
            _check_reference(model, reference)
        out = self.compute(model, forget_batch, retain_batch, reference)
        out.metrics.setdefault("loss", out.loss.item())
        return out

    @abstractmethod
    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        """The loss, given inputs already checked by ``__call__``."""

    def _with_retain(self, kind: str | None, gamma: float, loss: torch.Tensor, metrics: dict[str, float],
                     model, retain_batch, reference) -> ObjectiveOutput:
        if kind is not None:
            term, m = _retain_term(kind, model, reference, retain_batch)
            loss = loss + gamma * term
            metrics.update(m)
        metrics["loss"] = loss.item()
        return ObjectiveOutput(loss, metrics)


@dataclasses.dataclass
class GradientAscent(Objective):
    """Gradient ascent on the forget set: ``loss = -L_forget``.

    ``L_forget`` is the token-mean cross-entropy over the forget batch's answer tokens
    (:func:`sequence_nll`); minimising its negative pushes the answers' likelihood down without bound.
    """

    name: ClassVar[str] = "ga"

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        nll = sequence_nll(model, forget_batch)
        return ObjectiveOutput(-nll, {"loss": -nll.item(), "forget_nll": nll.item()})


@dataclasses.dataclass
class GradDiff(Objective):
    """Gradient difference: ``loss = -L_forget + gamma * L_retain``.

    ``L_retain`` is the retain batch's token-mean NLL (``retain_loss="nll"``) or
    ``KL(pi_ref || pi_theta)`` averaged over its answer tokens (``retain_loss="kl"``, needs a reference).
    """

    gamma: float = 1.0
    retain_loss: str = "nll"
    name: ClassVar[str] = "graddiff"

    def __post_init__(self) -> None:
        _check_nonneg(self, "gamma")
        _check_retain_loss(self, optional=False)

    @property
    def needs_retain(self) -> bool:
        return True

    @property
    def needs_reference(self) -> bool:
        return self.retain_loss == "kl"

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        nll = sequence_nll(model, forget_batch)
        return self._with_retain(self.retain_loss, self.gamma, -nll, {"forget_nll": nll.item()}, model,
                                 retain_batch, reference)


@dataclasses.dataclass
class NPO(Objective):
    """Negative preference optimisation (Zhang et al. 2024)::

        loss = -(2/beta) * mean_i log sigmoid(-beta * (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))
               [+ gamma * L_retain]

    with log-likelihoods summed over each answer's tokens and the mean over the forget batch's
    sequences. At ``theta == ref`` the loss is ``(2/beta) log 2`` and its gradient is
    ``mean_i grad log pi_theta(y_i|x_i)``; as ``beta -> 0`` the gradient approaches that of gradient
    ascent on summed log-likelihoods. ``retain_loss``: ``None`` (default), ``"nll"`` or ``"kl"``.
    """

    beta: float = 0.1
    retain_loss: str | None = None
    gamma: float = 1.0
    name: ClassVar[str] = "npo"

    def __post_init__(self) -> None:
        _check_positive(self, "beta")
        _check_nonneg(self, "gamma")
        _check_retain_loss(self, optional=True)

    @property
    def needs_retain(self) -> bool:
        return self.retain_loss is not None

    @property
    def needs_reference(self) -> bool:
        return True

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        logp, n = _forget_logprobs(model, forget_batch)
        with _frozen(reference):
            ref_logp, _ = answer_logprobs(reference, forget_batch)
        log_ratio = logp - ref_logp.to(logp.device)
        rows = logp.shape[0]
        npo = -(2.0 / self.beta) * _mean(F.logsigmoid(-self.beta * log_ratio).sum(), forget_batch, "rows", rows,
                                         "forget_batch")
        metrics = {"forget_nll": _mean(-logp.sum(), forget_batch, "answer_tokens", n.sum(), "forget_batch").item(),
                   "npo": npo.item(),
                   "log_ratio": _mean(log_ratio.sum(), forget_batch, "rows", rows, "forget_batch").item()}
        return self._with_retain(self.retain_loss, self.gamma, npo, metrics, model, retain_batch, reference)


@dataclasses.dataclass
class SimNPO(Objective):
    """Simple NPO, reference-free and length-normalised::

        loss = -(2/beta) * mean_i log sigmoid(-beta * log pi_theta(y_i|x_i) / |y_i| - delta)
               [+ gamma * L_retain]

    ``log pi_theta(y|x)`` summed over the answer's ``|y|`` tokens (so the argument is ``-beta`` times the
    mean token log-probability, minus the margin ``delta``). Defaults beta 4.5, delta 0 (open-unlearning).
    Note: open-unlearning's code subtracts ``beta * delta`` rather than ``delta``; both agree at delta 0.
    """

    beta: float = 4.5
    delta: float = 0.0
    retain_loss: str | None = None
    gamma: float = 1.0
    name: ClassVar[str] = "simnpo"

    def __post_init__(self) -> None:
        _check_positive(self, "beta")
        _check_finite(self, "delta")
        _check_nonneg(self, "gamma")
        _check_retain_loss(self, optional=True)

    @property
    def needs_retain(self) -> bool:
        return self.retain_loss is not None

    @property
    def needs_reference(self) -> bool:
        return self.retain_loss == "kl"

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        logp, n = _forget_logprobs(model, forget_batch)
        arg = -self.beta * logp / n - self.delta
        simnpo = -(2.0 / self.beta) * _mean(F.logsigmoid(arg).sum(), forget_batch, "rows", logp.shape[0],
                                            "forget_batch")
        metrics = {"forget_nll": _mean(-logp.sum(), forget_batch, "answer_tokens", n.sum(), "forget_batch").item(),
                   "simnpo": simnpo.item()}
        return self._with_retain(self.retain_loss, self.gamma, simnpo, metrics, model, retain_batch, reference)


@dataclasses.dataclass
class IDK(Objective):
    """"I don't know" fine-tuning: ``loss = L_refusal + gamma * L_retain``.

    ``L_refusal`` is the token-mean NLL of refusal answers to the forget questions: the forget batch must
    be tokenised from :meth:`prepare_forget`'s records, which replace each answer by one of ``refusals``
    (chosen deterministically from ``seed`` and the record's question and answer, so the choice does not
    depend on batch order). ``retain_loss``: ``"nll"`` (default), ``"kl"`` or ``None``.
    """

    refusals: tuple[str, ...] = DEFAULT_REFUSALS
    retain_loss: str | None = "nll"
    gamma: float = 1.0
    seed: int = 0
    name: ClassVar[str] = "idk"

    def __post_init__(self) -> None:
        if isinstance(self.refusals, str):
            raise ValueError("IDK.refusals must be a sequence of strings, got a single string")
        self.refusals = tuple(self.refusals)
        if not self.refusals:
            raise ValueError("IDK.refusals must hold at least one refusal answer")
        bad = [r for r in self.refusals if not isinstance(r, str) or not r.strip()]
        if bad:
            raise ValueError(f"IDK.refusals must be non-empty strings, got {bad!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"IDK.seed must be an int, got {self.seed!r}")
        _check_nonneg(self, "gamma")
        _check_retain_loss(self, optional=True)

    @property
    def needs_retain(self) -> bool:
        return self.retain_loss is not None

    @property
    def needs_reference(self) -> bool:
        return self.retain_loss == "kl"

    def refusal_for(self, record: QA) -> str:
        """The refusal that replaces ``record``'s answer (a function of seed, question and answer)."""
        rng = random.Random(f"{self.seed}\x00{record.question}\x00{record.answer}")
        return self.refusals[rng.randrange(len(self.refusals))]

    def prepare_forget(self, records: Sequence[QA]) -> list[QA]:
        """Copies of ``records`` whose answers are refusals; questions and other fields are kept."""
        return [r.with_answer(self.refusal_for(r)) for r in records]

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        nll = sequence_nll(model, forget_batch)
        return self._with_retain(self.retain_loss, self.gamma, nll, {"forget_nll": nll.item()}, model,
                                 retain_batch, reference)


@dataclasses.dataclass
class KLRetain(Objective):
    """Any objective plus a KL anchor on the retain set: ``loss = objective + alpha * KL_retain``.

    ``KL_retain = KL(pi_ref || pi_theta)`` averaged over the retain batch's answer tokens
    (:func:`retain_kl`). Needs a retain batch and a reference; ``prepare_forget`` is the wrapped one's.
    """

    objective: Objective
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise ValueError(f"KLRetain.objective must be an Objective, got {type(self.objective).__name__}")
        _check_nonneg(self, "alpha")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.objective.name}+kl"

    @property
    def needs_retain(self) -> bool:
        return True

    @property
    def needs_reference(self) -> bool:
        return True

    def prepare_forget(self, records: Sequence[QA]) -> list[QA]:
        return self.objective.prepare_forget(records)

    def trainable_parameters(self, model) -> list[str] | None:
        return self.objective.trainable_parameters(model)

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        inner = self.objective(model, forget_batch, retain_batch, reference)
        kl = retain_kl(model, reference, retain_batch)
        loss = inner.loss + self.alpha * kl
        metrics = dict(inner.metrics)
        metrics["inner_loss"] = metrics.pop("loss", inner.loss.item())
        metrics["retain_kl"] = kl.item()
        metrics["loss"] = loss.item()
        return ObjectiveOutput(loss, metrics)


# ---------------------------------------------------------------------------------------------------
# RMU: representation misdirection


#: RMU's token choices: every real token (``attention_mask == 1``) or only the answer tokens.
RMU_TOKENS = ("all", "answer")


class _StopForward(Exception):
    """Raised by RMU's hook once layer ``L`` has run: the later layers are not needed."""


def decoder_blocks(model) -> Sequence[torch.nn.Module]:
    """The decoder blocks of a transformers causal LM, in order (Llama: ``model.layers``; GPT-2: ``transformer.h``)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner.layers
    inner = getattr(model, "transformer", None)
    if inner is not None and isinstance(getattr(inner, "h", None), torch.nn.ModuleList):
        return inner.h
    raise ValueError(f"RMU cannot find the decoder blocks of {type(model).__name__} (expected model.layers "
                     "as in Llama or transformer.h as in GPT-2)")


def _block_prefix(model) -> str:
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(blocks)]


def layer_activations(model, batch: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The output hidden state of decoder block ``layer`` (0-based), shape ``(batch, seq, hidden)``.

    Read by a forward hook on the block (the residual stream after the block, before any final norm),
    as RMU's released code does; the forward pass stops there, so later blocks are not run.
    """
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range for a model with {len(blocks)} decoder blocks")
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = blocks[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder block {layer} did not run")
    return captured[0]


def _masked_mse(h: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, what: str) -> torch.Tensor:
    """Mean over the kept tokens of the mean squared difference over the hidden dimension."""
    keep = keep.to(h.dtype)
    n = keep.sum()
    if int(n) == 0:
        raise ValueError(f"{what} has no tokens to steer (every position is padding or prompt)")
    per_token = (h - target).pow(2).mean(-1)
    return (per_token * keep).sum() / n


@dataclasses.dataclass
class RMU(Objective):
    """Representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark")::

        loss = mean_t ||h_L(x_f)_t - c*u||^2 / d  +  alpha * mean_t ||h_L(x_r)_t - h_L^ref(x_r)_t||^2 / d

    ``h_L`` is the output hidden state of decoder block ``layer`` (0-based; the residual stream after the
    block, read by a forward hook as the released code does), ``d`` the hidden size, ``u`` a fixed random
    unit vector (``torch.rand`` uniform in [0, 1) from ``seed``, normalised, as in the released code) and
    ``h_L^ref`` the frozen original model's activations. Each squared norm over ``d`` is ``F.mse_loss``'s
    mean; the mean over ``t`` runs over the batch's real tokens only (``tokens="all"``: every position with
    ``attention_mask == 1``, as the paper steers whole forget texts; ``"answer"``: only answer tokens), so
    padding never counts.

    Only ``params`` of the decoder blocks ``update_layers`` are trained (:meth:`trainable_parameters`;
    the Unlearner freezes the rest). Defaults, for this project's tiny models (2-4 blocks, hidden 32-128):

    - ``layer=None``: block ``(num_layers - 1) // 4`` (block 7 of Zephyr-7B's 32, the paper's choice;
      block 0 of a 2- or 4-block model);
    - ``update_layers=None``: blocks ``layer-2 .. layer`` (those that exist), as the paper;
    - ``params=None``: each updated block's MLP output projection weight (``mlp.down_proj.weight`` in
      Llama, ``mlp.c_proj.weight`` in GPT-2), as the paper (names are relative to the block);
    - ``c=6.5``: the paper's Zephyr-7B value; the tiny models' activations at these blocks have norms of
      the same order (a few units for hidden 32), though larger models' can be far larger: set ``c``
      from the activation norms of the model at hand;
    - ``alpha=10``: the paper's 1200 (with lr 5e-5, Zephyr-7B) was tuned for Zephyr's activations; on the
      tiny models 100 and more hold the forget term almost still at lr 1e-3-1e-2 over tens of AdamW steps,
      10 lets the forget activations move while the retain ones stay close.
    """

    layer: int | None = None
    c: float = 6.5
    alpha: float = 10.0
    update_layers: tuple[int, ...] | None = None
    params: tuple[str, ...] | None = None
    tokens: str = "all"
    seed: int = 0
    name: ClassVar[str] = "rmu"

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValueError(f"RMU.layer must be an int >= 0 or None, got {self.layer!r}")
        _check_positive(self, "c")
        _check_nonneg(self, "alpha")
        if self.update_layers is not None:
            self.update_layers = tuple(self.update_layers)
            if not self.update_layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                             for i in self.update_layers):
                raise ValueError(f"RMU.update_layers must be a non-empty sequence of ints >= 0 or None, got "
                                 f"{self.update_layers!r}")
        if self.params is not None:
            if isinstance(self.params, str):
                raise ValueError("RMU.params must be a sequence of parameter names, got a single string")
            self.params = tuple(self.params)
            if not self.params or any(not isinstance(p, str) or not p.strip() for p in self.params):
                raise ValueError(f"RMU.params must be non-empty parameter names or None, got {self.params!r}")
        if self.tokens not in RMU_TOKENS:
            raise ValueError(f"RMU.tokens must be one of {list(RMU_TOKENS)}, got {self.tokens!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"RMU.seed must be an int, got {self.seed!r}")
        self._u: dict[int, torch.Tensor] = {}

    @property
    def needs_retain(self) -> bool:
        return self.alpha > 0

    @property
    def needs_reference(self) -> bool:
        return self.alpha > 0

    def resolved_layer(self, model) -> int:
        """The steered block's index for ``model`` (checks ``layer`` against its number of blocks)."""
        n = len(decoder_blocks(model))
        layer = (n - 1) // 4 if self.layer is None else self.layer
        if layer >= n:
            raise ValueError(f"RMU.layer must be in [0, {n - 1}] for this model ({n} decoder blocks), got {layer}")
        return layer

    def resolved_update_layers(self, model) -> tuple[int, ...]:
        """The blocks whose ``params`` are trained (default ``layer-2 .. layer``)."""
        n = len(decoder_blocks(model))
        if self.update_layers is None:
            layer = self.resolved_layer(model)
            return tuple(range(max(0, layer - 2), layer + 1))
        bad = [i for i in self.update_layers if i >= n]
        if bad:
            raise ValueError(f"RMU.update_layers must be in [0, {n - 1}] for this model ({n} decoder blocks), "
                             f"got {bad}")
        return tuple(sorted(set(self.update_layers)))

    def trainable_parameters(self, model) -> list[str] | None:
        """Full names of the parameters RMU trains: ``params`` (relative to a block) of ``update_layers``.

        Raises ``ValueError`` naming the option when a layer is out of range or a name is unknown."""
        self.resolved_layer(model)
        prefix = _block_prefix(model)
        blocks = decoder_blocks(model)
        layers = self.resolved_update_layers(model)
        local = {n for n, _ in blocks[layers[0]].named_parameters()}
        if self.params is None:
            default = [n for n in ("mlp.down_proj.weight", "mlp.c_proj.weight") if n in local]
            if not default:
                raise ValueError(f"RMU.params: no MLP output projection in {type(model).__name__}'s blocks; name "
                                 f"the parameters to train (block parameters: {sorted(local)})")
            names = tuple(default[:1])
        else:
            names = self.params
        out = []
        for i in layers:
            have = {n for n, _ in blocks[i].named_parameters()}
            unknown = [n for n in names if n not in have]
            if unknown:
                raise ValueError(f"RMU.params: unknown parameter name(s) {unknown} in decoder block {i}; "
                                 f"known: {sorted(have)}")
            out.extend(f"{prefix}.{i}.{n}" for n in names)
        return out

    def control_vector(self, hidden_size: int) -> torch.Tensor:
        """``c * u``: ``u`` uniform in [0, 1)^d from ``seed``, normalised to unit length (fixed per run)."""
        if hidden_size not in self._u:
            g = torch.Generator().manual_seed(self.seed)
            u = torch.rand(hidden_size, generator=g, dtype=torch.float64)
            self._u[hidden_size] = (u / u.norm()).to(torch.float32)
        return self.c * self._u[hidden_size]

    def _keep(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.tokens == "answer":
            return batch["labels"] != -100
        return batch["attention_mask"] != 0

    def forget_loss(self, model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the kept tokens of ``mean_d (h_L - c*u)^2`` (differentiable)."""
        h = layer_activations(model, batch, self.resolved_layer(model))
        target = self.control_vector(h.shape[-1]).to(device=h.device, dtype=h.dtype)
        return _masked_mse(h, target, self._keep(batch).to(h.device), "forget_batch")

    def retain_loss(self, model, reference, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the kept tokens of ``mean_d (h_L - h_L^ref)^2`` (unweighted; the reference under no_grad)."""
        layer = self.resolved_layer(model)
        h = layer_activations(model, batch, layer)
        with _frozen(reference):
            ref = layer_activations(reference, batch, layer).to(device=h.device, dtype=h.dtype)
        return _masked_mse(h, ref, self._keep(batch).to(h.device), "retain_batch")

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        forget = self.forget_loss(model, forget_batch)
        loss = forget
        metrics = {"rmu_forget": forget.item()}
        if self.alpha > 0:
            retain = self.retain_loss(model, reference, retain_batch)
            loss = forget + self.alpha * retain
            metrics["rmu_retain"] = retain.item()
        metrics["loss"] = loss.item()
        return ObjectiveOutput(loss, metrics)


OBJECTIVES: dict[str, type[Objective]] = {
    "ga": GradientAscent,
    "graddiff": GradDiff,
    "npo": NPO,
    "simnpo": SimNPO,
    "idk": IDK,
    "rmu": RMU,
}


def make_objective(name: str, **kwargs: Any) -> Objective:
    """The objective called ``name`` (a key of :data:`OBJECTIVES`, case-insensitive) with ``kwargs``."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OBJECTIVES:
        raise ValueError(f"unknown unlearning objective {name!r}; known: {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[key]
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = [f.name for f in dataclasses.fields(cls)]
        raise ValueError(f"bad arguments {sorted(kwargs)} for objective {key!r} (accepted: {fields}): {err}"
                         ) from err
