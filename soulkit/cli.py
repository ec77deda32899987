"""The ``soulkit`` command line.

    soulkit train [--steps N] [--optimizers OPT[,OPT]] [--model ARCH] [--out DIR] [--seed S]
                  [--checkpoint-every N] [--overwrite] ...
    soulkit demo  [--out DIR] [--only STAGE[,STAGE]]
    soulkit data --out DIR [--scale SCALE | --authors N --qa-per-author Q] [--seed S]
    soulkit evaluate MODEL_DIR [--split SPLIT] [--scale SCALE | --data DIR] [--out DIR]
    soulkit unlearn --method METHOD [--optimizer OPT] [--split SPLIT]
                    [--model DIR] [--data DIR] --out DIR [--lr LR] [--epochs E] [--overwrite]
                    [--mask salun|wagle [--mask-ratio R]]
                    [--rmu-layer L --rmu-coeff C --rmu-alpha A --rmu-update-layers 0,1 --rmu-params NAMES] ...
    soulkit attack [MODEL_DIR] --attack ATTACK [--split SPLIT] [--scale SCALE | --data DIR] --out DIR
                   [--bits 4|8] [--group-size N] [--steps 10,25,50] [--lr LR] [--optimizer OPT] [--overwrite]
    soulkit influence MODEL_DIR --train TRAIN.jsonl --queries QUERIES.jsonl --out DIR [--solver ekfac|kfac|identity]
                      [--per-token] [--top-k K] [--text-field F | --prompt-field F --completion-field F]
                      [--max-length N] [--batch-size B] [--damping D] [--overwrite]

``evaluate``, ``unlearn`` and ``attack`` take the evaluation settings that change numbers: ``--truth-ratio
geometric|arithmetic``, ``--eval-examples N|all``, ``--eval-subset seeded|first``, ``--max-new-tokens N``
(defaults: the reference implementations', see :func:`soulkit.unlearn.evaluate.conventions`).

The choices (optimizers, architectures, methods, estimators, scales, splits) are those of the library's
registries, listed by ``soulkit COMMAND --help``; the help looks them up only when it is shown, so
building the parser imports nothing heavy.

``demo`` runs the stages of :data:`DEMO_STAGES` in order, each into ``<out>/<stage>``; a new story
(e.g. unlearning) is one more :class:`DemoStage` appended there.

Errors raised by the library (bad values, missing files, ...) are printed as one line on stderr
with a non-zero exit status; ``soulkit --debug ...`` shows the traceback instead. A missing optional
dependency is reported with the extra that installs it (``pip install 'soulkit[unlearn]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._extras import MissingExtraError, check_extra, missing_extra, missing_extra_message

__all__ = ["main", "build_parser", "DemoStage", "DEMO_STAGES"]

PROG = "soulkit"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Exceptions that mean "the input was wrong" (or the environment was), not "soulkit has a bug".
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError, FloatingPointError, ImportError)


class _UsageError(Exception):
    """argparse found bad arguments; carries the one-line message."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (no usage dump), raised instead of exiting, and
    whose help lists registry names looked up when the help is shown (:func:`_registry_argument`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._registry_help: list[tuple[argparse.Action, str, Callable[[], Sequence[str]], str | None]] = []

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")

    def format_help(self) -> str:
        for action, template, names, default in self._registry_help:
            action.help = template.format(choices=_choices_text(names, default))
        return super().format_help()


def _registry(module: str, attr: str) -> Callable[[], list[str]]:
    """The names of a registry (a dict's keys or a sequence), ``module.attr`` (dotted), imported on call."""

    def names() -> list[str]:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return list(obj)

    return names


def _field_default(module: str, cls: str, name: str) -> Callable[[], str]:
    """The default of dataclass field ``module.cls.name``, looked up on call."""

    def default() -> str:
        field = next(f for f in dataclasses.fields(getattr(importlib.import_module(module), cls)) if f.name == name)
        return field.default

    return default


def _choices_text(names: Callable[[], Sequence[str]], default: str | Callable[[], str] | None) -> str:
    try:
        listed = list(names())
        default = default() if callable(default) else default
    except ModuleNotFoundError as e:
        missing = missing_extra(e)
        if missing is None:
            raise
        return f"install 'soulkit[{missing[1]}]' to list them"
    return ", ".join(f"{n} (default)" if n == default else n for n in listed)


def _registry_argument(p: argparse.ArgumentParser, *flags: str, help: str, names: Callable[[], Sequence[str]],
                       default_name: str | Callable[[], str] | None = None, **kwargs) -> argparse.Action:
    """``p.add_argument`` whose ``help`` template has ``{choices}``: the registry's names, filled in when
    the help is shown (the parser is built without importing the registries). ``default_name`` (or the
    argument's default) is marked."""
    action = p.add_argument(*flags, help=help.format(choices="see --help"), **kwargs)
    assert isinstance(p, _Parser)
    p._registry_help.append((action, help, names, default_name if default_name is not None else action.default))
    return action


_DEMO_CONFIG = "soulkit.demos.lm.config"


# ---------------------------------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser, *, full: bool = True) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for the md/json/png (default: ./soulkit-train, ./soulkit-demo)")
    p.add_argument("--seed", type=int, default=0, help="model init and Sophia sampling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    if not full:
        return
    p.add_argument("--steps", type=int, default=None, help="training steps per optimizer (default 250)")
    _registry_argument(p, "--optimizers", default=None, help="comma-separated, from: {choices} (default: all)",
                       names=_registry(_DEMO_CONFIG, "ARMS"))
    _registry_argument(p, "--model", default=None, help="architecture: {choices}",
                       names=_registry(_DEMO_CONFIG, "MODEL_KINDS"),
                       default_name=_field_default(_DEMO_CONFIG, "TrainConfig", "model"))
    p.add_argument("--data-seed", type=int, default=None, help="batch order seed (default: --seed)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, dest="num_layers")
    p.add_argument("--heads", type=int, default=None, dest="num_heads")
    p.add_argument("--adamw-lr", type=float, default=None)
    p.add_argument("--sophia-lr", type=float, default=None)
    p.add_argument("--rho", type=float, default=None, dest="sophia_rho", help="Sophia's clipping scale")
    p.add_argument("--hbc-lr", type=float, default=None, dest="sophia_hbc_lr", help="lr of the sophia-hbc arm")
    p.add_argument("--hbc-rho", type=float, default=None, dest="sophia_hbc_rho", help="rho of the sophia-hbc arm")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--hessian-interval", type=int, default=None, dest="hessian_update_interval",
                   help="Sophia Hessian refresh interval k (default 10)")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None, help="cap on the bytes of text read")
    p.add_argument("--data", default=None, dest="data_path",
                   help="a local text file or directory to train on instead of the standard library")
    p.add_argument("--checkpoint-every", type=int, default=50, dest="checkpoint_every",
                   help="save every arm every N steps into OUT/checkpoint (0: never); running the same command "
                        "again after a kill resumes from there (default 50)")
    p.add_argument("--overwrite", action="store_true", help="replace results or a checkpoint already in --out")


_CONFIG_FIELDS = (
    "steps", "optimizers", "model", "data_seed", "batch_size", "seq_len", "hidden_size", "num_layers",
    "num_heads", "adamw_lr", "sophia_lr", "sophia_rho", "sophia_hbc_lr", "sophia_hbc_rho", "weight_decay",
    "hessian_update_interval",
    "grad_clip", "eval_every", "eval_batches", "max_bytes", "data_path",
)


def _train_config(args: argparse.Namespace):
    from .demos.lm import TrainConfig

    kwargs = {f: getattr(args, f) for f in _CONFIG_FIELDS if getattr(args, f, None) is not None}
    return TrainConfig(seed=args.seed, progress=not args.no_progress, **kwargs)


def _run_train(config, out: Path | None, checkpoint_every: int = 0) -> str:
    from .demos.lm import run_training_demo

    result = run_training_demo(config, out_dir=out, checkpoint_every=checkpoint_every,
                               notify=lambda line: print(line, flush=True))
    lines = [
        f"byte-level {config.model} LM, {result.n_params / 1e6:.2f} M parameters, {config.steps} steps, "
        f"{result.data_info['train_bytes']:,} train bytes",
        result.table,
    ]
    if result.paths:
        lines.append("wrote " + ", ".join(result.paths[k] for k in ("md", "json", "png")))
    return "\n".join(lines)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


# what `soulkit train` writes into --out: the report, and the checkpoint while it runs
_TRAIN_REPORT = ("train_lm.md", "train_lm.json", "train_lm.png")
# the flags of `soulkit train` whose names are not their destinations'
_TRAIN_FLAGS = {"num_layers": "--layers", "num_heads": "--heads", "sophia_rho": "--rho",
                "sophia_hbc_lr": "--hbc-lr", "sophia_hbc_rho": "--hbc-rho",
                "hessian_update_interval": "--hessian-interval", "data_path": "--data"}


def _cmd_train(args: argparse.Namespace) -> int:
    from .demos.lm.run import CHECKPOINT_DIR

    config = _train_config(args)  # validates before anything slow happens
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be an int >= 0 (0: no checkpoints), got {args.checkpoint_every}")
    if config.data_path is not None and not Path(config.data_path).expanduser().exists():  # before run.json
        raise FileNotFoundError(f"TrainConfig.data_path does not exist: {Path(config.data_path).expanduser()}")
    out = args.out if args.out is not None else Path("soulkit-train")
    _set_threads(args)
    state = _resume_or_start(out, args.overwrite, [*_TRAIN_REPORT, CHECKPOINT_DIR], _invocation(args),
                             results=_TRAIN_REPORT, model=None, flags=_TRAIN_FLAGS)
    if state == "complete":
        md = (out / "train_lm.md").read_text(encoding="utf-8")
        print("\n".join(line for line in md.splitlines() if line.startswith("|")))
        print(f"{out} holds this run's results already (same options); --overwrite starts it again")
        return 0
    if state == "resume" and not (out / CHECKPOINT_DIR).exists():
        print(f"{out} holds no checkpoint of this run (--checkpoint-every 0, or killed before the first one): "
              "training it again from step 0", flush=True)
    print(_run_train(config, out, args.checkpoint_every))
    return 0


# ------------------------------------------------------------------------------ data/evaluate/unlearn
_SCALES = _registry("soulkit.unlearn.suite", "SCALES")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    _registry_argument(p, "--scale", default="small", help="benchmark scale when no --data is given: {choices}",
                       names=_SCALES)
    p.add_argument("--data", type=Path, default=None, help="a benchmark directory written by `soulkit data`")
    p.add_argument("--seed-data", type=int, default=0, dest="data_seed", help="benchmark generator seed")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the benchmark's models are cached (default $SOULKIT_CACHE or ~/.cache/soulkit)")
    _registry_argument(p, "--split", default="forget05", help="forget split: {choices} (or forgetNN, NN in 1..99)",
                       names=_registry("soulkit.unlearn.data", "AuthorBenchmark.SPLITS"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """The evaluation settings that change numbers (defaults: the reference implementations')."""
    p.add_argument("--truth-ratio", default=None, dest="truth_ratio",
                   help="geometric (default: TOFU's code, open-unlearning) or arithmetic (the TOFU paper's form)")
    p.add_argument("--eval-examples", default=None, dest="eval_examples",
                   help="questions evaluated per set: 'all' (open-unlearning) or N (default: the scale's; "
                        "'all' on QA files)")
    p.add_argument("--eval-subset", default=None, dest="eval_subset",
                   help="with --eval-examples N: 'seeded' (a seeded subsample, default) or 'first' (the first N, "
                        "as TOFU's code takes the first 300)")
    p.add_argument("--max-new-tokens", type=int, default=None, dest="max_new_tokens",
                   help="greedy generation length for ROUGE (default 200, as the references; cut to the model's "
                        "context)")


def _eval_overrides(args: argparse.Namespace) -> dict:
    """The EvalConfig fields set by the flags of :func:`_add_eval_args`, checked (one line naming the flag)."""
    from .unlearn.evaluate import EVAL_SUBSETS
    from .unlearn.metrics import TRUTH_RATIO_MODES

    out: dict = {}
    if args.truth_ratio is not None:
        if args.truth_ratio not in TRUTH_RATIO_MODES:
            raise ValueError(f"--truth-ratio must be one of {', '.join(TRUTH_RATIO_MODES)}, got {args.truth_ratio!r}")
        out["truth_ratio"] = args.truth_ratio
    if args.eval_examples is not None:
        v = args.eval_examples.strip().lower()
        if v == "all":
            out["max_eval_examples"] = None
        else:
            try:
                n = int(v)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"--eval-examples must be 'all' or an int >= 1, got {args.eval_examples!r}")
            out["max_eval_examples"] = n
    if args.eval_subset is not None:
        if args.eval_subset not in EVAL_SUBSETS:
            raise ValueError(f"--eval-subset must be one of {', '.join(EVAL_SUBSETS)}, got {args.eval_subset!r}")
        out["subset"] = args.eval_subset
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be an int >= 1, got {args.max_new_tokens}")
        out["max_new_tokens"] = args.max_new_tokens
    return out


def _suite(args: argparse.Namespace, eval_overrides: dict | None = None):
    from .unlearn.suite import UnlearningSuite

    suite = UnlearningSuite.from_scale(args.scale, seed=args.data_seed, data_dir=args.data,
                                       cache_dir=args.cache_dir, progress=not args.no_progress)
    if eval_overrides:
        suite.eval_config = dataclasses.replace(suite.eval_config, **eval_overrides)
    return suite


def _check_out(out: Path, overwrite: bool, owned: Sequence[str]) -> None:
    """Refuse an output directory that already holds results unless ``overwrite``; then clear ours."""
    import shutil

    present = [name for name in owned if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds results ({', '.join(present)}); pass --overwrite or choose "
                              f"another --out")
    for name in present:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


# the record of the options a long job was started with, so that the same command resumes it
RUN_RECORD = "run.json"
# options that never change what a job computes
# parallel: a run resumes on any number of ranks (the checkpoint format and the trajectory are the same)
_NOT_RECORDED = ("out", "overwrite", "no_progress", "threads", "cache_dir", "func", "command", "parallel")


def _invocation(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
            if k not in _NOT_RECORDED and not callable(v)}


def _resume_or_start(out: Path, overwrite: bool, owned: Sequence[str], invocation: dict, *,
                     results: Sequence[str] = ("results.json",), model: str | None = "model",
                     flags: dict[str, str] | None = None) -> str:
    """Decide what a long job does with ``out``: ``"start"`` (empty, or ``--overwrite``: cleared), or, when
    ``out`` holds a run started with the same options, ``"resume"`` (it has a checkpoint), ``"evaluate"``
    (its ``model`` directory is written, its results are not) or ``"complete"`` (all of ``results`` are
    written). A run started with other options, or results without a record of their options, are refused
    naming the difference (``flags``: the option of a destination, where it is not ``--dest-with-dashes``)."""
    from ._io import atomic_write_json

    record = out / RUN_RECORD
    present = [name for name in owned if (out / name).exists()]
    if overwrite or not present:
        _check_out(out, True, [*owned, RUN_RECORD])
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, invocation)
        return "start"
    if not record.is_file():
        raise FileExistsError(f"{out} already holds results ({', '.join(present)}) with no record of how they were "
                              f"made; pass --overwrite or choose another --out")
    saved = json.loads(record.read_text())
    differ = sorted(k for k in set(saved) | set(invocation) if saved.get(k) != invocation.get(k))
    if differ:
        flags = flags or {}
        shown = ", ".join(f"{flags.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} -> {invocation.get(k)!r}"
                          for k in differ[:6])
        raise ValueError(f"{out} holds a run started with other options ({shown}); rerun it as it was started, "
                         "pass --overwrite to start over, or choose another --out")
    if all((out / name).exists() for name in results):
        return "complete"
    if model is not None and (out / model).is_dir():
        return "evaluate"
    return "resume"


def _cmd_data(args: argparse.Namespace) -> int:
    check_extra("unlearn", "soulkit data")
    from .unlearn.data import generate_benchmark
    from .unlearn.suite import SCALES

    if args.scale not in SCALES:
        raise ValueError(f"unknown scale {args.scale!r}; choose one of {', '.join(SCALES)}")
    n_authors = args.authors or SCALES[args.scale].n_authors
    qa = args.qa_per_author or SCALES[args.scale].qa_per_author
    _check_out(args.out, args.overwrite, ["meta.json", "qa.jsonl"])
    bench = generate_benchmark(n_authors, qa_per_author=qa, seed=args.data_seed)
    bench.save(args.out)
    print(f"wrote {len(bench.authors)} authors x {qa} QA ({len(bench.qa)} pairs), {len(bench.holdout)} holdout, "
          f"{len(bench.real_authors)} real-author and {len(bench.world_facts)} world-fact QA to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    check_extra("unlearn", "soulkit evaluate")
    from ._io import atomic_write_json
    from .unlearn.evaluate import format_results

    overrides = _eval_overrides(args)  # bad settings fail before anything slow
    _set_threads(args)
    files = {k: getattr(args, k) for k in ("forget", "retain", "real_authors", "world_facts", "holdout")}
    if any(v is not None for v in files.values()):
        return _evaluate_files(args, files, overrides)
    if args.reference is not None:
        raise ValueError("--reference goes with QA files (--forget/--retain/--real-authors/--world-facts); "
                         "on the generated benchmark the retrain is the reference")
    suite = _suite(args, overrides)
    suite.benchmark.split(args.split)  # validates the split name early
    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"model directory {args.model_dir} does not exist")
    out = args.out if args.out is not None else Path(args.model_dir).parent / f"eval-{args.split}"
    _check_out(out, args.overwrite, ["results.json"])  # refuse before the (slow) evaluation
    results = suite.evaluate_dir(args.model_dir, args.split)
    atomic_write_json(out / "results.json", results)
    print(format_results(results))
    print(f"wrote {out / 'results.json'}")
    return 0


def _evaluate_files(args: argparse.Namespace, files: dict[str, Path | None], overrides: dict) -> int:
    """``soulkit evaluate`` on QA files (e.g. real TOFU ``*_perturbed.json``) and any local model."""
    import json

    from ._io import atomic_write_json
    from .unlearn.data import read_jsonl
    from .unlearn.evaluate import EvalConfig, EvalSets, evaluate_model, format_results
    from .unlearn.models import load_model

    missing = [f"--{k.replace('_', '-')}" for k in ("forget", "retain", "real_authors", "world_facts")
               if files[k] is None]
    if missing:
        raise ValueError(f"evaluating on QA files needs {', '.join(missing)} too")
    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"model directory {args.model_dir} does not exist")
    reference = None
    if args.reference is not None:
        reference = json.loads(Path(args.reference).read_text())
    out = args.out if args.out is not None else Path(args.model_dir).parent / "eval"
    _check_out(out, args.overwrite, ["results.json"])
    sets = EvalSets(**{k: (read_jsonl(v) if v is not None else None) for k, v in files.items()})
    model, tok = load_model(args.model_dir)
    config = EvalConfig(show_progress=not args.no_progress, **overrides)
    results = evaluate_model(model, tok, sets, config=config, reference=reference)
    results["model_dir"] = str(args.model_dir)
    atomic_write_json(out / "results.json", results)
    print(format_results(results))
    print(f"wrote {out / 'results.json'}" + ("" if reference else " (no --reference: forget quality needs the "
                                            "results.json of a retain model evaluated on the same files)"))
    return 0


