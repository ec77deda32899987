"""Fused element-wise kernels for soulkit's second-order updates.

Every kernel family has a plain-torch per-tensor *reference* (the definition, for debugging and
tests) beside its fast implementations (foreach torch on any device, inductor-compiled code on the
CPU, Triton on CUDA); :mod:`soulkit.kernels.dispatch` picks one per call. This package imports
nothing else from soulkit.
"""

from .adahessian import adahessian_step_reference
from .dispatch import adahessian_step, project, project_chunks, sophia_step
from .projection import project_reference, rademacher_matrix
from .sophia import sophia_step_reference

__all__ = [
    "adahessian_step",
    "adahessian_step_reference",
    "project",
    "project_chunks",
    "project_reference",
    "rademacher_matrix",
    "sophia_step",
    "sophia_step_reference",
]
