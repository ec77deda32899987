"""What a run of the byte-level LM demo depends on: :class:`TrainConfig` and one arm's :class:`OptimizerSpec`.

Both validate on construction (``ValueError`` naming the field and the allowed range). The
optimizers an arm can use are :data:`OPTIMIZER_KINDS`, the arms a run can train :data:`ARMS`; the model
architectures :data:`MODEL_KINDS`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..._causal_lm import ARCHS

__all__ = [
    "ARMS",
    "DEFAULT_ADAMW_LR",
    "DEFAULT_SOPHIA_LR",
    "DEFAULT_SOPHIA_RHO",
    "DEFAULT_SOPHIA_HBC_LR",
    "DEFAULT_SOPHIA_HBC_RHO",
    "MODEL_KINDS",
    "OPTIMIZER_KINDS",
    "OptimizerSpec",
    "TrainConfig",
]

# The defaults are the best learning rates of a small sweep on the default model and data (both
# optimizers tuned, seed 0, 250 steps; benchmarks/optimizers.py sweeps a grid around them). Sophia's
# loss hardly depends on rho here: h is an EMA with beta2 = 0.99 refreshed every 10 steps and not
# bias-corrected, so in a few hundred steps it stays well below its steady value, most coordinates
# are clipped and the update is close to sign-momentum.
DEFAULT_ADAMW_LR = 1e-3
DEFAULT_SOPHIA_LR = 5e-4
DEFAULT_SOPHIA_RHO = 0.04
# The ``sophia-hbc`` arm: Sophia with its Hessian EMA bias-corrected (h / (1 - beta2**n)), so h has its
# steady scale from the first refresh and rho clips only the coordinates it should; lr and rho are the
# ones benchmarks/optimizers.py --hessian-bias-correction selected (results/optimizers_hbc.md).
DEFAULT_SOPHIA_HBC_LR = 2.5e-4
DEFAULT_SOPHIA_HBC_RHO = 0.5

OPTIMIZER_KINDS = ("adamw", "sophia")
#: The arms a run can train: AdamW, Sophia as published (rho 0.04, no bias correction of h) and Sophia
#: with Hessian bias correction (``sophia-hbc``).
ARMS = ("adamw", "sophia", "sophia-hbc")
MODEL_KINDS = ARCHS


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
    optimizers: tuple[str, ...] = ARMS
    adamw_lr: float = DEFAULT_ADAMW_LR
    sophia_lr: float = DEFAULT_SOPHIA_LR
    sophia_rho: float = DEFAULT_SOPHIA_RHO
    sophia_hbc_lr: float = DEFAULT_SOPHIA_HBC_LR
    sophia_hbc_rho: float = DEFAULT_SOPHIA_HBC_RHO
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
            raise ValueError(f"TrainConfig.optimizers must name at least one of {ARMS}")
        for name in self.optimizers:
            if name not in ARMS:
                raise ValueError(f"TrainConfig.optimizers: unknown optimizer {name!r}; choose from {ARMS}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"TrainConfig.optimizers has duplicates: {self.optimizers!r}")
        need_num("adamw_lr", 0.0, 10.0, lo_open=True)
        need_num("sophia_lr", 0.0, 10.0, lo_open=True)
        need_num("sophia_rho", 0.0, 1e6, lo_open=True)
        need_num("sophia_hbc_lr", 0.0, 10.0, lo_open=True)
        need_num("sophia_hbc_rho", 0.0, 1e6, lo_open=True)
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
                hbc = name == "sophia-hbc"
                specs.append(
                    OptimizerSpec(
                        "sophia", self.sophia_hbc_lr if hbc else self.sophia_lr, label=name,
                        rho=self.sophia_hbc_rho if hbc else self.sophia_rho, weight_decay=self.weight_decay,
                        hessian_update_interval=self.hessian_update_interval, hessian_bias_correction=hbc,
                    )
                )
        return specs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizers"] = list(self.optimizers)
        return d

