"""AdamW vs Sophia on a byte-level causal LM trained on real text (the CPython standard library).

The data is the interpreter's own standard library: every ``.py`` file under
``sysconfig.get_paths()["stdlib"]`` (``site-packages``/``dist-packages`` left out), listed in sorted
order, then put in a fixed pseudo-random order by the SHA-1 of each relative path (so a byte cap
takes files from all over the library, not only its first directories). Each file goes to the
validation split when the SHA-1 of ``"val:" + relative path``, read as a number, falls in the first
``val_fraction`` of the range; files are read in that order until the training split holds
``(1 - val_fraction) * max_bytes`` bytes and the validation split the rest (the last file of each is
cut). No network, no randomness. ``data_path`` points at a local file or directory instead.

The model is a small ``LlamaForCausalLM`` (or ``GPT2LMHeadModel``) over the 256 byte values, built
from scratch under a seed. Every optimizer ("arm") trains its own copy of the *same* initial weights
on the *same* batches, in lockstep: each step runs every arm once, alternating which arm goes
first, so machine noise hits all arms alike and their step times are measured in the same run.
Validation loss is computed every ``eval_every`` steps on fixed validation windows.

Defaults (``hidden_size=192``, 4 layers, 4 heads, ``seq_len=128``, batch 16 = 2,048 tokens per step,
1.87 M parameters, 250 steps; AdamW lr 1e-3, Sophia lr 5e-4 with rho 0.04) come from sweeps on
2 CPU cores (see the module constants below); the default demo takes under 3 minutes on an idle
2-core Xeon (~0.25 s per step and optimizer with 2 threads; ``soulkit train --threads 1`` is the
better choice when other jobs share the cores).

Library use::

    from soulkit.demos.train_lm import TrainConfig, train_lm
    result = train_lm(TrainConfig(steps=300), out_dir="runs/lm")
    print(result.table)
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import math
import os
import statistics
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import atomic_write_bytes, atomic_write_text, to_json

__all__ = [
    "TrainConfig",
    "OptimizerSpec",
    "ArmResult",
    "TrainResult",
    "load_text_bytes",
    "build_model",
    "make_optimizer",
    "train_arms",
    "train_lm",
    "summarize",
    "steps_to_reach",
    "median_window_time",
    "to_json",
    "plot_curves",
    "format_table",
    "write_outputs",
    "atomic_write_bytes",
    "atomic_write_text",
    "DEFAULT_ADAMW_LR",
    "DEFAULT_SOPHIA_LR",
    "DEFAULT_SOPHIA_RHO",
]

# Defaults chosen by two sweeps on the default model and data (1.87 M-parameter Llama, 250 steps,
# seed 0, all arms in lockstep from one init; final validation loss in nats/byte; 2-core Xeon):
#   AdamW  lr 2.5e-4 / 5e-4 / 1e-3:                  2.355 / 2.058 / 2.056
#          lr 1e-3 / 2e-3 / 4e-3 / 8e-3 (first sweep): 2.084 / 2.157 / 2.278 / 2.560
#   Sophia rho 0.04, lr 1e-4 / 2.5e-4 / 5e-4:         2.910 / 2.648 / 2.598   (win rate ~0.02-0.04)
#          rho 0.2,  lr 2.5e-4 / 5e-4:                2.634 / 2.709           (win rate ~0.06-0.12)
#          rho 1.0,  lr 5e-4 / 1e-3:                  2.614 / 2.647           (win rate ~0.2-0.35)
#          rho 0.04, lr 1e-3 / 2e-3 / 4e-3 / 8e-3 (first sweep): 2.710 / 2.760 / 2.867 / 2.987
#          (first sweep, lr 2e-3: rho 0.01 / 0.2 -> 2.788 / 2.788)
# Sophia's loss hardly depends on rho here (h is an EMA with beta2 = 0.99 refreshed every 10 steps
# and not bias-corrected, so in a few hundred steps it stays well below its steady value and most
# coordinates are clipped: the update is close to sign-momentum). At this size and batch (2,048
# tokens per step) Sophia trails AdamW clearly; benchmarks/optimizers.py measures it with both tuned.
DEFAULT_ADAMW_LR = 1e-3
DEFAULT_SOPHIA_LR = 5e-4
DEFAULT_SOPHIA_RHO = 0.04

OPTIMIZER_KINDS = ("adamw", "sophia")
MODEL_KINDS = ("llama", "gpt2")
_EXCLUDED_DIRS = ("site-packages", "dist-packages")


# ---------------------------------------------------------------------------------------------- config
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


@dataclass(frozen=True)
class OptimizerSpec:
    """One arm: an optimizer kind and its hyperparameters. ``label`` names it in tables and plots."""

    kind: str
    lr: float
    label: str = ""
    rho: float = DEFAULT_SOPHIA_RHO  # Sophia only
    betas: tuple[float, float] | None = None  # None: (0.9, 0.95) for AdamW, (0.965, 0.99) for Sophia
    weight_decay: float = 0.1
    hessian_update_interval: int = 10  # Sophia only
    hessian_bias_correction: bool = False  # Sophia only: h / (1 - beta2**n)

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZER_KINDS:
            raise ValueError(f"OptimizerSpec.kind must be one of {OPTIMIZER_KINDS}, got {self.kind!r}")
        if not _is_num(self.lr) or not self.lr > 0:
            raise ValueError(f"OptimizerSpec.lr must be a finite number > 0, got {self.lr!r}")
        if not _is_num(self.rho) or not self.rho > 0:
            raise ValueError(f"OptimizerSpec.rho must be a finite number > 0, got {self.rho!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"OptimizerSpec.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.betas is not None:
            if len(self.betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in self.betas):
                raise ValueError(f"OptimizerSpec.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not _is_int(self.hessian_update_interval) or self.hessian_update_interval < 1:
            raise ValueError(
                f"OptimizerSpec.hessian_update_interval must be an int >= 1, got {self.hessian_update_interval!r}"
            )
        if not self.label:
            object.__setattr__(self, "label", self.kind)

    @property
    def resolved_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return (float(self.betas[0]), float(self.betas[1]))
        return (0.9, 0.95) if self.kind == "adamw" else (0.965, 0.99)


@dataclass
class TrainConfig:
    """Everything a training run depends on. Validated on construction (``ValueError`` naming the field).

    Seeds: ``seed`` initialises the model (all arms start from the same weights) and seeds Sophia's
    label sampling; ``data_seed`` (default: ``seed``) orders the training batches.
    """

    steps: int = 250
    batch_size: int = 16
    seq_len: int = 128
    model: str = "llama"
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None  # None: 8/3 x hidden (Llama, multiple of 16) or 4 x hidden (GPT-2)
    dropout: float = 0.0  # GPT-2 only (Llama has none by default)
    optimizers: tuple[str, ...] = ("adamw", "sophia")
    adamw_lr: float = DEFAULT_ADAMW_LR
    sophia_lr: float = DEFAULT_SOPHIA_LR
    sophia_rho: float = DEFAULT_SOPHIA_RHO
    weight_decay: float = 0.1
    hessian_update_interval: int = 10
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_frac: float = 0.05  # linear warmup over this fraction of steps, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio x lr
    eval_every: int = 25
    eval_batches: int = 8
    timing_warmup_steps: int = 2  # untimed steps on a throwaway copy first (compiles, allocator)
    max_bytes: int = 4_000_000  # cap on the bytes of text read (train + validation)
    val_fraction: float = 0.1
    data_path: str | None = None  # a local text file or directory instead of the standard library
    data_glob: str = "**/*.py"  # files taken from a directory (data_path or the standard library)
    seed: int = 0
    data_seed: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"TrainConfig.{name} must be an int {rng}, got {v!r}")

        def need_num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            ok = _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ValueError(f"TrainConfig.{name} must be a number in {rng}, got {v!r}")

        need_int("steps", 1)
        need_int("batch_size", 1)
        need_int("seq_len", 2, 8192)
        if self.model not in MODEL_KINDS:
            raise ValueError(f"TrainConfig.model must be one of {MODEL_KINDS}, got {self.model!r}")
        need_int("hidden_size", 8)
        need_int("num_layers", 1, 64)
        need_int("num_heads", 1)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TrainConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2 and self.model == "llama":
            raise ValueError(
                f"TrainConfig.hidden_size / num_heads must be even for llama (rotary embeddings), got "
                f"{self.hidden_size}/{self.num_heads}"
            )
        if self.intermediate_size is not None:
            need_int("intermediate_size", 1)
        need_num("dropout", 0.0, 1.0, hi_open=True)
        if isinstance(self.optimizers, str):
            self.optimizers = tuple(s.strip() for s in self.optimizers.split(",") if s.strip())
        self.optimizers = tuple(self.optimizers)
        if not self.optimizers:
            raise ValueError(f"TrainConfig.optimizers must name at least one of {OPTIMIZER_KINDS}")
        for name in self.optimizers:
            if name not in OPTIMIZER_KINDS:
                raise ValueError(f"TrainConfig.optimizers: unknown optimizer {name!r}; choose from {OPTIMIZER_KINDS}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"TrainConfig.optimizers has duplicates: {self.optimizers!r}")
        need_num("adamw_lr", 0.0, 10.0, lo_open=True)
        need_num("sophia_lr", 0.0, 10.0, lo_open=True)
        need_num("sophia_rho", 0.0, 1e6, lo_open=True)
        need_num("weight_decay", 0.0, 10.0)
        need_int("hessian_update_interval", 1)
        need_num("grad_clip", 0.0, 1e6)
        need_num("warmup_frac", 0.0, 1.0, hi_open=True)
        need_num("min_lr_ratio", 0.0, 1.0)
        need_int("eval_every", 1)
        need_int("eval_batches", 1)
        need_int("timing_warmup_steps", 0, 100)
        need_int("max_bytes", 1024)
        need_num("val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        if self.data_path is not None and not isinstance(self.data_path, (str, os.PathLike)):
            raise ValueError(f"TrainConfig.data_path must be a path or None, got {self.data_path!r}")
        need_int("seed", 0)
        if self.data_seed is not None:
            need_int("data_seed", 0)

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.model == "gpt2":
            return 4 * self.hidden_size
        return max(16, (self.hidden_size * 8 // 3) // 16 * 16)

    def optimizer_specs(self) -> list[OptimizerSpec]:
        specs = []
        for name in self.optimizers:
            if name == "adamw":
                specs.append(OptimizerSpec("adamw", self.adamw_lr, weight_decay=self.weight_decay))
            else:
                specs.append(
                    OptimizerSpec(
                        "sophia", self.sophia_lr, rho=self.sophia_rho, weight_decay=self.weight_decay,
                        hessian_update_interval=self.hessian_update_interval,
                    )
                )
        return specs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizers"] = list(self.optimizers)
        return d


# ---------------------------------------------------------------------------------------------- data
def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")


def _list_files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` matching ``pattern`` (a ``Path.match``-style glob), without walking into
    ``site-packages``/``dist-packages`` (third-party code, and far larger than the library itself)."""
    name_pattern = pattern.rsplit("/", 1)[-1]
    recursive = "**" in pattern
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS) if recursive else []
        for fn in filenames:
            p = Path(dirpath, fn)
            if fnmatch.fnmatchcase(fn, name_pattern) and p.is_file():
                files.append(p)
    return sorted(files)


