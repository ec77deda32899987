"""SOUL's released optimizer (reproduced) and Signum: each against a hand computation of its formula, written
out element by element in plain Python floats (float64), independent of the implementation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from soulkit.optim import OPTIMIZERS, Signum, SoulReleasedSophia, make_optimizer
from soulkit.optim.factory import optimizer_options


def _sign(x: float) -> float:
    return 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)


def _soul_by_hand(theta, grads, *, lr, b1, b2, rho, bs, wd, eps=1e-15, double=True):
    """The released step on lists of floats: h, m twice (or once), decay, clipped sign step."""
    theta = list(theta)
    m = [0.0] * len(theta)
    h = [0.0] * len(theta)
    for g in grads:
        unclipped = 0
        for i, gi in enumerate(g):
            h[i] = h[i] * b2 + gi * gi * (1 - b2)
            if double:
                m[i] = m[i] * b1 + gi * (1 - b1)
            theta[i] = theta[i] * (1 - lr * wd)
            m[i] = m[i] * b1 + gi * (1 - b1)
            ratio = min(abs(m[i]) / (h[i] * (rho * bs) + eps), 1.0)
            unclipped += ratio < 1.0
            theta[i] = theta[i] + _sign(m[i]) * ratio * (-lr)
    return theta, m, h, unclipped / len(theta)


def _signum_by_hand(theta, grads, *, lr, beta, wd):
    theta = list(theta)
    m = [0.0] * len(theta)
    for g in grads:
        for i, gi in enumerate(g):
            m[i] = m[i] * beta + gi * (1 - beta)
            theta[i] = theta[i] * (1 - lr * wd)
            theta[i] = theta[i] + _sign(m[i]) * (-lr)
    return theta, m


def _grads(n_steps: int, shape, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g, dtype=torch.float64) * scale for _ in range(n_steps)]
    out[1].view(-1)[0] = 0.0  # a zero gradient coordinate on one step
    return out


def _run(opt_cls, theta0: torch.Tensor, grads, **kw):
    p = torch.nn.Parameter(theta0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


# small gradients (the released regime: almost all coordinates clipped) and large ones with a small
# rho * bs (a mix of clipped and unclipped coordinates)
@pytest.mark.parametrize("scale, rho, bs", [(1e-3, 0.04, 5120), (1.0, 0.5, 3)])
@pytest.mark.parametrize("double", [True, False])
def test_soul_released_matches_the_hand_computation_exactly(scale, rho, bs, double):
    theta0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = _grads(4, (3, 5), seed=1, scale=scale)
    hyper = dict(lr=0.01, betas=(0.9, 0.95), rho=rho, weight_decay=0.1, bs=bs, double_momentum=double)
    p, opt = _run(SoulReleasedSophia, theta0, grads, **hyper)
    want_theta, want_m, want_h, want_rate = _soul_by_hand(theta0.flatten().tolist(), [g.flatten().tolist() for g in grads],
                                               lr=0.01, b1=0.9, b2=0.95, rho=rho, bs=bs, wd=0.1, double=double)
    state = opt.state[p]
    assert p.detach().flatten().tolist() == want_theta
    assert state["exp_avg"].flatten().tolist() == want_m
    assert state["hessian"].flatten().tolist() == want_h
    assert float(state["step"]) == 4.0
    assert opt.win_rate() == [want_rate]
    assert 0.0 < want_rate < 1.0  # some coordinates clipped, some not (where m changed sign, for small g)


def test_steady_small_gradients_are_all_clipped_sign_steps():
    """|m| / (204.8 h) ~ 1 / (204.8 |g|) for a steady gradient: a sign step of size lr everywhere."""
    g = torch.full((50,), 1e-3, dtype=torch.float64) * torch.linspace(-1, 1, 50, dtype=torch.float64).sign()
    p, opt = _run(SoulReleasedSophia, torch.zeros(50, dtype=torch.float64), [g] * 5, lr=1e-3, weight_decay=0.0)
    assert opt.win_rate() == [0.0]
    torch.testing.assert_close(p.detach(), -5e-3 * g.sign(), rtol=1e-12, atol=0)


def test_double_momentum_is_an_ema_with_beta1_squared():
    """m_t = b1 (b1 m + (1-b1) g) + (1-b1) g = b1^2 m + (1-b1)(1+b1) g; once per step: b1 m + (1-b1) g."""
    theta0 = torch.zeros(7, dtype=torch.float64)
    grads = _grads(3, (7,), seed=2)
    b1 = 0.9
    m_double = torch.zeros(7, dtype=torch.float64)
    m_single = torch.zeros(7, dtype=torch.float64)
    for g in grads:
        m_double = b1 ** 2 * m_double + (1 - b1) * (1 + b1) * g
        m_single = b1 * m_single + (1 - b1) * g
    kw = dict(lr=1e-3, betas=(b1, 0.95), weight_decay=0.0)
    p2, opt2 = _run(SoulReleasedSophia, theta0, grads, double_momentum=True, **kw)
    p1, opt1 = _run(SoulReleasedSophia, theta0, grads, double_momentum=False, **kw)
    torch.testing.assert_close(opt2.state[p2]["exp_avg"], m_double, rtol=1e-14, atol=0)
    torch.testing.assert_close(opt1.state[p1]["exp_avg"], m_single, rtol=1e-14, atol=0)
    # after one step the released momentum is 0.19 g instead of 0.1 g
    q, o = _run(SoulReleasedSophia, theta0, grads[:1], double_momentum=True, **kw)
    torch.testing.assert_close(o.state[q]["exp_avg"], 0.19 * grads[0], rtol=1e-14, atol=0)
    assert not torch.equal(p1, p2)  # and the flag changes the weights
    # the Hessian EMA does not depend on the flag
    assert torch.equal(opt1.state[p1]["hessian"], opt2.state[p2]["hessian"])


def test_defaults_are_souls_released_settings():
    opt = SoulReleasedSophia([torch.nn.Parameter(torch.zeros(2))])
    d = opt.defaults
    assert (d["betas"], d["rho"], d["weight_decay"], d["bs"], d["eps"], d["double_momentum"]) == \
        ((0.9, 0.95), 0.04, 0.1, 5120, 1e-15, True)


def test_maximize_is_minimising_the_negated_gradient():
    theta0 = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = _grads(3, (6,), seed=4, scale=0.1)
    for cls, kw in ((SoulReleasedSophia, {"rho": 0.5, "bs": 2}), (Signum, {})):
        a, _ = _run(cls, theta0, grads, lr=0.01, weight_decay=0.1, maximize=True, **kw)
        b, _ = _run(cls, theta0, [-g for g in grads], lr=0.01, weight_decay=0.1, **kw)
        assert torch.equal(a, b), cls.__name__


@pytest.mark.parametrize("cls, kw", [(SoulReleasedSophia, {"rho": 0.5, "bs": 3, "double_momentum": True}),
                                     (Signum, {"beta": 0.8})])
def test_state_dict_round_trip_continues_identically(cls, kw):
    theta0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = _grads(6, (4, 3), seed=6)
    full, _ = _run(cls, theta0, grads, lr=0.02, weight_decay=0.1, **kw)

    p = torch.nn.Parameter(theta0.clone())
    opt = cls([p], lr=0.02, weight_decay=0.1, **kw)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = cls([q], lr=0.5, weight_decay=0.0, **kw)  # the loaded groups replace these settings
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.02 and opt2.param_groups[0]["weight_decay"] == 0.1
    for g in grads[3:]:
        q.grad = g.clone()
        opt2.step()
    assert torch.equal(q, full)


def test_closure_param_groups_and_no_grad_params():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = SoulReleasedSophia([{"params": [model.weight], "lr": 0.1},
                              {"params": [model.bias, frozen], "weight_decay": 0.0}], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0
    # first step: h = 0.05 g^2 and m = 0.19 g, so the ratio is min(0.19 / (204.8 * 0.05 |g|), 1)
    g_w = model.weight.grad
    ratio = (0.19 / (204.8 * 0.05 * g_w.abs())).clamp(max=1)
    torch.testing.assert_close(w0 * (1 - 0.1 * 0.1) - model.weight.detach(), 0.1 * g_w.sign() * ratio)
    assert not torch.equal(model.bias, b0)
    assert torch.equal(frozen, torch.ones(2)) and frozen not in opt.state  # no grad: untouched, no state
    assert len(opt.win_rate()) == 2


def test_signum_matches_the_hand_computation_exactly():
    theta0 = torch.randn(2, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = _grads(5, (2, 9), seed=8)
    p, opt = _run(Signum, theta0, grads, lr=0.03, beta=0.8, weight_decay=0.2)
    want_theta, want_m = _signum_by_hand(theta0.flatten().tolist(), [g.flatten().tolist() for g in grads],
                                         lr=0.03, beta=0.8, wd=0.2)
    assert p.detach().flatten().tolist() == want_theta
    assert opt.state[p]["exp_avg"].flatten().tolist() == want_m


def test_signum_steps_are_lr_in_every_coordinate():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = Signum([p], lr=0.05, beta=0.0)
    p.grad = torch.randn(100)
    p.grad[0] = 0.0
    opt.step()
    assert p[0] == 0.0 and torch.equal(p[1:].abs(), torch.full((99,), 0.05))


@pytest.mark.parametrize("kw, needle", [
    ({"lr": -1e-3}, "lr must be a finite number >= 0"),
    ({"lr": math.nan}, "lr must be a finite number >= 0"),
    ({"lr": math.inf}, "lr must be a finite number >= 0"),
    ({"betas": (1.0, 0.95)}, r"betas\[0\] must be a number in \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\] must be a number in \[0, 1\)"),
    ({"betas": (0.9, math.nan)}, r"betas\[1\] must be a number in \[0, 1\)"),
    ({"betas": (0.9,)}, "betas must be a pair"),
    ({"rho": 0.0}, "rho must be a finite number > 0"),
    ({"rho": -0.04}, "rho must be a finite number > 0"),
    ({"rho": math.inf}, "rho must be a finite number > 0"),
    ({"bs": 0}, "bs must be a finite number >= 1"),
    ({"bs": 0.5}, "bs must be a finite number >= 1"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0"),
    ({"eps": 0.0}, "eps must be a finite number > 0"),
])
def test_soul_released_bad_hyperparameters(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SoulReleasedSophia([torch.nn.Parameter(torch.zeros(2))], **kw)
    with pytest.raises(ValueError, match=needle):  # in a param group too
        SoulReleasedSophia([{"params": [torch.nn.Parameter(torch.zeros(2))], **kw}])


@pytest.mark.parametrize("kw, needle", [
    ({"lr": -1.0}, "lr must be"), ({"lr": math.nan}, "lr must be"), ({"beta": 1.0}, r"beta must be a number in \[0, 1\)"),
    ({"beta": -0.5}, "beta must be"), ({"weight_decay": -1.0}, "weight_decay must be"),
])
def test_signum_bad_hyperparameters(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Signum([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_integer_params_and_sparse_grads_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        SoulReleasedSophia([torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)])
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3).to_sparse()
    for opt in (SoulReleasedSophia([p]), Signum([p])):
        with pytest.raises(TypeError, match="sparse"):
            opt.step()


def test_factory_registers_both_names():
    assert {"soul-released", "signum"} <= set(OPTIMIZERS)
    ps = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer("soul-released", ps, lr=5e-6, weight_decay=0.1, rho=0.04, double_momentum=False)
    assert type(opt) is SoulReleasedSophia
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["rho"], g["double_momentum"]) == (5e-6, 0.1, 0.04, False)
    sig = make_optimizer("signum", ps, lr=1e-3, beta=0.5)
    assert type(sig) is Signum and sig.param_groups[0]["beta"] == 0.5
    assert "rho" in optimizer_options("soul-released") and "bs" in optimizer_options("soul-released")
    with pytest.raises(TypeError, match="optimizer 'signum' takes no option 'rho'"):
        make_optimizer("signum", ps, lr=1e-3, rho=0.1)


def test_unlearner_and_cli_accept_both_names():
    from soulkit.cli import build_parser
    from soulkit.unlearn.suite import default_unlearn_config
    from soulkit.unlearn.unlearner import OPTIMIZERS as UNLEARN_OPTIMIZERS

    assert {"soul-released", "signum"} <= set(UNLEARN_OPTIMIZERS)
    args = build_parser().parse_args(["unlearn", "--method", "graddiff", "--optimizer", "soul-released",
                                      "--out", "x"])
    assert args.optimizer == "soul-released"
    cfg = default_unlearn_config("graddiff", "soul-released")
    assert cfg.weight_decay == 0.1 and cfg.optimizer_kwargs == {}
    assert default_unlearn_config("graddiff", "signum").weight_decay == 0.0
