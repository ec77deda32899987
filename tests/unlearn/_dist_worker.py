"""Rank bodies and the shared run recipe of ``tests/unlearn/test_unlearner_distributed.py``.

Each scenario runs the :class:`~soulkit.unlearn.Unlearner` on a tiny float64 Llama, on 2 CPU ranks
(gloo; ``tests/_dist.py`` starts them) with ``parallel="ddp"`` or ``"fsdp2"``; the test runs the same
recipe (:func:`run`) in one process and compares. Scenarios with ``interrupt_at`` are stopped by their
``evaluate_fn`` after that step and resumed from their checkpoint by a second Unlearner.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from soulkit.unlearn.objectives import Objective, ObjectiveOutput

from .. import _dist
from ._corpus import ARCH, FORGET, RETAIN
from .conftest import _TEXTS

WORLD_SIZE = 2


@dataclasses.dataclass(frozen=True)
class Spec:
    objective: str
    objective_kwargs: dict[str, Any]
    optimizer: str
    config: dict[str, Any]
    interrupt_at: int | None = None  # stop after this step, then resume from the checkpoint
    nan_at_call: int | None = None  # the objective's loss is NaN at this call (1-based) on the last rank only
    kinds: tuple[str, ...] = ("ddp", "fsdp2")
    on_disk: bool = True  # False: no out_dir (a NaN restores the in-memory snapshot)


_BASE = dict(lr=1e-2, steps=5, batch_size=4, show_progress=False, seed=3)
SPECS = {
    "graddiff_adamw": Spec("graddiff", {"retain_loss": "nll"}, "adamw",
                           dict(_BASE, grad_accum=2, schedule="linear", warmup_steps=1, weight_decay=0.01)),
    "npo_sophia": Spec("npo", {"retain_loss": "kl"}, "sophia",
                       dict(_BASE, checkpoint_every=2, optimizer_kwargs={"hessian_update_interval": 2}),
                       interrupt_at=3),
    # a weight-saliency mask (computed by every rank from the whole forget set, written by rank 0)
    "graddiff_salun": Spec("graddiff", {}, "sophia", dict(_BASE, steps=4, mask="salun", mask_ratio=0.3,
                                                          checkpoint_every=2), kinds=("ddp",)),
    # a NaN seen by one rank only: every rank stops and restores the step-2 checkpoint
    "nonfinite": Spec("graddiff", {}, "adamw", dict(_BASE, checkpoint_every=2), nan_at_call=4),
    "nonfinite_in_memory": Spec("graddiff", {}, "sophia", dict(_BASE, checkpoint_every=2), nan_at_call=4,
                                kinds=("fsdp2",), on_disk=False),
    # SOUL's released optimizer (its own squared-gradient "Hessian") and sign-momentum, with the IDK objective
    "idk_soulreleased": Spec("idk", {}, "soul-released", dict(_BASE, steps=3), kinds=("fsdp2",)),
    # Sophia's Hutchinson refresh: each rank's estimate of its share's loss, averaged over the ranks by Sophia
    "graddiff_hutchinson": Spec("graddiff", {}, "sophia", dict(_BASE, steps=3, estimator="hutchinson",
                                                               optimizer_kwargs={"hessian_update_interval": 2}),
                                kinds=("ddp",)),
    "simnpo_signum": Spec("simnpo", {"retain_loss": "nll"}, "signum", dict(_BASE, steps=3), kinds=("ddp",)),
}
SCENARIOS = (*(f"{kind}_{name}" for name, spec in SPECS.items() for kind in spec.kinds), "bad_batch", "cli_ddp")

#: ``soulkit unlearn`` on 4 authors x 4 QA: forget25 is one author's 4 QA, the retain set 12, so batches of 4
#: split over 2 ranks. The test runs it in one process first (training the models into the cache that
#: :data:`CLI_CACHE_ENV` names, which the ranks then reuse), then on the ranks (``--parallel`` by default).
CLI_CACHE_ENV = "SOULKIT_TEST_DIST_CLI_CACHE"
CLI_SCALE = "tiny4x4"


def cli_args(out: Path, cache: Path) -> list[str]:
    return ["unlearn", "--method", "npo", "--optimizer", "sophia", "--split", "forget25", "--scale", CLI_SCALE,
            "--cache-dir", str(cache), "--no-progress", "--batch-size", "4", "--steps", "3", "--hessian-interval",
            "2", "--lr", "1e-3", "--out", str(out)]


def add_cli_scale() -> None:
    from soulkit.unlearn import suite
    from soulkit.unlearn.evaluate import EvalConfig
    from soulkit.unlearn.models import TrainRecipe

    suite.SCALES[CLI_SCALE] = suite.Scale(
        4, 4, TrainRecipe(model=ARCH, vocab_size=400, pretrain_epochs=2, finetune_max_epochs=4, check_every=2,
                          target_rouge=0.99, batch_size=16),
        EvalConfig(max_eval_examples=20, max_new_tokens=12, show_progress=False), "test scale: 4 authors x 4 QA")


def _cli(rank: int, world: int, out_dir: Path) -> dict:
    import os

    from safetensors.torch import load_file

    from soulkit.cli import main

    add_cli_scale()
    out = out_dir / "cli_ddp"
    code = main(cli_args(out, Path(os.environ[CLI_CACHE_ENV])))
    if code != 0:
        raise AssertionError(f"soulkit unlearn exited {code} on rank {rank}")
    torch.distributed.barrier()
    return {"weights": load_file(str(out / "model" / "model.safetensors")),
            "results": json.loads((out / "results.json").read_text()),
            "files": sorted(p.name for p in out.iterdir())}


class _NaNOnLastRank(Objective):
    """``inner``, except that call ``at`` (1-based) returns a NaN loss on the last rank (the only one in
    one process)."""

    def __init__(self, inner: Objective, at: int):
        self.inner, self.at, self.calls = inner, at, 0
        self.name = inner.name

    @property
    def needs_retain(self) -> bool:
        return self.inner.needs_retain

    @property
    def needs_reference(self) -> bool:
        return self.inner.needs_reference

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        self.calls += 1
        out = self.inner.compute(model, forget_batch, retain_batch, reference)
        dist = torch.distributed
        last = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        if self.calls == self.at and last:
            out.loss = out.loss * float("nan")
        return out


class Interrupted(Exception):
    pass


def build():
    """The tokenizer and the float64 starting model (the same in every process)."""
    from soulkit.unlearn.models import build_model, train_tokenizer

    tok = train_tokenizer(_TEXTS * 4, vocab_size=320, min_frequency=1)
    return tok, build_model(ARCH, tok, seed=0).double().eval()


def vocab_digest(tok) -> str:
    return hashlib.sha256(repr(sorted(tok.get_vocab().items())).encode()).hexdigest()


def run(name: str, parallel: str | None, out_dir: Path, *, interrupt: bool = True):
    """Scenario ``name``'s Unlearner run (with ``interrupt``, resumed after an interruption if its spec says
    so): the tokenizer, the result, whether the input model was left untouched, and the step resumed from
    (or None)."""
    from soulkit.unlearn import UnlearnConfig, Unlearner, make_objective
    from soulkit.unlearn.checkpoint import INFO_FILE

    spec = SPECS[name]
    tok, model = build()
    cfg = UnlearnConfig(**spec.config)

    def unlearner(config, evaluate_fn=None):
        objective = make_objective(spec.objective, **spec.objective_kwargs)
        if spec.nan_at_call is not None:
            objective = _NaNOnLastRank(objective, spec.nan_at_call)
        return Unlearner(model, tok, objective, forget=FORGET,
                         retain=RETAIN, optimizer=spec.optimizer, config=config,
                         out_dir=out_dir if spec.on_disk else None,
                         evaluate_fn=evaluate_fn, parallel=parallel)

    start = {k: v.clone() for k, v in model.state_dict().items()}
    resumed_from = None
    if interrupt and spec.interrupt_at is not None:
        def stop(_model, step):
            if step == spec.interrupt_at:
                raise Interrupted
            return {}

        try:
            unlearner(dataclasses.replace(cfg, eval_every=1), stop).run()
        except Interrupted:
            pass
        else:
            raise AssertionError("the run was not interrupted")
        resumed_from = json.loads((out_dir / "checkpoint" / INFO_FILE).read_text())["step"]
    result = unlearner(cfg).run()
    untouched = all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    return tok, result, untouched, resumed_from


def _body(rank: int, world: int, scenario: str, out_dir: Path) -> dict:
    if scenario == "bad_batch":
        from soulkit.unlearn import UnlearnConfig, Unlearner, make_objective

        tok, model = build()
        try:
            Unlearner(model, tok, make_objective("graddiff"), forget=FORGET, retain=RETAIN,
                      config=UnlearnConfig(batch_size=3, steps=1), parallel="ddp")
            return {"error": ""}
        except ValueError as exc:
            return {"error": str(exc)}
    parallel, name = scenario.split("_", 1)
    tok, result, untouched, resumed_from = run(name, parallel, out_dir / scenario)
    d = out_dir / scenario
    files = {} if not SPECS[name].on_disk else {
        "model_dir": result.model_dir is not None and (d / "model").is_dir(),
        "checkpoint_left": (d / "checkpoint").exists(),
        "log_lines": len((d / "log.jsonl").read_text().splitlines()),
        "stray": sorted(p.name for p in d.iterdir() if p.name not in ("model", "log.jsonl", "mask.safetensors")),
        "mask_file": (d / "mask.safetensors").is_file(),
    }
    return {**files,
        "params": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "is_plain": not any(hasattr(p, "device_mesh") for p in result.model.parameters()),
        "losses": [e["loss"] for e in result.log],
        "steps": result.steps,
        "untouched": untouched,
        "resumed_from": -1 if resumed_from is None else resumed_from,
        "vocab": vocab_digest(tok),
        "stopped": result.stopped,
        "written": (d.exists() and any(d.iterdir())) if not SPECS[name].on_disk else True,
    }


BODIES = {s: functools.partial(_body, scenario=s) for s in SCENARIOS if s != "cli_ddp"}
BODIES["cli_ddp"] = _cli


def main(rank: int, world: int, scenarios: list[str], out_dir: str) -> None:
    """Entry point of one rank: the scenarios in one process group, as ``tests/_dist.py`` runs them."""
    bodies = {s: functools.partial(BODIES[s], out_dir=Path(out_dir)) for s in scenarios}
    _dist.run_rank(rank, world, scenarios, out_dir, bodies)


if __name__ == "__main__":  # manual run: python -m tests.unlearn._dist_worker OUT_DIR [SCENARIO ...]
    import torch.multiprocessing as mp

    chosen = sys.argv[2:] or list(SCENARIOS)
    mp.start_processes(main, args=(WORLD_SIZE, chosen, sys.argv[1]), nprocs=WORLD_SIZE, start_method="spawn")