def _mask_overrides(args: argparse.Namespace) -> dict:
    """``--mask`` / ``--mask-ratio`` as UnlearnConfig fields; bad values are one line naming the flag."""
    import math

    from .unlearn.masks import MASKS

    if args.mask is None:
        if args.mask_ratio is not None:
            raise ValueError("--mask-ratio is a setting of --mask; add --mask " + " or --mask ".join(MASKS))
        return {}
    if args.mask not in MASKS:
        raise ValueError(f"unknown --mask {args.mask!r}; choose one of {', '.join(MASKS)}")
    out = {"mask": args.mask}
    if args.mask_ratio is not None:
        if not (math.isfinite(args.mask_ratio) and 0.0 < args.mask_ratio <= 1.0):
            raise ValueError(f"--mask-ratio must be in (0, 1], got {args.mask_ratio}")
        out["mask_ratio"] = args.mask_ratio
    return out


# the RMU flags of `soulkit unlearn`: dest -> (flag, RMU's option)
_RMU_FLAGS = {"rmu_layer": ("--rmu-layer", "layer"), "rmu_coeff": ("--rmu-coeff", "c"),
              "rmu_alpha": ("--rmu-alpha", "alpha"), "rmu_update_layers": ("--rmu-update-layers", "update_layers"),
              "rmu_params": ("--rmu-params", "params")}


