"""Question-answer records and the one way soulkit turns them into tokens and scores them.

Everything in :mod:`soulkit.unlearn` (training, evaluation, objectives) formats a QA pair the same
way, so that "the probability of the answer given the question" means one thing everywhere::

    <bos>Question: {question}\\nAnswer: {answer}<eos>

Only the answer tokens (and the end-of-sequence token) carry labels; the prompt is context.

    from soulkit.unlearn.qa import QADataset, answer_logprobs, pad_token_id, qa_batches, read_jsonl
    records = read_jsonl("forget.jsonl")                          # TOFU's JSON-lines format
    ds = QADataset(records, tokenizer)
    for batch in qa_batches(ds, 4, pad_id=pad_token_id(tokenizer)):
        total_logprob, n_tokens = answer_logprobs(model, batch)  # [B], [B]

QA records are read and written as JSON lines in TOFU's field names (``question``, ``answer``,
``paraphrased_answer``, ``perturbed_answer``) by :func:`read_jsonl` / :func:`write_jsonl`; TOFU's own
files (e.g. ``forget10_perturbed.json``) load as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._io import atomic_write_text
from ..optim.lm_targets import causal_lm_targets

__all__ = [
    "QA",
    "PROMPT_TEMPLATE",
    "format_prompt",
    "pad_token_id",
    "encode_qa",
    "QADataset",
    "collate_qa",
    "SHARE_KEY",
    "BatchShare",
    "shard_batch",
    "mean_denominator",
    "batched",
    "qa_batches",
    "read_jsonl",
    "write_jsonl",
    "answer_logits",
    "answer_logprobs",
    "answer_token_stats",
    "answer_gradient_norms",
    "context_limit",
    "generation_budget",
    "greedy_answers",
]

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100
_QA_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "author", "attribute")
T = TypeVar("T")


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

    def to_dict(self, *, extra: bool = True) -> dict[str, Any]:
        """The JSON object of one record in TOFU's field names; unset optional fields are left out and
        ``extra`` entries become top-level fields (``extra=False``: left out)."""
        d: dict[str, Any] = {"question": self.question, "answer": self.answer}
        if self.paraphrased_answer is not None:
            d["paraphrased_answer"] = self.paraphrased_answer
        if self.perturbed_answer:
            d["perturbed_answer"] = list(self.perturbed_answer)
        if self.author is not None:
            d["author"] = self.author
        if self.attribute is not None:
            d["attribute"] = self.attribute
        if extra:
            clash = sorted(set(self.extra) & set(_QA_FIELDS))
            if clash:
                raise ValueError(f"QA.extra may not use the reserved field names {clash} "
                                 f"(question: {self.question!r})")
            d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, obj: Any, *, where: str = "QA record") -> QA:
        """The record of a JSON object (:meth:`to_dict`'s inverse); ``perturbed_answer`` may be one
        string or a list. Malformed objects raise ``ValueError`` starting with ``where``."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("question", "answer"):
            if key not in obj:
                raise ValueError(f"{where}: missing field {key!r}")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {obj[key]!r}")
        for key in ("paraphrased_answer", "author", "attribute"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string or null, "
                                 f"got {type(obj[key]).__name__}")
        perturbed = obj.get("perturbed_answer")
        if perturbed is None:
            perturbed = ()
        elif isinstance(perturbed, str):
            perturbed = (perturbed,)
        elif isinstance(perturbed, list) and all(isinstance(p, str) for p in perturbed):
            perturbed = tuple(perturbed)
        else:
            raise ValueError(f"{where}: field 'perturbed_answer' must be a string or a list of strings, "
                             f"got {perturbed!r}"[:300])
        extra = {k: v for k, v in obj.items() if k not in _QA_FIELDS}
        return cls(obj["question"], obj["answer"], obj.get("paraphrased_answer"), perturbed, obj.get("author"),
                   obj.get("attribute"), extra)


# --------------------------------------------------------------------------------------------- JSONL
def write_jsonl(path: str | os.PathLike, records: Iterable[QA]) -> None:
    """Write QA records as JSON lines (:meth:`QA.to_dict`), atomically (temp file, then rename)."""
    lines = []
    for r in records:
        if not isinstance(r, QA):
            raise TypeError(f"write_jsonl writes QA records, got {type(r).__name__}")
        lines.append(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


def read_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> list[QA]:
    """QA records from a JSON-lines file (TOFU's format; a JSON array file is accepted too).

    Each line is an object with ``question`` and ``answer`` (non-empty strings), optionally
    ``paraphrased_answer`` and ``perturbed_answer`` (a list of strings or one string); ``author`` and
    ``attribute`` fill the QA fields, other fields go to ``QA.extra``. Blank lines are skipped.
    Malformed input raises ValueError naming the file and the 1-based line number; a file without
    records raises unless ``allow_empty``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records: list[QA] = []
    data = None
    if text.lstrip().startswith("["):  # maybe a JSON array file (e.g. a dataset written with json.dump)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: read it as JSON lines, which names the bad line
    if isinstance(data, list):
        for i, obj in enumerate(data, 1):
            records.append(QA.from_dict(obj, where=f"{path}, record {i}"))
    else:
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in strings
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
                                 ) from None
            try:
                records.append(QA.from_dict(obj, where=f"{path}, line {lineno}"))
            except ValueError as e:
                msg = str(e)
                raise ValueError(msg if msg.startswith(str(path)) else f"{path}, line {lineno}: {msg}"
                                 ) from None
    if not records and not allow_empty:
        raise ValueError(f"{path}: empty file, no QA records")
    return records


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


#: The key under which a rank's share of a global batch (:func:`shard_batch`) records what it is a share of.
SHARE_KEY = "share"


@dataclass(frozen=True)
class BatchShare:
    """What a data-parallel rank's batch is a share of: a global batch of ``rows`` sequences with
    ``answer_tokens`` answer tokens (shifted targets that are not ``-100``), split over ``world`` ranks.

    A mean over a share is its *sum* divided by ``global count / world`` (:meth:`denominator`), not by
    its own count, so that the ranks' losses, averaged as DDP/FSDP average gradients, are the loss of
    the global batch exactly, however unevenly its answer tokens fall to the ranks.
    """

    rows: int
    answer_tokens: int
    world: int

    def denominator(self, kind: str) -> float:
        """``rows / world`` (``kind="rows"``) or ``answer_tokens / world`` (``"answer_tokens"``)."""
        if kind not in ("rows", "answer_tokens"):
            raise ValueError(f"kind must be 'rows' or 'answer_tokens', got {kind!r}")
        return getattr(self, kind) / self.world


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s rows (``rank::world``, as ``DistributedSampler`` deals them) of a
    :func:`collate_qa` batch, with a :class:`BatchShare` under :data:`SHARE_KEY`.

    Every rank builds the same global batch (same padding width) and takes its rows, so a row is
    tokenised and padded exactly as in a single-process run. ``world`` must divide the batch's rows.
    """
    rows = batch["input_ids"].shape[0]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) and world >= 1, got rank {rank}, world {world}")
    if rows % world:
        raise ValueError(f"a batch of {rows} rows cannot be split evenly over {world} ranks")
    answer_tokens = int((causal_lm_targets(batch["labels"], drop_last=True) != IGNORE_INDEX).sum())
    share = {k: v[rank::world] for k, v in batch.items() if k != SHARE_KEY}
    share[SHARE_KEY] = BatchShare(rows=rows, answer_tokens=answer_tokens, world=world)
    return share


def mean_denominator(batch: Any, kind: str, local: torch.Tensor | float) -> torch.Tensor | float:
    """What a mean over ``batch``'s ``kind`` ("rows" or "answer_tokens") divides by: ``local`` (the
    batch's own count) for a whole batch, :meth:`BatchShare.denominator` for a rank's share."""
    share = batch.get(SHARE_KEY) if isinstance(batch, Mapping) else None
    return local if share is None else share.denominator(kind)


def batched(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of ``batch_size`` elements (the last one may be shorter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def qa_batches(dataset: QADataset, batch_size: int, *, pad_id: int,
               order: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`collate_qa` batches of ``dataset`` items taken in ``order`` (default: dataset order),
    ``batch_size`` items each (the last batch may be smaller)."""
    indices = range(len(dataset)) if order is None else order
    for idx in batched(indices, batch_size):
        yield collate_qa([dataset[i] for i in idx], pad_id=pad_id)


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted float32 (float64 for a float64 model) logits ``[B, T-1, V]``, their targets ``[B, T-1]`` and the answer-token mask.

    Position ``t`` of the logits predicts token ``t + 1`` (:func:`soulkit.optim.lm_targets.causal_lm_targets`
    with ``drop_last=True``); the last position, which has no target, is dropped.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # float64 stays float64
    targets = causal_lm_targets(labels, drop_last=True)
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


def _text_mask(valid: torch.Tensor, targets: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """``valid`` without each row's last answer position where that target is ``eos_token_id``."""
    if eos_token_id is None:
        return valid
    last = valid & (valid.long().cumsum(1) == valid.long().sum(1, keepdim=True))
    return valid & ~(last & (targets == eos_token_id))


@torch.no_grad()
def answer_token_stats(model, batch: dict[str, torch.Tensor], *, eos_token_id: int | None = None
                       ) -> dict[str, torch.Tensor]:
    """Per-token statistics of the answer tokens, for membership inference and extraction.

    Returns ``[B, T-1]`` tensors aligned with the shifted targets: ``logprob`` (log p of the target
    token), ``mean`` and ``std`` of log p under the model's own next-token distribution (Min-K%++),
    ``correct`` (argmax equals the target), the bool ``mask`` of answer positions (answer tokens and the
    final eos), and ``text_mask``: ``mask`` without the final prediction of ``eos_token_id`` (the
    answer's text tokens; equal to ``mask`` when ``eos_token_id`` is ``None``).
    """
    logits, targets, valid = answer_logits(model, batch)
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    tok = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    mu = (probs * logprobs).sum(-1)
    var = (probs * logprobs.square()).sum(-1) - mu.square()
    correct = logits.argmax(-1) == targets
    return {"logprob": tok, "mean": mu, "std": var.clamp_min(0).sqrt(), "correct": correct & valid,
            "mask": valid, "text_mask": _text_mask(valid, targets, eos_token_id)}


def answer_gradient_norms(model, batch: dict[str, torch.Tensor], *, p: float = 2.0,
                          eos_token_id: int | None = None) -> torch.Tensor:
    """Per sequence, the p-norm of the gradient of its mean answer NLL with respect to each parameter
    tensor: ``[B, P]`` float64 (the GradNorm attack's input, :func:`soulkit.unlearn.metrics.mia_gradnorm_score`).

    One forward and backward pass per sequence (the batch's right padding cut off), over the answer's
    text tokens (the final prediction of ``eos_token_id`` left out, as open-unlearning). ``P`` counts
    the parameters that require grad and receive a gradient. Gradients come from ``torch.autograd.grad``:
    no ``.grad`` is written, the model is not changed. ``p``: 1, 2 or ``inf``.
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"the GradNorm norm p must be 1, 2 or inf, got {p!r}")
    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise ValueError("the GradNorm attack needs parameters that require grad; every parameter of this "
                         "model is frozen (requires_grad=False)")
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = []
    with torch.enable_grad():
        for i, n in enumerate(lengths):
            one = {k: v[i:i + 1, :int(n)] for k, v in batch.items()}
            logits, targets, valid = answer_logits(model, one)
            mask = _text_mask(valid, targets, eos_token_id)
            logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
            loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norms = [torch.linalg.vector_norm(g.detach(), ord=p, dtype=torch.float64) for g in grads
                     if g is not None]
            rows.append(torch.stack(norms).cpu())
    return torch.stack(rows)


def context_limit(model) -> int | None:
    """The model's context length in tokens (``max_position_embeddings`` / ``n_positions`` of its
    config), or ``None`` when the config names none."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _prompt_ids(tokenizer, question: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(format_prompt(question), add_special_tokens=False)["input_ids"]


def generation_budget(model, tokenizer, questions: Sequence[str], max_new_tokens: int) -> int:
    """The new tokens :func:`greedy_answers` generates at most for ``questions``: ``max_new_tokens``, cut
    so that the longest prompt plus the generation fits the model's context (:func:`context_limit`);
    the same for every question whatever the batching. Raises when a prompt alone fills the context."""
    limit = context_limit(model)
    if limit is None or not questions:
        return max_new_tokens
    longest = max(len(_prompt_ids(tokenizer, q)) for q in questions)
    if longest >= limit:
        raise ValueError(f"a prompt of {longest} tokens fills the model's context of {limit} positions; "
                         "nothing can be generated")
    return min(max_new_tokens, limit - longest)


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 48,
                   batch_size: int = 32) -> list[str]:
    """Greedy answers to ``questions`` (prompt format of :func:`format_prompt`), decoded and stripped:
    at most ``max_new_tokens`` new tokens, fewer where the model's context would overflow
    (:func:`generation_budget`); each answer is cut at its first eos."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    max_new_tokens = generation_budget(model, tokenizer, list(questions), max_new_tokens)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for chunk in batched(questions, batch_size):
            enc = [_prompt_ids(tokenizer, q) for q in chunk]
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
