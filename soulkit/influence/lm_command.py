"""The work behind ``soulkit influence``: influence of JSONL training examples on JSONL queries for a local
``save_pretrained`` causal LM, written as ``scores.safetensors``, ``topk.jsonl``, ``report.md`` and ``run.json``.

Each record is one sequence whose loss is the next-token cross-entropy *summed* over its scored tokens:
every token of ``text`` (``text_field``), or, for a record with ``prompt_field`` and ``completion_field``,
only the completion's tokens (the prompt's labels are ``-100``). The prompt is tokenized with the
tokenizer's special tokens, the completion without, and the two id lists are concatenated. Batches are
right-padded dicts ``{input_ids, attention_mask, labels}`` (padding labelled ``-100``) in file order, and
the analyzer is :class:`~soulkit.influence.InfluenceAnalyzer` on the factored route (``ekfac``, ``kfac``,
or ``identity`` over the same tracked modules), so ``scores[i, j] ~ loss_i(theta without j) - loss_i(theta)``.

Factors and chunks of scores are kept in ``OUT/store`` (:mod:`.store`): the same command after an interruption
resumes there; under ``torchrun`` the ranks split fitting and scoring and rank 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._io import to_json
from ..optim.lm_targets import causal_lm_targets
from .analyzer import InfluenceAnalyzer
from .gradients import OutputLoss
from .modules import tracked_modules
from .store import InfluenceStore, Sharding

__all__ = ["LM_SOLVERS", "OUTPUT_FILES", "STORE_DIR", "Record", "check_model_dir", "encode_records", "lm_loss", "pad_collate",
           "read_records", "run_influence"]

LM_SOLVERS = ("ekfac", "kfac", "identity")
OUTPUT_FILES = ("scores.safetensors", "topk.jsonl", "report.md", "run.json")
#: where in ``--out`` the factors and chunks of scores are kept (a rerun resumes from it)
STORE_DIR = "store"


@dataclass
class Record:
    """One JSONL record: the text shown in reports, and ``(prompt, completion)`` when only the completion is scored."""

    line: int
    text: str
    prompt: str | None = None
    completion: str | None = None


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def _sequence_loss(logits: Tensor, batch) -> Tensor:
    targets = causal_lm_targets(batch["labels"], drop_last=True)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100).sum(1)


def lm_loss() -> OutputLoss:
    """The per-sequence loss: next-token cross-entropy summed over the tokens whose label is not ``-100``."""
    return OutputLoss(_logits, _sequence_loss)


def read_records(path: Path, *, text_field: str, prompt_field: str | None, completion_field: str | None,
                 require_pair: bool) -> list[Record]:
    """The records of a JSONL file. With ``prompt_field``/``completion_field``, a record holding both is
    scored on its completion; otherwise (or always when ``require_pair`` is False and it lacks them) it
    needs ``text_field``. ``require_pair``: every record must hold the pair (queries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    pair = prompt_field is not None
    records: list[Record] = []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            if pair and prompt_field in obj and completion_field in obj:
                p, c = obj[prompt_field], obj[completion_field]
                for name, v in ((prompt_field, p), (completion_field, c)):
                    if not isinstance(v, str):
                        raise ValueError(f"{path} line {n}: field {name!r} must be a string, got {type(v).__name__}")
                records.append(Record(n, p + c, p, c))
                continue
            if pair and require_pair:
                missing = [k for k in (prompt_field, completion_field) if k not in obj]
                raise ValueError(f"{path} line {n}: no field {missing[0]!r} (fields: {', '.join(obj) or 'none'}); "
                                 "set --prompt-field/--completion-field")
            if text_field not in obj:
                want = (f"fields {prompt_field!r}+{completion_field!r} or {text_field!r}" if pair
                        else f"field {text_field!r}")
                raise ValueError(f"{path} line {n}: no {want} (fields: {', '.join(obj) or 'none'}); set --text-field"
                                 + (" or --prompt-field/--completion-field" if not pair else ""))
            t = obj[text_field]
            if not isinstance(t, str):
                raise ValueError(f"{path} line {n}: field {text_field!r} must be a string, got {type(t).__name__}")
            records.append(Record(n, t))
    if not records:
        raise ValueError(f"{path} holds no records (an empty JSONL file)")
    return records


def encode_records(records: Sequence[Record], tokenizer, *, path: Path, max_length: int | None,
                   vocab_size: int) -> list[dict[str, Tensor]]:
    """``{input_ids, labels}`` per record (prompt labels ``-100``), truncated on the right to ``max_length``."""
    out = []
    for r in records:
        if r.prompt is None:
            ids = list(tokenizer(r.text)["input_ids"])
            labels = list(ids)
        else:
            p = list(tokenizer(r.prompt)["input_ids"])
            c = list(tokenizer(r.completion, add_special_tokens=False)["input_ids"])
            ids, labels = p + c, [-100] * len(p) + c
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if sum(1 for x in labels[1:] if x != -100) == 0:
            what = "no completion token after the first position" if r.prompt is not None else "fewer than two tokens"
            raise ValueError(f"{path} line {r.line}: nothing to score ({what}"
                             + (f" within {max_length} tokens" if max_length is not None else "") + ")")
        bad = [x for x in ids if not 0 <= x < vocab_size]
        if bad:
            raise ValueError(f"{path} line {r.line}: token id {bad[0]} is outside the model's vocabulary of "
                             f"{vocab_size}: the tokenizer does not match the model")
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)})
    return out