def _rmu_kwargs(args: argparse.Namespace) -> dict:
    """RMU's options from the ``--rmu-*`` flags (refused with any other ``--method``)."""
    given = {dest: getattr(args, dest) for dest in _RMU_FLAGS if getattr(args, dest, None) is not None}
    if given and args.method != "rmu":
        raise ValueError(f"{', '.join(_RMU_FLAGS[d][0] for d in given)} "
                         f"{'is an option' if len(given) == 1 else 'are options'} of --method rmu, "
                         f"not --method {args.method}")
    out = {}
    for dest, value in given.items():
        flag, option = _RMU_FLAGS[dest]
        if dest == "rmu_update_layers":
            try:
                value = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"{flag} must be comma-separated block indices, got {value!r}") from None
        elif dest == "rmu_params":
            value = tuple(v.strip() for v in value.split(","))
        out[option] = value
    return out


def _check_trainable(objective, model_dir: Path | None, suite) -> None:
    """Check an objective's choice of parameters (RMU's layer and names) against the model's architecture,
    built on the meta device (no weights are read or trained), before ``--out`` is touched."""
    from .unlearn.objectives import Objective

    if type(objective).trainable_parameters is Objective.trainable_parameters:
        return
    import torch

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        if model_dir is not None:
            from transformers import AutoConfig, AutoModelForCausalLM

            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        else:  # the benchmark's finetuned model (perhaps not trained yet): the scale's architecture
            from ._causal_lm import build_model

            recipe = suite.zoo.recipe
            skeleton = build_model(recipe.model, vocab_size=recipe.vocab_size)
    objective.trainable_parameters(skeleton)


