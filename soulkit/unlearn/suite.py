"""The benchmark end to end: data, cached models, retrain references and evaluation in one object.

    suite = UnlearningSuite.from_scale("small")             # or UnlearningSuite(benchmark, recipe)
    ft = suite.finetuned_dir()                              # trained once, cached
    res = suite.evaluate_dir(ft, "forget05")                # forget quality vs the retrain, utility, MIA...

The retrain of a split (seed 1) is the reference of forget quality and privleak; a second retrain
(seed 2) evaluated against the first gives the realistic ceiling of forget quality. Their
evaluations are cached as JSON beside the models, so each is computed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_json
from .data import AuthorBenchmark, generate_benchmark
from .evaluate import EvalConfig, EvalSets, conventions, evaluate_model, score_answers
from .models import ModelConfig, ModelZoo, TrainRecipe, load_model, model_meta
from .objectives import make_objective
from .unlearner import UnlearnConfig, Unlearner, finished_run

__all__ = ["Scale", "SCALES", "UnlearningSuite", "default_unlearn_config"]


@dataclass(frozen=True)
class Scale:
    """A named benchmark size: authors, QA per author, the training recipe and evaluation caps."""

    n_authors: int
    qa_per_author: int
    recipe: TrainRecipe
    eval: EvalConfig = field(default_factory=EvalConfig)
    description: str = ""


# Evaluation settings: the references' (EvalConfig's defaults: geometric truth ratio, up to 200 new tokens, every
# question) except that the demo and small scales subsample each set (100 / 200 questions, seeded): every
# question of the small scale's retain set (720-780) would double the cost of each of the ~150 evaluations of
# benchmarks/unlearning.py. results.json's config records the choice.
SCALES: dict[str, Scale] = {
    # the `make demo` story: the smallest scale, for a quick end-to-end run
    "demo": Scale(20, 10, TrainRecipe(model=ModelConfig(hidden_size=96, num_layers=3, num_heads=4),
                                      vocab_size=1024, pretrain_epochs=20, finetune_max_epochs=60,
                                      check_every=5, lr=3e-3),
                  EvalConfig(max_eval_examples=100), "20 authors x 10 QA, 0.5M-param Llama"),
    # the default of `soulkit unlearn` / `soulkit evaluate` and the unlearning benchmark
    "small": Scale(40, 20, TrainRecipe(model=ModelConfig(hidden_size=128, num_layers=4, num_heads=4),
                                       vocab_size=2048, pretrain_epochs=20, finetune_max_epochs=80,
                                       check_every=5, lr=3e-3),
                   EvalConfig(max_eval_examples=200), "40 authors x 20 QA, 1.3M-param Llama"),
    # TOFU's size: 200 authors x 20 QA
    "tofu": Scale(200, 20, TrainRecipe(model=ModelConfig(hidden_size=256, num_layers=6, num_heads=8),
                                       vocab_size=4096, pretrain_epochs=20, finetune_max_epochs=80,
                                       check_every=5, lr=2e-3),
                  EvalConfig(), "TOFU scale: 200 authors x 20 QA"),
}


class UnlearningSuite:
    """Data + models + evaluation of one benchmark configuration.

    Args:
        benchmark: an :class:`~soulkit.unlearn.data.AuthorBenchmark` (generated or loaded).
        recipe: how its models are trained.
        eval_config: evaluation settings.
        cache_dir: model cache root (default ``$SOULKIT_CACHE`` or ``~/.cache/soulkit``).
    """

    def __init__(self, benchmark: AuthorBenchmark, recipe: TrainRecipe | None = None, *,
                 eval_config: EvalConfig | None = None, cache_dir: str | os.PathLike | None = None,
                 progress: bool | None = None):
        self.benchmark = benchmark
        self.zoo = ModelZoo(benchmark, recipe, cache_dir=cache_dir, progress=progress)
        self.eval_config = eval_config or EvalConfig()
        if progress is not None:
            self.eval_config = replace(self.eval_config, show_progress=progress)

    @classmethod
    def from_scale(cls, scale: str | Scale = "small", *, seed: int = 0, data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> UnlearningSuite:
        """A suite at a named scale (:data:`SCALES`); ``data_dir`` loads a saved benchmark instead."""
        if isinstance(scale, str):
            if scale not in SCALES:
                raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
            scale = SCALES[scale]
        if data_dir is not None:
            bench = AuthorBenchmark.load(data_dir)
        else:
            bench = generate_benchmark(scale.n_authors, qa_per_author=scale.qa_per_author, seed=seed)
        return cls(bench, scale.recipe, eval_config=scale.eval, cache_dir=cache_dir, progress=progress)

    # ------------------------------------------------------------------ models
    def finetuned_dir(self) -> Path:
        return self.zoo.finetuned()

    def retrained_dir(self, split: str, seed: int = 1) -> Path:
        return self.zoo.retrained(split, seed=seed)

    # ------------------------------------------------------------------ evaluation
    def eval_sets(self, split: str) -> EvalSets:
        forget, retain = self.benchmark.split(split)
        return EvalSets(forget=forget, retain=retain, real_authors=self.benchmark.real_authors,
                        world_facts=self.benchmark.world_facts, holdout=self.benchmark.holdout or None)

    def reference_path(self, split: str, seed: int = 1) -> Path:
        """Where :meth:`reference` caches its evaluation: keyed by split, seed and every evaluation setting
        that changes a number (so a changed setting, or a soulkit whose metric conventions changed, is
        evaluated afresh instead of reusing numbers computed otherwise)."""
        settings = {k: v for k, v in asdict(self.eval_config).items() if k not in ("show_progress", "batch_size")}
        settings["conventions"] = conventions(self.eval_config)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.zoo.root / f"eval-{split}-retrain-seed{seed}-{key}.json"

    def reference(self, split: str, seed: int = 1) -> dict[str, Any]:
        """Evaluation of the retrain of ``split`` with ``seed`` (computed once, cached as JSON)."""
        path = self.reference_path(split, seed)
        if path.is_file():
            return json.loads(path.read_text())
        model, tok = load_model(self.retrained_dir(split, seed))
        res = evaluate_model(model, tok, self.eval_sets(split), config=self.eval_config)
        atomic_write_json(path, res)
        return res

    def evaluate(self, model, tokenizer, split: str, *, with_ceiling: bool = True) -> dict[str, Any]:
        """Evaluate ``model`` on ``split``: forget quality against retrain seed 1; with ``with_ceiling``
        also the forget quality a second retrain (seed 2) reaches against seed 1."""
        ref = self.reference(split, seed=1)
        ceiling = self.reference(split, seed=2) if with_ceiling else None
        self._check_tokenizer(tokenizer)
        res = evaluate_model(model, tokenizer, self.eval_sets(split), config=self.eval_config, reference=ref,
                             ceiling_reference=ceiling)
        res["split"] = split
        return res

    def evaluate_dir(self, directory: str | os.PathLike, split: str, **kw: Any) -> dict[str, Any]:
        model, tok = load_model(directory)
        res = self.evaluate(model, tok, split, **kw)
        res["model_dir"] = str(directory)
        res["model_stage"] = model_meta(directory).get("stage")
        return res

    def _check_tokenizer(self, tokenizer) -> None:
        ours = self.zoo.tokenizer()
        probe = "Question: Where was the author born?\nAnswer: In a small town."
        if len(tokenizer) != len(ours) or tokenizer(probe)["input_ids"] != ours(probe)["input_ids"]:
            raise ValueError("the model's tokenizer does not match the benchmark's tokenizer; models trained "
                             "elsewhere need their own retrain references (use evaluate_model directly)")

    # ------------------------------------------------------------------ unlearning
    def unlearn(self, method: str, optimizer: str, split: str, *, model_dir: str | os.PathLike | None = None,
                config: UnlearnConfig | None = None, objective_kwargs: dict[str, Any] | None = None,
                out_dir: str | os.PathLike | None = None, evaluate: bool = True,
                parallel: str | None = None) -> tuple[dict[str, Any], Any]:
        """Unlearn ``split``'s forget authors from ``model_dir`` (default: the finetuned model) with
        ``method`` under ``optimizer``; returns ``(results, UnlearnResult)``. ``results`` has the fields
        of :meth:`evaluate` (when ``evaluate``) plus method, optimizer, split, seed, lr, steps, wall time.
        ``parallel``: the Unlearner's (``"ddp"``/``"fsdp2"`` under ``torchrun``; every rank evaluates the
        same unlearned model and gets the same results).

        With ``out_dir``, an interrupted run continues: from its checkpoint, or, when it had already
        written its model, by evaluating that model."""
        forget, retain = self.benchmark.split(split)  # bad split / objective arguments fail before any training
        objective = make_objective(method, **(objective_kwargs or {}))
        model, tok = load_model(model_dir or self.finetuned_dir())
        self._check_tokenizer(tok)
        config = config or default_unlearn_config(method, optimizer)
        probe = retain[: max(len(forget), 1)]

        def quick_eval(m, step: int) -> dict[str, float]:  # every config.eval_every steps: probabilities only
            return {"forget_probability": float(np.exp(-score_answers(m, tok, forget)).mean()),
                    "retain_probability": float(np.exp(-score_answers(m, tok, probe)).mean())}

        t0 = time.perf_counter()
        run = finished_run(out_dir) if out_dir is not None else None
        if run is None:  # a new run, or one resumed from out_dir's checkpoint
            run = Unlearner(model, tok, objective, forget=forget, retain=retain, optimizer=optimizer, config=config,
                            out_dir=out_dir, evaluate_fn=quick_eval if config.eval_every else None,
                            parallel=parallel).run()
            seconds = time.perf_counter() - t0
        else:  # the run finished training before its evaluation was interrupted: evaluate its model
            saved = model_meta(run.model_dir).get("config", {})
            ignore = ("show_progress", "eval_every")
            if ({k: v for k, v in saved.items() if k not in ignore}
                    != json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in ignore}))):
                raise ValueError(f"{run.model_dir} was written by a run with another configuration; use a new "
                                 "out_dir or remove it")
            seconds = run.seconds
        results: dict[str, Any] = self.evaluate(run.model, tok, split) if evaluate else {"split": split}
        if evaluate:  # "config" is the unlearning run's below; the evaluation's settings move here
            results["eval_config"] = results.pop("config")
        win = [e["win_rate"] for e in run.log if "win_rate" in e]
        results.update(method=method, optimizer=optimizer, split=split, seed=config.seed, lr=config.lr,
                       steps=run.steps, stopped=run.stopped, unlearn_seconds=seconds,
                       objective=objective.name, config=config.to_dict(),
                       final_loss=run.log[-1]["loss"] if run.log else None,
                       mean_win_rate=sum(win) / len(win) if win else None, progress=run.evaluations)
        return results, run


# lr per (method, optimizer) and Sophia's rho for the tiny benchmark models: the settings benchmarks/unlearning.py's
# sweep selects on forget05 of the small scale (highest forget quality keeping >= 95% of the finetuned utility);
# the sweep and its choice are in benchmarks/results/unlearning.md.
_DEFAULT_LR: dict[tuple[str, str], float] = {
    ("ga", "adamw"): 1e-4, ("ga", "sophia"): 1e-4,
    ("graddiff", "adamw"): 3e-4, ("graddiff", "sophia"): 2e-4,
    ("npo", "adamw"): 3e-4, ("npo", "sophia"): 1e-4,
    ("simnpo", "adamw"): 3e-4, ("simnpo", "sophia"): 1e-4,
    ("idk", "adamw"): 1e-4, ("idk", "sophia"): 1e-4,
}
_SOPHIA_RHO = 1.0


def default_unlearn_config(method: str, optimizer: str, **overrides: Any) -> UnlearnConfig:
    """The benchmark's default settings for ``method`` x ``optimizer``: 5 epochs, batch 8 (+ 8 retain),
    constant lr from the sweep, grad clip 1; Sophia with rho 1.0 (``optimizer_kwargs`` overrides merge);
    ``soul-released`` with SOUL's released settings (its class defaults, and weight decay 0.1)."""
    kw: dict[str, Any] = {"lr": _DEFAULT_LR.get((method, optimizer), 1e-4), "epochs": 5.0, "batch_size": 8}
    if optimizer == "soul-released":
        kw["weight_decay"] = 0.1  # SOUL's TOFU configs; betas (0.9, 0.95), rho 0.04, bs 5120 are the class defaults
    opt_kwargs = {"rho": _SOPHIA_RHO} if optimizer == "sophia" else {}
    opt_kwargs.update(overrides.pop("optimizer_kwargs", None) or {})
    kw.update(overrides)
    return UnlearnConfig(optimizer_kwargs=opt_kwargs, **kw)
