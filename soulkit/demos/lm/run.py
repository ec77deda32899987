"""``soulkit train``: train the configured optimizers side by side and report (:func:`run_training_demo`)."""

from __future__ import annotations

import os

from .config import TrainConfig
from .loop import train_arms
from .report import TrainResult, format_table, summarize, write_outputs

__all__ = ["run_training_demo"]


def run_training_demo(config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None) -> TrainResult:
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
