"""Sophia in ``transformers.Trainer``: the Hessian refresh inside the Trainer loop, and its logs.

Sophia needs one thing a plain ``Trainer`` never does: on a refresh step (every
``hessian_update_interval`` optimizer steps) a Hessian-diagonal estimate. :class:`SophiaTrainer`
builds it from the logits of the training forward (GNB, :meth:`Sophia.accumulate_gnb`: one extra
backward, no extra forward), over *every* micro-batch of a gradient-accumulation step, and
:class:`SophiaCallback` adds Sophia's numbers to the Trainer's logs::

    from soulkit.optim.hf_trainer import SophiaTrainer

    args = TrainingArguments(output_dir, learning_rate=6e-4, weight_decay=0.1, max_grad_norm=1.0, ...)
    trainer = SophiaTrainer(model=model, args=args, train_dataset=ds,
                            sophia_kwargs=dict(rho=0.05, hessian_update_interval=10))
    trainer.train()    # logs sophia_win_rate, sophia_hessian_updates, sophia_skipped_steps, ...

or with an optimizer built by hand (any LR scheduler)::

    opt = Sophia(model.parameters(), lr=6e-4, rho=0.05, weight_decay=0.1)
    trainer = SophiaTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, scheduler))

Label alignment: causal-LM losses in transformers shift inside the model (``ForCausalLMLoss`` pads
``labels`` on the right with -100 and drops the first column, so ``logits[:, t]`` is scored
against ``labels[:, t + 1]``). The GNB estimate keeps exactly the positions that loss scores
(:func:`causal_lm_targets`); a ``shift_labels`` entry of the batch is used as-is, as the model does.

A plain ``transformers.Trainer`` also runs Sophia (pass ``optimizers=(opt, sched)``), but nothing
refreshes the Hessian there: ``h`` stays 0 and every step is a clipped sign-momentum step.
:class:`SophiaCallback` warns about that.

This module imports transformers; ``import soulkit.optim`` does not import this module.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .lm_targets import causal_lm_targets
from .sophia import Sophia

__all__ = ["SophiaCallback", "SophiaTrainer", "causal_lm_targets", "loss_shifts_labels", "unwrap_sophia"]

_RESERVED_SOPHIA_KWARGS = {
    "params": "the Trainer passes the model's parameters (weight decay off for biases and norms)",
    "lr": "set TrainingArguments(learning_rate=...)",
    "weight_decay": "set TrainingArguments(weight_decay=...)",
}


def unwrap_sophia(optimizer: Any) -> Sophia | None:
    """The :class:`Sophia` inside ``optimizer`` (itself, or behind wrappers such as accelerate's
    ``AcceleratedOptimizer`` that keep the wrapped one in ``.optimizer``), or ``None``."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, Sophia):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether ``model``'s own loss shifts its labels (decoder-only causal LMs), decided as the
    Trainer does: its ``loss_type`` maps to ``ForCausalLMLoss``, or its class is a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        if LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss:
            return True
    except ImportError:  # pragma: no cover - transformers without the loss registry
        pass
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _optim_name(optim: Any) -> str:
    return str(getattr(optim, "value", optim))


def _logits_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        logits = outputs.get("logits") if hasattr(outputs, "get") else None
    elif isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        logits = outputs[1]  # (loss, logits, ...) when the model was asked for a tuple with labels
    else:
        logits = None
    return logits if isinstance(logits, torch.Tensor) else None


