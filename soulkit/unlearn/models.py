"""Tiny causal LMs for the fictitious-author benchmark: tokenizer, model, and the train/retrain recipe.

    tok = train_tokenizer(texts, vocab_size=2048)                 # byte-level BPE, trained offline
    model = build_model(ModelConfig(arch="llama"), tok)           # transformers LlamaForCausalLM

The benchmark's models come from :class:`ModelZoo`, which trains them once and caches them on disk::

    zoo = ModelZoo(generate_benchmark(40), TrainRecipe())
    finetuned_dir = zoo.finetuned()            # pretrain (world knowledge) -> fine-tune on all authors
    retrain_dir = zoo.retrained("forget10", seed=1)   # same recipe without the forget authors
    model, tokenizer = load_model(finetuned_dir)

Stages (TOFU's recipe, shrunk): a *base* model learns the world knowledge (real authors, world facts)
from scratch; *finetuned* continues from it on every fictitious author's QA (the world knowledge is
replayed alongside, as a large pretrained model would keep it) until greedy answers on the forget10
authors reach ROUGE-L recall ``target_rouge``; a *retrain* continues from the same base on the retain
split only, for the same number of epochs, with its own data-order seed. Each model directory is a
``save_pretrained`` directory (safetensors) with its tokenizer and a ``soulkit_model.json`` that
records the stage, recipe, data fingerprint, epochs and wall time. Directories are keyed by a hash of
data and recipe, written under a temporary name and renamed when complete (an existing model
directory is never overwritten); training checkpoints every epoch and resumes after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._causal_lm import ModelConfig, build_model
from .._io import atomic_write_json
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .qa import QA, QADataset, pad_token_id, qa_batches

__all__ = [
    "ModelConfig",
    "TrainRecipe",
    "ModelZoo",
    "train_tokenizer",
    "build_model",
    "train_qa",
    "load_model",
    "save_model",
    "default_cache_dir",
    "SPECIAL_TOKENS",
]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 2048, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts`` with the ``tokenizers`` library (no download).

    Returned as a transformers fast tokenizer with ``<pad>``, ``<s>`` (bos) and ``</s>`` (eos), so it
    saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any other.
    Byte-level: every string is encodable, nothing maps to an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + specials + merges), got {vocab_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


# ------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainRecipe:
    """How the benchmark's models are trained (every field enters the cache key).

    ``finetune_max_epochs`` caps the fine-tune, which stops early at the first check (every
    ``check_every`` epochs) where the forget10 authors' greedy answers reach ROUGE-L recall
    ``target_rouge`` (on up to ``check_examples`` of their questions); retrains use the epoch count
    the fine-tune needed. AdamW (betas 0.9/0.95) with linear warmup then constant lr.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    vocab_size: int = 2048
    pretrain_epochs: int = 30
    finetune_max_epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    batch_size: int = 32
    grad_clip: float = 1.0
    target_rouge: float = 0.95
    check_every: int = 5
    check_examples: int = 100
    replay_world_knowledge: bool = True
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig(**self.model))
        positive = ("vocab_size", "finetune_max_epochs", "batch_size", "check_every", "check_examples",
                    "max_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainRecipe.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_epochs", "warmup_steps", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ValueError(f"TrainRecipe.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainRecipe.lr must be > 0, got {self.lr}")
        if not 0.0 < self.target_rouge <= 1.0:
            raise ValueError(f"TrainRecipe.target_rouge must be in (0, 1], got {self.target_rouge}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_qa(model, tokenizer, records: Sequence[QA], *, epochs: int, recipe: TrainRecipe, seed: int,
             checkpoint_dir: str | os.PathLike | None = None,
             stop_check: Callable[[Any, int], bool] | None = None, check_every: int = 1,
             progress: bool | None = None, desc: str = "train") -> dict[str, Any]:
    """Train ``model`` in place on the answers of ``records`` (token-mean NLL of answer tokens).

    Data order is drawn from ``seed`` per epoch. With ``checkpoint_dir``, the model, optimizer and
    scheduler state are saved there after every epoch (:func:`~soulkit.unlearn.checkpoint.save_checkpoint`)
    and an interrupted run resumes from the last complete epoch with the same result.
    ``stop_check(model, epoch)`` is called every ``check_every`` epochs; training stops when it returns True. Returns a log dict with ``epochs``
    (epochs run), ``losses`` (mean loss per epoch) and ``stopped_early``.
    """
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    ds = QADataset(records, tokenizer, max_length=recipe.max_length)
    pad = pad_token_id(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps))
    log: dict[str, Any] = {"epochs": 0, "losses": [], "stopped_early": False}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and has_checkpoint(ckpt):
        states, info = load_checkpoint(ckpt, model)
        opt.load_state_dict(states["optimizer"])
        sched.load_state_dict(states["scheduler"])
        log = info["log"]
    model.train()
    device = next(model.parameters()).device
    bar = tqdm(total=epochs, initial=log["epochs"], desc=desc, unit="epoch", leave=False,
               disable=None if progress is None else not progress)
    try:
        while log["epochs"] < epochs and not log["stopped_early"]:
            epoch = log["epochs"]
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(len(ds), generator=g).tolist()
            total, n = 0.0, 0
            for batch in qa_batches(ds, recipe.batch_size, pad_id=pad, order=order):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: non-finite training loss at epoch {epoch}; "
                                             f"lower TrainRecipe.lr ({recipe.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                opt.step()
                sched.step()
                total += float(loss.detach())
                n += 1
            log["epochs"] = epoch + 1
            log["losses"].append(total / max(n, 1))
            bar.update(1)
            bar.set_postfix(loss=f"{log['losses'][-1]:.3f}")
            if stop_check is not None and (epoch + 1) % check_every == 0:
                model.eval()
                log["stopped_early"] = bool(stop_check(model, epoch + 1)) and epoch + 1 < epochs
                model.train()
            if ckpt is not None:
                save_checkpoint(ckpt, model, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                                {"log": log})
    finally:
        bar.close()
        model.eval()
    return log


