"""Newton unlearning with K-FAC / EK-FAC curvature.

References: (1) a float64 MLP (Linear with bias, transformers Conv1D, Linear without bias, a LayerNorm the
factors do not cover) whose per-module steps are checked against a dense solve with the Kronecker
(K-FAC) or eigenbasis-diagonal (EK-FAC) matrix built by hand from the module inputs and output
gradients; (2) linear least squares built so that K-FAC is the exact Hessian, where one step is the
exact damped Newton step and the iteration reaches the exact leave-set-out retrain; (3) the tiny
memorised Llama, where the step lowers the forget probability and moves only the tracked modules.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

from soulkit.influence import OutputLoss
from soulkit.influence.factored import FactoredInfluence
from soulkit.unlearn.evaluate import score_answers
from soulkit.unlearn.newton import factored_newton, newton_unlearn, qa_newton_factors

from ._corpus import FORGET, RETAIN

CE = OutputLoss(lambda m, b: m(b[0]), lambda z, b: nn.functional.cross_entropy(z, b[1], reduction="none"))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = Conv1D(4, 5)  # y = x @ W + b, W [in=5, out=4]
        self.fc3 = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


def _mlp_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _by_hand(model: _MLP, x, y):
    """Per module ``(a [n, in(+1)], s [n, out])``: inputs (a 1 appended for a bias) and the gradients of each
    example's loss at the module's output."""
    h1 = nn.functional.linear(x, model.fc1.weight, model.fc1.bias)
    z1 = torch.tanh(model.norm(h1))
    h2 = z1 @ model.fc2.weight + model.fc2.bias
    z2 = torch.tanh(h2)
    h3 = z2 @ model.fc3.weight.T
    loss = nn.functional.cross_entropy(h3, y, reduction="sum")
    s1, s2, s3 = torch.autograd.grad(loss, [h1, h2, h3])
    one = torch.ones(len(x), 1, dtype=x.dtype)
    return {"fc1": (torch.cat([x, one], 1), s1), "fc2": (torch.cat([z1, one], 1).detach(), s2),
            "fc3": (z2.detach(), s3)}


def _dense_curvature(a, s, method: str):
    """``[out*in, out*in]`` K-FAC ``S (x) A`` or EK-FAC ``K diag(Lambda) K^T`` (row-major ``vec`` of ``[out, in]``)."""
    n = len(a)
    A, S = a.T @ a / n, s.T @ s / n
    if method == "kfac":
        return torch.kron(S, A)
    _, qa = torch.linalg.eigh(A)
    _, qs = torch.linalg.eigh(S)
    G = torch.einsum("no,ni->noi", s, a)
    lam = (qs.T @ G @ qa).square().mean(0)
    K = torch.kron(qs, qa)
    return K @ torch.diag(lam.flatten()) @ K.T


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_step_matches_dense_kronecker_solve(method):
    torch.manual_seed(0)
    model = _MLP().double().eval()
    forget, retain = _mlp_data(6, seed=1), _mlp_data(14, seed=2)
    before = copy.deepcopy(model.state_dict())
    damping, scale = 0.05, 0.7
    new, info = factored_newton(model, CE, forget, retain, method=method, damping=damping, scale=scale,
                                fisher="empirical", batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched

    x, y = (torch.cat([retain.tensors[i], forget.tensors[i]]) for i in range(2))
    train = _by_hand(model, x, y)
    fx, fy = forget.tensors
    g_forget = {k: torch.einsum("no,ni->oi", s, a) / len(fx) for k, (a, s) in _by_hand(model, fx, fy).items()}
    delta = {k: (p - dict(model.named_parameters())[k]).detach() for k, p in new.named_parameters()}
    factor = scale * len(fx) / len(x)
    for name, (a, s) in train.items():
        H = _dense_curvature(a, s, method)
        g = g_forget[name]
        expected = factor * torch.linalg.solve(H + damping * torch.eye(len(H), dtype=H.dtype), g.flatten())
        expected = expected.reshape(g.shape)
        mod = getattr(model, name)
        got_w = delta[f"{name}.weight"].T if name == "fc2" else delta[f"{name}.weight"]
        got = torch.cat([got_w, delta[f"{name}.bias"].unsqueeze(1)], 1) if mod.bias is not None else got_w
        # the factors are accumulated in float32 (the influence layer's choice)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()), msg=name)
    assert torch.equal(delta["norm.weight"], torch.zeros(5, dtype=torch.float64))
    assert info["uncovered"] == ["norm.weight", "norm.bias"]
    assert info["covered"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight"]
    assert info["curvature"] == method and info["n_forget"] == 6 and info["n_train"] == 20
    assert 0 < info["covered_fraction"] < 1


def _least_squares(n: int = 40, d: int = 3, seed: int = 0):
    """``y = X theta0 - r`` with ``r`` orthogonal to ``[X, 1]`` and mean square 1: ``theta0`` is the least-squares
    optimum and its residuals make the empirical K-FAC ``A (x) mean(r^2) = A`` the exact Hessian."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Xb = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta0 = torch.randn(d + 1, generator=g, dtype=torch.float64)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    r = r - Xb @ torch.linalg.lstsq(Xb, r).solution
    r = r / r.square().mean().sqrt()
    y = Xb @ theta0 - r
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta0[:d].unsqueeze(0))
        model.bias.copy_(theta0[d:])
    return model, X, y, Xb


SQ = OutputLoss(lambda m, b: m(b[0]), lambda z, b: 0.5 * (z.squeeze(-1) - b[1]).square())


