"""InfluenceAnalyzer: calibration against closed-form ridge leave-one-out, Newton-corrected LOO against
exact retraining (logistic and softmax regression), data handling, the model left untouched, bad input."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from soulkit.influence import (
    ArnoldiSolver,
    CGSolver,
    ConvergenceError,
    InfluenceAnalyzer,
    InfluenceConfig,
    LissaSolver,
    OutputLoss,
    loo_correlation,
)

from ._problems import (
    DT,
    RIDGE_LOSS,
    actual_loo,
    augment,
    classification_problem,
    ridge_grads,
    ridge_loo,
    ridge_problem,
)

SOLVERS = {
    "exact": ("exact", 1e-12),
    "cg": (CGSolver(tol=1e-12), 1e-9),
    "lissa": (LissaSolver(tol=1e-10), 1e-7),
    "arnoldi": (ArnoldiSolver(rank=5), 1e-10),
}


@pytest.fixture(scope="module")
def ridge():
    p = ridge_problem(n=40, d=4, m=5, l2=0.1)
    gq = ridge_grads(p, p["Xq"], p["yq"])
    gt = ridge_grads(p, p["X"], p["y"])
    p["first_order"] = gq @ torch.linalg.solve(p["A"], gt.T) / p["n"]
    thetas = torch.stack([ridge_loo(p, j) for j in range(p["n"])])  # [n, d+1]
    p["delta"] = thetas - p["theta"]
    Xqa = augment(p["Xq"])

    def loss(th):
        return 0.5 * (Xqa @ th.T - p["yq"][:, None]) ** 2  # [m, n]

    p["actual"] = loss(thetas) - loss(p["theta"][None])
    p["linearised"] = gq @ p["delta"].T  # g_i . (theta_{-j} - theta)
    return p


@pytest.mark.parametrize("name", list(SOLVERS))
def test_ridge_scores_are_calibrated_against_closed_form(ridge, name):
    solver, tol = SOLVERS[name]
    an = InfluenceAnalyzer(
        ridge["model"], RIDGE_LOSS, solver=solver, l2=ridge["l2"], batch_size=16, progress=False
    )
    scores = an.fit(ridge["train"]).scores(ridge["train"], ridge["queries"])
    assert scores.shape == (5, 40) and scores.dtype == DT
    torch.testing.assert_close(
        scores, ridge["first_order"], rtol=tol, atol=tol * float(ridge["first_order"].abs().max())
    )
    # sign and scale: first-order scores track the actual leave-one-out loss change
    fit = loo_correlation(scores.flatten(), ridge["actual"].flatten())
    assert fit.pearson > 0.98 and 0.8 < fit.slope < 1.25


def test_ridge_newton_is_the_exact_leave_one_out_step(ridge):
    an = InfluenceAnalyzer(
        ridge["model"], RIDGE_LOSS, solver="exact", l2=ridge["l2"], loo="newton", progress=False
    )
    scores = an.fit(ridge["train"]).scores(ridge["train"], ridge["queries"])
    # for a quadratic objective one Newton step lands on theta_{-j}: scores = g_i . (theta_{-j} - theta)
    torch.testing.assert_close(scores, ridge["linearised"], rtol=1e-10, atol=1e-13)
    # ... and differ from the actual change only by the loss's own curvature along the step
    Xqa = augment(ridge["Xq"])
    second = 0.5 * (Xqa @ ridge["delta"].T) ** 2
    torch.testing.assert_close(scores + second, ridge["actual"], rtol=1e-9, atol=1e-13)
    # leverages: x_j^T A^{-1} x_j / n for squared loss (Lambda = 1)
    Xa = augment(ridge["X"])
    lev = (Xa * torch.linalg.solve(ridge["A"], Xa.T).T).sum(1) / ridge["n"]
    torch.testing.assert_close(an.leverages(ridge["train"])[:, 0, 0], lev, rtol=1e-10, atol=1e-14)


def test_self_scores_and_damping(ridge):
    n = ridge["n"]
    gt = ridge_grads(ridge, ridge["X"], ridge["y"])
    for damping in (0.0, 0.3):
        A = ridge["A"] + damping * torch.eye(5, dtype=DT)
        an = InfluenceAnalyzer(
            ridge["model"], RIDGE_LOSS, solver="cg", l2=ridge["l2"], damping=damping, progress=False
        )
        an.fit(ridge["train"])
        torch.testing.assert_close(
            an.self_scores(ridge["train"]), (gt * torch.linalg.solve(A, gt.T).T).sum(1) / n
        )
        gq = ridge_grads(ridge, ridge["Xq"], ridge["yq"])
        torch.testing.assert_close(
            an.scores(ridge["train"], ridge["queries"]), gq @ torch.linalg.solve(A, gt.T) / n
        )
    # newton self-scores: loss_j(theta_{-j}) - loss_j(theta) to first order in the step
    an = InfluenceAnalyzer(
        ridge["model"], RIDGE_LOSS, solver="exact", l2=ridge["l2"], loo="newton", progress=False
    )
    ss = an.fit(ridge["train"]).self_scores(ridge["train"])
    torch.testing.assert_close(ss, (gt * ridge["delta"]).sum(1), rtol=1e-10, atol=1e-14)
    assert bool((ss > 0).all())  # removing an example always raises its own loss


@pytest.mark.parametrize("k, n", [(1, 50), (3, 30)], ids=["logistic", "softmax-3"])
def test_newton_loo_is_closer_to_retraining_than_first_order(k, n):
    p = classification_problem(n=n, d=3, k=k, m=6, l2=0.05)
    actual = actual_loo(p)
    err, fits = {}, {}
    for loo in ("first_order", "newton"):
        an = InfluenceAnalyzer(p["model"], p["loss"], solver="exact", l2=p["l2"], loo=loo, progress=False)
        s = an.fit(p["train"]).scores(p["train"], p["queries"])
        err[loo] = float((s - actual).abs().mean() / actual.abs().mean())
        fits[loo] = loo_correlation(s.flatten(), actual.flatten())
        # Gauss-Newton curvature is the Hessian for a linear model
        gn = InfluenceAnalyzer(
            p["model"], p["loss"], solver="cg", curvature="gauss_newton", l2=p["l2"], loo=loo, progress=False
        )
        torch.testing.assert_close(
            gn.fit(p["train"]).scores(p["train"], p["queries"]), s, rtol=1e-7, atol=1e-10
        )
    assert err["newton"] < 0.6 * err["first_order"], err
    assert abs(fits["newton"].slope - 1) < abs(fits["first_order"].slope - 1), fits
    assert abs(fits["newton"].slope - 1) < 0.05 and fits["newton"].pearson > 0.99, fits


def test_float32_model_scored_in_float64_and_loaders():
    p = classification_problem(n=30, d=3, k=1, m=4, l2=0.1)
    ref = InfluenceAnalyzer(p["model"], p["loss"], solver="exact", l2=0.1, progress=False).fit(p["train"])
    ref_scores = ref.scores(p["train"], p["queries"])
    m32 = copy.deepcopy(p["model"]).float()
    train32 = TensorDataset(p["X"].float(), p["y"].float())
    an = InfluenceAnalyzer(m32, p["loss"], solver="exact", l2=0.1, dtype=torch.float64, progress=False)
    got = an.fit(DataLoader(train32, batch_size=7)).scores(
        DataLoader(train32, batch_size=7), TensorDataset(p["Xq"].float(), p["yq"].float())
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref_scores, rtol=1e-5, atol=1e-7)
    # float32 throughout agrees to float32 precision
    an32 = InfluenceAnalyzer(m32, p["loss"], solver="cg", l2=0.1, progress=False).fit(train32)
    got32 = an32.scores(train32, TensorDataset(p["Xq"].float(), p["yq"].float()))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref_scores, rtol=2e-3, atol=1e-5)


class DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_dict_batches_and_identity_solver():
    p = classification_problem(n=20, d=3, k=1, m=3)

    def loss(m, b):
        return F.binary_cross_entropy_with_logits(m(b["x"]).squeeze(-1), b["y"], reduction="none")

    an = InfluenceAnalyzer(p["model"], loss, solver="identity", batch_size=6, progress=False)
    s = an.fit(DictData(p["X"], p["y"])).scores(DictData(p["X"], p["y"]), DictData(p["Xq"], p["yq"]))
    G = an.train_gradients(DictData(p["X"], p["y"]))
    Q = an.query_gradients(DictData(p["Xq"], p["yq"]))
    torch.testing.assert_close(s, Q @ G.T / 20)  # TracIn-style dot products / n


def test_model_is_never_modified():
    p = classification_problem(n=20, d=3, k=3, m=3)
    model = p["model"]
    model.train()
    before = copy.deepcopy(model.state_dict())
    flags = [q.requires_grad for q in model.parameters()]
    for loo in ("first_order", "newton"):
        an = InfluenceAnalyzer(
            model, p["loss"], solver="cg", l2=0.05, loo=loo, curvature="gauss_newton", progress=False
        )
        an.fit(p["train"])
        an.scores(p["train"], p["queries"])
        an.self_scores(p["train"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(q.grad is None for q in model.parameters())
    assert [q.requires_grad for q in model.parameters()] == flags and model.training


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small():
    return classification_problem(n=20, d=3, k=1, m=3)


def test_bad_configuration(small):
    model, loss = small["model"], small["loss"]
    for kwargs, exc, match in [
        (dict(damping=-0.1), ValueError, "damping must be a finite number >= 0, got -0.1"),
        (dict(l2=-1.0), ValueError, "l2 must be a finite number >= 0, got -1.0"),
        (dict(l2=float("nan")), ValueError, "l2 must be a finite number >= 0"),
        (dict(solver="newton_schulz"), ValueError, "unknown solver 'newton_schulz'"),
        (dict(curvature="fisher"), ValueError, "curvature must be one of"),
        (dict(loo="exact"), ValueError, "loo must be one of"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
        (dict(dtype=torch.float16), TypeError, "dtype must be None, torch.float32 or torch.float64"),
        (dict(params=["weight", "nope"]), ValueError, r"\['nope'\] are not parameters"),
    ]:
        with pytest.raises(exc, match=match):
            InfluenceAnalyzer(model, loss, **kwargs)

    def plain(m, b):
        return F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1], reduction="none")

    with pytest.raises(TypeError, match="loo='newton' need loss_fn to be an OutputLoss"):
        InfluenceAnalyzer(model, plain, loo="newton")
    with pytest.raises(TypeError, match="curvature='gauss_newton' need loss_fn to be an OutputLoss"):
        InfluenceAnalyzer(model, plain, curvature="gauss_newton")
    with pytest.raises(RuntimeError, match=r"call fit\(train\) before"):
        InfluenceAnalyzer(model, loss).scores(small["train"], small["queries"])


def test_bad_data(small):
    model, loss = small["model"], small["loss"]
    an = InfluenceAnalyzer(model, loss, solver="exact", l2=0.05, progress=False)
    empty = TensorDataset(torch.zeros(0, 3, dtype=DT), torch.zeros(0, dtype=DT))
    with pytest.raises(ValueError, match="train is empty"):
        an.fit(empty)
    with pytest.raises(ValueError, match="train is empty"):
        an.fit(DataLoader(empty, batch_size=4))
    with pytest.raises(ValueError, match="shuffles"):
        an.fit(DataLoader(small["train"], shuffle=True))
    with pytest.raises(ValueError, match="drop_last"):
        an.fit(DataLoader(small["train"], batch_size=3, drop_last=True))
    with pytest.raises(TypeError, match="must be a torch.utils.data.Dataset or DataLoader"):
        an.fit((small["X"], small["y"]))
    an.fit(small["train"])
    with pytest.raises(ValueError, match="queries is empty"):
        an.scores(small["train"], empty)
    half = TensorDataset(small["X"][:10], small["y"][:10])
    with pytest.raises(ValueError, match="train has 10 examples but the analyzer was fitted on 20"):
        an.scores(half, small["queries"])


def test_non_per_example_loss_and_unused_parameters(small):
    def mean_loss(m, b):
        return F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])

    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\]"):
        InfluenceAnalyzer(small["model"], mean_loss, solver="exact").fit(small["train"])

    class TwoHeads(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin, self.unused_head = lin, nn.Linear(3, 2).to(DT)

        def forward(self, x):
            return self.lin(x)

    model = TwoHeads(copy.deepcopy(small["model"]))
    with pytest.raises(
        ValueError, match=r"does not depend on parameters \['unused_head.weight', 'unused_head.bias'\]"
    ):
        InfluenceAnalyzer(model, small["loss"], solver="exact", l2=0.05).fit(small["train"])
    ok = InfluenceAnalyzer(
        model, small["loss"], solver="exact", l2=0.05, params=["lin.weight", "lin.bias"], progress=False
    )
    assert ok.fit(small["train"]).scores(small["train"], small["queries"]).shape == (3, 20)


def test_nan_curvature_and_non_convergence(small):
    model = nn.Linear(2, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    ds = TensorDataset(torch.randn(8, 2, dtype=DT))

    def nan_hessian(m, b):
        return m(b[0]).squeeze(-1) + m.weight.abs().pow(1.5).sum()

    with pytest.raises(FloatingPointError, match="NaN/Inf in the curvature"):
        InfluenceAnalyzer(model, nan_hessian, solver="exact", l2=0.1).fit(ds)
    an = InfluenceAnalyzer(
        small["model"], small["loss"], solver=CGSolver(max_iter=1), l2=0.05, progress=False
    ).fit(small["train"])
    with pytest.raises(ConvergenceError, match="relative residual"):
        an.scores(small["train"], small["queries"])
    # singular curvature without l2/damping: an error naming the cure
    zero_feature = TensorDataset(torch.cat([small["X"][:, :2], torch.zeros(20, 1, dtype=DT)], 1), small["y"])
    with pytest.raises(ValueError, match="singular|not positive definite"):
        InfluenceAnalyzer(small["model"], small["loss"], solver="exact").fit(zero_feature)


def test_output_loss_must_be_per_example(small):
    bad = OutputLoss(lambda m, b: m(b[0]).squeeze(-1), lambda z, b: (z - z.mean()) ** 2)
    with pytest.raises(ValueError, match="not per-example"):
        InfluenceAnalyzer(small["model"], bad, solver="exact", l2=0.1).fit(small["train"])


def test_fit_checks_an_output_loss_without_building_its_output_hessian(small, monkeypatch):
    from soulkit.influence.gradients import BoundLoss

    def refuse(*args, **kwargs):
        raise AssertionError("output_derivatives called: the [b, k, k] output Hessian is not needed for this")

    want = InfluenceAnalyzer(small["model"], small["loss"], solver="exact", l2=0.05, progress=False).fit(
        small["train"]).scores(small["train"], small["queries"])
    monkeypatch.setattr(BoundLoss, "output_derivatives", refuse)
    got = InfluenceAnalyzer(small["model"], small["loss"], solver="exact", l2=0.05, progress=False).fit(
        small["train"]).scores(small["train"], small["queries"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scores_refer_to_the_model_at_fit(small):
    model = copy.deepcopy(small["model"])
    an = InfluenceAnalyzer(model, small["loss"], solver="exact", l2=0.05, progress=False).fit(small["train"])
    before = an.scores(small["train"], small["queries"])
    with torch.no_grad():
        model.weight.add_(1.0)  # an in-place training step after fit
    torch.testing.assert_close(an.scores(small["train"], small["queries"]), before, rtol=0, atol=0)


def test_options_come_from_influence_config_alone(small):
    model, loss = small["model"], small["loss"]
    # one definition of the options: the analyzer takes an InfluenceConfig and/or its fields by name
    assert list(inspect.signature(InfluenceAnalyzer.__init__).parameters) == [
        "self", "model", "loss_fn", "config", "options"
    ]
    cfg = InfluenceConfig(solver="exact", l2=0.05, progress=False)
    by_config = InfluenceAnalyzer(model, loss, cfg).fit(small["train"]).scores(small["train"], small["queries"])
    by_name = InfluenceAnalyzer(model, loss, solver="exact", l2=0.05, progress=False).fit(small["train"])
    torch.testing.assert_close(by_config, by_name.scores(small["train"], small["queries"]), rtol=0, atol=0)
    assert by_name.config == cfg
    # names override the config's fields, the config itself is left alone
    an = InfluenceAnalyzer(model, loss, cfg, l2=0.5, damping=0.1)
    assert (an.config.l2, an.config.damping, an.config.progress) == (0.5, 0.1, False)
    assert (cfg.l2, cfg.damping) == (0.05, 0.0)
    # a solver given by name: every analyzer gets its own
    a1, a2 = InfluenceAnalyzer(model, loss, cfg), InfluenceAnalyzer(model, loss, cfg)
    assert a1.solver is not a2.solver and cfg.solver == "exact"
    solver = CGSolver(tol=1e-9)
    assert InfluenceAnalyzer(model, loss, solver=solver).solver is solver
    # overrides are validated like the config
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0, got -1"):
        InfluenceAnalyzer(model, loss, cfg, l2=-1)
    with pytest.raises(TypeError, match=r"unknown influence option 'solvr'; the options are the fields of InfluenceConfig: solver, l2"):
        InfluenceAnalyzer(model, loss, solvr="cg")
    with pytest.raises(TypeError, match="unknown influence options 'a', 'b'"):
        InfluenceAnalyzer(model, loss, a=1, b=2)
    with pytest.raises(TypeError, match="config must be an InfluenceConfig or None, got dict"):
        InfluenceAnalyzer(model, loss, {"l2": 0.1})
    with pytest.raises(ValueError, match="unknown solver 'newton_schulz'"):
        InfluenceConfig(solver="newton_schulz")
    assert {f.name for f in dataclasses.fields(InfluenceConfig)} >= {"solver", "l2", "damping", "loo", "curvature"}
