"""soulkit.optim.factory: an optimizer by name with its options, clear errors for a bad name or option,
and the weight-decay split of a model's parameters."""

from __future__ import annotations

import pytest
import torch

from soulkit.optim import OPTIMIZERS, AdaHessian, Sophia, make_optimizer
from soulkit.optim.factory import optimizer_options, weight_decay_groups


def _params():
    return [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]


def test_registry_names_and_exports():
    assert list(OPTIMIZERS) == ["adamw", "sophia", "adahessian", "soul-released", "signum"]
    import soulkit.optim

    assert {"OPTIMIZERS", "make_optimizer"} <= set(soulkit.optim.__all__)
    assert soulkit.optim.OPTIMIZERS is OPTIMIZERS


@pytest.mark.parametrize("name, cls, options, expected", [
    ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.9), "eps": 1e-6, "amsgrad": True},
     {"betas": (0.8, 0.9), "eps": 1e-6, "amsgrad": True}),
    ("sophia", Sophia, {"betas": (0.9, 0.98), "rho": 0.2, "hessian_bias_correction": True, "eps": 1e-12},
     {"betas": (0.9, 0.98), "rho": 0.2, "hessian_bias_correction": True, "eps": 1e-12}),
    ("adahessian", AdaHessian, {"betas": (0.8, 0.95), "hessian_power": 0.5, "n_samples": 2, "block_size": 4},
     {"betas": (0.8, 0.95), "hessian_power": 0.5, "n_samples": 2, "block_size": 4}),
])
def test_each_name_builds_its_class_with_the_options(name, cls, options, expected):
    ps = _params()
    opt = make_optimizer(name, ps, lr=0.03, weight_decay=0.2, seed=11, **options)
    assert type(opt) is cls
    (group,) = opt.param_groups
    assert group["params"] == ps
    assert (group["lr"], group["weight_decay"]) == (0.03, 0.2)
    for key, value in expected.items():
        assert group[key] == value, key
    # the options not given keep the class's own defaults
    untouched = {k: v for k, v in cls(_params(), lr=0.03).defaults.items() if k not in (*options, "lr", "weight_decay",
                                                                                          "seed")}
    assert {k: group[k] for k in untouched} == untouched


def test_seed_reaches_the_optimizers_that_draw_random_numbers():
    assert make_optimizer("sophia", _params(), lr=0.1, seed=7).seed == 7
    assert make_optimizer("sophia", _params(), lr=0.1).seed == 0
    assert make_optimizer("adahessian", _params(), lr=0.1, seed=5).param_groups[0]["seed"] == 5
    adamw = make_optimizer("adamw", _params(), lr=0.1, seed=5)  # AdamW takes no seed: not passed on
    assert "seed" not in adamw.param_groups[0] and "seed" not in adamw.defaults


def test_sophia_refresh_options_and_defaults():
    s = make_optimizer("sophia", _params(), lr=0.1, hessian_update_interval=3, nonfinite="raise")
    assert (s.hessian_update_interval, s.nonfinite) == (3, "raise")
    # the factory's weight_decay default is 0, not Sophia's own 0.1 (as AdamW users expect from a factory)
    assert s.param_groups[0]["weight_decay"] == 0.0
    assert make_optimizer("adamw", _params(), lr=0.1).param_groups[0]["weight_decay"] == 0.0


def test_param_groups_pass_through_unchanged():
    ps = _params()
    groups = [{"params": [ps[0]], "weight_decay": 0.5, "lr": 0.2}, {"params": [ps[1]], "weight_decay": 0.0}]
    opt = make_optimizer("sophia", groups, lr=0.01, weight_decay=0.1, rho=0.3)
    assert [(g["lr"], g["weight_decay"], g["rho"]) for g in opt.param_groups] == [(0.2, 0.5, 0.3), (0.01, 0.0, 0.3)]