class SophiaCallback(TrainerCallback):
    """Adds Sophia's numbers to the Trainer's training logs (``on_log``):

    * ``sophia_win_rate``: fraction of coordinates whose update was not clipped, averaged over the
      optimizer steps since the previous log (counted on the device at each step; read here only).
      The paper's authors tune ``rho`` to keep it within 0.1-0.5.
    * ``sophia_hessian_updates``, ``sophia_skipped_steps``, ``sophia_skipped_hessian_updates``: totals.

    The values go into the ``logs`` dict passed to later callbacks (reporting integrations, progress
    printing) and into ``state.log_history``. :class:`SophiaTrainer` installs one in front of the
    other callbacks, so every reporter sees them; with a plain ``Trainer`` pass it in ``callbacks=``.
    Warns once when the optimizer is not a Sophia, and when Sophia steps without ever receiving a
    Hessian estimate (a plain ``Trainer`` does not refresh it: use :class:`SophiaTrainer`).
    """

    def __init__(self, prefix: str = "sophia_") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self._reset()
        self._warned_not_sophia = False
        self._warned_no_hessian = False

    def _reset(self) -> None:
        self._win_sum: torch.Tensor | None = None  # device tensor: no host sync per step
        self._win_total = 0
        self._last_num_steps: int | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._reset()
        opt = unwrap_sophia(optimizer)
        if opt is None:
            if optimizer is not None and not self._warned_not_sophia:
                self._warned_not_sophia = True
                warnings.warn(
                    f"SophiaCallback: the Trainer's optimizer is {type(optimizer).__name__}, not "
                    "soulkit.optim.Sophia; nothing to log",
                    UserWarning,
                    stacklevel=2,
                )
            return
        self._last_num_steps = opt.num_steps

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_sophia(optimizer)
        if opt is None or opt.num_steps == self._last_num_steps:
            return  # not a Sophia, or its step was skipped (non-finite gradient)
        self._last_num_steps = opt.num_steps
        counts = [c for c in opt._win_counts if c is not None]
        if opt.track_win_rate and counts:
            step_sum = torch.stack([c.to(counts[0].device) for c in counts]).sum()
            self._win_sum = step_sum if self._win_sum is None else self._win_sum + step_sum
            self._win_total += sum(t for c, t in zip(opt._win_counts, opt._win_totals) if c is not None)
        if (
            not self._warned_no_hessian
            and opt.num_steps >= 1
            and opt.num_hessian_updates + opt.skipped_hessian_updates == 0
            and opt._pending_terms == 0
            and opt._pending_hutchinson == 0
        ):
            self._warned_no_hessian = True
            warnings.warn(
                f"Sophia has taken {opt.num_steps} step(s) without a Hessian estimate: h stays 0 and every "
                "step is a clipped sign-momentum step of size lr. Train with "
                "soulkit.optim.hf_trainer.SophiaTrainer (GNB refresh every hessian_update_interval steps), "
                "or call accumulate_gnb / update_hessian yourself",
                UserWarning,
                stacklevel=2,
            )

    def metrics(self, optimizer: Any) -> dict[str, float]:
        """The values :meth:`on_log` adds, and resets the win-rate average (one host sync)."""
        opt = unwrap_sophia(optimizer)
        if opt is None:
            return {}
        out: dict[str, float] = {}
        if self._win_sum is not None and self._win_total > 0:
            out[self.prefix + "win_rate"] = float(self._win_sum.item()) / self._win_total
        self._win_sum, self._win_total = None, 0
        out[self.prefix + "hessian_updates"] = opt.num_hessian_updates
        out[self.prefix + "skipped_steps"] = opt.skipped_steps
        out[self.prefix + "skipped_hessian_updates"] = opt.skipped_hessian_updates
        return out

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or any(k.startswith(("eval_", "test_", "predict_")) for k in logs):
            return  # evaluation metrics: not Sophia's business
        extra = self.metrics(optimizer)
        if not extra:
            return
        logs.update(extra)
        # Trainer.log appends {**logs, "step": ...} to log_history just before on_log
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(
            k in last for k in logs if k not in extra
        ):
            last.update(extra)


