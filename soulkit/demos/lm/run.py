"""``soulkit train``: train the configured optimizers side by side and report (:func:`run_training_demo`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .config import TrainConfig
from .loop import train_arms
from .report import TrainResult, format_table, summarize, write_outputs

__all__ = ["CHECKPOINT_DIR", "run_training_demo"]

CHECKPOINT_DIR = "checkpoint"  # under out_dir


def run_training_demo(config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None, *,
                      checkpoint_every: int = 0, notify: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``config.optimizers`` side by side; summarise, and write md/json/png into ``out_dir`` if given.

    With ``out_dir``, ``checkpoint_every`` > 0 checkpoints every arm into ``out_dir/checkpoint`` every that
    many steps and after the last; a checkpoint found there is resumed from (``notify`` is told, one line
    per arm), so a run killed while training or while writing its report ends as an uninterrupted one
    would. The checkpoint is removed once the report is written.
    """
    config = TrainConfig() if config is None else config
    ckpt = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    arms, info, n_params = train_arms(config, checkpoint_dir=ckpt, checkpoint_every=checkpoint_every if ckpt else 0,
                                      notify=notify)
    summary = summarize(arms, config)
    result = TrainResult(
        config=config, arms=arms, data_info=info, n_params=n_params, summary=summary,
        table=format_table(summary, config.hessian_update_interval),
    )
    if out_dir is not None:
        result.paths = write_outputs(result, out_dir)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    return result
