"""TrainConfig and OptimizerSpec: validation with messages naming the field, derived values."""

import pytest

from soulkit._causal_lm import ARCHS
from soulkit.demos.lm.config import ARMS, MODEL_KINDS, OPTIMIZER_KINDS, OptimizerSpec, TrainConfig


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


def test_registries():
    assert MODEL_KINDS == ARCHS == ("llama", "gpt2")  # the demo builds every architecture the factory knows
    assert OPTIMIZER_KINDS == ("adamw", "sophia")
    assert ARMS == ("adamw", "sophia", "sophia-hbc")
    assert TrainConfig().model in MODEL_KINDS and TrainConfig().optimizers == ARMS


def test_derived_values():
    cfg = TrainConfig(seed=3, hidden_size=192, weight_decay=0.2, hessian_update_interval=7)
    assert cfg.resolved_data_seed == 3 and TrainConfig(seed=3, data_seed=5).resolved_data_seed == 5
    assert cfg.resolved_intermediate_size == 512  # 8/3 x 192, a multiple of 16
    assert TrainConfig(model="gpt2", hidden_size=64).resolved_intermediate_size == 256
    assert TrainConfig(intermediate_size=40).resolved_intermediate_size == 40
    adamw, sophia, hbc = cfg.optimizer_specs()
    assert (adamw.kind, adamw.lr, adamw.weight_decay, adamw.resolved_betas) == ("adamw", cfg.adamw_lr, 0.2, (0.9, 0.95))
    assert (sophia.kind, sophia.lr, sophia.rho) == ("sophia", cfg.sophia_lr, cfg.sophia_rho)
    assert sophia.hessian_update_interval == 7 and sophia.resolved_betas == (0.965, 0.99)
    assert not sophia.hessian_bias_correction  # "sophia" is the published setting
    assert (hbc.kind, hbc.label, hbc.lr, hbc.rho, hbc.hessian_bias_correction) == (
        "sophia", "sophia-hbc", cfg.sophia_hbc_lr, cfg.sophia_hbc_rho, True)
    assert hbc.hessian_update_interval == 7 and hbc.weight_decay == 0.2
    d = cfg.to_dict()
    assert d["optimizers"] == ["adamw", "sophia", "sophia-hbc"] and d["seed"] == 3
