"""The training loop: every optimizer ("arm") trains its own copy of the *same* initial weights on the
*same* batches, in lockstep.

Each step runs every live arm once, alternating which arm goes first, so machine noise hits all
arms alike and their step times are measured in the same run. Validation loss is computed every
``eval_every`` steps on fixed validation windows. The learning rate warms up linearly over
``warmup_frac`` of the steps, then follows a cosine down to ``min_lr_ratio`` of its peak.

With a ``checkpoint_dir``, :func:`train_arms` saves every arm every ``checkpoint_every`` steps and after
the last one (:mod:`soulkit._checkpoint`'s format, one directory per arm: weights, optimizer and LR
scheduler state, the torch and Python RNG states, the step and the curves so far; the whole
``checkpoint_dir`` is swapped in at once, so its arms always belong to the same step), and resumes from
the checkpoint it finds there. The batch order is a function of ``data_seed`` and the step, and Sophia's
label sampling of its seed and step, so a resumed run ends where an uninterrupted one does, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..._checkpoint import INFO_FILE, has_checkpoint, load_checkpoint, save_checkpoint
from ..._io import atomic_directory, to_json
from .config import OptimizerSpec, TrainConfig
from .corpus import load_text_bytes, token_batch, train_offsets, val_batches
from .model import build_model
from .optimizer import arm_optimizer

__all__ = ["ArmResult", "lr_lambda", "train_arms", "train_step"]


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier of each step (for ``LambdaLR``): linear warmup, then cosine decay."""
    warmup = int(round(config.warmup_frac * config.steps))
    total = config.steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class ArmResult:
    """Curves of one arm. Times are seconds of training work only (evaluation excluded)."""

    spec: OptimizerSpec
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    refresh_steps: list[int] = field(default_factory=list)  # Sophia: steps with a Hessian refresh
    win_rate: list[float] = field(default_factory=list)  # Sophia: fraction unclipped, at each refresh step
    warmup_s: float = 0.0  # one-off warm-up (compile) time on a throwaway copy, not in step_time
    diverged_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = dataclasses.asdict(self.spec)
        return d


