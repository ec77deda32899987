"""End-to-end demos: small, self-contained runs on data that needs no network.

- :mod:`soulkit.demos.train_lm`: AdamW vs Sophia on a byte-level LM trained on the CPython standard
  library's sources (``soulkit train`` / ``soulkit demo``); run it with
  ``from soulkit.demos.train_lm import TrainConfig, train_lm``.

The submodule is not shadowed by a function of the same name: ``from soulkit.demos import train_lm``
gives the module.
"""

from . import train_lm
from .train_lm import OptimizerSpec, TrainConfig, TrainResult

__all__ = ["train_lm", "OptimizerSpec", "TrainConfig", "TrainResult"]