def _cmd_unlearn(args: argparse.Namespace) -> int:
    check_extra("unlearn", "soulkit unlearn")
    from ._io import atomic_write_json
    from .optim.factory import optimizer_options
    from .unlearn.evaluate import format_results
    from .unlearn.objectives import OBJECTIVES, make_objective
    from .unlearn.suite import default_unlearn_config
    from .unlearn.unlearner import OPTIMIZERS

    if args.method not in OBJECTIVES:
        raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(OBJECTIVES)}")
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {args.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    overrides = {k: getattr(args, k) for k in ("lr", "epochs", "steps", "batch_size", "grad_accum", "seed",
                                               "eval_every", "checkpoint_every")
                 if getattr(args, k) is not None}
    if args.no_progress:
        overrides["show_progress"] = False
    # optimizer options given as flags, checked against the options the optimizer takes before anything slow
    flags = {"rho": ("--rho", args.rho), "hessian_update_interval": ("--hessian-interval", args.hessian_interval)}
    opt_kwargs = {option: value for option, (_, value) in flags.items() if value is not None}

    def takes(name: str, option: str) -> bool:
        options = optimizer_options(name)
        return options is None or option in options

    refused = [option for option in opt_kwargs if not takes(args.optimizer, option)]
    if refused:
        takers = [n for n in OPTIMIZERS if all(takes(n, o) for o in refused)]
        raise ValueError(f"{' and '.join(flags[o][0] for o in refused)} {'is' if len(refused) == 1 else 'are'} not "
                         f"a setting of --optimizer {args.optimizer}"
                         + (f"; add --optimizer {' or '.join(takers)}" if takers else ""))
    if args.estimator is not None:
        overrides["estimator"] = args.estimator
    overrides.update(_mask_overrides(args))
    eval_overrides = _eval_overrides(args)
    config = default_unlearn_config(args.method, args.optimizer, optimizer_kwargs=opt_kwargs, **overrides)
    objective_kwargs = {}
    if args.beta is not None:
        objective_kwargs["beta"] = args.beta
    if args.gamma is not None:
        objective_kwargs["gamma"] = args.gamma
    objective_kwargs.update(_rmu_kwargs(args))
    objective = make_objective(args.method, **objective_kwargs)  # bad objective options fail before any work
    world, parallel = _unlearn_parallel(args.parallel)
    if parallel is not None:
        from .unlearn.unlearner import check_parallel_support

        check_parallel_support(parallel, objective, config)
    _set_threads(args)
    suite = _suite(args, eval_overrides)
    forget, retain = suite.benchmark.split(args.split)  # validates the split name before anything slow
    if parallel is not None:
        from .unlearn.unlearner import check_split

        check_split(len(forget), config.batch_size, world, "forget", "--batch-size")
        check_split(len(retain), config.batch_size, world, "retain", "--batch-size")
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"model directory {args.model} does not exist")
    _check_trainable(objective, args.model, suite)
    with contextlib.ExitStack() as stack:
        if parallel is not None:
            from .influence.lm_command import _process_group

            stack.enter_context(_process_group())  # torchrun: joins the ranks (gloo) for this run
        writer = _rank() == 0
        say = print if writer else (lambda *a, **k: None)
        state = _on_rank0(lambda: _resume_or_start(args.out, args.overwrite, ["results.json", "model", "log.jsonl",
                                                                             "checkpoint", "mask.safetensors"],
                                                   _invocation(args)))
        if state == "complete":
            say(format_results(json.loads((args.out / "results.json").read_text())))
            say(f"{args.out} holds this run's results already (same options); --overwrite starts it again")
            return 0
        if state == "evaluate":
            say(f"{args.out}/model was written before the run was interrupted: evaluating it", flush=True)
        elif state == "resume":
            say(f"resuming the run in {args.out} from its checkpoint", flush=True)
        results, run = suite.unlearn(args.method, args.optimizer, args.split, model_dir=args.model, config=config,
                                     objective_kwargs=objective_kwargs, out_dir=args.out, parallel=parallel)
        results["model_dir"] = str(run.model_dir)
        if parallel is not None:
            results["parallel"] = {"kind": parallel, "world_size": world}
        if writer:
            atomic_write_json(args.out / "results.json", results)
        say(format_results(results))
        say(f"{args.method} x {args.optimizer}: {run.steps} steps ({run.stopped}) in "
            f"{results['unlearn_seconds']:.1f} s; wrote {args.out / 'model'}, {args.out / 'results.json'}, "
            f"{args.out / 'log.jsonl'}")
        _on_rank0(lambda: None)  # the others wait until results.json is written
    return 0