# ---------------------------------------------------------------------------------------- model dirs
MODEL_META = "soulkit_model.json"


def save_model(model, tokenizer, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a ``save_pretrained`` directory (safetensors + tokenizer + ``soulkit_model.json``).

    Written under a temporary name beside ``directory`` and renamed when complete; an existing
    ``directory`` is never overwritten (FileExistsError).
    """
    final = Path(directory)
    if final.exists():
        raise FileExistsError(f"{final} already exists; soulkit never overwrites a model directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a tiny model
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MODEL_META, meta or {})
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return final


def load_model(directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a local ``save_pretrained`` directory (safetensors only, no pickle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a save_pretrained model directory (no config.json)")
    if not any(d.glob("*.safetensors")):
        raise FileNotFoundError(f"{d} holds no .safetensors weights; soulkit does not load pickled weights "
                                f"(convert with model.save_pretrained(..., safe_serialization=True))")
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(d)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise for tiny models
    try:
        model = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True).to(device).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{d}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                         f"{model.get_input_embeddings().weight.shape[0]}: tokenizer and model do not match")
    return model, tokenizer


def model_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``soulkit_model.json`` of a model directory (empty dict for foreign models)."""
    p = Path(directory) / MODEL_META
    return json.loads(p.read_text()) if p.is_file() else {}


def default_cache_dir() -> Path:
    """``$SOULKIT_CACHE`` or ``~/.cache/soulkit``."""
    return Path(os.environ.get("SOULKIT_CACHE") or Path.home() / ".cache" / "soulkit")


# ---------------------------------------------------------------------------------------------- zoo
_FORMAT = "soulkit-zoo-v1"
_ROUGE_SPLIT = "forget10"


def built_with() -> dict[str, Any]:
    """What a model trained here depends on besides its data, recipe and seed: the CPU model, its vector ISA
    and the versions of torch and the model stack. The cache key leaves these out (a cache is reused on
    the machine that built it); a model rebuilt where they differ need not equal the cached one, and this
    record, kept in each stage's metadata, tells why."""
    from .._env import cpu_model, library_versions

    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, **library_versions()}


