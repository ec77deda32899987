"""Question-answer records and the one way soulkit turns them into tokens and scores them.

Everything in :mod:`soulkit.unlearn` (training, evaluation, objectives) formats a QA pair the same
way, so that "the probability of the answer given the question" means one thing everywhere::

    <bos>Question: {question}\\nAnswer: {answer}<eos>

Only the answer tokens (and the end-of-sequence token) carry labels; the prompt is context.

    from soulkit.unlearn.qa import QA, QADataset, collate_qa, answer_logprobs
    ds = QADataset(records, tokenizer)
    batch = collate_qa([ds[i] for i in range(4)], pad_id=tokenizer.pad_token_id)
    total_logprob, n_tokens = answer_logprobs(model, batch)      # [B], [B]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "QA",
    "PROMPT_TEMPLATE",
    "format_prompt",
    "pad_token_id",
    "encode_qa",
    "QADataset",
    "collate_qa",
    "answer_logits",
    "answer_logprobs",
    "answer_token_stats",
    "greedy_answers",
]

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class QA:
    """One question with its answer and the alternative answers TOFU's metrics need.

    ``paraphrased_answer``: the same fact in other words (truth ratio's reference).
    ``perturbed_answer``: wrong answers of the same form (wrong values of the same attribute type).
    ``author``: whose fact this is (splits are by whole authors); ``attribute``: which fact.
    """

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answer: tuple[str, ...] = ()
    author: str | None = None
    attribute: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("QA.question must be a non-empty string")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"QA.answer must be a non-empty string (question: {self.question!r})")
        if isinstance(self.perturbed_answer, str):
            object.__setattr__(self, "perturbed_answer", (self.perturbed_answer,))
        else:
            object.__setattr__(self, "perturbed_answer", tuple(self.perturbed_answer))

    def with_answer(self, answer: str) -> QA:
        """A copy whose ``answer`` is replaced (e.g. by a refusal for IDK unlearning)."""
        return QA(self.question, answer, self.paraphrased_answer, self.perturbed_answer, self.author,
                  self.attribute, dict(self.extra))


def format_prompt(question: str) -> str:
    """The prompt a model sees for ``question`` (answers follow after one space)."""
    return PROMPT_TEMPLATE.format(question=question)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (the tokenizer object is not modified)."""
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    return int(pid)


def encode_qa(tokenizer, question: str, answer: str, *, max_length: int | None = None
              ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one QA pair; labels are ``-100`` on the prompt.

    The prompt and the answer are tokenised separately so the boundary is exact for every
    tokenizer; a bos token is prepended and an eos token appended when the tokenizer has them.
    Too long sequences are truncated from the left of the prompt (the answer is kept whole); an
    answer longer than ``max_length`` raises.
    """
    prompt = tokenizer(format_prompt(question), add_special_tokens=False)["input_ids"]
    ans = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ans = ans + [tokenizer.eos_token_id]
    if not ans:
        raise ValueError(f"answer {answer!r} tokenises to nothing")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt + ans
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + list(ans)
    if max_length is not None and len(ids) > max_length:
        if len(ans) >= max_length:
            raise ValueError(f"answer of {len(ans)} tokens does not fit max_length={max_length}: {answer[:60]!r}")
        cut = len(ids) - max_length
        ids, labels = ids[cut:], labels[cut:]
    return ids, labels


class QADataset(Dataset):
    """QA records tokenised once; items are dicts of ``input_ids`` and ``labels`` (lists of int).

    ``answer_field``: which answer to score/train on: ``"answer"`` (default), ``"paraphrased_answer"``,
    or an int ``i`` for ``perturbed_answer[i]``.
    """

    def __init__(self, records: Sequence[QA], tokenizer, *, answer_field: str | int = "answer",
                 max_length: int | None = None):
        if len(records) == 0:
            raise ValueError("QADataset needs at least one QA record")
        self.records = list(records)
        self.items = []
        for r in self.records:
            if isinstance(answer_field, int):
                if answer_field >= len(r.perturbed_answer):
                    raise ValueError(f"question {r.question!r} has {len(r.perturbed_answer)} perturbed answers, "
                                     f"index {answer_field} requested")
                answer = r.perturbed_answer[answer_field]
            else:
                answer = getattr(r, answer_field)
                if answer is None:
                    raise ValueError(f"question {r.question!r} has no {answer_field}")
            ids, labels = encode_qa(tokenizer, r.question, answer, max_length=max_length)
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def collate_qa(items: Sequence[dict[str, list[int]]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and padding)."""
    if not items:
        raise ValueError("collate_qa got an empty batch")
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted float logits ``[B, T-1, V]``, their targets ``[B, T-1]`` and the answer-token mask."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    return logits, targets, valid


def answer_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probabilities ``[B]`` and the number of answer tokens ``[B]``.

    Differentiable (no ``no_grad`` inside): objectives use it for per-sequence log-likelihoods.
    The mean token NLL of a sequence is ``-total / n_tokens``.
    """
    logits, targets, valid = answer_logits(model, batch)
    logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    logp = logp * valid
    return logp.sum(1), valid.sum(1)


@torch.no_grad()
def answer_token_stats(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-token statistics of the answer tokens, for membership inference and extraction.

    Returns ``[B, T-1]`` tensors aligned with the shifted targets: ``logprob`` (log p of the target
    token), ``mean`` and ``std`` of log p under the model's own next-token distribution (Min-K%++),
    ``correct`` (argmax equals the target), and the bool ``mask`` of answer positions.
    """
    logits, targets, valid = answer_logits(model, batch)
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    tok = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    mu = (probs * logprobs).sum(-1)
    var = (probs * logprobs.square()).sum(-1) - mu.square()
    correct = logits.argmax(-1) == targets
    return {"logprob": tok, "mean": mu, "std": var.clamp_min(0).sqrt(), "correct": correct & valid,
            "mask": valid}


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 48,
                   batch_size: int = 32) -> list[str]:
    """Greedy answers to ``questions`` (prompt format of :func:`format_prompt`), decoded and stripped."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            enc = [bos + tokenizer(format_prompt(q), add_special_tokens=False)["input_ids"] for q in chunk]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):  # left padding for generation
                ids[i, width - len(e):] = torch.tensor(e)
                mask[i, width - len(e):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1)
            for row in gen[:, width:].tolist():
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out