def _unlearn_parallel(option: str | None) -> tuple[int, str | None]:
    """The world size and the Unlearner's ``parallel`` for ``soulkit unlearn``: under ``torchrun``
    (``WORLD_SIZE`` > 1, or a process group the caller initialised) ``--parallel``, default ``ddp``;
    in one process ``None`` (``--parallel`` is refused there: it needs the ranks)."""
    import torch.distributed as dist

    from .unlearn.parallel import PARALLEL

    if option is not None and option not in PARALLEL:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL)}, got {option!r}")
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if option is not None:
            raise ValueError(f"--parallel {option} needs several processes: start the command with torchrun "
                             "--nproc-per-node N -m soulkit unlearn ...")
        return world, None
    return world, option or "ddp"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only, its result (or its error, raised again) sent to every rank; ``fn()`` itself
    without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank fails with rank 0's error instead of waiting for it
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


_ATTACKS = "soulkit.unlearn.attacks"
# the flags of `soulkit attack` that belong to one attack each: dest -> (flag, the attacks it applies to)
_ATTACK_FLAGS = {
    "bits": ("--bits", ("quantize",)), "group_size": ("--group-size", ("quantize",)),
    "per_tensor": ("--per-tensor", ("quantize",)), "steps": ("--steps", ("relearn",)),
    "lr": ("--lr", ("relearn", "sequential")), "optimizer": ("--optimizer", ("relearn", "sequential")),
    "batch_size": ("--batch-size", ("relearn",)), "shots": ("--shots", ("few-shot",)),
    "seed": ("--seed", ("relearn", "few-shot", "multihop", "sequential")),
    "method": ("--method", ("sequential",)), "requests": ("--requests", ("sequential",)),
    "relearn_data": ("--relearn-data", ("relearn",)),
}


def _attack_config(args: argparse.Namespace):
    """The AttackConfig of ``soulkit attack``'s flags; bad values are one line naming the flag."""
    from .unlearn.attacks import (
        ATTACKS,
        RELEARN_DATA,
        RELEARN_OPTIMIZERS,
        SEQUENTIAL_OPTIMIZERS,
        AttackConfig,
    )
    from .unlearn.objectives import OBJECTIVES

    if args.attack not in ATTACKS:
        raise ValueError(f"unknown attack {args.attack!r}; choose one of {', '.join(ATTACKS)}")
    foreign = [flag for dest, (flag, attacks) in _ATTACK_FLAGS.items()
               if getattr(args, dest) not in (None, False) and args.attack not in attacks]
    if foreign:
        raise ValueError(f"{' and '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a setting of "
                         f"--attack {args.attack}")
    kw: dict = {"attack": args.attack}
    if args.bits is not None:
        if args.bits.strip() not in ("4", "8"):
            raise ValueError(f"--bits must be 4 or 8, got {args.bits!r}")
        kw["bits"] = int(args.bits)
    if args.group_size is not None:
        if args.group_size < 1:
            raise ValueError(f"--group-size must be an int >= 1, got {args.group_size}")
        kw["group_size"] = args.group_size
    if args.per_tensor:
        if args.group_size is not None:
            raise ValueError("--per-tensor and --group-size exclude each other")
        kw["per_channel"] = False
    if args.steps is not None:
        budgets = []
        for part in args.steps.split(","):
            try:
                b = int(part.strip())
            except ValueError:
                b = 0
            if b < 1:
                raise ValueError(f"--steps takes relearning budgets, ints >= 1 separated by commas (e.g. "
                                 f"10,25,50), got {args.steps!r}")
            budgets.append(b)
        kw["steps"] = tuple(budgets)
    if args.lr is not None:
        if not args.lr > 0 or args.lr == float("inf"):
            raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
        kw["lr"] = args.lr
    if args.optimizer is not None:
        allowed = SEQUENTIAL_OPTIMIZERS if args.attack == "sequential" else RELEARN_OPTIMIZERS
        if args.optimizer not in allowed:
            raise ValueError(f"unknown --optimizer {args.optimizer!r}; choose one of {', '.join(allowed)}")
        kw["optimizer"] = args.optimizer
    if args.relearn_data is not None:
        if args.relearn_data not in RELEARN_DATA:
            raise ValueError(f"unknown --relearn-data {args.relearn_data!r}; choose one of {', '.join(RELEARN_DATA)}")
        kw["relearn_data"] = args.relearn_data
    if args.method is not None:
        if args.method not in OBJECTIVES:
            raise ValueError(f"unknown --method {args.method!r}; choose one of {', '.join(OBJECTIVES)}")
        kw["method"] = args.method
    for dest, flag in (("batch_size", "--batch-size"), ("shots", "--shots"), ("seed", "--seed"),
                       ("requests", "--requests")):
        v = getattr(args, dest)
        if v is not None:
            if v < (0 if dest == "seed" else 1):
                raise ValueError(f"{flag} must be an int >= {0 if dest == 'seed' else 1}, got {v}")
            kw[dest] = v
    return AttackConfig(**kw)


