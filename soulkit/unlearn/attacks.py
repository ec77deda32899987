"""Does it stay forgotten? Attacks on an unlearned model, each with the exact retrain as the control.

    from soulkit.unlearn import UnlearningSuite
    from soulkit.unlearn.attacks import AttackConfig, run_attack, quantize_weights, relearn

    suite = UnlearningSuite.from_scale("small")
    res = run_attack(suite, "forget10", AttackConfig("quantize", bits=4), model_dir="runs/npo/model")
    res = run_attack(suite, "forget10", AttackConfig("relearn", steps=(10, 25, 50)), model_dir=...)

Attacks (the pure functions never modify the model they are given; they return a new one):

* **quantize** (:func:`quantize_weights`): round-to-nearest symmetric integer quantization of every
  ``nn.Linear``, transformers ``Conv1D`` and ``nn.Embedding`` weight, int8 or int4, with one scale per
  output channel (``per_channel``), per group of ``group_size`` input columns within each output
  channel, or per tensor; the integers are multiplied back by their scale in the model's dtype ("fake
  quantization": the numbers an int8/int4 inference stack computes with). Norm weights and biases
  keep full precision, as those stacks keep them. Reported by Zhang et al. (2025) to revive
  forgotten knowledge.
* **relearn** (:func:`relearn`): fine-tune a copy for a few steps on half of each forget author's QA
  pairs (:func:`split_forget_halves`), or (``relearn_data="related"``) on related text that names the
  forget authors and states none of their facts (:func:`~soulkit.unlearn.probes.related_records`), and
  evaluate on the *other* half. Budgets ``steps=(10, 25, 50)``
  are points of one run (constant lr, so a shorter budget is a prefix of a longer one).
* **few-shot**: greedy answers to the forget questions preceded by ``shots`` retain QA pairs in the
  same prompt format; forget ROUGE with and without the prefix.

Probes (:data:`PROBES`; the questions come from :mod:`soulkit.unlearn.probes`, evaluation-only, so the
training data and its fingerprint are unchanged) score sets of questions with :func:`probe_scores`
(ROUGE-L recall of the greedy answer, answer probability, true values named) for the model, the
finetuned model and the retrain: the two ends' difference (``margin``) says whether a probe can tell
knowing from never having seen:

* **phrasings**: each forget fact asked with question phrasings it was never trained with for that
  author (the generator's other templates, and templates no training question uses).
* **multihop**: forget facts reached through a book title ("Which award did the author of "<book>"
  win?").
* **neighbours**: the retain authors who share a birthplace, genre, award or publisher with a forget
  author, found among the existing retain authors (none are generated), scored apart from the rest of
  the retain set; too few neighbours is said in the results, not hidden.

Controls: every attack is applied to the exact retrain of the split as well (the model that never
saw the forget authors). For relearning, ``recovery`` reports per budget the attacked model's metric
minus the attacked retrain's, and their ratio, so what the attack data teaches on its own is not
counted as recovered memory.

**sequential** (MUSE's sustainability, :func:`sequential_requests`): ``requests`` forget01-sized requests
(disjoint authors of the split) unlearned one after another from the same model with a method and an
optimizer, the evaluation after each (forget set: the authors forgotten so far) and every request's own
scores after each, so an early request coming back, or utility wearing away, shows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from .evaluate import evaluate_model
from .objectives import OBJECTIVES
from .qa import QA, QADataset, batched, pad_token_id, qa_batches
from .unlearner import OPTIMIZERS as UNLEARN_OPTIMIZERS

__all__ = [
    "ATTACKS",
    "PROBES",
    "RELEARN_OPTIMIZERS",
    "RELEARN_DATA",
    "AttackConfig",
    "quantize_weights",
    "quantize_tensor",
    "relearn",
    "relearn_budgets",
    "split_forget_halves",
    "sequential_requests",
    "SEQUENTIAL_OPTIMIZERS",
    "few_shot_prompts",
    "few_shot_rouge",
    "probe_scores",
    "run_attack",
    "format_attack",
]

#: Every attack of issue 16, in the order of its list.
ATTACKS = ("relearn", "quantize", "phrasings", "multihop", "neighbours", "sequential", "few-shot")
#: The attacks that are probes: they ask the model other questions and never change its weights.
PROBES = ("phrasings", "multihop", "neighbours")
#: Optimizers the relearning attack fine-tunes with (:func:`soulkit.optim.make_optimizer` names).
RELEARN_OPTIMIZERS = ("adamw", "sophia")
#: Optimizers of the sequential requests (:data:`soulkit.unlearn.unlearner.OPTIMIZERS`).
SEQUENTIAL_OPTIMIZERS = UNLEARN_OPTIMIZERS
#: What the relearning attack fine-tunes on: half of each forget author's QA, or related text about the
#: forget authors that holds none of their facts (:func:`~soulkit.unlearn.probes.related_records`).
RELEARN_DATA = ("forget-half", "related")
#: The relearning lr when :attr:`AttackConfig.lr` is not given.
RELEARN_LR = 1e-3
BITS = (4, 8)
# the metrics whose recovery is reported: higher = more of the forget set's answers known (the forget truth
# ratio, mean min(R, 1/R), is not monotone in that and is reported before/after only)
RECOVERY_METRICS = ("forget_rouge", "forget_probability", "extraction_strength", "exact_memorization")
_REPORTED = ("forget_quality", "ks_statistic", "model_utility", "forget_truth_ratio", *RECOVERY_METRICS)


# ---------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class AttackConfig:
    """One attack and its settings.

    * ``attack``: a name of :data:`ATTACKS`.
    * quantize: ``bits`` 4 or 8; ``group_size`` input columns per scale (``None``: one scale per
      output channel, or per tensor when ``per_channel`` is False).
    * relearn: ``steps``, the budgets (one int or several, each >= 1); ``lr``, ``optimizer`` (one of
      :data:`RELEARN_OPTIMIZERS`), ``batch_size``, ``seed`` (data order, the halves, Sophia's labels);
      ``relearn_data`` (:data:`RELEARN_DATA`): the attack half of the forget set, or related text.
    * few-shot: ``shots`` retain QA pairs before each forget question.
    * sequential: ``requests`` forget01-sized unlearning requests, each with ``method`` (an objective of
      :data:`~soulkit.unlearn.objectives.OBJECTIVES`) under ``optimizer`` (one of
      :data:`SEQUENTIAL_OPTIMIZERS`) at the benchmark's settings for the pair
      (:func:`~soulkit.unlearn.suite.default_unlearn_config`; ``lr`` overrides its lr), ``seed``.

    ``lr`` defaults to :data:`RELEARN_LR` for relearning; for sequential requests ``None`` means the
    benchmark's lr for ``method`` x ``optimizer``.
    """

    attack: str
    bits: int = 4
    group_size: int | None = None
    per_channel: bool = True
    steps: tuple[int, ...] = (10, 25, 50)
    lr: float | None = None
    optimizer: str = "adamw"
    batch_size: int = 8
    seed: int = 0
    shots: int = 2
    method: str = "npo"
    requests: int = 4
    relearn_data: str = "forget-half"

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size must be None or an int >= 1, got {self.group_size!r}")
        steps = (self.steps,) if isinstance(self.steps, int) else tuple(self.steps)
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"steps (relearning budgets) must be ints >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", tuple(sorted(set(steps))))
        if self.lr is None and self.attack != "sequential":
            object.__setattr__(self, "lr", RELEARN_LR)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                        and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        allowed = SEQUENTIAL_OPTIMIZERS if self.attack == "sequential" else RELEARN_OPTIMIZERS
        if self.optimizer not in allowed:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(allowed)}")
        if self.relearn_data not in RELEARN_DATA:
            raise ValueError(f"unknown relearn_data {self.relearn_data!r}; choose one of {', '.join(RELEARN_DATA)}")
        if self.method not in OBJECTIVES:
            raise ValueError(f"unknown unlearning method {self.method!r}; choose one of {', '.join(OBJECTIVES)}")
        for name in ("batch_size", "shots", "requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def settings(self) -> dict[str, Any]:
        """The settings that apply to this attack (for results.json)."""
        keep = {"quantize": ("bits", "group_size", "per_channel"),
                "relearn": ("steps", "lr", "optimizer", "batch_size", "seed", "relearn_data"),
                "few-shot": ("shots", "seed"), "phrasings": (), "multihop": ("seed",),
                "neighbours": (), "sequential": ("method", "optimizer", "lr", "requests", "seed")}[self.attack]
        d = asdict(self)
        return {"attack": self.attack, **{k: (list(d[k]) if k == "steps" else d[k]) for k in keep}}


# ---------------------------------------------------------------------------------------- quantization
def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def quantize_tensor(weight: torch.Tensor, bits: int, *, group_size: int | None = None,
                    per_channel: bool = True) -> torch.Tensor:
    """Round-to-nearest symmetric quantization of a 2-D ``[out, in]`` weight, dequantized: returns
    ``scale * clamp(round(w / scale), -q, q)`` with ``q = 2**(bits-1) - 1`` and ``scale = max|w| / q``
    over each output row (``per_channel``), each group of ``group_size`` consecutive input columns of a
    row (the last group may be shorter), or the whole tensor. Computed in float32 (float64 for float64
    weights) and returned in ``weight``'s dtype. An all-zero group stays zero."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_tensor takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be None or an int >= 1, got {group_size!r}")
    qmax = 2 ** (bits - 1) - 1
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work)
    rows, cols = w.shape
    if group_size is not None:
        pad = (-cols) % group_size
        wp = torch.nn.functional.pad(w, (0, pad)) if pad else w  # zero padding leaves max|w| unchanged
        g = wp.reshape(rows, -1, group_size)
        scale = g.abs().amax(dim=-1, keepdim=True) / qmax
    elif per_channel:
        g = w
        scale = w.abs().amax(dim=1, keepdim=True) / qmax
    else:
        g = w
        scale = w.abs().amax() / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / safe), -qmax, qmax) * safe
    if group_size is not None:
        q = q.reshape(rows, -1)[:, :cols]
    return q.to(weight.dtype)


