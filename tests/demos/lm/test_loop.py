"""The lockstep training loop: every arm learns from the same init; schedule; bad arms."""

import math

import pytest

from soulkit.demos.lm.config import OptimizerSpec, TrainConfig
from soulkit.demos.lm.loop import lr_lambda, train_arms


def test_every_arm_learns(tiny_run):
    result, _ = tiny_run
    assert [a.spec.label for a in result.arms] == ["adamw", "sophia", "sophia-hbc"]
    for arm in result.arms:
        assert arm.eval_steps == [0, 4, 8, 12]
        assert arm.diverged_at is None
        assert all(math.isfinite(v) for v in arm.val_loss)
        # from ~ln(256) = 5.55 nats/byte at init
        assert arm.val_loss[0] == pytest.approx(math.log(256), abs=0.3)
        assert arm.val_loss[-1] < arm.val_loss[0] - 0.2, (arm.spec.label, arm.val_loss)
        assert len(arm.step_time) == len(arm.train_loss) == 12
    sophia = result.arms[1]
    for arm in result.arms[1:]:
        assert arm.refresh_steps == [0, 10]
        assert len(arm.win_rate) == 2 and all(0.0 <= w <= 1.0 for w in arm.win_rate)
    assert sophia.warmup_s > 0 and result.arms[0].warmup_s > 0
    # same initial weights and same validation windows: identical loss before training
    assert result.arms[0].val_loss[0] == sophia.val_loss[0] == result.arms[2].val_loss[0]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(TrainConfig(steps=100, warmup_frac=0.1, min_lr_ratio=0.2))
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.6)  # half-way through the cosine: (1 + 0.2) / 2
    assert f(100) == pytest.approx(0.2) and f(150) == pytest.approx(0.2)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_lambda(TrainConfig(steps=10, warmup_frac=0.0))(0) == pytest.approx(1.0)


def test_bad_arms_are_refused_before_training():
    cfg = TrainConfig(steps=1)
    with pytest.raises(ValueError, match="at least one OptimizerSpec"):
        train_arms(cfg, [])
    with pytest.raises(ValueError, match="labels must be unique"):
        train_arms(cfg, [OptimizerSpec("adamw", 1e-3), OptimizerSpec("adamw", 2e-3)])


def test_micro_batches_accumulate_the_full_batch_gradient_and_refresh_from_the_first():
    import copy

    import torch

    from soulkit.demos.lm.loop import train_step
    from soulkit.demos.lm.model import build_model
    from soulkit.optim import Sophia

    torch.manual_seed(0)
    config = TrainConfig(model="llama", hidden_size=16, num_layers=1, num_heads=2, seq_len=8, batch_size=4)
    model = build_model(config, seed=0).double()
    batch = torch.randint(0, 256, (4, 9))
    models = [model, copy.deepcopy(model)]
    grads = []
    for m, micro in zip(models, (1, 2)):
        opt = Sophia(m.parameters(), lr=0.0, weight_decay=0.0, hessian_update_interval=10)
        seen = []
        opt.accumulate_gnb = lambda logits, labels, seen=seen: seen.append(labels.shape[0])  # noqa: B023
        opt.step = lambda: grads.append([p.grad.clone() for p in m.parameters()])  # noqa: B023
        loss, refreshed = train_step(m, opt, None, OptimizerSpec("sophia", lr=1e-3), batch[:, :-1], batch[:, 1:], 0.0, micro)
        assert refreshed and seen == [4 // micro] and math.isfinite(loss)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