def _cmd_attack(args: argparse.Namespace) -> int:
    check_extra("unlearn", "soulkit attack")
    from ._io import atomic_write_json
    from .unlearn.attacks import format_attack, run_attack

    config = _attack_config(args)  # every bad value fails here, before anything is loaded or written
    eval_overrides = _eval_overrides(args)
    model_dir = args.model_dir
    if model_dir is not None:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        if not any(model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"model directory {model_dir} holds no .safetensors weights; soulkit attacks "
                                    "save_pretrained(..., safe_serialization=True) directories")
        if args.out.resolve() == model_dir.resolve() or model_dir.resolve() in args.out.resolve().parents:
            raise ValueError(f"--out {args.out} is inside the model directory {model_dir}, which an attack never "
                             "modifies; choose another --out")
    if (args.out / "results.json").exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds results (results.json); pass --overwrite or choose another "
                              "--out")
    _set_threads(args)
    suite = _suite(args, eval_overrides)
    suite.benchmark.split(args.split)  # validates the split name before anything slow
    results = run_attack(suite, args.split, config, model_dir=model_dir,
                         progress=lambda msg: print(msg, flush=True))  # stage lines; --no-progress: no bars
    results["options"] = _invocation(args)
    atomic_write_json(args.out / "results.json", results)  # replaces an old one only now (--overwrite)
    print(format_attack(results))
    print(f"{config.attack} on {results['model_dir']} ({args.split}) in {results['attack_seconds']:.1f} s; "
          f"wrote {args.out / 'results.json'}")
    return 0


