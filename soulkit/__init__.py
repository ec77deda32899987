"""soulkit: cheap, correct second-order information for PyTorch.

The entry points of its three jobs, importable from here (each loaded on first use, so that
``import soulkit`` stays cheap):

- optimizers (:mod:`soulkit.optim`): :class:`Sophia`, :class:`AdaHessian`;
- influence scores (:mod:`soulkit.influence`): :class:`InfluenceAnalyzer` with its :class:`InfluenceConfig`;
- unlearning (:mod:`soulkit.unlearn`, the ``unlearn`` extra): :class:`Unlearner` with its :class:`UnlearnConfig`.

Everything else lives in those subpackages; the demos behind ``soulkit train`` / ``soulkit demo`` in
:mod:`soulkit.demos`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Sophia": "soulkit.optim",
    "AdaHessian": "soulkit.optim",
    "InfluenceAnalyzer": "soulkit.influence",
    "InfluenceConfig": "soulkit.influence",
    "Unlearner": "soulkit.unlearn",
    "UnlearnConfig": "soulkit.unlearn",
}
_SUBPACKAGES = ("kernels", "optim", "influence", "unlearn", "demos")

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