def pad_collate(pad_id: int):
    """A collate function: right-pad ``input_ids`` with ``pad_id`` (mask 0, label ``-100``)."""

    def collate(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def check_model_dir(model_dir: Path) -> None:
    """A ``save_pretrained`` directory: ``config.json`` and safetensors weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} holds no config.json; pass a save_pretrained directory")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"model directory {model_dir} holds no .safetensors weights; save the model with "
                                "save_pretrained(..., safe_serialization=True)")


def _position_limit(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def run_influence(model_dir: Path, train_path: Path, queries_path: Path, out: Path, *, options: dict,
                  solver: str = "ekfac", per_token: bool = False, top_k: int = 5, top_tokens: int = 5,
                  text_field: str = "text", prompt_field: str | None = None, completion_field: str | None = None,
                  max_length: int | None = None, batch_size: int = 8, damping: float = 0.0,
                  progress: bool | None = None, overwrite: bool = False, chunk_batches: int = 16,
                  projection: int | None = None, store: Path | None = None,
                  ) -> dict[str, Any]:
    """Score, then write the four output files into ``out`` (each replaced only once all are ready).

    The factors and chunks of scores go to the store ``out/store`` (:class:`~soulkit.influence.InfluenceStore`,
    ``chunk_batches`` training batches per chunk) as they are computed, so that the same call after an
    interruption resumes; a store made for another model, data or options is refused unless ``overwrite``,
    which starts it over. ``store``: a store directory of the caller's instead (never cleared: a mismatch is an
    error). ``projection``: LoGra-style projected gradients, every training example's kept in the store, so
    that a later call with other queries against the same store skips the training pass (the scores
    themselves are then recomputed, not stored). Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks join a gloo
    process group and split the work; rank 0 writes the outputs. ``options`` is written to ``run.json``. Returns a summary (sizes,
    seconds, paths, whether the store was resumed).
    """
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if solver not in LM_SOLVERS:
        raise ValueError(f"--solver must be one of {', '.join(LM_SOLVERS)}, got {solver!r}")
    check_model_dir(model_dir)
    kw = dict(text_field=text_field, prompt_field=prompt_field, completion_field=completion_field)
    train_records = read_records(train_path, require_pair=False, **kw)
    query_records = read_records(queries_path, require_pair=prompt_field is not None, **kw)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"could not load a tokenizer from {model_dir} (save it there with save_pretrained): "
                         f"{e}") from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if progress is False and bars:
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    limit = _position_limit(model)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the model's {limit} positions")
    length = max_length if max_length is not None else limit
    vocab = model.get_input_embeddings().num_embeddings
    train = encode_records(train_records, tokenizer, path=train_path, max_length=length, vocab_size=vocab)
    queries = encode_records(query_records, tokenizer, path=queries_path, max_length=length, vocab_size=vocab)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = pad_collate(pad)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=False, collate_fn=collate)
    query_loader = DataLoader(queries, batch_size=batch_size, shuffle=False, collate_fn=collate)

    modules = [t.name for t in tracked_modules(model)] if solver == "identity" else None
    t0 = time.perf_counter()
    an = InfluenceAnalyzer(model, lm_loss(), solver=solver, modules=modules, l2=0.0, damping=damping,
                           batch_size=batch_size, progress=progress, projection=projection)
    own_store = store is None
    store = InfluenceStore(Path(out) / STORE_DIR if own_store else store, chunk_batches=chunk_batches)
    with _process_group():
        sharding = Sharding.current()
        if overwrite and own_store:
            store.clear(sharding)
        resumed = (store.directory / "store.json").is_file()
        an.fit(train_loader, store=store)
        if projection is not None and not per_token:
            an.train_statistics(train_loader, store=store)
        if per_token:
            tok_scores = an.scores(train_loader, query_loader, per_token=True, store=store).float()
            scores = tok_scores.sum(-1)
        else:
            tok_scores, scores = None, an.scores(train_loader, query_loader, store=store).float()
    seconds = time.perf_counter() - t0
    summary = {"n_train": len(train), "n_queries": len(queries), "seconds": seconds, "resumed": resumed,
               "rank": sharding.rank, "world": sharding.world, "paths": [str(out / name) for name in OUTPUT_FILES]}
    if sharding.rank != 0:
        return summary

    k = min(top_k, len(train))
    lines, table = [], []
    for i, q in enumerate(query_records):
        row = scores[i]
        entry: dict[str, Any] = {"query": i, "text": q.text}
        if q.prompt is not None:
            entry.update(prompt=q.prompt, completion=q.completion)
        for side, descending in (("positive", True), ("negative", False)):
            order = torch.argsort(row, descending=descending, stable=True)[:k].tolist()
            listed = []
            for j in order:
                ex: dict[str, Any] = {"index": j, "score": float(row[j]), "text": train_records[j].text}
                if tok_scores is not None:
                    ids = train[j]["input_ids"]
                    ts = tok_scores[i, j, : len(ids)]
                    pick = torch.argsort(ts, descending=descending, stable=True)[: min(top_tokens, len(ids))]
                    ex["tokens"] = [{"position": int(t), "token": tokenizer.decode([int(ids[t])]),
                                     "score": float(ts[t])} for t in pick]
                listed.append(ex)
            entry[side] = listed
        lines.append(json.dumps(entry, ensure_ascii=False))
        table.append(entry)

    n_params = sum(p.numel() for p in model.parameters())
    tracked = [t.name for t in tracked_modules(model)]
    report = [
        "# soulkit influence", "",
        f"- model: `{model_dir}` ({type(model).__name__}, {n_params:,} parameters, {len(tracked)} tracked modules)",
        f"- solver: {solver}, damping: {damping:g}" + (" (0: 0.1x each module's mean eigenvalue)"
                                                        if damping == 0 and solver != "identity" else "")
        + (f"; gradients projected to {projection} x {projection} per module (LoGra)" if projection else ""),
        f"- training examples: {len(train)} from `{train_path}`; queries: {len(queries)} from `{queries_path}`",
        "- loss: next-token cross-entropy summed over "
        + (f"the completion of records with `{prompt_field}` + `{completion_field}` (prompt masked), else "
           f"`{text_field}`" if prompt_field is not None else f"`{text_field}`")
        + f"; max length {length}; batch size {batch_size}; per-token: {'yes' if per_token else 'no'}",
        f"- fit + scores: {seconds:.1f} s" + (f" on {sharding.world} processes" if sharding.world > 1 else "")
        + (f" (resumed from `{store.directory}`)" if resumed else f"; factors and scores kept in `{store.directory}`"),
        "",
        "`scores[i, j]` predicts `loss_i(without j) - loss_i`: positive means training example j helps query i.",
        "",
    ]
    for e in table:
        report += [f"## Query {e['query']}: {_clip(e['text']).replace('|', '/')}", "",
                   "| side | train index | score | text |", "|---|---:|---:|---|"]
        for side in ("positive", "negative"):
            for ex in e[side]:
                report.append(f"| {side} | {ex['index']} | {ex['score']:.4g} | {_clip(ex['text']).replace('|', '/')} |")
        report.append("")

    tensors = {"scores": scores.contiguous()}
    if tok_scores is not None:
        tensors["per_token"] = tok_scores.contiguous()
    meta = {"solver": solver, "n_train": str(len(train)), "n_queries": str(len(queries)), "model_dir": str(model_dir)}
    _write_outputs(out, {
        "scores.safetensors": lambda p: save_file(tensors, str(p), metadata=meta),
        "topk.jsonl": lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"),
        "report.md": lambda p: p.write_text("\n".join(report), encoding="utf-8"),
        "run.json": lambda p: p.write_text(to_json(options) + "\n", encoding="utf-8"),
    })
    return summary


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join the default process group for the run,
    with gloo (the command runs on the CPU), unless the caller has already; otherwise nothing."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _write_outputs(out: Path, writers: dict) -> None:
    """Write every file into a temporary directory beside ``out`` (fsynced), then move them into ``out``
    (``run.json`` last): a failure while writing leaves ``out`` as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, write in writers.items():
            write(tmp / name)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o644)
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(writers, key=lambda n: n == "run.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