def _cmd_influence(args: argparse.Namespace) -> int:
    import math

    from .influence.lm_command import LM_SOLVERS, OUTPUT_FILES, check_model_dir, run_influence

    # every bad value fails here, before anything is loaded or written
    if args.solver not in LM_SOLVERS:
        raise ValueError(f"--solver must be one of {', '.join(LM_SOLVERS)}, got {args.solver!r}")
    for flag, v, low in (("--top-k", args.top_k, 1), ("--top-tokens", args.top_tokens, 1),
                         ("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 2),
                         ("--chunk-batches", args.chunk_batches, 1), ("--projection", args.projection, 1)):
        if v is not None and v < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {v}")
    if not (math.isfinite(args.damping) and args.damping >= 0):
        raise ValueError(f"--damping must be a finite number >= 0, got {args.damping}")
    if (args.prompt_field is None) != (args.completion_field is None):
        raise ValueError("--prompt-field and --completion-field go together: pass both, or neither (--text-field)")
    check_model_dir(args.model_dir)
    for flag, path in (("--train", args.train), ("--queries", args.queries)):
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist" if not path.exists() else f"{flag} {path} is "
                                    "not a file")
    out, model_dir = args.out.resolve(), args.model_dir.resolve()
    if out == model_dir or model_dir in out.parents:
        raise ValueError(f"--out {args.out} is inside the model directory {args.model_dir}, which soulkit influence "
                         "never modifies; choose another --out")
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file; choose a directory")
    if args.store is not None and args.store.exists() and not args.store.is_dir():
        raise FileExistsError(f"--store {args.store} is a file; choose a directory")
    present = [name for name in OUTPUT_FILES if (args.out / name).exists()]
    if present and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds results ({', '.join(present)}); pass --overwrite or choose "
                              "another --out")
    _set_threads(args)
    summary = run_influence(
        args.model_dir, args.train, args.queries, args.out, options=_invocation(args), solver=args.solver,
        per_token=args.per_token, top_k=args.top_k, top_tokens=args.top_tokens, text_field=args.text_field,
        prompt_field=args.prompt_field, completion_field=args.completion_field, max_length=args.max_length,
        batch_size=args.batch_size, damping=args.damping, progress=not args.no_progress, overwrite=args.overwrite,
        chunk_batches=args.chunk_batches, projection=args.projection, store=args.store,
    )  # results replace old ones (--overwrite) only once all of them are written; the store resumes a killed run
    if summary["rank"] == 0:
        print(f"{args.solver} influence of {summary['n_train']} training examples on {summary['n_queries']} queries "
              f"in {summary['seconds']:.1f} s" + (" (resumed)" if summary["resumed"] else "")
              + (f" on {summary['world']} processes" if summary["world"] > 1 else "")
              + f"; wrote {', '.join(summary['paths'])}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.kernels import build_parser as bench_parser
    from .bench.kernels import run

    parser = bench_parser()
    parser.prog = f"{PROG} bench kernels"
    options = parser.parse_args(args.options)
    stem = run(options)
    print(f"wrote {stem}.json, .md and .png")
    return 0


# ---------------------------------------------------------------------------------------------- demo
@dataclass(frozen=True)
class DemoStage:
    """One part of ``soulkit demo``: ``run(args, out_dir)`` does the work and returns text to print.
    ``extras``: the optional dependencies it needs, checked for every chosen stage before the first runs."""

    name: str
    description: str
    run: Callable[[argparse.Namespace, Path], str]
    extras: tuple[str, ...] = ()


def _demo_train(args: argparse.Namespace, out: Path) -> str:
    from .demos.lm import TrainConfig

    return _run_train(TrainConfig(seed=args.seed, progress=not args.no_progress), out)


def _demo_unlearn(args: argparse.Namespace, out: Path) -> str:
    from .demos.unlearn_tofu import run_unlearning_demo

    return run_unlearning_demo(out, progress=not args.no_progress).table


DEMO_STAGES: tuple[DemoStage, ...] = (
    DemoStage("train", "AdamW vs Sophia on a byte-level LM (the default `soulkit train`)", _demo_train),
    DemoStage("unlearn", "SOUL (Sophia) vs AdamW unlearning on the fictitious-author benchmark", _demo_unlearn,
              extras=("unlearn",)),
)


def _cmd_demo(args: argparse.Namespace) -> int:
    names = [s.name for s in DEMO_STAGES]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown or not wanted:
            raise ValueError(f"--only: unknown demo stage {', '.join(unknown) or repr(args.only)}; choose from {names}")
        stages = [s for s in DEMO_STAGES if s.name in wanted]
    else:
        stages = list(DEMO_STAGES)
    for stage in stages:
        for extra in stage.extras:
            check_extra(extra, f"the '{stage.name}' stage of soulkit demo")
    out = args.out if args.out is not None else Path("soulkit-demo")
    _set_threads(args)
    for i, stage in enumerate(stages, 1):
        print(f"== [{i}/{len(stages)}] {stage.name}: {stage.description}", flush=True)
        print(stage.run(args, out / stage.name), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Second-order optimization for PyTorch: Sophia, influence, unlearning.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p_train = sub.add_parser("train", help="train a byte-level LM with AdamW and Sophia side by side")
    _add_train_args(p_train)
    p_train.set_defaults(func=_cmd_train)

    p_demo = sub.add_parser("demo", help="run the end-to-end demo (default sizes)")
    _add_train_args(p_demo, full=False)
    p_demo.add_argument("--only", default=None,
                        help="comma-separated stages to run: " + ", ".join(s.name for s in DEMO_STAGES))
    p_demo.set_defaults(func=_cmd_demo, out=None)

    p_data = sub.add_parser("data", help="write the fictitious-author benchmark (JSONL, TOFU field names)")
    p_data.add_argument("--out", type=Path, required=True)
    _registry_argument(p_data, "--scale", default="small", help="benchmark scale: {choices}", names=_SCALES)
    p_data.add_argument("--authors", type=int, default=None, help="number of authors (default: the scale's)")
    p_data.add_argument("--qa-per-author", type=int, default=None, dest="qa_per_author")
    p_data.add_argument("--seed", type=int, default=0, dest="data_seed")
    p_data.add_argument("--overwrite", action="store_true")
    p_data.set_defaults(func=_cmd_data)

    p_eval = sub.add_parser("evaluate", help="TOFU evaluation of a model directory against the exact retrain")
    p_eval.add_argument("model_dir", type=Path, help="a save_pretrained directory (safetensors)")
    _add_bench_args(p_eval)
    p_eval.add_argument("--out", type=Path, default=None, help="where results.json goes (default: "
                        "MODEL_DIR/../eval-SPLIT)")
    p_eval.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
    for name, what in [("forget", "forget-set"), ("retain", "retain-set"), ("real-authors", "real-author"),
                       ("world-facts", "world-fact"), ("holdout", "holdout (non-member) ")]:
        p_eval.add_argument(f"--{name}", type=Path, default=None, dest=name.replace("-", "_"),
                            help=f"{what} QA file (JSONL, TOFU fields) instead of the generated benchmark")
    _add_eval_args(p_eval)
    p_eval.add_argument("--reference", type=Path, default=None,
                        help="results.json of the retain model on the same files: forget quality and privleak "
                             "are computed against it")
    p_eval.set_defaults(func=_cmd_evaluate)

    p_bench = sub.add_parser("bench", help="kernel microbenchmarks: soulkit bench kernels [--help]",
                             add_help=False)
    p_bench.add_argument("suite", choices=["kernels"], help="what to benchmark")
    p_bench.add_argument("options", nargs=argparse.REMAINDER, help="the suite's options (soulkit bench kernels --help)")
    p_bench.set_defaults(func=_cmd_bench)

    p_un = sub.add_parser("unlearn", help="unlearn a forget split (SOUL = --optimizer sophia)")
    _registry_argument(p_un, "--method", required=True, help="unlearning objective: {choices}",
                       names=_registry("soulkit.unlearn.objectives", "OBJECTIVES"))
    _registry_argument(p_un, "--optimizer", default="sophia", help="optimizer: {choices}",
                       names=_registry("soulkit.unlearn.unlearner", "OPTIMIZERS"))
    p_un.add_argument("--model", type=Path, default=None,
                      help="model directory to unlearn from (default: the benchmark's finetuned model)")
    p_un.add_argument("--out", type=Path, required=True)
    p_un.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    _add_bench_args(p_un)
    p_un.add_argument("--lr", type=float, default=None)
    p_un.add_argument("--epochs", type=float, default=None, help="passes over the forget set (default 5)")
    p_un.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p_un.add_argument("--batch-size", type=int, default=None, dest="batch_size")
    p_un.add_argument("--grad-accum", type=int, default=None, dest="grad_accum")
    p_un.add_argument("--seed", type=int, default=None)
    p_un.add_argument("--rho", type=float, default=None, help="Sophia's clipping scale")
    p_un.add_argument("--hessian-interval", type=int, default=None, dest="hessian_interval")
    _registry_argument(p_un, "--estimator", default=None, help="Sophia's Hessian estimator: {choices}",
                       names=_registry("soulkit.unlearn.unlearner", "ESTIMATORS"),
                       default_name=_field_default("soulkit.unlearn.unlearner", "UnlearnConfig", "estimator"))
    p_un.add_argument("--beta", type=float, default=None, help="NPO/SimNPO beta")
    p_un.add_argument("--gamma", type=float, default=None, help="retain-term weight")
    p_un.add_argument("--rmu-layer", type=int, default=None, dest="rmu_layer",
                      help="RMU: decoder block (0-based) whose output is steered (default (blocks - 1) // 4)")
    p_un.add_argument("--rmu-coeff", type=float, default=None, dest="rmu_coeff",
                      help="RMU: steering coefficient c, the norm of the target c*u (default 6.5)")
    p_un.add_argument("--rmu-alpha", type=float, default=None, dest="rmu_alpha",
                      help="RMU: weight of the retain activation distance (default 10)")
    p_un.add_argument("--rmu-update-layers", default=None, dest="rmu_update_layers",
                      help="RMU: comma-separated blocks whose parameters train (default layer-2..layer)")
    p_un.add_argument("--rmu-params", default=None, dest="rmu_params",
                      help="RMU: comma-separated parameter names within a block to train (default: the MLP "
                           "output projection, mlp.down_proj.weight / mlp.c_proj.weight)")
    p_un.add_argument("--eval-every", type=int, default=None, dest="eval_every",
                      help="every N steps record forget/retain answer probability (results.json: progress)")
    p_un.add_argument("--checkpoint-every", type=int, default=None, dest="checkpoint_every")
    _registry_argument(p_un, "--mask", default=None,
                       help="weight-saliency mask computed before unlearning; only the kept weights move: {choices}",
                       names=_registry("soulkit.unlearn.masks", "MASKS"))
    p_un.add_argument("--mask-ratio", type=float, default=None, dest="mask_ratio",
                      help="fraction of the weights --mask keeps, in (0, 1] (default 0.5)")
    _registry_argument(p_un, "--parallel", default=None,
                       help="under torchrun: data parallelism, {choices} (default there: ddp); each rank takes its "
                            "share of every batch, rank 0 writes",
                       names=_registry("soulkit.unlearn.parallel", "PARALLEL"))
    _add_eval_args(p_un)
    p_un.set_defaults(func=_cmd_unlearn)

    p_at = sub.add_parser("attack", help="does it stay forgotten? attack a model (relearn, quantize, ...) and "
                                         "evaluate it before and after, the exact retrain as the control")
    p_at.add_argument("model_dir", type=Path, nargs="?", default=None,
                      help="a save_pretrained directory (safetensors), never modified (default: the benchmark's "
                           "finetuned model)")
    _registry_argument(p_at, "--attack", required=True, help="attack: {choices}", names=_registry(_ATTACKS, "ATTACKS"))
    p_at.add_argument("--out", type=Path, required=True, help="where results.json goes")
    p_at.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    _add_bench_args(p_at)
    p_at.add_argument("--bits", default=None, help="quantize: 4 (default) or 8")
    p_at.add_argument("--group-size", type=int, default=None, dest="group_size",
                      help="quantize: one scale per N input columns (default: one per output channel)")
    p_at.add_argument("--per-tensor", action="store_true", dest="per_tensor", help="quantize: one scale per tensor")
    p_at.add_argument("--steps", default=None, help="relearn: budgets in steps, comma-separated (default 10,25,50)")
    p_at.add_argument("--lr", type=float, default=None, help="relearn: learning rate (default 1e-3); sequential: the "
                                                             "unlearning lr (default: the benchmark's for the method "
                                                             "and optimizer)")
    _registry_argument(p_at, "--optimizer", default=None, help="relearn: optimizer, {choices}; sequential: also "
                                                               "soul-released, signum",
                       names=_registry(_ATTACKS, "RELEARN_OPTIMIZERS"),
                       default_name=_field_default(_ATTACKS, "AttackConfig", "optimizer"))
    _registry_argument(p_at, "--method", default=None, help="sequential: unlearning objective, {choices}",
                       names=_registry("soulkit.unlearn.objectives", "OBJECTIVES"),
                       default_name=_field_default(_ATTACKS, "AttackConfig", "method"))
    p_at.add_argument("--requests", type=int, default=None,
                      help="sequential: forget01-sized requests unlearned one after another (default 4)")
    p_at.add_argument("--batch-size", type=int, default=None, dest="batch_size", help="relearn: batch size (default 8)")
    _registry_argument(p_at, "--relearn-data", default=None, dest="relearn_data",
                       help="relearn: what it fine-tunes on, {choices} (related: text naming the forget authors, "
                            "none of their facts)", names=_registry(_ATTACKS, "RELEARN_DATA"),
                       default_name=_field_default(_ATTACKS, "AttackConfig", "relearn_data"))
    p_at.add_argument("--shots", type=int, default=None, help="few-shot: retain QA pairs before each question "
                                                              "(default 2)")
    p_at.add_argument("--seed", type=int, default=None, help="relearn: forget halves and data order; few-shot: the example pairs; "
                                                             "multihop: the bridge titles; sequential: the "
                                                             "unlearning runs (default 0)")
    _add_eval_args(p_at)
    p_at.set_defaults(func=_cmd_attack)

    p_inf = sub.add_parser("influence", help="which training examples (and tokens) explain a causal LM's outputs: "
                                             "influence scores and a top-k report")
    p_inf.add_argument("model_dir", type=Path, help="a save_pretrained causal LM and its tokenizer (safetensors), "
                                                    "never modified")
    p_inf.add_argument("--train", type=Path, required=True, help="training examples, JSONL")
    p_inf.add_argument("--queries", type=Path, required=True, help="queries, JSONL")
    p_inf.add_argument("--out", type=Path, required=True,
                       help="where scores.safetensors, topk.jsonl, report.md and run.json go, and store/ (the "
                            "factors and chunks of scores, from which the same command resumes an interrupted run)")
    p_inf.add_argument("--overwrite", action="store_true",
                       help="replace results already in --out and start its store over")
    p_inf.add_argument("--store", type=Path, default=None,
                       help="keep the factors (and with --projection the training gradients) here instead of "
                            "OUT/store: later runs with other --queries and the same model, --train and options "
                            "reuse them (--overwrite does not clear a --store)")
    p_inf.add_argument("--projection", type=int, default=None,
                       help="LoGra-style: project each module's gradients to K x K and keep every training "
                            "example's projected gradient in the store, so scoring new queries needs no pass "
                            "over --train (default: exact gradients, one training pass per run)")
    p_inf.add_argument("--chunk-batches", type=int, default=16, dest="chunk_batches",
                       help="training batches per chunk of scores written to the store (default 16)")
    _registry_argument(p_inf, "--solver", default="ekfac", help="curvature: {choices} (identity: gradient dot "
                       "products)", names=_registry("soulkit.influence.lm_command", "LM_SOLVERS"))
    p_inf.add_argument("--per-token", action="store_true", dest="per_token",
                       help="also score every training token (scores.safetensors: per_token [queries, train, T])")
    p_inf.add_argument("--top-k", type=int, default=5, dest="top_k",
                       help="most positive and most negative training examples listed per query (default 5)")
    p_inf.add_argument("--top-tokens", type=int, default=5, dest="top_tokens",
                       help="with --per-token: tokens listed per training example (default 5)")
    p_inf.add_argument("--text-field", default="text", dest="text_field",
                       help="JSONL field scored as a whole (default text)")
    p_inf.add_argument("--prompt-field", default=None, dest="prompt_field",
                       help="with --completion-field: only the completion's tokens count in the loss")
    p_inf.add_argument("--completion-field", default=None, dest="completion_field")
    p_inf.add_argument("--max-length", type=int, default=None, dest="max_length",
                       help="truncate sequences to N tokens (default: the model's positions)")
    p_inf.add_argument("--batch-size", type=int, default=8, dest="batch_size", help="sequences per batch (default 8)")
    p_inf.add_argument("--damping", type=float, default=0.0,
                       help="added to the curvature (default 0: 0.1x each module's mean eigenvalue)")
    p_inf.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_inf.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p_inf.set_defaults(func=_cmd_influence)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soulkit`` console script and of ``python -m soulkit``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = PROG
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"{PROG} {args.command}"
        return int(args.func(args))
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as e:
        if debug:
            raise
        missing = missing_extra(e)
        if isinstance(e, MissingExtraError):
            message = _one_line(e)
        elif missing is not None:
            message = missing_extra_message(*missing, command)
        else:
            message = _one_line(e)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, but say how to see more
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    msg = str(e) if str(e) else type(e).__name__
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    return " ".join(msg.split())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