class ModelZoo:
    """Builds the benchmark's models once and caches them under ``cache_dir/models/<key>/``.

    ``key`` hashes the benchmark's fingerprint and the recipe, so a changed recipe or dataset gets
    new models and never reuses stale ones. Every method returns a model directory path.
    """

    def __init__(self, benchmark, recipe: TrainRecipe | None = None, *, cache_dir: str | os.PathLike | None = None,
                 progress: bool | None = None):
        self.benchmark = benchmark
        self.recipe = recipe or TrainRecipe()
        blob = json.dumps({"format": _FORMAT, "data": benchmark.fingerprint(), "recipe": self.recipe.to_dict()},
                          sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.root = Path(cache_dir or default_cache_dir()) / "models" / self.key
        self.progress = progress
        self._tokenizer = None

    # -- tokenizer
    def _once(self, name: str, build: Callable[[Path], Path]) -> Path:
        """``root/name``, built by ``build(path)`` unless it exists. Processes sharing the cache build it
        once: a file lock serialises the builders, and one that waited finds the first one's result.
        Under the lock, temporary directories left by a killed builder are removed (its training
        checkpoint is kept and resumed)."""
        from filelock import FileLock

        d = self.root / name
        if d.is_dir():
            return d
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f".{name}.lock")):
            if d.is_dir():  # built by the process this one waited for
                return d
            for stale in self.root.glob(f".{name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            return build(d)

    def tokenizer(self):
        """The benchmark's tokenizer (trained on every text of the benchmark once, then loaded)."""
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self._once("tokenizer", self._build_tokenizer))
        return self._tokenizer

    def _build_tokenizer(self, d: Path) -> Path:
        tok = train_tokenizer(self._texts(), vocab_size=self.recipe.vocab_size)
        tmp = self.root / f".tokenizer.tmp-{os.getpid()}"
        try:
            tok.save_pretrained(tmp)
            os.rename(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return d

    def _texts(self) -> list[str]:
        from .qa import format_prompt

        b = self.benchmark
        texts = []
        for r in [*b.qa, *b.holdout, *b.pretrain_records()]:
            texts.append(format_prompt(r.question) + " " + r.answer)
            if r.paraphrased_answer:
                texts.append(r.paraphrased_answer)
            texts.extend(r.perturbed_answer)
        return texts

    # -- stages
    def base(self) -> Path:
        """The model that learned the world knowledge (real authors, world facts) from scratch."""
        return self._once("base", self._build_base)

    def _build_base(self, d: Path) -> Path:
        tok = self.tokenizer()
        model = build_model(self.recipe.model, tok, seed=self.recipe.seed)
        t0 = time.perf_counter()
        log = train_qa(model, tok, self.benchmark.pretrain_records(), epochs=self.recipe.pretrain_epochs,
                       recipe=self.recipe, seed=self.recipe.seed, checkpoint_dir=self._ckpt("base"),
                       progress=self.progress, desc="pretrain")
        return self._finish(model, tok, d, {"stage": "base", "train": log, "seconds": time.perf_counter() - t0})

    def finetuned(self) -> Path:
        """Base + every fictitious author, until the forget10 authors are memorised."""
        probe = self.benchmark.records(_ROUGE_SPLIT)[: self.recipe.check_examples]
        return self._once("finetuned", lambda d: self._continue(
            d, "finetuned", self.benchmark.qa, seed=self.recipe.seed, epochs=self.recipe.finetune_max_epochs,
            probe=probe))

    def retrained(self, split: str, seed: int = 1) -> Path:
        """Base + the retain authors of ``split`` (never the forget authors), ``seed`` = data order."""
        if seed == self.recipe.seed:
            raise ValueError(f"retrain seed {seed} equals the fine-tune's seed; use another (1, 2, ...)")
        forget, retain = self.benchmark.split(split)
        name = f"retrain-{split}-seed{seed}"

        def build(d: Path) -> Path:
            epochs = model_meta(self.finetuned())["train"]["epochs"]
            return self._continue(d, name, retain, seed=seed, epochs=epochs, probe=None,
                                  extra={"split": split, "n_forget": len(forget)})

        return self._once(name, build)

    def _continue(self, d: Path, stage: str, records: Sequence[QA], *, seed: int, epochs: int,
                  probe: Sequence[QA] | None, extra: dict | None = None) -> Path:
        model, tok = load_model(self.base())
        data = list(records) + (self.benchmark.pretrain_records() if self.recipe.replay_world_knowledge else [])
        checks: list[dict[str, float]] = []

        def stop(m, epoch: int) -> bool:
            rouge = _probe_rouge(m, tok, probe)
            checks.append({"epoch": epoch, "rouge": rouge})
            return rouge >= self.recipe.target_rouge

        t0 = time.perf_counter()
        log = train_qa(model, tok, data, epochs=epochs, recipe=self.recipe, seed=seed,
                       checkpoint_dir=self._ckpt(stage), stop_check=stop if probe else None,
                       check_every=self.recipe.check_every, progress=self.progress, desc=stage)
        meta = {"stage": stage, "train": log, "seconds": time.perf_counter() - t0, "seed": seed,
                "rouge_checks": checks, **(extra or {})}
        if probe and (not checks or checks[-1]["epoch"] != log["epochs"]):
            checks.append({"epoch": log["epochs"], "rouge": _probe_rouge(model, tok, probe)})
        return self._finish(model, tok, d, meta)

    def _ckpt(self, stage: str) -> Path:
        return self.root / f".{stage}.checkpoint"

    def _finish(self, model, tok, d: Path, meta: dict[str, Any]) -> Path:
        meta = {**meta, "recipe": self.recipe.to_dict(), "data_fingerprint": self.benchmark.fingerprint(),
                "zoo_key": self.key, "built_with": built_with()}
        save_model(model, tok, d, meta)
        shutil.rmtree(self._ckpt(meta["stage"]), ignore_errors=True)
        return d


def _probe_rouge(model, tokenizer, records: Sequence[QA]) -> float:
    from .metrics import rouge_l_recall
    from .qa import greedy_answers

    answers = greedy_answers(model, tokenizer, [r.question for r in records])
    return float(rouge_l_recall(answers, [r.answer for r in records]).mean())
