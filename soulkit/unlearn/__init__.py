"""Second-order (SOUL) and first-order unlearning of a forget set from a causal LM, with a TOFU-style
benchmark that needs no network: data, tiny models, objectives, the unlearner, and the evaluation.

    from soulkit.unlearn import UnlearningSuite, Unlearner, UnlearnConfig, make_objective, load_model
"""

from .data import AuthorBenchmark, generate_benchmark, read_jsonl, write_jsonl
from .evaluate import EvalConfig, EvalSets, evaluate_model, format_results
from .models import ModelConfig, ModelZoo, TrainRecipe, load_model, save_model
from .newton import newton_unlearn
from .objectives import (
    IDK,
    NPO,
    OBJECTIVES,
    GradDiff,
    GradientAscent,
    KLRetain,
    Objective,
    SimNPO,
    make_objective,
)
from .qa import QA
from .suite import SCALES, UnlearningSuite, default_unlearn_config
from .unlearner import UnlearnConfig, Unlearner, UnlearnResult

__all__ = [
    "QA", "AuthorBenchmark", "generate_benchmark", "read_jsonl", "write_jsonl",
    "EvalConfig", "EvalSets", "evaluate_model", "format_results",
    "ModelConfig", "ModelZoo", "TrainRecipe", "load_model", "save_model",
    "newton_unlearn",
    "Objective", "GradientAscent", "GradDiff", "NPO", "SimNPO", "IDK", "KLRetain", "OBJECTIVES", "make_objective",
    "SCALES", "UnlearningSuite", "default_unlearn_config",
    "UnlearnConfig", "Unlearner", "UnlearnResult",
]