def load_text_bytes(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train and validation byte streams (uint8 tensors) and a description of where they came from.

    Deterministic: the file list is sorted, ordered by the SHA-1 of each relative path and split by
    file (SHA-1 of ``"val:" + path``) into train/validation; files are read in that order until each
    split holds its share of ``config.max_bytes`` (the last file of a split is cut). A single file is
    split by bytes instead.
    """
    if config.data_path is not None:
        root = Path(config.data_path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"TrainConfig.data_path does not exist: {root}")
        source = str(root)
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        source = f"CPython {sysconfig.get_python_version()} standard library ({root})"
    if root.is_file():
        files, base = [root], root.parent
    else:
        files, base = _list_files(root, config.data_glob), root
    if not files:
        raise ValueError(f"no files matching {config.data_glob!r} under {root}")
    rels = [f.relative_to(base).as_posix() for f in files]  # sorted, deterministic
    order = sorted(range(len(files)), key=lambda i: (_path_hash(rels[i]), rels[i]))
    threshold = int(config.val_fraction * 2**64)
    budget = [config.max_bytes - int(config.val_fraction * config.max_bytes), int(config.val_fraction * config.max_bytes)]
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    n_files = [0, 0]
    single = len(files) == 1
    for i in order:
        if budget[0] <= 0 and budget[1] <= 0:
            break
        split = 0 if single else int(_path_hash("val:" + rels[i]) < threshold)
        if budget[split] <= 0:
            continue
        data = files[i].read_bytes()[: config.max_bytes if single else budget[split]]
        if not data:
            continue
        budget[split] -= len(data)
        parts[split].append(data + b"\n\n")
        n_files[split] += 1
    train_parts, val_parts = parts
    if single:  # one file: split its bytes instead
        n_files = [1, 1]
        data = b"".join(train_parts)
        cut = int(len(data) * (1 - config.val_fraction))
        train_parts, val_parts = [data[:cut]], [data[cut:]]
    train = b"".join(train_parts)
    val = b"".join(val_parts)
    need = config.seq_len + 1
    if len(train) < need or len(val) < need:
        raise ValueError(
            f"not enough text: {len(train)} train / {len(val)} validation bytes, each needs at least "
            f"seq_len + 1 = {need} (raise TrainConfig.max_bytes or val_fraction)"
        )
    info = {
        "source": source,
        "files_listed": len(files),
        "train_files": n_files[0],
        "val_files": n_files[1],
        "train_bytes": len(train),
        "val_bytes": len(val),
    }
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val), info


def _train_offsets(n_bytes: int, config: TrainConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.resolved_data_seed)
    return torch.randint(0, n_bytes - config.seq_len - 1 + 1, (config.steps, config.batch_size), generator=gen)


def _val_batches(val: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """Fixed windows spread evenly over the validation stream (no randomness)."""
    n = config.eval_batches * config.batch_size
    last = val.numel() - config.seq_len - 1
    starts = torch.linspace(0, last, n).round().long()
    windows = torch.stack([val[s : s + config.seq_len + 1] for s in starts.tolist()]).long()
    return list(windows.split(config.batch_size))


def _batch(data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = offsets[:, None] + torch.arange(seq_len + 1)[None, :]
    return data[idx].long()


# ---------------------------------------------------------------------------------------------- model
def build_model(config: TrainConfig, seed: int | None = None) -> torch.nn.Module:
    """A fresh byte-level causal LM (vocab 256) initialised under ``seed`` (default ``config.seed``).

    The global RNG is left as it was (the seed is applied inside ``torch.random.fork_rng``).
    """
    seed = config.seed if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.model == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            mcfg = LlamaConfig(
                vocab_size=256,
                hidden_size=config.hidden_size,
                intermediate_size=config.resolved_intermediate_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                max_position_embeddings=config.seq_len,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=None,
            )
            model = LlamaForCausalLM(mcfg)
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            mcfg = GPT2Config(
                vocab_size=256,
                n_positions=config.seq_len,
                n_embd=config.hidden_size,
                n_layer=config.num_layers,
                n_head=config.num_heads,
                n_inner=config.resolved_intermediate_size,
                resid_pdrop=config.dropout,
                embd_pdrop=config.dropout,
                attn_pdrop=config.dropout,
                bos_token_id=None,
                eos_token_id=None,
            )
            model = GPT2LMHeadModel(mcfg)
    return model


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(spec: OptimizerSpec, model: torch.nn.Module, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW (torch's, default foreach/fused choice) or soulkit's Sophia; no decay on biases and norms."""
    groups = _param_groups(model, spec.weight_decay)
    if spec.kind == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.resolved_betas, weight_decay=spec.weight_decay)
    from ..optim import Sophia

    return Sophia(
        groups, lr=spec.lr, betas=spec.resolved_betas, rho=spec.rho, weight_decay=spec.weight_decay,
        hessian_update_interval=spec.hessian_update_interval, seed=seed,
        hessian_bias_correction=spec.hessian_bias_correction,
    )


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup = int(round(config.warmup_frac * config.steps))
    total = config.steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------- training
