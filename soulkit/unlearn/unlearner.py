"""The unlearning loop: any forget objective under any optimizer; SOUL is the Sophia case.

    from soulkit.unlearn import Unlearner, UnlearnConfig, make_objective
    u = Unlearner(model, tokenizer, make_objective("npo"), forget=forget_qa, retain=retain_qa,
                  optimizer="sophia", config=UnlearnConfig(lr=1e-4, epochs=5), out_dir="runs/npo-sophia")
    result = u.run()           # result.model is the unlearned copy; `model` itself is never modified

Each optimizer step takes a forget batch and a paired retain batch (both cycled through their sets
in a seeded order), evaluates the objective on ``grad_accum`` such pairs, optionally clips the
gradient norm, and steps the optimizer under a warmup + constant/linear/cosine lr schedule.

SOUL (Jia et al. 2024) is this loop with :class:`soulkit.optim.Sophia`: every
``hessian_update_interval`` steps the Hessian-diagonal estimate is refreshed, by default with the
Gauss-Newton-Bartlett estimator on the answer tokens of the step's forget and retain batches (one
extra forward and backward per refresh; each answer position's label is drawn with a uniform keyed
by the seed, the step, the micro-batch and the position in the batch, so data-parallel ranks draw
what one process draws), or with Hutchinson's estimator of the objective's own Hessian
(``estimator="hutchinson"``; double backward through an attention path that has one).

With ``parallel="ddp"`` or ``"fsdp2"`` the loop runs under ``torch.distributed`` (``torchrun``): each
rank takes its rows of every global batch and the run follows the one-process trajectory
(:mod:`soulkit.unlearn.parallel`).

With ``out_dir`` the run checkpoints (``checkpoint/``, written by
:func:`soulkit.unlearn.checkpoint.save_checkpoint`: weights, optimizer state, step, logs) every
``checkpoint_every`` steps and resumes from there when started again; the data order and Sophia's
label sampling are functions of the seed and the step, so a resumed run ends where an uninterrupted
one does. A non-finite loss stops the run and restores the last good checkpoint.

With ``UnlearnConfig.mask`` (``"salun"`` or ``"wagle"``, :mod:`soulkit.unlearn.masks`) a weight-saliency
mask is computed once, at the starting weights, before the first step, and only the kept
``mask_ratio`` fraction of the weights moves: the other weights' gradients are zeroed before clipping
and each optimizer step, and the weights are written back after it (so weight decay and optimizer
state cannot move them). With ``out_dir`` the mask is saved as ``mask.safetensors`` and a resumed run
reads it back instead of recomputing it from weights that have moved.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..optim import Sophia, differentiable_attention
from ..optim.estimators import DIAGONAL_ESTIMATORS, LABEL_STREAM, sampled_label_loss, seeded_generator
from ..optim.factory import make_optimizer
from ..optim.lm_targets import causal_lm_targets
from .checkpoint import INFO_FILE, has_checkpoint, load_checkpoint, save_checkpoint
from .masks import (
    MASKS,
    WAGLE_MU,
    MaskedWeights,
    check_mask_ratio,
    load_mask,
    salun_mask,
    save_mask,
    wagle_mask,
)
from .models import save_model
from .objectives import RMU, KLRetain, Objective, frozen_reference
from .parallel import PARALLEL, make_parallel
from .qa import IGNORE_INDEX, QA, QADataset, batched, collate_qa, pad_token_id

__all__ = ["UnlearnConfig", "Unlearner", "UnlearnResult", "OPTIMIZERS", "ESTIMATORS", "MASKS", "PARALLEL",
           "finished_run"]

#: The optimizers of :data:`soulkit.optim.OPTIMIZERS` this loop drives. AdaHessian is not among
#: them: its refresh steps need ``backward(create_graph=True)``, which the loop does not do.
#: ``soul-released`` is SOUL's released optimizer reproduced (its squared-gradient "Hessian" is refreshed
#: inside its own step, from the clipped gradient); ``signum`` is sign-momentum.
OPTIMIZERS = ("adamw", "sophia", "soul-released", "signum")
#: Sophia's Hessian-diagonal estimators in this loop (``UnlearnConfig.estimator``).
ESTIMATORS = DIAGONAL_ESTIMATORS
_SCHEDULES = ("constant", "linear", "cosine")
#: Where a run with a weight-saliency mask keeps it (in ``out_dir``).
MASK_FILE = "mask.safetensors"
_MASK_FIELDS = ("mask", "mask_ratio", "mask_mu")


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of an unlearning run.

    ``steps`` optimizer steps, or (when ``None``) ``epochs`` passes over the forget set; each step
    sees ``batch_size * grad_accum`` forget examples and as many retain examples. ``lr`` follows
    ``schedule`` after ``warmup_steps``. ``optimizer_kwargs`` go to the optimizer (AdamW: betas,
    weight_decay...; Sophia: betas, rho, hessian_update_interval...); ``estimator`` picks Sophia's
    Hessian-diagonal estimator. ``eval_every``/``checkpoint_every``: steps (``None``: never/only at
    the end). ``mask``: ``None`` (every weight moves), ``"salun"`` or ``"wagle"``: only the top
    ``mask_ratio`` fraction (in (0, 1]) of the weights by that saliency score moves; ``mask_mu`` is
    WAGLE's ``mu`` (:mod:`soulkit.unlearn.masks`).
    """

    lr: float = 1e-4
    epochs: float = 5.0
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    estimator: str = "gnb"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int | None = None
    checkpoint_every: int | None = None
    max_length: int = 128
    seed: int = 0
    show_progress: bool | None = None
    mask: str | None = None
    mask_ratio: float = 0.5
    mask_mu: float = WAGLE_MU

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"UnlearnConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"UnlearnConfig.epochs must be > 0 (or give steps), got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"UnlearnConfig.steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"UnlearnConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"UnlearnConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"UnlearnConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"UnlearnConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"UnlearnConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if not self.weight_decay >= 0:  # NaN fails too
            raise ValueError(f"UnlearnConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"UnlearnConfig.{name} must be >= 1 or None, got {v}")
        if self.mask is not None and self.mask not in MASKS:
            raise ValueError(f"UnlearnConfig.mask must be one of {MASKS} or None, got {self.mask!r}")
        check_mask_ratio(self.mask_ratio, "UnlearnConfig.mask_ratio")
        mu = self.mask_mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
            raise ValueError(f"UnlearnConfig.mask_mu must be a finite number > 0, got {mu!r}")

    def total_steps(self, n_forget: int) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * n_forget / per_step))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict; without a mask the mask settings are left out (they change nothing),
        so the records of runs without one read as they did before masks existed."""
        d = asdict(self)
        if self.mask is None:
            for name in _MASK_FIELDS:
                d.pop(name)
        return d


@dataclass
class UnlearnResult:
    """What a run produced: the unlearned model (a copy), its per-step log, and why it stopped."""

    model: Any
    steps: int
    stopped: str  # "completed" | "nonfinite_loss"
    log: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    seconds: float
    model_dir: Path | None = None


class _Cycler:
    """Batches of a dataset in a seeded order, epoch after epoch; batch ``i`` is a pure function of i."""

    def __init__(self, ds: QADataset, batch_size: int, seed: int, pad: int):
        self.ds, self.bs, self.seed, self.pad = ds, min(batch_size, len(ds)), seed, pad
        self.per_epoch = math.ceil(len(ds) / self.bs)
        self._epoch: tuple[int, list[Sequence[int]]] | None = None  # (epoch, its batches of indices)

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, list(batched(torch.randperm(len(self.ds), generator=g).tolist(), self.bs)))
        return collate_qa([self.ds[k] for k in self._epoch[1][j]], pad_id=self.pad)


class Unlearner:
    """Unlearn ``forget`` from (a copy of) ``model`` with ``objective`` under ``optimizer``.

    Args:
        model: a transformers causal LM; it is deep-copied, never modified.
        tokenizer: its tokenizer (QA formatting of :mod:`soulkit.unlearn.qa`).
        objective: an :class:`~soulkit.unlearn.objectives.Objective` (``make_objective("npo")``...).
        forget, retain: QA records; ``retain`` is required by objectives with a retain term and must
            not share questions with ``forget``.
        optimizer: ``"adamw"``, ``"sophia"`` (SOUL), ``"soul-released"`` (SOUL's released optimizer,
            reproduced), ``"signum"``, or a callable ``params -> Optimizer``.
        config: :class:`UnlearnConfig`.
        out_dir: where checkpoints, ``log.jsonl`` and the final ``model/`` go (``None``: memory only).
        evaluate_fn: ``(model, step) -> dict`` run every ``config.eval_every`` steps and at the end.
        resume: continue from ``out_dir/checkpoint`` when it exists (default True).
        parallel: ``None`` (one process), ``"ddp"`` or ``"fsdp2"``: data parallelism over the initialised
            ``torch.distributed`` process group (:mod:`soulkit.unlearn.parallel`; start with ``torchrun``,
            call ``init_process_group()`` first, build the Unlearner with the same arguments on every
            rank). Each rank takes ``batch_size / world_size`` rows of every global batch (so the world
            size must divide ``config.batch_size`` and the sizes of the epochs' last batches), gradients
            and Sophia's Hessian refresh see the global batch, and the run follows the one-process
            trajectory. ``out_dir`` must be one directory all ranks see; rank 0 writes. ``evaluate_fn``
            runs on every rank (under ``"fsdp2"`` with the sharded model, so its forward passes must be
            the same on every rank). Under ``"fsdp2"`` the result's model is a plain (unsharded) copy of
            ``model`` with the unlearned weights, on every rank. Not supported: RMU objectives, and under
            ``"fsdp2"`` the Hutchinson estimator and weight-saliency masks.
    """

    def __init__(self, model, tokenizer, objective: Objective, *, forget: Sequence[QA],
                 retain: Sequence[QA] | None = None, optimizer: str | Callable = "adamw",
                 config: UnlearnConfig | None = None, out_dir: str | os.PathLike | None = None,
                 evaluate_fn: Callable[[Any, int], dict] | None = None, resume: bool = True,
                 parallel: str | None = None):
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be a soulkit.unlearn.objectives.Objective, got {type(objective).__name__}"
                            " (use make_objective(name))")
        if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not forget:
            raise ValueError("the forget set is empty")
        if objective.needs_retain and not retain:
            raise ValueError(f"objective {objective.name!r} needs a retain set")
        if config is not None and config.mask == "wagle" and not retain:
            raise ValueError("mask 'wagle' needs a retain set (its score uses the retain gradient)")
        if retain:
            overlap = {r.question for r in forget} & {r.question for r in retain}
            if overlap:
                raise ValueError(f"forget and retain sets share {len(overlap)} question(s), e.g. "
                                 f"{sorted(overlap)[0]!r}: a forget split must not overlap its retain split")
        self.config = config or UnlearnConfig()
        if parallel is not None and parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL} or None, got {parallel!r}")
        if parallel is not None:
            check_parallel_support(parallel, objective, self.config)
        self._par = make_parallel(parallel)
        self.parallel = parallel
        # under FSDP2 the copy below is sharded in place; the result is a fresh copy of this with its weights
        self._source = model if parallel == "fsdp2" else None
        self.tokenizer = tokenizer
        self.objective = objective
        self.optimizer_spec = optimizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.evaluate_fn = evaluate_fn
        self.resume = resume
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{model.get_input_embeddings().weight.shape[0]}: tokenizer and model do not match")
        self.model = copy.deepcopy(model)
        self.model.train()
        # e.g. RMU: only a few MLP weights train (bad layer / parameter names fail here, before any work)
        trainable = objective.trainable_parameters(self.model)
        self._trainable = None if trainable is None else set(trainable)
        self.reference = (self._par.wrap_reference(frozen_reference(model)) if objective.needs_reference
                          else None)
        c = self.config
        pad = pad_token_id(tokenizer)
        forget_records = objective.prepare_forget(list(forget))
        self.forget = _Cycler(QADataset(forget_records, tokenizer, max_length=c.max_length), c.batch_size,
                              c.seed, pad)
        self.retain = (_Cycler(QADataset(list(retain), tokenizer, max_length=c.max_length), c.batch_size,
                               c.seed + 1, pad) if retain else None)
        self.total_steps = c.total_steps(len(forget))
        check_split(len(forget_records), c.batch_size, self._par.world, "forget")
        if retain:
            check_split(len(retain), c.batch_size, self._par.world, "retain")
        # the mask's data: the forget QA as given (for IDK, the real answers, not the refusals), in order
        self._mask_forget = QADataset(list(forget), tokenizer, max_length=c.max_length) if c.mask else None
        self._mask_retain = (QADataset(list(retain), tokenizer, max_length=c.max_length)
                             if c.mask == "wagle" else None)
        self._pad = pad

    # ------------------------------------------------------------------ pieces
    def _optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        if callable(self.optimizer_spec):
            return self.optimizer_spec(params)
        return make_optimizer(self.optimizer_spec, params, lr=c.lr, weight_decay=c.weight_decay, seed=c.seed,
                              **c.optimizer_kwargs)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        span = max(1, self.total_steps - c.warmup_steps)
        frac = min(1.0, (step - c.warmup_steps) / span)
        if c.schedule == "linear":
            return 1.0 - frac
        if c.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    @staticmethod
    def _to(batch: dict[str, Any] | None, device: torch.device) -> dict[str, Any] | None:
        if batch is None:
            return None
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _refresh_gnb(self, opt: Sophia, net, batches: list[tuple[dict, dict | None]], step: int,
                     device: torch.device) -> None:
        """Sophia's GNB refresh on the step's global batches (forget and retain, every micro-batch).

        Each answer position's label is drawn from the model's softmax with a uniform keyed by the seed,
        the step, the micro-batch, forget/retain and the position in the *global* batch, so every rank
        draws, for its rows, the labels a single process draws. The summed sampled-label loss over all
        ``B`` terms, divided by ``B``, is backpropagated (DDP/FSDP2 average it over ranks: hence the world
        size factor) and folded as ``h_hat = B * grad**2`` (:meth:`Sophia.update_hessian`)."""
        par = self._par
        parts = [(micro, which, b) for micro, pair in enumerate(batches) for which, b in enumerate(pair)
                 if b is not None]
        targets = [causal_lm_targets(b["labels"], drop_last=True) for _, _, b in parts]
        n_terms = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
        opt.zero_grad(set_to_none=True)
        for k, ((micro, which, b), t) in enumerate(zip(parts, targets)):
            gen = seeded_generator(torch.device("cpu"), self.config.seed, LABEL_STREAM, step, micro, which)
            u = par.rows(torch.rand(t.shape, generator=gen, dtype=torch.float64)).to(device)
            share = self._to(par.share(b), device)
            with par.gradient_sync(net, k == len(parts) - 1):
                logits = net(input_ids=share["input_ids"], attention_mask=share["attention_mask"]).logits
                loss_sum, _ = sampled_label_loss(logits[:, :-1], uniforms=u,
                                                 labels=causal_lm_targets(share["labels"], drop_last=True))
                (loss_sum * (par.world / n_terms)).backward()
        opt.update_hessian(batch_size=n_terms)
        opt.zero_grad(set_to_none=True)

    def _refresh_hessian(self, opt: Sophia, net, pairs: list[tuple[dict, dict | None]],
                         batches: list[tuple[dict, dict | None]], step: int, device: torch.device) -> None:
        if self.config.estimator == "gnb":
            self._refresh_gnb(opt, net, batches, step, device)
            return
        # Sophia averages the calls, so each micro-batch passes its own (unscaled) loss: the mean of the
        # estimates is that of the step's objective (the mean over its equal micro-batches), and under DDP
        # Sophia averages the ranks' estimates as DDP averages their gradients
        model = self.model
        with differentiable_attention(model):
            for fb, rb in pairs:
                opt.accumulate_hutchinson(lambda fb=fb, rb=rb: self.objective(
                    model, fb, rb, reference=self.reference).loss)

    def _compute_mask(self) -> dict[str, torch.Tensor]:
        c = self.config
        device = next(self.model.parameters()).device

        def batches(ds: QADataset):
            for idx in batched(range(len(ds)), c.batch_size):
                yield {k: v.to(device) for k, v in collate_qa([ds[i] for i in idx], pad_id=self._pad).items()}

        if c.mask == "salun":
            return salun_mask(self.model, batches(self._mask_forget), c.mask_ratio)
        return wagle_mask(self.model, batches(self._mask_forget), batches(self._mask_retain), c.mask_ratio,
                          mu=c.mask_mu)

    def _weight_mask(self, resuming: bool) -> dict[str, torch.Tensor]:
        """The run's mask: read back from ``out_dir`` when resuming, else computed at the current
        (starting) weights and, with ``out_dir``, saved there."""
        c = self.config
        path = self.out_dir / MASK_FILE if self.out_dir is not None else None
        if resuming and path is not None and path.is_file():
            mask, meta = load_mask(path, self.model)
            if (meta.get("mask"), meta.get("mask_ratio"), meta.get("mask_mu")) != \
                    (c.mask, repr(float(c.mask_ratio)), repr(float(c.mask_mu))):
                raise ValueError(f"{path} was computed with other mask settings; use a new out_dir")
            return mask
        if resuming:
            raise FileNotFoundError(f"the checkpoint in {self.out_dir} has no {MASK_FILE}: the mask cannot be "
                                    "recomputed from weights that have moved; use a new out_dir")
        mask = self._compute_mask()  # every rank computes the same mask from the same data
        if path is not None:
            if self._par.is_writer:
                save_mask(path, mask, {"mask": c.mask, "mask_ratio": repr(float(c.mask_ratio)),
                                       "mask_mu": repr(float(c.mask_mu))})
            self._par.barrier()
        return mask

    def _ckpt_dir(self) -> Path | None:
        return self.out_dir / "checkpoint" if self.out_dir is not None else None

    def _save_checkpoint(self, opt, step: int, log: list, evals: list) -> None:
        par = self._par
        # gathered under FSDP2: every rank takes part, rank 0 keeps them
        weights = par.full_state_dict(self.model, keep=par.is_writer)
        states = {"optimizer": par.full_optimizer_state(opt, keep=par.is_writer)}
        if par.is_writer:
            save_checkpoint(self._ckpt_dir(), self.model, states,
                            {"step": step, "log": log, "evaluations": evals, "config": self.config.to_dict()},
                            weights=weights)
        par.barrier()

    def _check_checkpoint_config(self) -> None:
        d = self._ckpt_dir()
        info = json.loads((d / INFO_FILE).read_text(encoding="utf-8"))
        saved = {k: v for k, v in info["config"].items() if k not in ("show_progress", "eval_every")}
        now = {k: v for k, v in self.config.to_dict().items() if k not in ("show_progress", "eval_every")}
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(now)):
            raise ValueError(f"{d} was written by a run with another configuration; use a new out_dir or "
                             f"remove the checkpoint")

    def _load_checkpoint(self, opt) -> tuple[int, list, list]:
        d = self._ckpt_dir()
        self._check_checkpoint_config()  # before loading anything
        states, info = load_checkpoint(d, self.model,
                                       load_weights=lambda w: self._par.load_full_state_dict(self.model, w))
        self._par.load_optimizer_state(opt, states["optimizer"])
        return info["step"], info["log"], info["evaluations"]

    # ------------------------------------------------------------------ loop
    def run(self) -> UnlearnResult:
        """Run (or resume) to ``total_steps``; returns the unlearned model and the logs.

        Parameters outside the objective's :meth:`~soulkit.unlearn.objectives.Objective.trainable_parameters`
        are frozen during the run (``requires_grad`` is restored afterwards)."""
        model = self.model
        frozen = []  # parameters the objective leaves alone: no gradient, not given to the optimizer
        if self._trainable is not None:
            frozen = [p for n, p in model.named_parameters() if n not in self._trainable and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return self._run()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _run(self) -> UnlearnResult:
        from tqdm.auto import tqdm

        c = self.config
        par = self._par
        model = self.model
        step, log, evals = 0, [], []
        ckpt = self._ckpt_dir()
        if self.out_dir is not None and (self.out_dir / "model").exists():
            raise FileExistsError(f"{self.out_dir / 'model'} already exists; choose a new out_dir")
        resuming = ckpt is not None and self.resume and has_checkpoint(ckpt)
        if resuming:
            self._check_checkpoint_config()  # before the mask is read back
        masked = None
        if c.mask is not None:
            # computed once, at the starting weights (before any wrapping); a resumed run reads it back, as
            # the masked-out weights never moved and the checkpoint holds their starting values
            masked = MaskedWeights(model, self._weight_mask(resuming))
        net = par.wrap(model)  # DDP wrapper, or the model sharded in place (FSDP2), or the model itself
        params = [p for p in model.parameters() if p.requires_grad]
        opt = self._optimizer(params)
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        if resuming:
            step, log, evals = self._load_checkpoint(opt)
            if par.is_writer:
                _write_log(self.out_dir / "log.jsonl", log)
        elif ckpt is not None:
            if par.is_writer:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                _write_log(self.out_dir / "log.jsonl", [])
            self._save_checkpoint(opt, 0, [], [])  # the last good state until the first checkpoint
        snapshot = None if ckpt is not None else _snapshot(model, opt)
        good_step = step
        stopped = "completed"
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        is_sophia = isinstance(opt, Sophia)
        logs_win_rate = callable(getattr(opt, "win_rate", None))  # Sophia, soul-released
        bar = tqdm(total=self.total_steps, initial=step, desc=f"unlearn {self.objective.name}", unit="step",
                   leave=False, disable=(True if not par.is_writer else
                                         None if c.show_progress is None else not c.show_progress))
        try:
            while step < self.total_steps:
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * self._lr_factor(step)
                batches = []  # the step's global (forget, retain) batches, one pair per micro-batch
                for micro in range(c.grad_accum):
                    i = step * c.grad_accum + micro
                    batches.append((self.forget.batch(i), self.retain.batch(i) if self.retain is not None else None))
                # this rank's shares of them (the batches themselves in one process), on the device
                pairs = [(self._to(par.share(fb), device), self._to(par.share(rb) if rb is not None else None, device))
                         for fb, rb in batches]
                if is_sophia and opt.hessian_due():
                    self._refresh_hessian(opt, net, pairs, batches, step, device)
                opt.zero_grad(set_to_none=True)
                total, metrics = 0.0, {}
                finite = True
                for k, (fb, rb) in enumerate(pairs):
                    with par.gradient_sync(net, k == len(pairs) - 1):
                        out = self.objective(net, fb, rb, reference=self.reference)
                        if not par.all_true(bool(torch.isfinite(out.loss))):
                            finite = False
                            break
                        (out.loss / c.grad_accum).backward()
                    total += float(out.loss.detach()) / c.grad_accum
                    for name, v in out.metrics.items():
                        metrics[name] = metrics.get(name, 0.0) + float(v) / c.grad_accum
                if not finite:
                    stopped = "nonfinite_loss"
                    break
                if masked is not None:
                    masked.mask_grads()
                if c.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                opt.step()
                if masked is not None:
                    masked.restore()
                step += 1
                # the global batch's loss and metrics: each rank's share is a part of their mean
                names = sorted(metrics)
                total, *values = par.mean([total] + [metrics[n] for n in names])
                entry = {"step": step, "loss": total, "lr": opt.param_groups[0]["lr"], **dict(zip(names, values))}
                if logs_win_rate:
                    try:
                        entry["win_rate"] = float(opt.win_rate()[0])
                    except (RuntimeError, IndexError):
                        pass
                log.append(entry)
                if self.out_dir is not None and par.is_writer:
                    with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(entry) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
                if c.eval_every and self.evaluate_fn is not None and step % c.eval_every == 0 \
                        and step < self.total_steps:
                    evals.append({"step": step, **self._evaluate(step)})
                if c.checkpoint_every and step % c.checkpoint_every == 0 and step < self.total_steps:
                    if ckpt is not None:
                        self._save_checkpoint(opt, step, log, evals)
                    else:
                        snapshot = _snapshot(model, opt)
                    good_step = step
        finally:
            bar.close()
        if stopped == "nonfinite_loss":
            if ckpt is not None:
                step, log, evals = self._load_checkpoint(opt)
                if par.is_writer:
                    _write_log(self.out_dir / "log.jsonl", log)
            else:
                _restore(model, opt, snapshot)
                step, log = good_step, log[:good_step]
                evals = [e for e in evals if e["step"] <= good_step]  # as the on-disk checkpoint keeps them
        model.eval()
        if self.evaluate_fn is not None:
            evals.append({"step": step, **self._evaluate(step)})
        seconds = time.perf_counter() - t0
        if self._source is not None:  # FSDP2: a plain copy of the input model with the gathered weights
            weights = par.full_state_dict(model)
            model = copy.deepcopy(self._source)
            model.load_state_dict(weights)
            model.eval()
            self.model = model
        model_dir = None
        if self.out_dir is not None:
            meta = {"stage": "unlearned", "objective": self.objective.name,
                    "optimizer": self.optimizer_spec if isinstance(self.optimizer_spec, str) else "custom",
                    "steps": step, "stopped": stopped, "config": self.config.to_dict(), "seconds": seconds,
                    "evaluations": evals}
            if self.parallel is not None:
                meta["parallel"] = {"kind": self.parallel, "world_size": par.world}
            model_dir = self.out_dir / "model"
            if par.is_writer:
                save_model(model, self.tokenizer, model_dir, meta)
                shutil.rmtree(ckpt, ignore_errors=True)
            par.barrier()
        return UnlearnResult(model=model, steps=step, stopped=stopped, log=log, evaluations=evals,
                             seconds=seconds, model_dir=model_dir)

    def _evaluate(self, step: int) -> dict:
        was = self.model.training
        self.model.eval()
        try:
            return dict(self.evaluate_fn(self.model, step))
        finally:
            self.model.train(was)


def finished_run(out_dir: str | os.PathLike) -> UnlearnResult | None:
    """The run that finished in ``out_dir`` (its saved ``model/`` and ``log.jsonl``), loaded; ``None`` if
    the directory holds no finished model. For re-evaluating a run whose evaluation was interrupted."""
    from .models import load_model, model_meta

    d = Path(out_dir) / "model"
    if not d.is_dir():
        return None
    meta = model_meta(d)
    if meta.get("stage") != "unlearned":
        raise ValueError(f"{d} is not a model written by the Unlearner (stage {meta.get('stage')!r})")
    model, _ = load_model(d)
    log_path = Path(out_dir) / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    return UnlearnResult(model=model, steps=int(meta["steps"]), stopped=meta["stopped"], log=log,
                         evaluations=list(meta.get("evaluations", [])), seconds=float(meta.get("seconds", math.nan)),
                         model_dir=d)


def check_split(n_records: int, batch_size: int, world: int, name: str,
                option: str = "UnlearnConfig.batch_size") -> None:
    """Refuse a set of ``n_records`` whose batches of ``batch_size`` (the epoch's last one shorter) do not split
    evenly over ``world`` ranks; ``name`` ("forget"/"retain") and ``option`` (what sets the batch size: the
    CLI says ``--batch-size``) go into the message."""
    if world == 1:
        return
    if batch_size % world:
        raise ValueError(f"{option}={batch_size} must be a multiple of the world size {world}: "
                         "each rank takes an equal share of every global batch")
    bs = min(batch_size, n_records)
    bad = sorted(n for n in {bs, n_records % bs} - {0} if n % world)
    if bad:
        raise ValueError(f"the {name} set ({n_records} records) has batches of {bad[0]} records with "
                         f"{option}={batch_size}, which do not split over the world size {world}: "
                         f"use a {name} set whose size is a multiple of {world}")


def check_parallel_support(parallel: str, objective: Objective, config: UnlearnConfig) -> None:
    """What the data-parallel loop cannot do yet, refused (``ValueError`` naming the option) before any work."""
    inner = objective.objective if isinstance(objective, KLRetain) else objective
    if isinstance(inner, RMU):
        raise ValueError(f"objective {objective.name!r} is not supported with parallel={parallel!r}: RMU stops the "
                         "forward pass at the steered block, which DDP/FSDP2 cannot synchronise; run it in one "
                         "process")
    if parallel == "fsdp2" and config.estimator != "gnb":
        raise ValueError(f"UnlearnConfig.estimator={config.estimator!r} is not supported with parallel={parallel!r}; "
                         "use 'gnb' (or parallel='ddp')")
    if parallel == "fsdp2" and config.mask is not None:
        raise ValueError(f"UnlearnConfig.mask={config.mask!r} is not supported with parallel='fsdp2'; use "
                         "parallel='ddp' or no mask")


def _write_log(path: Path, log: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in log))


def _snapshot(model, opt) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": copy.deepcopy(opt.state_dict())}


def _restore(model, opt, snap: dict[str, Any]) -> None:
    model.load_state_dict(snap["model"])
    opt.load_state_dict(snap["opt"])