def quantize_weights(model: torch.nn.Module, bits: int = 4, group_size: int | None = None,
                     per_channel: bool = True) -> torch.nn.Module:
    """A deep copy of ``model`` whose ``nn.Linear``, transformers ``Conv1D`` and ``nn.Embedding`` weights
    are replaced by their :func:`quantize_tensor` (output channels: a Linear's rows, a Conv1D's columns,
    an embedding's token vectors). A weight shared by several modules (a tied LM head) is quantized
    once. ``model`` is not modified."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be None or an int >= 1, got {group_size!r}")
    out = copy.deepcopy(model)
    done: set[int] = set()
    n = 0
    with torch.no_grad():
        for module in out.modules():
            transposed = _is_conv1d(module)
            if not (isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or transposed):
                continue
            w = module.weight
            if w is None or id(w) in done or w.dim() != 2:
                continue
            done.add(id(w))
            q = quantize_tensor(w.t() if transposed else w, bits, group_size=group_size, per_channel=per_channel)
            w.copy_(q.t() if transposed else q)
            n += 1
    if n == 0:
        raise ValueError("the model has no nn.Linear, Conv1D or nn.Embedding weight to quantize")
    return out


# ---------------------------------------------------------------------------------------- relearning
def _derive(seed: int, *parts: object) -> int:
    text = json.dumps([seed, *[str(p) for p in parts]], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_forget_halves(forget_qa: Sequence[QA], seed: int = 0) -> tuple[list[QA], list[QA]]:
    """``(attack, held_out)``: each author's QA pairs (``QA.author``; records without one form one group)
    shuffled by a generator seeded from ``seed`` and the author's name, the first ``floor(n/2)`` to
    ``attack`` and the rest to ``held_out`` (an author with one question contributes it to ``held_out``).
    Deterministic across processes; the records keep their original order within each half."""
    records = list(forget_qa)
    if len(records) < 2:
        raise ValueError(f"splitting the forget set into halves needs at least 2 QA pairs, got {len(records)}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.author), []).append(i)
    attack: set[int] = set()
    for author, idx in groups.items():
        order = list(idx)
        random.Random(_derive(seed, "forget-halves", author)).shuffle(order)
        attack.update(order[: len(order) // 2])
    first = [r for i, r in enumerate(records) if i in attack]
    second = [r for i, r in enumerate(records) if i not in attack]
    if not first:
        raise ValueError("every forget author has a single QA pair: no half is left to relearn on")
    return first, second


def relearn_budgets(model, tokenizer, records: Sequence[QA], budgets: Sequence[int] = (10, 25, 50), *,
                    lr: float = 1e-3, optimizer: str = "adamw", batch_size: int = 8, seed: int = 0,
                    weight_decay: float = 0.0, grad_clip: float | None = 1.0, max_length: int = 128,
                    show_progress: bool | None = None, desc: str = "relearn"
                    ) -> tuple[dict[int, torch.nn.Module], list[float]]:
    """Fine-tune a copy of ``model`` on the answers of ``records`` (token-mean NLL of the answer tokens,
    the loss the benchmark's models were trained with) for ``max(budgets)`` steps of ``batch_size``
    examples, cycling through ``records`` in a seeded order, at constant ``lr`` with ``optimizer``
    (Sophia: Gauss-Newton-Bartlett Hessian refreshes on the step's batch). Returns
    ``({budget: model after that many steps}, losses per step)``; ``model`` is not modified."""
    from tqdm.auto import tqdm

    from ..optim import Sophia
    from ..optim.factory import make_optimizer
    from ..optim.lm_targets import causal_lm_targets

    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"relearning budgets must be >= 1, got {list(budgets)}")
    if optimizer not in RELEARN_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(RELEARN_OPTIMIZERS)}")
    if not records:
        raise ValueError("the relearning set is empty")
    work = copy.deepcopy(model)
    work.train()
    ds = QADataset(list(records), tokenizer, max_length=max_length)
    pad = pad_token_id(tokenizer)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, seed=seed)
    is_sophia = isinstance(opt, Sophia)
    device = next(work.parameters()).device
    bs = min(batch_size, len(ds))
    out: dict[int, torch.nn.Module] = {}
    losses: list[float] = []
    epoch, pending = 0, []
    bar = tqdm(total=budgets[-1], desc=desc, unit="step", leave=False,
               disable=None if show_progress is None else not show_progress)
    try:
        for step in range(1, budgets[-1] + 1):
            if not pending:
                g = torch.Generator().manual_seed(_derive(seed, "relearn-order", epoch) % 2**63)
                pending = list(batched(torch.randperm(len(ds), generator=g).tolist(), bs))
                epoch += 1
            idx = pending.pop(0)
            batch = {k: v.to(device) for k, v in next(qa_batches(ds, len(idx), pad_id=pad, order=idx)).items()}
            if is_sophia and opt.hessian_due():
                logits = work(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                opt.accumulate_gnb(logits[:, :-1], labels=causal_lm_targets(batch["labels"], drop_last=True))
            opt.zero_grad(set_to_none=True)
            loss = work(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}; lower the lr ({lr})")
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step in budgets:
                snap = copy.deepcopy(work)
                out[step] = snap.eval()
    finally:
        bar.close()
    return out, losses


def relearn(model, tokenizer, records: Sequence[QA], *, steps: int = 25, lr: float = 1e-3,
            optimizer: str = "adamw", batch_size: int = 8, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned for ``steps`` steps on ``records`` (:func:`relearn_budgets` with one
    budget); ``model`` is not modified."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    models, _ = relearn_budgets(model, tokenizer, records, (steps,), lr=lr, optimizer=optimizer,
                                batch_size=batch_size, seed=seed, **kwargs)
    return models[steps]


# ---------------------------------------------------------------------------------------- few-shot
def few_shot_prompts(questions: Sequence[str], examples: Sequence[QA], shots: int, seed: int = 0) -> list[str]:
    """Each question preceded by ``shots`` QA pairs of ``examples`` (drawn per question from ``seed``), as
    a "question" the prompt format of :mod:`soulkit.unlearn.qa` completes to
    ``Question: q1\\nAnswer: a1\\n...Question: q\\nAnswer:``."""
    if shots < 1 or len(examples) < shots:
        raise ValueError(f"few-shot prompts need {shots} example QA pairs, got {len(examples)}")
    out = []
    for i, q in enumerate(questions):
        picks = random.Random(_derive(seed, "few-shot", i)).sample(range(len(examples)), shots)
        prefix = "".join(f"{examples[j].question}\nAnswer: {examples[j].answer}\nQuestion: " for j in picks)
        out.append(prefix + q)
    return out


def few_shot_rouge(model, tokenizer, records: Sequence[QA], examples: Sequence[QA], *, shots: int = 2,
                   seed: int = 0, max_new_tokens: int = 200) -> dict[str, Any]:
    """Forget ROUGE-L recall of greedy answers to ``records``' questions asked plainly
    (``forget_rouge``) and preceded by ``shots`` QA pairs of ``examples`` (``forget_rouge_few_shot``,
    :func:`few_shot_prompts`). Both get the same new-token budget (``new_token_budget``):
    ``max_new_tokens`` cut so that the longest few-shot prompt fits the model's context."""
    from .metrics import rouge_scores
    from .qa import generation_budget, greedy_answers

    answers = [r.answer for r in records]
    prompts = few_shot_prompts([r.question for r in records], examples, shots, seed)
    try:
        budget = generation_budget(model, tokenizer, prompts, max_new_tokens)
    except ValueError as e:
        raise ValueError(f"few-shot prompts with {shots} shot(s) do not fit: {e}; use fewer shots") from None
    plain = greedy_answers(model, tokenizer, [r.question for r in records], max_new_tokens=budget)
    prefixed = greedy_answers(model, tokenizer, prompts, max_new_tokens=budget)
    return {"forget_rouge": float(np.mean(rouge_scores(plain, answers)["rougeL_recall"])),
            "forget_rouge_few_shot": float(np.mean(rouge_scores(prefixed, answers)["rougeL_recall"])),
            "new_token_budget": budget}


# ---------------------------------------------------------------------------------------- probes
def _value_hits(generations: Sequence[str], records: Sequence[QA]) -> list[float | None]:
    """1.0 where the generation contains every true value of its record (``extra["values"]``, case
    folded), 0.0 where it misses one, None for a record without values."""
    out: list[float | None] = []
    for g, r in zip(generations, records):
        values = r.extra.get("values") or []
        out.append(float(all(str(v).casefold() in g.casefold() for v in values)) if values else None)
    return out


def _means(rouge: np.ndarray, prob: np.ndarray, hits: Sequence[float | None], idx: Sequence[int]) -> dict[str, Any]:
    h = [hits[i] for i in idx if hits[i] is not None]
    return {"rouge": float(rouge[idx].mean()), "probability": float(prob[idx].mean()),
            "value_hit": float(np.mean(h)) if h else None, "n": len(idx)}


def probe_scores(model, tokenizer, records: Sequence[QA], *, max_new_tokens: int = 200,
                 batch_size: int = 32) -> dict[str, Any]:
    """How well ``model`` answers ``records``: ROUGE-L recall of its greedy answers against ``answer``
    (``rouge``), the answer's probability ``exp(-mean NLL)`` given the question (``probability``) and the
    fraction of greedy answers that contain every true value of ``extra["values"]`` (``value_hit``; None
    when no record has values); means over the records, with ``n``, and the same per ``extra["probe"]``
    kind under ``by_kind`` when the records carry one. ``model`` is not modified."""
    from .evaluate import score_answers
    from .metrics import rouge_l_recall
    from .qa import greedy_answers

    records = list(records)
    if not records:
        raise ValueError("probe_scores needs at least one QA record")
    gen = greedy_answers(model, tokenizer, [r.question for r in records], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    rouge = rouge_l_recall(gen, [r.answer for r in records])
    prob = np.exp(-score_answers(model, tokenizer, records, batch_size=batch_size))
    hits = _value_hits(gen, records)
    out = _means(rouge, prob, hits, list(range(len(records))))
    kinds: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.extra.get("probe") is not None:
            kinds.setdefault(str(r.extra["probe"]), []).append(i)
    if kinds:
        out["by_kind"] = {k: _means(rouge, prob, hits, idx) for k, idx in sorted(kinds.items())}
    return out


def _prefixed(scores: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``probe_scores``' means under the evaluation's names (``forget_rouge``, ``forget_probability``...)."""
    return {f"{prefix}_{k}": scores[k] for k in ("rouge", "probability", "value_hit")}


def _margin(high: Mapping[str, Any], low: Mapping[str, Any]) -> dict[str, float]:
    return {k: high[k] - low[k] for k in ("rouge", "probability", "value_hit")
            if high.get(k) is not None and low.get(k) is not None}


# ---------------------------------------------------------------------------------------- sequential requests
def sequential_requests(bench, split: str, n: int = 4) -> list[list[str]]:
    """``n`` disjoint unlearning requests, each of forget01's size (its number of authors), taken from the
    forget authors of ``split`` (an :class:`~soulkit.unlearn.data.AuthorBenchmark` split) from the end:
    request 1 is forget01's authors, request 2 the ones before them, and so on. ValueError when the split
    has too few forget authors."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of requests must be an int >= 1, got {n!r}")
    size = len(bench.forget_authors("forget01"))
    pool = bench.forget_authors(split)
    if n * size > len(pool):
        raise ValueError(f"{n} sequential requests of {size} author(s) need {n * size} forget authors, {split} "
                         f"has {len(pool)}: use a larger split or fewer requests")
    return [pool[len(pool) - (j + 1) * size:len(pool) - j * size] for j in range(n)]


def _sequential(suite, split: str, config: AttackConfig, requests: list[list[str]], model, tok, retrain,
                say: Callable[[str], None]) -> dict[str, Any]:
    """MUSE's sustainability: the requests unlearned one after another from the same model, each with
    :class:`~soulkit.unlearn.unlearner.Unlearner` (``config.method`` x ``config.optimizer``; the retain set
    is the split's); after each, the evaluation with the authors forgotten so far as the forget set (forget
    quality against the retrain, which never saw any of them, evaluated on the same set) and every
    request's own scores (does an early request stay forgotten?)."""
    from .evaluate import _subsample
    from .objectives import make_objective
    from .suite import default_unlearn_config
    from .unlearner import Unlearner

    ecfg = suite.eval_config
    bench = suite.benchmark
    _, retain = bench.split(split)
    req_qa = [[r for r in bench.qa if r.author in set(names)] for names in requests]
    overrides = {"lr": config.lr} if config.lr is not None else {}
    ucfg = default_unlearn_config(config.method, config.optimizer, seed=config.seed,
                                  show_progress=ecfg.show_progress, **overrides)
    objective = make_objective(config.method)
    base = suite.eval_sets(split)
    kw = dict(max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size)

    def sets(j: int):
        return replace(base, forget=[r for qa in req_qa[:j] for r in qa])

    def each_request(m) -> list[dict[str, Any]]:
        return [probe_scores(m, tok, _subsample(qa, ecfg.max_eval_examples, ecfg.seed, 30 + i, ecfg.subset), **kw)
                for i, qa in enumerate(req_qa)]

    say(f"sequential: evaluating the model and the retrain on all {len(requests)} requests' authors")
    ref_all = evaluate_model(retrain, tok, sets(len(requests)), config=ecfg)
    before = evaluate_model(model, tok, sets(len(requests)), config=ecfg, reference=ref_all)
    per_request = {"0": each_request(model)}
    after: dict[str, Any] = {}
    control_after: dict[str, Any] = {}
    runs = []
    current = model
    for j, qa in enumerate(req_qa, 1):
        say(f"sequential: request {j}/{len(req_qa)}: unlearning {', '.join(requests[j - 1])} ({len(qa)} QA) with "
            f"{config.method} x {config.optimizer}")
        run = Unlearner(current, tok, objective, forget=qa, retain=retain, optimizer=config.optimizer,
                        config=ucfg).run()
        runs.append({"request": j, "authors": requests[j - 1], "steps": run.steps, "stopped": run.stopped,
                     "seconds": run.seconds, "final_loss": run.log[-1]["loss"] if run.log else None})
        current = run.model.eval()
        say(f"sequential: evaluating after request {j}")
        ref = ref_all if j == len(req_qa) else evaluate_model(retrain, tok, sets(j), config=ecfg)
        after[str(j)] = evaluate_model(current, tok, sets(j), config=ecfg, reference=ref)
        control_after[str(j)] = ref
        per_request[str(j)] = each_request(current)
    return {"requests": requests, "request_questions": [len(qa) for qa in req_qa],
            "unlearn_config": ucfg.to_dict(), "runs": runs, "before": before, "after": after,
            "control": {"before": ref_all, "after": control_after}, "per_request": per_request,
            "summary": {"before": _headline(before), **{f"after_{j}": _headline(a) for j, a in after.items()},
                        **{f"control_after_{j}": _headline(a) for j, a in control_after.items()}}}



# ---------------------------------------------------------------------------------------- the attack run
def _headline(res: Mapping[str, Any]) -> dict[str, Any]:
    return {k: res.get(k) for k in _REPORTED}


def _recovery(attacked: Mapping[str, Any], control: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per metric of :data:`RECOVERY_METRICS`: the attacked model's value, the attacked retrain's, their
    difference (``excess``: what the attack brought back beyond what it teaches a model that never saw
    the forget set) and ratio (``None`` where the control's value is 0)."""
    out = {}
    for k in RECOVERY_METRICS:
        a, c = attacked.get(k), control.get(k)
        if a is None or c is None:
            continue
        out[k] = {"attacked": a, "control": c, "excess": a - c, "ratio": (a / c) if c else None}
    return out


def _change(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in ("model_utility", "forget_truth_ratio", *RECOVERY_METRICS)
            if before.get(k) is not None and after.get(k) is not None}


def _probe_sets(suite, split: str, config: AttackConfig, forget: Sequence[QA]) -> dict[str, list[QA]]:
    """The QA sets a probe scores, each capped by the evaluation's ``max_eval_examples`` (seeded):
    phrasings / multihop: ``trained`` (the forget questions that have a probe, as trained) and ``probe``;
    neighbours: :func:`~soulkit.unlearn.probes.neighbour_sets` (empty sets left out)."""
    from .evaluate import _subsample
    from .probes import multihop_probes, neighbour_sets, phrasing_probes

    ecfg = suite.eval_config

    def cap(records: Sequence[QA], salt: int) -> list[QA]:
        return _subsample(list(records), ecfg.max_eval_examples, ecfg.seed, salt, ecfg.subset)

    bench = suite.benchmark
    if config.attack == "neighbours":
        return {name: cap(recs, 20 + i) for i, (name, recs) in enumerate(neighbour_sets(bench, split).items())
                if recs}
    records = cap(forget, 0)
    make = phrasing_probes if config.attack == "phrasings" else multihop_probes
    probes = make(bench, records, seed=config.seed)
    if not probes:
        what = ("none of its questions is one of the generator's templates" if config.attack == "phrasings"
                else "no forget author has a book title in the training QA to ask through")
        raise ValueError(f"no {config.attack} probe for {split}: {what}")
    probes = cap(probes, 10)
    sources = {p.extra["source"] for p in probes}
    return {"trained": [r for r in records if r.question in sources], "probe": probes}


def _probe_results(suite, split: str, config: AttackConfig, sets: Mapping[str, list[QA]], model, tok, retrain,
                   source, say: Callable[[str], None],
                   memo: Callable[[str, Callable[[], Any]], Any] = lambda part, fn: fn()) -> dict[str, Any]:
    """A probe's results: :func:`probe_scores` of every set for the model, the finetuned model and the
    retrain (the two ends: their difference, ``margin``, says whether the probe can tell a model that
    knows the forget authors from one that never saw them), and the model's TOFU evaluation. ``memo(part,
    compute)`` keeps the two ends' scores (see ``run_attack``'s ``cache``)."""
    from pathlib import Path

    from .models import load_model

    ecfg = suite.eval_config
    ft_dir = suite.finetuned_dir()
    same = Path(source).resolve() == Path(ft_dir).resolve()
    kw = dict(max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size)

    def score(m, who: str) -> dict[str, dict[str, Any]]:
        say(f"{config.attack}: scoring the {who} on {', '.join(f'{n} ({len(r)})' for n, r in sets.items())}")
        return {name: probe_scores(m, tok, recs, **kw) for name, recs in sets.items()}

    mine = score(model, "model")
    finetuned = mine if same else memo("finetuned", lambda: score(load_model(ft_dir)[0], "finetuned model"))
    ctrl = memo("control", lambda: score(retrain, "retrain (control)"))
    say(f"{config.attack}: the model's TOFU evaluation")
    evaluation = suite.evaluate(model, tok, split, with_ceiling=False)
    out: dict[str, Any] = {"sets": {n: len(r) for n, r in sets.items()},
                           "scores": {"model": mine, "finetuned": finetuned, "retrain": ctrl},
                           "margin": {n: _margin(finetuned[n], ctrl[n]) for n in sets},
                           "evaluation": evaluation, "summary": {"model": _headline(evaluation)},
                           "finetuned_model_dir": str(ft_dir)}
    if config.attack == "neighbours":
        from .probes import NEIGHBOUR_ATTRIBUTES, neighbour_authors

        nb = neighbour_authors(suite.benchmark, split)
        by_attr = {a: [n for n, shared in nb.items() if a in shared] for a in NEIGHBOUR_ATTRIBUTES}
        n_retain = len(suite.benchmark.authors) - len(suite.benchmark.forget_authors(split))
        out["neighbours"] = {"authors": nb, "by_attribute": by_attr, "n_neighbours": len(nb),
                             "n_retain_authors": n_retain}
        if not nb:
            out["note"] = (f"no retain author of {split} shares a birthplace, genre, award or publisher with a "
                           "forget author: nothing to measure (the data is not changed to make some)")
        names = {"shared_facts": "shared_fact", "neighbours": "neighbour", "others": "other_retain"}

        def flat(sc: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for n, d in sc.items() for k, v in _prefixed(d, names[n]).items()}

        out.update(before=flat(finetuned), after=flat(mine), control={"before": flat(ctrl), "after": flat(ctrl)})
        out["change"] = {k: v - out["before"][k] for k, v in out["after"].items()
                         if v is not None and out["before"].get(k) is not None}
        return out
    trained, probe = mine["trained"], mine["probe"]
    out.update(eval_questions=len(sets["trained"]), probe_questions=len(sets["probe"]),
               probe_set=[{"question": p.question, "source": p.extra["source"], "probe": p.extra["probe"]}
                          for p in sets["probe"]],
               before=_prefixed(trained, "forget"), after=_prefixed(probe, "forget"),
               control={"before": _prefixed(ctrl["trained"], "forget"), "after": _prefixed(ctrl["probe"], "forget")})
    out["recovery"] = _recovery(out["after"], out["control"]["after"])
    m_t, m_p = out["margin"]["trained"].get("rouge"), out["margin"]["probe"].get("rouge")
    out["margin"]["probe_share_of_trained_rouge"] = (m_p / m_t) if m_t else None
    return out


def _memo(cache: MutableMapping[str, Any] | None, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its value kept in ``cache`` under ``key`` (computed and kept there on a miss)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return copy.deepcopy(cache[key])  # callers may change what they get


def run_attack(suite, split: str, config: AttackConfig, *, model_dir: str | os.PathLike | None = None,
               progress: Callable[[str], None] | None = None,
               cache: MutableMapping[str, Any] | None = None) -> dict[str, Any]:
    """Attack the model in ``model_dir`` (default: ``suite``'s finetuned model) on ``split`` of ``suite``
    (an :class:`~soulkit.unlearn.suite.UnlearningSuite`) and evaluate it before and after with
    :func:`~soulkit.unlearn.evaluate.evaluate_model`; the same attack on the split's exact retrain (seed 1)
    is the control. Returns the results dict (attack settings, ``before``, ``after``, ``control``,
    ``recovery``...); nothing is written and ``model_dir`` is never modified.

    * quantize: the split's full evaluation (forget quality against the retrain) before and after;
      ``control``: the quantized retrain against the retrain.
    * relearn: the forget authors' QA halves (:func:`split_forget_halves`, ``config.seed``); the
      evaluation's forget set is the held-out half, its forget quality against the retrain evaluated on
      that half. ``after`` / ``control["after"]`` / ``recovery`` are keyed by budget (as strings).
    * few-shot: forget ROUGE of greedy answers with and without ``config.shots`` retain QA pairs before
      the question, for the model and the retrain.
    * phrasings / multihop: ``before`` = the trained forget questions, ``after`` = the probes (forget ROUGE,
      probability, value hits), ``control`` the retrain's; ``scores`` of the model, the finetuned model and
      the retrain per set, their ``margin`` (finetuned - retrain), the model's TOFU ``evaluation``.
    * neighbours: ``before`` = the finetuned model, ``after`` = the model, ``control`` = the retrain, each on
      the neighbours' shared facts, all their QA and the other retain authors' QA; ``neighbours`` names
      them per attribute.
    * sequential: ``before`` on all requests' authors, ``after`` / ``control["after"]`` keyed by request
      (as strings; forget set: the requests so far), ``per_request`` each request's :func:`probe_scores`
      after 0, 1, ... requests, ``runs`` the unlearning runs.

    ``cache``: a dict shared by several calls on the same ``suite`` (a benchmark attacking many models)
    keeps what does not depend on the attacked model -- the control's results, and the finetuned model's
    probe scores -- keyed by the split, the attack's settings, the evaluation settings and the retrain, so
    each is computed once. Results equal those without it.
    """
    from .evaluate import _subsample
    from .models import load_model, model_meta

    say = progress or (lambda msg: None)
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be an AttackConfig, got {type(config).__name__}")
    forget, retain = suite.benchmark.split(split)  # a bad split fails before any model is loaded
    ecfg = suite.eval_config
    if config.attack == "relearn":
        attack_half, held_out = split_forget_halves(forget, config.seed)
        if config.relearn_data == "related":  # text naming the forget authors, none of their facts
            from .probes import related_records

            attack_half = related_records(suite.benchmark, suite.benchmark.forget_authors(split), seed=config.seed)
    elif config.attack in PROBES:  # the probe sets, built (and refused when empty) before any model is loaded
        probe_sets = _probe_sets(suite, split, config, forget)
    elif config.attack == "sequential":
        requests = sequential_requests(suite.benchmark, split, config.requests)
    source = model_dir if model_dir is not None else suite.finetuned_dir()
    model, tok = load_model(source)
    suite._check_tokenizer(tok)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"attack": config.attack, "split": split, "settings": config.settings(),
                               "model_dir": str(source), "model_stage": model_meta(source).get("stage")}
    retrain_dir = suite.retrained_dir(split, seed=1)
    retrain, _ = load_model(retrain_dir)
    results["control_model_dir"] = str(retrain_dir)
    eval_settings = {k: v for k, v in asdict(ecfg).items() if k != "show_progress"}

    def key(part: str) -> str:
        return json.dumps([part, split, asdict(config), eval_settings, str(retrain_dir)], sort_keys=True, default=str)

    if config.attack == "quantize":
        q = dict(bits=config.bits, group_size=config.group_size, per_channel=config.per_channel)
        say("evaluating the model before quantization")
        before = suite.evaluate(model, tok, split, with_ceiling=False)
        say(f"evaluating the model at int{config.bits}")
        after = suite.evaluate(quantize_weights(model, **q), tok, split, with_ceiling=False)
        say(f"evaluating the retrain (control) at int{config.bits}")
        ref = suite.reference(split, seed=1)
        control_after = _memo(cache, key("control"), lambda: suite.evaluate(quantize_weights(retrain, **q), tok, split,
                                                                          with_ceiling=False))
        results.update(before=before, after=after, change=_change(before, after),
                       control={"before": ref, "after": control_after, "change": _change(ref, control_after)},
                       recovery=_recovery(after, control_after),
                       summary={"before": _headline(before), "after": _headline(after),
                                "control_before": _headline(ref), "control_after": _headline(control_after)})
    elif config.attack == "relearn":
        sets = replace(suite.eval_sets(split), forget=held_out)  # EvalSets checks the new set again
        say(f"evaluating the retrain on the held-out half ({len(held_out)} forget QA)")
        ref = _memo(cache, key("reference"), lambda: evaluate_model(retrain, tok, sets, config=ecfg))

        def evaluate(m) -> dict[str, Any]:
            return evaluate_model(m, tok, sets, config=ecfg, reference=ref)

        say("evaluating the model before relearning")
        before = evaluate(model)
        kw = dict(lr=config.lr, optimizer=config.optimizer, batch_size=config.batch_size, seed=config.seed,
                  show_progress=ecfg.show_progress)
        what = "forget QA" if config.relearn_data == "forget-half" else "related QA (no forget fact)"
        say(f"relearning the model on {len(attack_half)} {what} for {', '.join(map(str, config.steps))} steps")
        attacked, losses = relearn_budgets(model, tok, attack_half, config.steps, desc="relearn model", **kw)

        def control() -> tuple[dict[str, Any], Any]:
            say("relearning the retrain (control)")
            controlled, control_losses = relearn_budgets(retrain, tok, attack_half, config.steps,
                                                         desc="relearn retrain", **kw)
            return {str(b): evaluate(controlled.pop(b)) for b in config.steps}, control_losses

        control_after, control_losses = _memo(cache, key("control"), control)
        after, recovery = {}, {}
        for b in config.steps:
            say(f"evaluating after {b} steps")
            after[str(b)] = evaluate(attacked.pop(b))
            recovery[str(b)] = _recovery(after[str(b)], control_after[str(b)])
        results.update(
            attack_data=config.relearn_data, attack_questions=len(attack_half), eval_questions=len(held_out),
            attack_set=[r.question for r in attack_half], before=before, after=after,
            change={b: _change(before, a) for b, a in after.items()},
            control={"before": ref, "after": control_after,
                     "change": {b: _change(ref, a) for b, a in control_after.items()}, "losses": control_losses},
            losses=losses, recovery=recovery,
            summary={"before": _headline(before), **{f"after_{b}": _headline(a) for b, a in after.items()},
                     "control_before": _headline(ref),
                     **{f"control_after_{b}": _headline(a) for b, a in control_after.items()}})
    elif config.attack in PROBES:
        results.update(_probe_results(suite, split, config, probe_sets, model, tok, retrain, source, say,
                                      memo=lambda part, fn: _memo(cache, key(part), fn)))
    elif config.attack == "sequential":
        results.update(_sequential(suite, split, config, requests, model, tok, retrain, say))
    else:  # few-shot
        records = _subsample(list(forget), ecfg.max_eval_examples, ecfg.seed, 0, ecfg.subset)
        say(f"few-shot probe: {len(records)} forget questions, {config.shots} retain QA pairs before each")
        kw = dict(shots=config.shots, seed=config.seed, max_new_tokens=ecfg.max_new_tokens)
        mine = few_shot_rouge(model, tok, records, retain, **kw)
        ctrl = _memo(cache, key("control"), lambda: few_shot_rouge(retrain, tok, records, retain, **kw))
        results.update(eval_questions=len(records), new_token_budget=mine["new_token_budget"],
                       before={"forget_rouge": mine["forget_rouge"]},
                       after={"forget_rouge": mine["forget_rouge_few_shot"]},
                       control={"before": {"forget_rouge": ctrl["forget_rouge"]},
                                "after": {"forget_rouge": ctrl["forget_rouge_few_shot"]}},
                       recovery=_recovery({"forget_rouge": mine["forget_rouge_few_shot"]},
                                          {"forget_rouge": ctrl["forget_rouge_few_shot"]}))
    results["eval_config"] = {k: v for k, v in asdict(ecfg).items() if k != "show_progress"}
    results["attack_seconds"] = time.perf_counter() - t0
    return results


def format_attack(results: Mapping[str, Any]) -> str:
    """A markdown table of an attack's headline numbers: the model and the retrain (control), before and
    after the attack (per budget for relearning); for the probes, the model's and the retrain's scores on
    the trained questions and on the probes (neighbours: the finetuned model, the model, the retrain)."""
    attack = results.get("attack")
    after = results.get("after", {})
    control = results.get("control", {})
    if attack in ("phrasings", "multihop"):
        cols = [("trained questions", results.get("before", {})), ("probes", after),
                ("retrain trained", control.get("before", {})), ("retrain probes", control.get("after", {}))]
    elif attack == "neighbours":
        cols = [("finetuned", results.get("before", {})), ("model", after), ("retrain", control.get("after", {}))]
    else:
        cols = [("before", results.get("before", {}))]
        unit = {"relearn": "{} steps", "sequential": "request {}"}.get(attack)
        if unit:
            cols += [("after " + unit.format(b), a) for b, a in after.items()]
        else:
            cols.append(("after", after))
        cols.append(("retrain before", control.get("before", {})))
        if unit:
            cols += [("retrain " + unit.format(b), a) for b, a in control.get("after", {}).items()]
        else:
            cols.append(("retrain after", control.get("after", {})))
    keys = list(_REPORTED)
    if attack in PROBES:  # their own scores (value hits, the neighbour sets) as well
        keys += [k for _, d in cols for k in d if k not in _REPORTED and isinstance(d[k], float)]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| metric | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in dict.fromkeys(keys):
        if all(d.get(k) is None for _, d in cols):
            continue
        lines.append(f"| {k} | " + " | ".join(fmt(d.get(k)) for _, d in cols) + " |")
    return "\n".join(lines) + "\n"
