"""Sophia in transformers.Trainer: SophiaTrainer (GNB refresh in compute_loss) and SophiaCallback (logs).

A tiny LlamaForCausalLM (hidden 32, 2 layers, vocab 64) learns arithmetic token progressions from an
in-memory dataset; everything is written under tmp_path, nothing is reported anywhere.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from soulkit.optim import Sophia  # noqa: E402
from soulkit.optim.hf_trainer import (  # noqa: E402
    SophiaCallback,
    SophiaTrainer,
    causal_lm_targets,
    loss_shifts_labels,
    unwrap_sophia,
)

VOCAB, SEQ = 64, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2 * SEQ, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


class Progressions(torch.utils.data.Dataset):
    """Token sequences ``start, start+d, start+2d, ... (mod VOCAB)``; a random-length prefix of the
    labels is -100 (a "prompt"), so examples score different numbers of positions."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            start, step, prompt = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((0, VOCAB), (1, 4), (0, 6)))
            ids = (start + step * torch.arange(SEQ)) % VOCAB
            labels = ids.clone()
            labels[:prompt] = -100
            self.rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
        weight_decay=0.1, logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        lr_scheduler_type="constant", disable_tqdm=True, dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


class StepRecorder(TrainerCallback):
    """Records, just before each optimizer step, Sophia's step count and pending GNB term count."""

    def __init__(self) -> None:
        self.before_step: list[tuple[int, int]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_sophia(optimizer)
        self.before_step.append((opt.num_steps, opt._pending_terms))


# ---------------------------------------------------------------- label alignment
def test_causal_lm_targets_match_the_models_own_loss():
    model = tiny_llama()
    batch = [Progressions(4, seed=1)[i] for i in range(4)]
    ids = torch.stack([b["input_ids"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    labels[1, -3:] = -100  # masked positions at the end too
    out = model(input_ids=ids, labels=labels)
    targets = causal_lm_targets(labels)
    assert targets.shape == out.logits.shape[:-1]
    assert (targets[:, -1] == -100).all()
    assert torch.equal(targets[:, :-1], labels[:, 1:])
    mine = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(mine, out.loss)
    assert loss_shifts_labels(model)
    assert not loss_shifts_labels(torch.nn.Linear(2, 2))


def test_unwrap_sophia_through_wrappers():
    class Wrapper:  # as accelerate's AcceleratedOptimizer: the wrapped optimizer in .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    opt = Sophia(torch.nn.Linear(2, 2).parameters())
    assert unwrap_sophia(opt) is opt
    assert unwrap_sophia(Wrapper(Wrapper(opt))) is opt
    assert unwrap_sophia(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)) is None
    assert unwrap_sophia(None) is None
    loop = Wrapper(None)
    loop.optimizer = loop
    assert unwrap_sophia(loop) is None


# ---------------------------------------------------------------- training
def test_sophia_trainer_builds_sophia_trains_and_logs(tmp_path):
    trainer = SophiaTrainer(
        model=tiny_llama(), args=training_args(tmp_path), train_dataset=Progressions(),
        eval_dataset=Progressions(16, seed=2), sophia_kwargs=dict(rho=0.05, hessian_update_interval=5),
    )
    trainer.train()
    from accelerate.optimizer import AcceleratedOptimizer

    assert isinstance(trainer.optimizer, AcceleratedOptimizer)  # the Trainer wraps it
    opt = unwrap_sophia(trainer.optimizer)
    assert isinstance(opt, Sophia)
    assert opt.num_steps == 20
    assert opt.num_hessian_updates == 4  # steps 0, 5, 10, 15
    # TrainingArguments' lr and weight decay; none on norms (Trainer's grouping)
    assert {g["lr"] for g in opt.param_groups} == {1e-2}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert opt.param_groups[0]["rho"] == 0.05

    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [5, 10, 15, 20]
    assert [e["sophia_hessian_updates"] for e in logs] == [1, 2, 3, 4]
    assert all(0.0 <= e["sophia_win_rate"] <= 1.0 for e in logs)
    assert all(e["sophia_skipped_steps"] == 0 for e in logs)
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"], [e["loss"] for e in logs]

    # the next step would be a refresh step: evaluation must not start an estimate
    assert opt.hessian_due()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert opt._pending_terms == 0
    assert "sophia_win_rate" not in trainer.state.log_history[-1]


def test_gradient_accumulation_estimate_spans_all_micro_batches(tmp_path):
    """The terms folded at a refresh step are exactly the scored positions of the whole effective batch."""

    class Recording(SophiaTrainer):
        seen: list[tuple[int, torch.Tensor, object]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen.append((unwrap_sophia(self.optimizer).num_steps, inputs["labels"].clone(), num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    recorder = StepRecorder()
    trainer = Recording(
        model=tiny_llama(), train_dataset=Progressions(),
        args=training_args(tmp_path, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        sophia_kwargs=dict(hessian_update_interval=2), callbacks=[recorder],
    )
    trainer.train()
    opt = unwrap_sophia(trainer.optimizer)
    assert opt.num_hessian_updates == 3 and opt._pending_terms == 0

    assert [s for s, _ in recorder.before_step] == list(range(6))
    for step, pending in recorder.before_step:
        micro = [(labels, n) for s, labels, n in trainer.seen if s == step]
        assert len(micro) == 2  # both micro-batches ran before this optimizer step
        scored = sum(int((labels[:, 1:] != -100).sum()) for labels, _ in micro)
        if step % 2 == 0:
            assert pending == scored  # all micro-batches, shifted, -100 left out
            assert pending == int(micro[0][1])  # = the Trainer's own num_items_in_batch
        else:
            assert pending == 0
    # the prompts make the counts differ between steps: the check is not a constant
    assert len({p for s, p in recorder.before_step if s % 2 == 0}) > 1


def test_user_built_sophia_and_scheduler(tmp_path):
    model = tiny_llama()
    opt = Sophia(model.parameters(), lr=5e-3, rho=0.05, weight_decay=0.1, hessian_update_interval=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    callback = SophiaCallback()
    trainer = SophiaTrainer(
        model=model, args=training_args(tmp_path, max_steps=12, logging_steps=4), train_dataset=Progressions(),
        optimizers=(opt, sched), callbacks=[callback],
    )
    assert sum(isinstance(cb, SophiaCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert unwrap_sophia(trainer.optimizer) is opt
    assert opt.num_steps == 12 and opt.num_hessian_updates == 4  # steps 0, 3, 6, 9
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3 / 13)
    logs = train_logs(trainer)
    assert [e["sophia_hessian_updates"] for e in logs] == [2, 3, 4]
    assert all("sophia_win_rate" in e for e in logs)


def test_plain_trainer_with_sophia_callback_warns_without_refresh(tmp_path):
    model = tiny_llama()
    opt = Sophia(model.parameters(), lr=1e-3)
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=3, logging_steps=1), train_dataset=Progressions(16),
        optimizers=(opt, None), callbacks=[SophiaCallback()],
    )
    with pytest.warns(UserWarning, match="without a Hessian estimate"):
        trainer.train()
    assert opt.num_steps == 3 and opt.num_hessian_updates == 0
    logs = train_logs(trainer)
    assert len(logs) == 3
    assert all(e["sophia_hessian_updates"] == 0 for e in logs)
    # h = 0: every coordinate with a nonzero momentum is clipped (only rows of unseen tokens, m = 0, are not)
    assert all(e["sophia_win_rate"] < 0.05 for e in logs)


def test_sophia_callback_ignores_other_optimizers(tmp_path):
    model = tiny_llama()
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=2, logging_steps=1), train_dataset=Progressions(16),
        callbacks=[SophiaCallback()],
    )
    with pytest.warns(UserWarning, match="not soulkit.optim.Sophia"):
        trainer.train()
    assert all(not any(k.startswith("sophia_") for k in e) for e in trainer.state.log_history)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    kw = dict(max_steps=6, logging_steps=3, lr_scheduler_type="linear")
    sk = dict(rho=0.05, hessian_update_interval=4)
    full = SophiaTrainer(model=tiny_llama(), args=training_args(tmp_path / "a", **kw), train_dataset=Progressions(),
                         sophia_kwargs=sk)
    full.train()

    first = SophiaTrainer(
        model=tiny_llama(), train_dataset=Progressions(), sophia_kwargs=sk,
        args=training_args(tmp_path / "b", save_strategy="steps", save_steps=3, **kw),
    )
    first.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file()
    resumed = SophiaTrainer(model=tiny_llama(seed=1), args=training_args(tmp_path / "c", **kw),
                            train_dataset=Progressions(), sophia_kwargs=sk)
    resumed.train(resume_from_checkpoint=str(ckpt))
    opt_full, opt_res = unwrap_sophia(full.optimizer), unwrap_sophia(resumed.optimizer)
    assert (opt_res.num_steps, opt_res.num_hessian_updates) == (opt_full.num_steps, opt_full.num_hessian_updates) == (6, 2)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_checkpointing_non_reentrant_gives_the_same_run(tmp_path):
    """accumulate_gnb differentiates with autograd.grad: non-reentrant checkpointing supports it."""
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    checkpointing = {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    runs = []
    for i, kw in enumerate([{}, checkpointing]):
        trainer = SophiaTrainer(
            model=tiny_llama(), args=training_args(tmp_path / str(i), max_steps=4, logging_steps=2, **kw),
            train_dataset=Progressions(), sophia_kwargs=dict(hessian_update_interval=2),
        )
        trainer.train()
        assert unwrap_sophia(trainer.optimizer).num_hessian_updates == 2
        assert getattr(trainer.model, f"is_{name}") == bool(kw)
        runs.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- bad input
def test_bad_configuration_is_rejected(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="'lr'.*learning_rate"):
        SophiaTrainer(model=tiny_llama(), args=args, sophia_kwargs={"lr": 1e-3})
    with pytest.raises(ValueError, match="'weight_decay'"):
        SophiaTrainer(model=tiny_llama(), args=args, sophia_kwargs={"weight_decay": 0.2})
    with pytest.raises(ValueError, match="gnb_shift_labels"):
        SophiaTrainer(model=tiny_llama(), args=args, gnb_shift_labels="yes")
    model = tiny_llama()
    with pytest.raises(ValueError, match="sophia_kwargs only apply"):
        SophiaTrainer(model=model, args=args, optimizers=(Sophia(model.parameters()), None), sophia_kwargs={"rho": 0.1})
    trainer = SophiaTrainer(model=tiny_llama(), args=training_args(tmp_path, optim="adafactor"),
                            train_dataset=Progressions(8))
    with pytest.raises(ValueError, match="optim='adafactor'"):
        trainer.create_optimizer()


def test_mismatched_label_shape_is_a_clear_error(tmp_path):
    trainer = SophiaTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=Progressions(8),
                            gnb_shift_labels=False)
    trainer.create_optimizer()
    opt = unwrap_sophia(trainer.optimizer)
    model = trainer.model.train()
    row = Progressions(2)[0]
    inputs = {k: v[None] for k, v in row.items()}
    inputs["labels"] = inputs["labels"][:, :-1]  # wrong length
    with pytest.raises(ValueError, match="logits.shape"):
        trainer._accumulate_gnb(opt, model, model(input_ids=inputs["input_ids"]), inputs["labels"], None, None)


def test_importing_soulkit_optim_does_not_import_this_module():
    import subprocess

    code = "import sys, soulkit.optim; assert 'soulkit.optim.hf_trainer' not in sys.modules; " \
           "assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