def test_unknown_name_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'; choose one of adamw, sophia, adahessian, soul-released, signum$"):
        make_optimizer("sgd", _params(), lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'Sophia'"):  # names are exact
        make_optimizer("Sophia", _params(), lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optimizer_options("sgd")


@pytest.mark.parametrize("name, options, bad", [
    ("adamw", {"rho": 0.1}, "'rho'"),
    ("adamw", {"betas": (0.9, 0.99), "hessian_update_interval": 2, "momentum": 0.9},
     "'hessian_update_interval', 'momentum'"),
    ("sophia", {"amsgrad": True}, "'amsgrad'"),
    ("adahessian", {"rho": 0.1}, "'rho'"),
])
def test_an_option_the_optimizer_does_not_take_is_named_with_the_allowed_ones(name, options, bad):
    with pytest.raises(TypeError, match=rf"optimizer '{name}' takes no option {bad}; its options are: (.+)") as err:
        make_optimizer(name, _params(), lr=0.1, **options)
    allowed = str(err.value).split("its options are: ")[1].split(", ")
    assert allowed == list(optimizer_options(name))
    assert "betas" in allowed and not {k.strip("'") for k in bad.split(", ")} & set(allowed)


def test_options_are_the_signature_minus_what_the_factory_fills_in():
    assert optimizer_options("adamw") == ("betas", "eps", "amsgrad", "maximize", "foreach", "capturable",
                                          "differentiable", "fused")
    sophia = optimizer_options("sophia")
    assert {"rho", "betas", "hessian_update_interval", "hessian_bias_correction", "nonfinite"} <= set(sophia)
    assert not {"params", "lr", "weight_decay", "seed"} & set(sophia)
    assert {"hessian_power", "n_samples", "spatial_average", "block_size"} <= set(optimizer_options("adahessian"))


def test_a_registered_builder_is_usable_by_name(monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "sgd", torch.optim.SGD)
    opt = make_optimizer("sgd", _params(), lr=0.1, weight_decay=0.01, seed=3, momentum=0.9)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(TypeError, match="'rho'; its options are: momentum, dampening, nesterov"):
        make_optimizer("sgd", _params(), lr=0.1, rho=0.1)

    def anything(params, lr, weight_decay, **kwargs):  # takes any option: nothing to check ahead
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)

    monkeypatch.setitem(OPTIMIZERS, "any", anything)
    assert optimizer_options("any") is None
    assert make_optimizer("any", _params(), lr=0.1, nesterov=True, momentum=0.5).param_groups[0]["nesterov"]


# ---------------------------------------------------------------------------------------- decay split
def _model():
    return torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                               torch.nn.Linear(3, 2, bias=False))


def test_weight_decay_groups_decay_matrices_not_biases_or_norms():
    m = _model()
    m[1].bias.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = weight_decay_groups(m, 0.3)
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert [p is q for p, q in zip(decay["params"], [m[0].weight, m[1].weight, m[3].weight])] == [True] * 3
    assert len(decay["params"]) == 3
    assert [p is q for p, q in zip(no_decay["params"], [m[2].weight, m[2].bias])] == [True, True]
    assert len(no_decay["params"]) == 2
    # the same from a list of parameters
    again = weight_decay_groups(list(m.parameters()), 0.3)
    assert [[id(p) for p in g["params"]] for g in again] == [[id(p) for p in g["params"]] for g in (decay, no_decay)]


def test_weight_decay_groups_edges():
    (only,) = weight_decay_groups(torch.nn.Linear(2, 2, bias=False), 0.1)  # nothing to exempt: one group
    assert only["weight_decay"] == 0.1 and len(only["params"]) == 1
    decay, no_decay = weight_decay_groups(torch.nn.LayerNorm(4), 0.1)  # nothing to decay: the group stays, empty
    assert decay["params"] == [] and len(no_decay["params"]) == 2


def test_weight_decay_groups_feed_make_optimizer():
    m = _model()
    opt = make_optimizer("adamw", weight_decay_groups(m, 0.05), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
