"""AdamW vs Sophia on a byte-level causal LM trained on real text (the CPython standard library).

A small ``LlamaForCausalLM`` (or ``GPT2LMHeadModel``) over the 256 byte values is built from scratch
under a seed; every optimizer ("arm") trains its own copy of the same initial weights on the same
batches, in lockstep, and the run reports validation loss at equal steps, steps and wall time to
the AdamW arm's final loss, and the step-time overhead of each arm measured in the same run.

- :mod:`.config`: :class:`TrainConfig` (everything a run depends on), :class:`OptimizerSpec` (one arm);
- :mod:`.corpus`: the train/validation byte streams (:func:`load_text_bytes`) and their batches;
- :mod:`.model`: the byte-level LM (:func:`build_model`);
- :mod:`.optimizer`: AdamW or Sophia for an arm (:func:`arm_optimizer`);
- :mod:`.loop`: the lockstep training loop (:func:`train_arms`);
- :mod:`.report`: summary rows, table, plot and files (:class:`TrainResult`);
- :mod:`.run`: all of the above in one call (:func:`run_training_demo`, behind ``soulkit train``).

Defaults: hidden size 192, 4 layers, 4 heads, ``seq_len=128``, batch 16 (2,048 tokens per step),
1.87 M parameters, 250 steps; AdamW lr 1e-3, Sophia as published lr 5e-4 with rho 0.04, and Sophia with
Hessian bias correction (``sophia-hbc``) lr 2.5e-4 with rho 0.5.
``soulkit train --threads 1`` is often faster when other jobs share the cores.

Library use::

    from soulkit.demos.lm import TrainConfig, run_training_demo
    result = run_training_demo(TrainConfig(steps=300), out_dir="runs/lm")
    print(result.table)
"""

from .config import ARMS, MODEL_KINDS, OPTIMIZER_KINDS, OptimizerSpec, TrainConfig
from .corpus import load_text_bytes
from .loop import ArmResult, train_arms
from .model import build_model
from .optimizer import arm_optimizer
from .report import TrainResult, format_table, plot_curves, summarize, write_outputs
from .run import run_training_demo

__all__ = [
    "ARMS",
    "MODEL_KINDS",
    "OPTIMIZER_KINDS",
    "ArmResult",
    "OptimizerSpec",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "format_table",
    "load_text_bytes",
    "arm_optimizer",
    "plot_curves",
    "run_training_demo",
    "summarize",
    "train_arms",
    "write_outputs",
]
