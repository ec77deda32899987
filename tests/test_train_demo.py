"""The AdamW-vs-Sophia byte-level LM demo (soulkit.demos.train_lm), at a tiny size."""

import json
import math

import pytest
import torch

from soulkit.demos.train_lm import (
    OptimizerSpec,
    TrainConfig,
    atomic_write_text,
    build_model,
    load_text_bytes,
    steps_to_reach,
    train_lm,
)

TINY = dict(
    steps=12, batch_size=4, seq_len=32, hidden_size=32, num_layers=1, num_heads=2,
    eval_every=4, eval_batches=2, max_bytes=100_000, adamw_lr=1e-2, sophia_lr=1e-2, progress=False,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_lm")
    return train_lm(TrainConfig(**TINY), out_dir=out), out


def test_both_optimizers_learn(tiny_run):
    result, _ = tiny_run
    assert [a.spec.kind for a in result.arms] == ["adamw", "sophia"]
    for arm in result.arms:
        assert arm.eval_steps == [0, 4, 8, 12]
        assert arm.diverged_at is None
        assert all(math.isfinite(v) for v in arm.val_loss)
        # from ~ln(256) = 5.55 nats/byte at init
        assert arm.val_loss[0] == pytest.approx(math.log(256), abs=0.3)
        assert arm.val_loss[-1] < arm.val_loss[0] - 0.2, (arm.spec.label, arm.val_loss)
        assert len(arm.step_time) == len(arm.train_loss) == 12
    sophia = result.arms[1]
    assert sophia.refresh_steps == [0, 10]
    assert len(sophia.win_rate) == 2 and all(0.0 <= w <= 1.0 for w in sophia.win_rate)
    assert sophia.warmup_s > 0 and result.arms[0].warmup_s > 0
    # same initial weights and same validation windows: identical loss before training
    assert result.arms[0].val_loss[0] == sophia.val_loss[0]


def test_summary_and_outputs(tiny_run):
    result, out = tiny_run
    rows = {r["label"]: r for r in result.summary}
    assert rows["adamw"]["reference"] and rows["adamw"]["steps_to_target"] is not None
    assert rows["adamw"]["target"] == result.arms[0].val_loss[-1]
    assert rows["sophia"]["win_rate_mean"] is not None
    assert "| adamw |" in result.table and "| sophia |" in result.table
    for ext in ("md", "json", "png"):
        path = out / f"train_lm.{ext}"
        assert path.is_file() and path.stat().st_size > 0
    data = json.loads((out / "train_lm.json").read_text())
    assert data["config"]["steps"] == 12
    assert [a["spec"]["kind"] for a in data["arms"]] == ["adamw", "sophia"]
    assert data["arms"][1]["val_loss"] == result.arms[1].val_loss
    assert (out / "train_lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sophia |" in (out / "train_lm.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_data_is_deterministic_and_split_by_file():
    cfg = TrainConfig(max_bytes=50_000, seq_len=32)
    a_train, a_val, info = load_text_bytes(cfg)
    b_train, b_val, _ = load_text_bytes(cfg)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert a_train.dtype == torch.uint8
    assert info["train_bytes"] + info["val_bytes"] >= 50_000  # the cap plus file separators
    assert info["train_files"] >= 1 and info["val_files"] >= 1


def test_local_data_path(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" * 200)
    (tmp_path / "b.py").write_text("def f():\n    return 2\n" * 200)
    one_file = TrainConfig(data_path=str(tmp_path / "a.py"), seq_len=16, max_bytes=2048)
    train, val, info = load_text_bytes(one_file)
    assert train.numel() > val.numel() > 16
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_text_bytes(TrainConfig(data_path=str(tmp_path / "missing")))


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    cfg = TrainConfig(hidden_size=16, num_layers=1, num_heads=2)
    state = torch.random.get_rng_state()
    m1, m2, m3 = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    p1, p2, p3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    gpt2 = build_model(TrainConfig(model="gpt2", hidden_size=16, num_layers=1, num_heads=2))
    assert gpt2.config.vocab_size == 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), r"TrainConfig\.steps must be an int >= 1, got 0"),
        (dict(steps=2.5), r"TrainConfig\.steps"),
        (dict(batch_size=-1), r"TrainConfig\.batch_size"),
        (dict(model="bert"), r"TrainConfig\.model must be one of"),
        (dict(optimizers=("adamw", "sgd")), r"unknown optimizer 'sgd'"),
        (dict(optimizers=()), r"TrainConfig\.optimizers"),
        (dict(optimizers=("sophia", "sophia")), r"duplicates"),
        (dict(hidden_size=30, num_heads=4), r"divisible by num_heads"),
        (dict(sophia_lr=0.0), r"TrainConfig\.sophia_lr must be a number in \(0"),
        (dict(adamw_lr=float("nan")), r"TrainConfig\.adamw_lr"),
        (dict(sophia_rho=-1.0), r"TrainConfig\.sophia_rho"),
        (dict(val_fraction=1.0), r"TrainConfig\.val_fraction must be a number in \(0"),
        (dict(warmup_frac=1.0), r"TrainConfig\.warmup_frac"),
        (dict(eval_every=0), r"TrainConfig\.eval_every"),
        (dict(seed=-1), r"TrainConfig\.seed must be an int >= 0"),
        (dict(max_bytes=10), r"TrainConfig\.max_bytes"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_optimizers_string_and_spec_validation():
    assert TrainConfig(optimizers="sophia, adamw").optimizers == ("sophia", "adamw")
    with pytest.raises(ValueError, match=r"OptimizerSpec\.kind"):
        OptimizerSpec("sgd", 1e-3)
    with pytest.raises(ValueError, match=r"OptimizerSpec\.lr"):
        OptimizerSpec("adamw", -1.0)
    assert OptimizerSpec("sophia", 1e-3).label == "sophia"


def test_not_enough_text_is_an_error(tmp_path):
    (tmp_path / "tiny.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="not enough text"):
        load_text_bytes(TrainConfig(data_path=str(tmp_path), seq_len=64, max_bytes=1024))


def test_steps_to_reach_and_atomic_write(tmp_path):
    from soulkit.demos.train_lm import ArmResult

    arm = ArmResult(spec=OptimizerSpec("adamw", 1e-3), eval_steps=[0, 5, 10], val_loss=[5.0, 3.0, 2.0])
    assert steps_to_reach(arm, 3.0) == 5
    assert steps_to_reach(arm, 1.0) is None
    target = tmp_path / "sub" / "x.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]


def test_summary_of_synthetic_arms_including_a_diverged_one():
    from soulkit.demos.train_lm import ArmResult, format_table, summarize

    cfg = TrainConfig(steps=20, eval_every=10)
    adamw = ArmResult(spec=OptimizerSpec("adamw", 1e-3), eval_steps=[0, 10, 20], val_loss=[5.5, 3.0, 2.5],
                      step_time=[0.1] * 20)
    sophia = ArmResult(spec=OptimizerSpec("sophia", 1e-3), eval_steps=[0, 10, 20], val_loss=[5.5, 2.4, 2.0],
                       step_time=([0.3] + [0.1] * 9) * 2, refresh_steps=[0, 10], win_rate=[0.2, 0.4])
    broken = ArmResult(spec=OptimizerSpec("sophia", 1.0, label="sophia-hot"), eval_steps=[0], val_loss=[5.5],
                       step_time=[0.1, 0.1], diverged_at=1)
    rows = {r["label"]: r for r in summarize([adamw, sophia, broken], cfg)}
    assert rows["adamw"]["target"] == 2.5
    assert rows["sophia"]["steps_to_target"] == 10 and rows["sophia"]["steps_ratio"] == 0.5
    assert rows["sophia"]["wall_ratio"] == pytest.approx(1.2 / 2.0)  # 10 steps incl. one refresh vs 20 steps
    assert rows["sophia"]["step_overhead"] == pytest.approx(0.2)  # one 0.3 s refresh per 10-step window
    assert rows["sophia"]["median_step_overhead"] == pytest.approx(0.0)
    assert rows["sophia"]["win_rate_mean"] == pytest.approx(0.3)
    assert rows["sophia-hot"]["steps_to_target"] is None and math.isnan(rows["sophia-hot"]["val_loss_final"])
    table = format_table(list(rows.values()))
    assert "diverged @1" in table and "10 (0.50x)" in table
