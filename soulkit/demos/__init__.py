"""End-to-end demos: small, self-contained runs on data that needs no network.

- :mod:`soulkit.demos.train_lm`: AdamW vs Sophia on a byte-level LM trained on the CPython standard
  library's sources (``soulkit train`` / ``soulkit demo``).
"""

from .train_lm import OptimizerSpec, TrainConfig, TrainResult, train_lm

__all__ = ["OptimizerSpec", "TrainConfig", "TrainResult", "train_lm"]