class SophiaTrainer(Trainer):
    """``transformers.Trainer`` that refreshes Sophia's Hessian estimate and logs Sophia's numbers.

    On a refresh step (``hessian_due()``), :meth:`compute_loss` feeds the logits of every training
    micro-batch to :meth:`Sophia.accumulate_gnb` with the positions the model's loss scores (labels of
    -100 left out; shifted for causal LMs); Sophia folds ``h_hat = B * g_s**2`` over all micro-batches
    (B = all their kept positions; summed over DDP ranks) at the optimizer step. Evaluation and
    prediction never touch the estimate.

    Without ``optimizers=``, :meth:`create_optimizer` builds a :class:`Sophia` with the Trainer's
    parameter groups (no weight decay on biases and norms), ``lr=args.learning_rate`` and
    ``weight_decay=args.weight_decay`` (note: TrainingArguments defaults to 0.0; the paper uses
    0.1-0.2), plus ``sophia_kwargs`` (``rho``, ``betas``, ``hessian_update_interval``, ``seed``...).
    ``adam_*`` arguments are not used; ``max_grad_norm`` (default 1.0, as the paper) still clips ``g``.

    Args:
        sophia_kwargs: extra keyword arguments of :class:`Sophia` when the Trainer builds it.
        gnb_shift_labels: ``True``/``False`` forces whether labels are shifted for the estimate;
            ``None`` (default) follows the model's loss (:func:`loss_shifts_labels`).
        gnb_ignore_index: label value left out of the estimate (the loss's ignore index).
        All other arguments are ``transformers.Trainer``'s.

    Works with gradient accumulation, DDP, and ``torch.utils.checkpoint`` in its non-reentrant form.
    FSDP2 parameters are not supported by the GNB refresh (Sophia raises); DeepSpeed wraps the
    optimizer its own way and is not supported.
    """

    def __init__(
        self,
        *args: Any,
        sophia_kwargs: dict[str, Any] | None = None,
        gnb_shift_labels: bool | None = None,
        gnb_ignore_index: int = -100,
        **kwargs: Any,
    ) -> None:
        if sophia_kwargs is not None and not isinstance(sophia_kwargs, dict):
            raise TypeError(f"sophia_kwargs must be a dict or None, got {type(sophia_kwargs).__name__}")
        for key, hint in _RESERVED_SOPHIA_KWARGS.items():
            if sophia_kwargs and key in sophia_kwargs:
                raise ValueError(f"sophia_kwargs must not contain {key!r}: {hint}")
        if gnb_shift_labels not in (None, True, False):
            raise ValueError(f"gnb_shift_labels must be True, False or None, got {gnb_shift_labels!r}")
        if not isinstance(gnb_ignore_index, int):
            raise TypeError(f"gnb_ignore_index must be an int, got {type(gnb_ignore_index).__name__}")
        self.sophia_kwargs = dict(sophia_kwargs or {})
        self.gnb_shift_labels = gnb_shift_labels
        self.gnb_ignore_index = gnb_ignore_index
        super().__init__(*args, **kwargs)
        if self.sophia_kwargs and (self.optimizer is not None or self.optimizer_cls_and_kwargs is not None):
            raise ValueError(
                "sophia_kwargs only apply when SophiaTrainer builds the optimizer; with optimizers=(...) or "
                "optimizer_cls_and_kwargs=... configure that optimizer directly"
            )
        if not any(isinstance(cb, SophiaCallback) for cb in self.callback_handler.callbacks):
            # first, so that reporting integrations and progress printing see the Sophia values
            self.callback_handler.callbacks.insert(0, SophiaCallback())

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        optim = _optim_name(self.args.optim)
        if optim != _optim_name(TrainingArguments.__dataclass_fields__["optim"].default):
            raise ValueError(
                f"SophiaTrainer builds a soulkit Sophia optimizer, so TrainingArguments(optim={optim!r}) "
                "would be ignored: leave optim at its default, or use transformers.Trainer for that optimizer"
            )
        self.optimizer_cls_and_kwargs = (Sophia, {"lr": self.args.learning_rate, **self.sophia_kwargs})
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = None

    def _sophia_to_refresh(self, model: torch.nn.Module) -> Sophia | None:
        if not (model.training and torch.is_grad_enabled()):
            return None
        opt = unwrap_sophia(self.optimizer)
        if opt is None or not opt.hessian_due():
            return None
        return opt

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        opt = self._sophia_to_refresh(model)
        if opt is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # read these before Trainer.compute_loss (it may pop "labels")
        labels = inputs.get("labels")
        shift_labels = inputs.get("shift_labels")
        attention_mask = inputs.get("attention_mask")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._accumulate_gnb(opt, model, outputs, labels, shift_labels, attention_mask)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_gnb(self, opt, model, outputs, labels, shift_labels, attention_mask) -> int:
        logits = _logits_of(outputs)
        if logits is None:
            raise RuntimeError(
                "SophiaTrainer needs the model's logits for the GNB Hessian refresh, but its outputs have "
                "none (a fused/chunked loss that never materialises logits?); refresh the Hessian yourself "
                "with Sophia.update_hessian, or return logits"
            )
        if shift_labels is not None:
            targets = shift_labels
        elif labels is not None:
            shift = self.gnb_shift_labels
            if shift is None:
                shift = loss_shifts_labels(self.accelerator.unwrap_model(model))
            targets = causal_lm_targets(labels, self.gnb_ignore_index) if shift else labels
        else:
            targets = None
        if targets is None:
            mask = None
            if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == logits.shape[:-1]:
                mask = attention_mask.to(device=logits.device, dtype=torch.bool)
                if not bool(mask.any()):
                    return 0
            return opt.accumulate_gnb(logits, mask=mask)
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels for the GNB estimate have shape {tuple(targets.shape)} but the logits have "
                f"{tuple(logits.shape)} (expected labels of shape logits.shape[:-1]); set "
                "SophiaTrainer(gnb_shift_labels=...) to match how the model's loss aligns them"
            )
        targets = targets.to(logits.device)
        if not bool((targets != self.gnb_ignore_index).any()):
            return 0  # a micro-batch with no scored position adds nothing
        return opt.accumulate_gnb(logits, labels=targets, ignore_index=self.gnb_ignore_index)