def test_least_squares_one_step_and_exact_retrain():
    model, X, y, Xb = _least_squares()
    n_forget = 6
    forget, retain = TensorDataset(X[:n_forget], y[:n_forget]), TensorDataset(X[n_forget:], y[n_forget:])
    n = len(X)
    damping = 1e-6
    H = Xb.T @ Xb / n  # the exact Hessian of the mean loss
    theta0 = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    g_forget = Xb[:n_forget].T @ (Xb[:n_forget] @ theta0 - y[:n_forget]) / n_forget

    one, info = factored_newton(model, SQ, forget, retain, method="kfac", damping=damping, fisher="empirical",
                                likelihood="gaussian", batch_size=7)
    theta1 = torch.cat([one.weight.detach().flatten(), one.bias.detach()])
    expected = (n_forget / n) * torch.linalg.solve(H + damping * torch.eye(4, dtype=H.dtype), g_forget)
    torch.testing.assert_close(theta1 - theta0, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))

    retrained = torch.linalg.lstsq(Xb[n_forget:], y[n_forget:]).solution  # exact leave-set-out retraining
    assert float((theta1 - retrained).norm()) < 0.5 * float((theta0 - retrained).norm())  # first order only
    many, info = factored_newton(model, SQ, forget, retain, method="kfac", damping=damping, fisher="empirical",
                                 likelihood="gaussian", batch_size=7, steps=40)
    theta = torch.cat([many.weight.detach().flatten(), many.bias.detach()])
    torch.testing.assert_close(theta, retrained, rtol=0, atol=1e-9)
    assert info["steps"] == 40 and len(info["step_norms"]) == 40
    assert info["step_norms"][0] == pytest.approx(float((theta1 - theta0).norm()), rel=1e-9)
    assert info["step_norms"][-1] < 1e-10


def test_prefitted_factors_equal_fitting_inside():
    model = _MLP().double().eval()
    forget, retain = _mlp_data(6, seed=1), _mlp_data(14, seed=2)
    kw = dict(damping=0.05, fisher="empirical", batch_size=4)
    fi = FactoredInfluence(model, CE, method="ekfac", fisher="empirical", batch_size=4)
    fi.fit(DataLoader(ConcatDataset([retain, forget]), batch_size=4))
    a, _ = factored_newton(model, CE, forget, retain, method="kfac", **kw)
    b, info = factored_newton(model, CE, forget, retain, method="kfac", factors=fi.factors, **kw)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="fitted on 20 sequences but forget \\+ retain has 19"):
        factored_newton(model, CE, _mlp_data(5, seed=1), retain, method="kfac", factors=fi.factors, **kw)
    fk = FactoredInfluence(model, CE, method="kfac", fisher="empirical", batch_size=4)
    fk.fit(DataLoader(ConcatDataset([retain, forget]), batch_size=4))
    with pytest.raises(ValueError, match="fitted with 'kfac'; method='ekfac' needs EK-FAC factors"):
        factored_newton(model, CE, forget, retain, method="ekfac", factors=fk.factors, **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="diagonal"), "method must be one of \\('kfac', 'ekfac'\\), got 'diagonal'"),
    (dict(damping=0.0), "damping must be a finite number > 0"),
    (dict(damping=-1.0), "damping must be a finite number > 0"),
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(scale=-0.5), "scale must be a finite number > 0"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(fisher="exact"), "fisher must be one of"),
    (dict(factors="factors/"), None),
])
def test_factored_validation(kwargs, match):
    model = _MLP().double()
    if match is None:
        with pytest.raises(TypeError, match="factors must be KFACFactors"):
            factored_newton(model, CE, _mlp_data(3), _mlp_data(5), **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        factored_newton(model, CE, _mlp_data(3), _mlp_data(5), **kwargs)


def _prob(model, tok, records) -> float:
    return float(np.exp(-score_answers(model, tok, records)).mean())


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_lm_lowers_forget_probability_tracked_modules_only(memorised, tiny_tokenizer, curvature):
    tok = tiny_tokenizer
    before = {k: v.clone() for k, v in memorised.state_dict().items()}
    p_forget0, p_retain0 = _prob(memorised, tok, FORGET), _prob(memorised, tok, RETAIN)
    new, info = newton_unlearn(memorised, tok, FORGET, retain=RETAIN, curvature=curvature, damping=1e-3, scale=1.0)
    assert all(torch.equal(before[k], v) for k, v in memorised.state_dict().items())  # input untouched
    old = dict(memorised.named_parameters())
    for name, p in new.named_parameters():
        moved = not torch.equal(p, old[name])
        assert moved == (name in info["covered"]), name
    assert "model.embed_tokens.weight" in info["uncovered"]
    assert all(n.endswith("_proj.weight") for n in info["covered"])
    p_forget, p_retain = _prob(new, tok, FORGET), _prob(new, tok, RETAIN)
    assert p_forget < 0.6 * p_forget0, (p_forget0, p_forget)
    assert p_retain / p_retain0 > p_forget / p_forget0, (p_retain0, p_retain, p_forget0, p_forget)


def test_lm_ekfac_factors_fitted_once_serve_kfac(memorised, tiny_tokenizer):
    """qa_newton_factors fits what newton_unlearn fits (same order, loss, seed); EK-FAC factors hold K-FAC's."""
    factors = qa_newton_factors(memorised, tiny_tokenizer, FORGET, retain=RETAIN, method="ekfac", seed=3)
    kw = dict(retain=RETAIN, curvature="kfac", damping=1e-3, scale=0.5, seed=3)
    a, _ = newton_unlearn(memorised, tiny_tokenizer, FORGET, **kw)
    b, _ = newton_unlearn(memorised, tiny_tokenizer, FORGET, factors=factors, **kw)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q)
