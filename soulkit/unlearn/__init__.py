"""Second-order (SOUL) and first-order unlearning of a forget set from a causal LM, with a TOFU-style
benchmark that needs no network: data, tiny models, objectives, the unlearner, and the evaluation.

    from soulkit.unlearn import UnlearningSuite, Unlearner, UnlearnConfig, make_objective, load_model

The metric functions (truth ratio, forget quality, MIA scores...) are in :mod:`soulkit.unlearn.metrics`;
the QA prompt format, tokenisation and batching in :mod:`soulkit.unlearn.qa`; attacks on an unlearned
model (quantization, relearning, few-shot prompts) in :mod:`soulkit.unlearn.attacks`.
"""

from .attacks import ATTACKS, AttackConfig, quantize_weights, relearn, run_attack, split_forget_halves
from .data import AuthorBenchmark, generate_benchmark
from .evaluate import EvalConfig, EvalSets, evaluate_model, format_results, load_results, save_results
from .models import ModelConfig, ModelZoo, TrainRecipe, load_model, save_model
from .newton import newton_unlearn
from .objectives import (
    IDK,
    NPO,
    OBJECTIVES,
    RMU,
    GradDiff,
    GradientAscent,
    KLRetain,
    Objective,
    SimNPO,
    frozen_reference,
    make_objective,
)
from .qa import QA, read_jsonl, write_jsonl
from .suite import SCALES, UnlearningSuite, default_unlearn_config
from .unlearner import UnlearnConfig, Unlearner, UnlearnResult

__all__ = [
    "QA", "read_jsonl", "write_jsonl", "AuthorBenchmark", "generate_benchmark",
    "EvalConfig", "EvalSets", "evaluate_model", "format_results", "save_results", "load_results",
    "ModelConfig", "ModelZoo", "TrainRecipe", "load_model", "save_model",
    "newton_unlearn",
    "Objective", "GradientAscent", "GradDiff", "NPO", "SimNPO", "IDK", "RMU", "KLRetain", "OBJECTIVES", "make_objective",
    "frozen_reference",
    "SCALES", "UnlearningSuite", "default_unlearn_config",
    "UnlearnConfig", "Unlearner", "UnlearnResult",
    "ATTACKS", "AttackConfig", "quantize_weights", "relearn", "run_attack", "split_forget_halves",
]