@dataclass
class ArmResult:
    """Curves of one arm. Times are seconds of training work only (evaluation excluded)."""

    spec: OptimizerSpec
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    refresh_steps: list[int] = field(default_factory=list)  # Sophia: steps with a Hessian refresh
    win_rate: list[float] = field(default_factory=list)  # Sophia: fraction unclipped, at each refresh step
    warmup_s: float = 0.0  # one-off warm-up (compile) time on a throwaway copy, not in step_time
    diverged_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = dataclasses.asdict(self.spec)
        return d


@dataclass
class TrainResult:
    config: TrainConfig
    arms: list[ArmResult]
    data_info: dict[str, Any]
    n_params: int
    summary: list[dict[str, Any]]
    table: str
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "data": self.data_info,
            "n_params": self.n_params,
            "summary": self.summary,
            "arms": [a.to_dict() for a in self.arms],
        }


@torch.no_grad()
def _evaluate(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        logits = model(b[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    model.train(was_training)
    return total / n


def _overall_win_rate(opt: torch.optim.Optimizer) -> float:
    """Sophia's win rate over all groups (weighted by size); nan if nothing was counted."""
    pairs = [(w, sum(p.numel() for p in g["params"])) for w, g in zip(opt.win_rate(), opt.param_groups)]
    pairs = [(w, n) for w, n in pairs if n and math.isfinite(w)]
    return sum(w * n for w, n in pairs) / sum(n for _, n in pairs) if pairs else math.nan


def _train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    spec: OptimizerSpec,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    grad_clip: float,
) -> tuple[float, bool]:
    """One training step; Sophia refreshes its Hessian estimate (GNB, from this forward's logits) when due."""
    logits = model(inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    refresh = spec.kind == "sophia" and opt.hessian_due()
    if refresh:
        opt.accumulate_gnb(logits, labels=targets)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    return loss.item(), refresh


def train_arms(
    config: TrainConfig,
    specs: Sequence[OptimizerSpec] | None = None,
    *,
    data: tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None = None,
    desc: str = "train",
) -> tuple[list[ArmResult], dict[str, Any], int]:
    """Train one model copy per spec from the same init on the same batches, in lockstep.

    Returns ``(arm results, data info, number of parameters)``. A non-finite training loss stops that
    arm (``ArmResult.diverged_at``); the others go on.
    """
    specs = list(config.optimizer_specs() if specs is None else specs)
    if not specs:
        raise ValueError("train_arms needs at least one OptimizerSpec")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizer labels must be unique, got {labels}")
    train, val, info = load_text_bytes(config) if data is None else data
    offsets = _train_offsets(train.numel(), config)
    val_batches = _val_batches(val, config)

    base = build_model(config)
    n_params = sum(p.numel() for p in base.parameters())
    models, opts, scheds, results = [], [], [], []
    for spec in specs:
        m = copy.deepcopy(base)
        m.train()
        o = make_optimizer(spec, m, seed=config.seed)
        models.append(m)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(config)))
        results.append(ArmResult(spec=spec))
    del base

    def eval_all(step: int) -> None:
        for m, r in zip(models, results):
            if r.diverged_at is None:
                r.eval_steps.append(step)
                r.val_loss.append(_evaluate(m, val_batches))

    with torch.random.fork_rng(devices=[]):  # dropout (GPT-2 with dropout > 0) draws from a seeded RNG
        torch.manual_seed(config.seed + 1)
        # One-off costs (the compiled CPU Sophia step compiles on first use, allocator warm-up) are
        # paid on throwaway copies before the timed run and reported apart: step times are steady-state.
        warm = _batch(train, offsets[0], config.seq_len)
        for spec, m, r in zip(specs, models, results):
            if config.timing_warmup_steps:
                wm = copy.deepcopy(m)
                wo = make_optimizer(spec, wm, seed=config.seed)
                t0 = time.perf_counter()
                for _ in range(config.timing_warmup_steps):
                    _train_step(wm, wo, None, spec, warm[:, :-1], warm[:, 1:], config.grad_clip)
                r.warmup_s = time.perf_counter() - t0
                del wm, wo
        _run_lockstep(config, models, opts, scheds, results, train, offsets, eval_all, desc)
    return results, info, n_params


def _run_lockstep(
    config: TrainConfig,
    models: list[torch.nn.Module],
    opts: list[torch.optim.Optimizer],
    scheds: list[torch.optim.lr_scheduler.LRScheduler],
    results: list[ArmResult],
    train: torch.Tensor,
    offsets: torch.Tensor,
    eval_all: Callable[[int], None],
    desc: str,
) -> None:
    """Every step, each live arm trains once on the same batch; the arm order alternates per step."""
    from tqdm.auto import tqdm

    eval_all(0)
    bar = tqdm(range(config.steps), desc=desc, disable=not config.progress, dynamic_ncols=True, leave=False)
    for step in bar:
        batch = _batch(train, offsets[step], config.seq_len)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        order = range(len(results)) if step % 2 == 0 else reversed(range(len(results)))
        for i in order:
            r = results[i]
            if r.diverged_at is not None:
                continue
            t0 = time.perf_counter()
            loss_value, refresh = _train_step(models[i], opts[i], scheds[i], r.spec, inputs, targets, config.grad_clip)
            r.step_time.append(time.perf_counter() - t0)
            r.train_loss.append(loss_value)
            if refresh:
                # Sophia counts unclipped coordinates on the step that folds a refresh
                r.refresh_steps.append(step)
                r.win_rate.append(_overall_win_rate(opts[i]))
            if not math.isfinite(loss_value):
                r.diverged_at = step
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            eval_all(step + 1)
        bar.set_postfix({r.spec.label: f"{r.train_loss[-1]:.3f}" for r in results if r.train_loss}, refresh=False)
    bar.close()


# ---------------------------------------------------------------------------------------------- analysis
def median_window_time(step_time: Sequence[float], k: int) -> float:
    """Median over consecutive k-step windows of the mean step time: includes one refresh per window."""
    n = len(step_time) // k
    if n == 0:
        return statistics.median(step_time) if step_time else math.nan
    return statistics.median(sum(step_time[i * k : (i + 1) * k]) / k for i in range(n))


def steps_to_reach(arm: ArmResult, target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None: not reached)."""
    for s, v in zip(arm.eval_steps, arm.val_loss):
        if v <= target:
            return s
    return None


def _loss_at(arm: ArmResult, step: int) -> float:
    for s, v in zip(arm.eval_steps, arm.val_loss):
        if s == step:
            return v
    return math.nan


def summarize(arms: Sequence[ArmResult], config: TrainConfig, reference: str | None = None) -> list[dict[str, Any]]:
    """Per arm: validation loss at equal steps, steps/wall time to the reference's final loss, timings.

    The reference is the first AdamW arm (or ``reference``, a label); its final validation loss is the
    target. Step-time ratios compare arms timed in the same run (lockstep).
    """
    ref = None
    if reference is not None:
        ref = next((a for a in arms if a.spec.label == reference), None)
        if ref is None:
            raise ValueError(f"reference {reference!r} is not one of {[a.spec.label for a in arms]}")
    else:
        ref = next((a for a in arms if a.spec.kind == "adamw"), arms[0])
    target = ref.val_loss[-1] if ref.val_loss and ref.diverged_at is None else math.nan
    k = config.hessian_update_interval
    ref_window = median_window_time(ref.step_time, k)
    ref_median = statistics.median(ref.step_time) if ref.step_time else math.nan
    ref_total = sum(ref.step_time)
    ref_steps = ref.eval_steps[-1] if ref.eval_steps else 0
    half = (config.steps // 2) // config.eval_every * config.eval_every
    rows = []
    for a in arms:
        reached = steps_to_reach(a, target)
        wall_to = sum(a.step_time[:reached]) if reached is not None else None
        median_step = statistics.median(a.step_time) if a.step_time else math.nan
        window = median_window_time(a.step_time, k)
        refresh_times = [a.step_time[s] for s in a.refresh_steps if s < len(a.step_time)]
        rows.append(
            {
                "label": a.spec.label,
                "kind": a.spec.kind,
                "lr": a.spec.lr,
                "rho": a.spec.rho if a.spec.kind == "sophia" else None,
                "val_loss_half": _loss_at(a, half) if half > 0 else math.nan,
                "half_step": half,
                "val_loss_final": a.val_loss[-1] if a.val_loss and a.diverged_at is None else math.nan,
                "final_step": a.eval_steps[-1] if a.eval_steps else 0,
                "target": target,
                "steps_to_target": reached,
                "steps_ratio": (reached / ref_steps) if reached is not None and ref_steps else None,
                "wall_to_target_s": wall_to,
                "wall_ratio": (wall_to / ref_total) if wall_to is not None and ref_total > 0 else None,
                "train_time_s": sum(a.step_time),
                "median_step_s": median_step,
                "median_window_step_s": window,
                "median_refresh_step_s": statistics.median(refresh_times) if refresh_times else None,
                "step_overhead": window / ref_window - 1 if ref_window > 0 else math.nan,
                "median_step_overhead": median_step / ref_median - 1 if ref_median > 0 else math.nan,
                "win_rate_mean": _finite_mean(a.win_rate),
                "win_rate_last": a.win_rate[-1] if a.win_rate else None,
                "warmup_s": a.warmup_s,
                "diverged_at": a.diverged_at,
                "reference": a is ref,
            }
        )
    return rows


def _finite_mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return format(x, spec)


def format_table(summary: Sequence[dict[str, Any]], k: int = 10) -> str:
    """A markdown table of :func:`summarize`'s rows."""
    half = summary[0]["half_step"] if summary else 0
    final = summary[0]["final_step"] if summary else 0
    target = summary[0]["target"] if summary else math.nan
    lines = [
        f"| optimizer | lr | val loss @{half} | val loss @{final} | steps to {target:.4f} (ratio) | "
        f"wall to target (ratio) | train time (+ warm-up) | median step | step, {k}-step windows (overhead) | win rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        if r["steps_to_target"] is None:
            steps = "not reached" + (f" (diverged @{r['diverged_at']})" if r["diverged_at"] is not None else "")
            wall = "-"
        else:
            steps = f"{r['steps_to_target']} ({r['steps_ratio']:.2f}x)"
            wall = f"{r['wall_to_target_s']:.1f} s ({r['wall_ratio']:.2f}x)"
        overhead = "ref" if r["reference"] else f"{r['step_overhead'] * 100:+.1f}%"
        lr = f"{r['lr']:.2g}" + (f", rho {r['rho']:g}" if r["rho"] is not None else "")
        final_cell = f"diverged @{r['diverged_at']}" if r["diverged_at"] is not None else _fmt(r["val_loss_final"])
        lines.append(
            f"| {r['label']} | {lr} | {_fmt(r['val_loss_half'])} | {final_cell} | {steps} | {wall} | "
            f"{r['train_time_s']:.1f} s (+{r['warmup_s']:.1f} s) | {r['median_step_s'] * 1e3:.0f} ms | "
            f"{r['median_window_step_s'] * 1e3:.0f} ms ({overhead}) | {_fmt(r['win_rate_mean'], '.3f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- outputs
def plot_curves(arms: Sequence[ArmResult], path: str | os.PathLike, title: str = "", target: float | None = None) -> None:
    """Validation loss against steps and against training wall time; written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for a in arms:
        cum = [0.0]
        for t in a.step_time:
            cum.append(cum[-1] + t)
        times = [cum[min(s, len(cum) - 1)] for s in a.eval_steps]
        ax1.plot(a.eval_steps, a.val_loss, marker=".", label=a.spec.label)
        ax2.plot(times, a.val_loss, marker=".", label=a.spec.label)
    for ax, xl in ((ax1, "step"), (ax2, "training wall time (s)")):
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="gray", ls="--", lw=0.8, label="AdamW final")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        finite = [v for a in arms for v in a.val_loss[1:] if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax1.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def write_outputs(result: TrainResult, out_dir: str | os.PathLike, stem: str = "train_lm") -> dict[str, str]:
    """``<stem>.md`` (table), ``<stem>.json`` (config, summary, curves), ``<stem>.png`` (loss curves)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: str(out / f"{stem}.{k}") for k in ("md", "json", "png")}
    c = result.config
    md = (
        f"# AdamW vs Sophia: byte-level {c.model} LM ({result.n_params / 1e6:.2f} M parameters)\n\n"
        f"Data: {result.data_info['source']}; {result.data_info['train_bytes']:,} train / "
        f"{result.data_info['val_bytes']:,} validation bytes. {c.steps} steps x {c.batch_size} x {c.seq_len} "
        f"tokens, seed {c.seed}. Validation loss every {c.eval_every} steps on "
        f"{c.eval_batches * c.batch_size} fixed windows (nats/byte).\n\n"
        f"{result.table}\n\n"
        "Steps to target: first evaluated step whose validation loss is at or below the reference's final "
        "validation loss. Times: training work only, arms run in lockstep on the same batches; "
        f"overhead = median over {c.hessian_update_interval}-step windows (one Hessian refresh each) vs the "
        "reference in the same run. Warm-up: untimed steps on a throwaway copy before the run (one-off "
        "costs such as compiling Sophia's CPU step). Win rate: fraction of Sophia's coordinates not clipped, "
        "averaged over the refresh steps.\n"
    )
    atomic_write_text(paths["md"], md)
    atomic_write_text(paths["json"], to_json(result.to_dict()))
    target = next((r["target"] for r in result.summary), None)
    plot_curves(result.arms, paths["png"], title=f"byte-level {c.model}, {result.n_params / 1e6:.2f} M params", target=target)
    return paths


def train_lm(config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None) -> TrainResult:
    """Train ``config.optimizers`` side by side; summarise, and write md/json/png into ``out_dir`` if given."""
    config = TrainConfig() if config is None else config
    arms, info, n_params = train_arms(config)
    summary = summarize(arms, config)
    result = TrainResult(
        config=config, arms=arms, data_info=info, n_params=n_params, summary=summary,
        table=format_table(summary, config.hessian_update_interval),
    )
    if out_dir is not None:
        result.paths = write_outputs(result, out_dir)
    return result