@torch.no_grad()
def _evaluate(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        logits = model(b[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    model.train(was_training)
    return total / n


def _overall_win_rate(opt: torch.optim.Optimizer) -> float:
    """Sophia's win rate over all groups (weighted by size); nan if nothing was counted."""
    pairs = [(w, sum(p.numel() for p in g["params"])) for w, g in zip(opt.win_rate(), opt.param_groups)]
    pairs = [(w, n) for w, n in pairs if n and math.isfinite(w)]
    return sum(w * n for w, n in pairs) / sum(n for _, n in pairs) if pairs else math.nan


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    spec: OptimizerSpec,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    grad_clip: float,
    micro_batches: int = 1,
) -> tuple[float, bool]:
    """One training step; Sophia refreshes its Hessian estimate (GNB, from this forward's logits) when due.

    ``micro_batches > 1`` splits the batch and accumulates gradients; the refresh then uses the first
    micro-batch's logits only (half or less of the extra backward). Returns (mean loss, refreshed).
    """
    refresh = spec.kind == "sophia" and opt.hessian_due()
    total = 0.0
    for j, (x, y) in enumerate(zip(inputs.chunk(micro_batches), targets.chunk(micro_batches))):
        logits = model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if micro_batches > 1:
            loss = loss / micro_batches
        if refresh and j == 0:
            opt.accumulate_gnb(logits, labels=y)
        loss.backward()
        total += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    return total, refresh


def train_arms(
    config: TrainConfig,
    specs: Sequence[OptimizerSpec] | None = None,
    *,
    data: tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None = None,
    desc: str = "train",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    notify: Callable[[str], None] | None = None,
) -> tuple[list[ArmResult], dict[str, Any], int]:
    """Train one model copy per spec from the same init on the same batches, in lockstep.

    Returns ``(arm results, data info, number of parameters)``. A non-finite training loss stops that
    arm (``ArmResult.diverged_at``); the others go on.

    ``checkpoint_dir``: where checkpoints go (one subdirectory per arm, named by its label); when it
    holds one, training resumes from it (an arm that had finished or diverged is not trained again) and
    ``notify`` (e.g. ``print``) is told so, one line per arm. ``checkpoint_every``: save every N steps
    and after the last step (0: never). A checkpoint of another configuration is refused
    (``ValueError`` naming the differing fields).
    """
    specs = list(config.optimizer_specs() if specs is None else specs)
    if not specs:
        raise ValueError("train_arms needs at least one OptimizerSpec")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizer labels must be unique, got {labels}")
    train, val, info = load_text_bytes(config) if data is None else data
    offsets = train_offsets(train.numel(), config)
    val_windows = val_batches(val, config)

    base = build_model(config)
    n_params = sum(p.numel() for p in base.parameters())
    models, opts, scheds, results = [], [], [], []
    for spec in specs:
        m = copy.deepcopy(base)
        m.train()
        o = arm_optimizer(spec, m, seed=config.seed)
        models.append(m)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(config)))
        results.append(ArmResult(spec=spec))
    del base
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: no checkpoints), got {checkpoint_every}")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, saved_rng = 0, None
    if ckpt is not None and _recover_checkpoint(ckpt):
        start, saved_rng = _load_arms(ckpt, config, models, opts, scheds, results)
        for r in results:
            where = ckpt / _arm_dir(r.spec.label)
            if r.diverged_at is not None:
                line = f"{r.spec.label} diverged at step {r.diverged_at} before the interruption; not retrained"
            elif start >= config.steps:
                line = (f"{r.spec.label} finished its {config.steps} steps before the interruption; not retrained "
                        f"(checkpoint in {where})")
            else:
                line = f"resuming {r.spec.label} from step {start} (checkpoint in {where})"
            if notify is not None:
                notify(line)

    def save(step: int) -> None:
        if ckpt is not None and checkpoint_every and (step % checkpoint_every == 0 or step == config.steps):
            _save_arms(ckpt, step, config, models, opts, scheds, results)

    def eval_all(step: int) -> None:
        for m, r in zip(models, results):
            if r.diverged_at is None:
                r.eval_steps.append(step)
                r.val_loss.append(_evaluate(m, val_windows))

    with torch.random.fork_rng(devices=[]):  # dropout (GPT-2 with dropout > 0) draws from a seeded RNG
        torch.manual_seed(config.seed + 1)
        # One-off costs (the compiled CPU Sophia step compiles on first use, allocator warm-up) are
        # paid on throwaway copies before the timed run and reported apart: step times are steady-state.
        # A resumed run warms up the arms it still trains again, but keeps the warm-up times it recorded.
        warm = token_batch(train, offsets[0], config.seq_len)
        for spec, m, r in zip(specs, models, results):
            if config.timing_warmup_steps and start < config.steps and r.diverged_at is None:
                wm = copy.deepcopy(m)
                wo = arm_optimizer(spec, wm, seed=config.seed)
                t0 = time.perf_counter()
                for _ in range(config.timing_warmup_steps):
                    train_step(wm, wo, None, spec, warm[:, :-1], warm[:, 1:], config.grad_clip)
                if saved_rng is None:
                    r.warmup_s = time.perf_counter() - t0
                del wm, wo
        if saved_rng is not None:  # the RNGs as they were after the checkpointed step
            torch.set_rng_state(saved_rng["torch"])
            random.setstate(saved_rng["python"])
        if start < config.steps:
            _run_lockstep(config, models, opts, scheds, results, train, offsets, eval_all, desc, start=start,
                          after_step=save)
    return results, info, n_params


# ---------------------------------------------------------------------------------------------- checkpoints
def _arm_dir(label: str) -> str:
    """The checkpoint subdirectory of an arm: its label, with anything but letters, digits, '.', '_' and '-'
    replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", label) or "_"


def _record(config: TrainConfig) -> dict[str, Any]:
    """The configuration a checkpoint belongs to, as JSON sees it (``progress`` changes no number)."""
    d = config.to_dict()
    d.pop("progress", None)
    return json.loads(to_json(d))


def _result_record(r: ArmResult) -> dict[str, Any]:
    return json.loads(to_json(r.to_dict()))


def _restore_result(spec: OptimizerSpec, saved: dict[str, Any]) -> ArmResult:
    """An ArmResult from its JSON record (strict JSON wrote non-finite floats as null: they come back as nan)."""
    nan = lambda xs: [math.nan if x is None else x for x in xs]  # noqa: E731
    return ArmResult(spec=spec, eval_steps=list(saved["eval_steps"]), val_loss=nan(saved["val_loss"]),
                     train_loss=nan(saved["train_loss"]), step_time=nan(saved["step_time"]),
                     refresh_steps=list(saved["refresh_steps"]), win_rate=nan(saved["win_rate"]),
                     warmup_s=saved["warmup_s"], diverged_at=saved["diverged_at"])


def _save_arms(ckpt: Path, step: int, config: TrainConfig, models, opts, scheds, results) -> None:
    """Every arm's state after ``step`` steps, as ``ckpt/<arm>/``; ``ckpt`` is replaced whole."""
    for stale in ckpt.parent.glob(f".{ckpt.name}.tmp-*"):  # left by a process killed while writing one
        shutil.rmtree(stale, ignore_errors=True)
    rng = {"torch": torch.get_rng_state()}
    version, state, gauss = random.getstate()
    python_rng = [version, list(state), gauss]
    with atomic_directory(ckpt) as tmp:
        for m, o, s, r in zip(models, opts, scheds, results):
            save_checkpoint(tmp / _arm_dir(r.spec.label), m,
                            {"optimizer": o.state_dict(), "scheduler": s.state_dict(), "rng": rng},
                            {"step": step, "label": r.spec.label, "config": _record(config),
                             "python_rng": python_rng, "result": _result_record(r)})


