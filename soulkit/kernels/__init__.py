"""Fused element-wise kernels for soulkit's second-order updates.

Every kernel family has a plain-torch per-tensor *reference* (for debugging and for tests) and
faster implementations of the same math (foreach torch on any device; Triton on CUDA). This
package imports nothing else from soulkit.
"""

from .adahessian import adahessian_step, adahessian_step_foreach, adahessian_step_reference
from .projection import project, project_chunks, project_compiled, project_reference, rademacher_matrix
from .sophia import sophia_step, sophia_step_foreach, sophia_step_reference

__all__ = [
    "adahessian_step",
    "adahessian_step_foreach",
    "adahessian_step_reference",
    "project",
    "project_chunks",
    "project_compiled",
    "project_reference",
    "rademacher_matrix",
    "sophia_step",
    "sophia_step_foreach",
    "sophia_step_reference",
]
