"""End-to-end demos: small, self-contained runs on data that needs no network.

- :mod:`soulkit.demos.lm`: AdamW vs Sophia on a byte-level LM trained on the CPython standard
  library's sources (``soulkit train`` / ``soulkit demo``): :func:`run_training_demo` with a
  :class:`TrainConfig`.
- :mod:`soulkit.demos.unlearn_tofu`: SOUL (Sophia) vs AdamW unlearning on the fictitious-author
  benchmark (``soulkit demo``): :func:`run_unlearning_demo` (needs the ``unlearn`` extra).

Names are imported on first use, so that ``import soulkit.demos`` stays cheap and the training
demo never imports :mod:`soulkit.unlearn`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OptimizerSpec": ".lm",
    "TrainConfig": ".lm",
    "TrainResult": ".lm",
    "run_training_demo": ".lm",
    "UnlearnDemoResult": ".unlearn_tofu",
    "run_unlearning_demo": ".unlearn_tofu",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