def _recover_checkpoint(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds a checkpoint. A process killed between the two renames of a checkpoint swap
    left it only as ``.<name>.old-<pid>`` beside: it is put back."""
    if not ckpt.exists():
        old = sorted(ckpt.parent.glob(f".{ckpt.name}.old-*")) if ckpt.parent.is_dir() else []
        if not old:
            return False
        os.rename(old[-1], ckpt)
    return ckpt.is_dir()


def _load_arms(ckpt: Path, config: TrainConfig, models, opts, scheds, results) -> tuple[int, dict[str, Any]]:
    """Restore every arm from ``ckpt`` in place; returns the step and the RNG states to set."""
    now = _record(config)
    steps, rng = set(), None
    for i, (m, o, s, r) in enumerate(zip(models, opts, scheds, results)):
        d = ckpt / _arm_dir(r.spec.label)
        if not has_checkpoint(d):
            raise ValueError(f"{ckpt} holds no checkpoint of the arm {r.spec.label!r}: it was written by a run with "
                             "other optimizers; use another out_dir or remove the checkpoint")
        info = json.loads((d / INFO_FILE).read_text(encoding="utf-8"))  # checked before anything is loaded
        saved = info.get("config", {})
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if info.get("result", {}).get("spec") != _result_record(r)["spec"]:
            differ.append(f"the {r.spec.label} optimizer's settings")
        if differ:
            raise ValueError(f"{d} was written by a run with another configuration ({', '.join(differ)}); use "
                             "another out_dir or remove the checkpoint")
        states, info = load_checkpoint(d, m)
        o.load_state_dict(states["optimizer"])
        s.load_state_dict(states["scheduler"])
        results[i] = _restore_result(r.spec, info["result"])
        steps.add(int(info["step"]))
        version, state, gauss = info["python_rng"]
        rng = {"torch": states["rng"]["torch"], "python": (version, tuple(state), gauss)}
    if len(steps) != 1:
        raise ValueError(f"{ckpt} holds arms checkpointed at different steps {sorted(steps)}; remove it")
    return steps.pop(), rng


def _run_lockstep(
    config: TrainConfig,
    models: list[torch.nn.Module],
    opts: list[torch.optim.Optimizer],
    scheds: list[torch.optim.lr_scheduler.LRScheduler],
    results: list[ArmResult],
    train: torch.Tensor,
    offsets: torch.Tensor,
    eval_all: Callable[[int], None],
    desc: str,
    start: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Every step, each live arm trains once on the same batch; the arm order alternates per step.
    ``start``: the steps already done (a resumed run); ``after_step(n)`` runs after step n is done and
    evaluated (checkpoints)."""
    from tqdm.auto import tqdm

    if start == 0:
        eval_all(0)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=desc, disable=not config.progress,
               dynamic_ncols=True, leave=False)
    for step in bar:
        batch = token_batch(train, offsets[step], config.seq_len)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        order = range(len(results)) if step % 2 == 0 else reversed(range(len(results)))
        for i in order:
            r = results[i]
            if r.diverged_at is not None:
                continue
            t0 = time.perf_counter()
            loss_value, refresh = train_step(models[i], opts[i], scheds[i], r.spec, inputs, targets, config.grad_clip)
            r.step_time.append(time.perf_counter() - t0)
            r.train_loss.append(loss_value)
            if refresh:
                # Sophia counts unclipped coordinates on the step that folds a refresh
                r.refresh_steps.append(step)
                r.win_rate.append(_overall_win_rate(opts[i]))
            if not math.isfinite(loss_value):
                r.diverged_at = step
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            eval_all(step + 1)
        if after_step is not None:
            after_step(step + 1)
        bar.set_postfix({r.spec.label: f"{r.train_loss[-1]:.3f}" for r in results if r.train_loss}, refresh=False)
    bar.close()

