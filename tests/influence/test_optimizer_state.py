"""solver="optimizer_state": the training optimizer's diagonal curvature as the influence preconditioner.

Every expected score is computed here independently: per-example gradients by a loop of
``torch.autograd.grad``, the diagonal ``c`` built by hand from the state dict, and
``(1/n) g_i^T diag(c + l2 + damping)^{-1} g_j``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from soulkit.influence import InfluenceAnalyzer, InfluenceConfig, OptimizerStateSolver, OutputLoss
from soulkit.influence.solvers import DiagonalSolver
from soulkit.optim import AdaHessian, Sophia

N = 12


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(1)


def _data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return TensorDataset(X, Y)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _train(model, opt, ds, steps=6, *, sophia=False, adahessian=False):
    X, Y = ds.tensors
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, (X, Y)).mean()
        loss.backward(create_graph=adahessian)
        if sophia and opt.hessian_due():
            opt.update_hessian(batch_size=len(X))
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def _per_example_grads(model, ds, names=None):
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    rows = []
    for x, y in zip(*ds.tensors):
        loss = _loss(model, (x[None], y[None]))[0]
        gs = torch.autograd.grad(loss, [params[k] for k in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _reference(model, train, queries, c_by_name, shift=0.0, names=None):
    names = list(dict(model.named_parameters())) if names is None else names
    c = torch.cat([c_by_name[k].reshape(-1) for k in names]) + shift
    Gt, Gq = _per_example_grads(model, train, names), _per_example_grads(model, queries, names)
    return (Gq / c) @ Gt.T / len(train)


def _analyzer(model, **options):
    return InfluenceAnalyzer(
        model, _loss, solver="optimizer_state", dtype=torch.float64, progress=False, **options
    )


def _adam_c(model, sd, rule="adam"):
    """Adam's second moment by hand: sqrt(v / (1 - beta2^t)) + eps (rule "adam") or v_hat ("fisher")."""
    group = sd["param_groups"][0]
    b2, eps = group["betas"][1], group["eps"]
    out = {}
    for k, (name, _) in enumerate(model.named_parameters()):
        st = sd["state"][k]
        vhat = st["exp_avg_sq"] / (1 - b2 ** float(st["step"]))
        out[name] = vhat.sqrt() + eps if rule == "adam" else vhat
    return out


def _adam_c_partial(model, sd, indices):
    """``_adam_c`` for the optimizer indices given (an optimizer whose frozen parameters have no state)."""
    group = sd["param_groups"][0]
    named = list(model.named_parameters())
    out = {}
    for k in indices:
        st = sd["state"][k]
        out[named[k][0]] = (st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))).sqrt() + group[
            "eps"
        ]
    return out


def _adamw_model():
    train = _data(0)
    model = _mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    _train(model, opt, train)
    return model, opt.state_dict(), train, _data(1, n=5)


def _sophia_model(**kw):
    train = _data(0)
    model = _mlp(0)
    opt = Sophia(model.parameters(), lr=1e-2, hessian_update_interval=2, **kw)
    _train(model, opt, train, sophia=True)
    return model, opt.state_dict(), train, _data(1, n=5)


def _sophia_c(model, sd):
    n_refresh = sd["soulkit_sophia"]["num_hessian_updates"]
    b2 = sd["param_groups"][0]["betas"][1]
    return {
        name: sd["state"][k]["hessian"] / (1 - b2**n_refresh)
        for k, (name, _) in enumerate(model.named_parameters())
    }


# ---- scores against the hand-built reference -------------------------------------------------------


@pytest.mark.parametrize("rule", ["auto", "adam", "fisher"])
def test_adamw_scores_match_reference(rule):
    model, sd, train, queries = _adamw_model()
    an = _analyzer(model, optimizer_state=sd, optimizer_state_rule=rule, damping=1e-3).fit(train)
    got = an.scores(train, queries)
    want = _reference(
        model, train, queries, _adam_c(model, sd, "fisher" if rule == "fisher" else "adam"), 1e-3
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert an.solver.info["optimizer"] == "adam"
    assert an.solver.info["rule"] == ("fisher" if rule == "fisher" else "adam")


def test_sophia_scores_match_reference_with_l2_and_damping():
    model, sd, train, queries = _sophia_model()
    assert sd["soulkit_sophia"]["num_hessian_updates"] == 3
    an = _analyzer(model, optimizer_state=sd, l2=0.01, damping=1e-3).fit(train)
    got = an.scores(train, queries)
    torch.testing.assert_close(
        got, _reference(model, train, queries, _sophia_c(model, sd), 0.011), rtol=1e-10, atol=1e-12
    )
    assert an.solver.info == {**an.solver.info, "optimizer": "sophia", "rule": "hessian"}
    # self-influence uses the same solve
    g = _per_example_grads(model, train)
    c = torch.cat([v.reshape(-1) for v in _sophia_c(model, sd).values()]) + 0.011
    torch.testing.assert_close(an.self_scores(train), (g * g / c).sum(1) / N, rtol=1e-10, atol=1e-12)


def test_sophia_without_bias_correction_uses_h_as_saved():
    model, sd, train, queries = _sophia_model()
    an = _analyzer(model, optimizer_state=sd, optimizer_state_bias_correction=False, damping=1e-3).fit(train)
    raw = {name: sd["state"][k]["hessian"] for k, (name, _) in enumerate(model.named_parameters())}
    torch.testing.assert_close(
        an.scores(train, queries), _reference(model, train, queries, raw, 1e-3), rtol=1e-10, atol=1e-12
    )


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_adahessian_scores_match_reference():
    train, queries = _data(0), _data(1, n=5)
    model = _mlp(0)
    opt = AdaHessian(model.parameters(), lr=1e-2)
    _train(model, opt, train, steps=4, adahessian=True)
    sd = opt.state_dict()
    b2 = sd["param_groups"][0]["betas"][1]
    c = {
        name: (sd["state"][k]["exp_hessian_diag_sq"] / (1 - b2 ** float(sd["state"][k]["step"]))).sqrt()
        for k, (name, _) in enumerate(model.named_parameters())
    }
    an = _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train)
    torch.testing.assert_close(
        an.scores(train, queries), _reference(model, train, queries, c, 1e-3), rtol=1e-10, atol=1e-12
    )


def test_state_from_file_equals_state_dict(tmp_path):
    model, sd, train, queries = _adamw_model()
    path = tmp_path / "opt.pt"
    torch.save(sd, path)
    a = _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train).scores(train, queries)
    b = _analyzer(model, optimizer_state=str(path), damping=1e-3).fit(train).scores(train, queries)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_solver_instance_and_config_object():
    model, sd, train, queries = _adamw_model()
    a = _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train).scores(train, queries)
    cfg = InfluenceConfig(
        solver=OptimizerStateSolver(state=sd), damping=1e-3, dtype=torch.float64, progress=False
    )
    b = InfluenceAnalyzer(model, _loss, cfg).fit(train).scores(train, queries)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exact_hessian_diagonal_in_the_state_equals_the_diagonal_solver():
    """A Sophia state whose h is the exact Hessian diagonal gives the diagonal solver's (method exact) scores."""
    train, queries = _data(0), _data(1, n=5)
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = Sophia(model.parameters(), lr=1e-2, hessian_update_interval=1)
    _train(model, opt, train, steps=3, sophia=True)
    sd = opt.state_dict()
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(flat):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = torch.func.functional_call(model, parts, (train.tensors[0],))
        return ((out - train.tensors[1]) ** 2).sum(1).mean()

    hdiag = torch.autograd.functional.hessian(mean_loss, flat0).diagonal()
    sd = copy.deepcopy(sd)
    i = 0
    for k, s in enumerate(shapes):
        sd["state"][k]["hessian"] = hdiag[i : i + s.numel()].reshape(s).clone()
        i += s.numel()
    got = _analyzer(model, optimizer_state=sd, optimizer_state_bias_correction=False, damping=1e-3).fit(train)
    want = InfluenceAnalyzer(
        model, _loss, solver=DiagonalSolver(method="exact"), damping=1e-3, dtype=torch.float64, progress=False
    ).fit(train)
    torch.testing.assert_close(got.solver.diagonal, want.solver._d, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        got.scores(train, queries), want.scores(train, queries), rtol=1e-10, atol=1e-14
    )


# ---- which state belongs to which parameter ------------------------------------------------------


def test_frozen_parameter_is_left_out_by_default_and_refused_when_attributed():
    train, queries = _data(0), _data(1, n=5)
    model = _mlp(0)
    model[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all four, the frozen one without state
    _train(model, opt, train)
    sd = opt.state_dict()
    an = _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train)  # params default: requires_grad
    names = ["0.weight", "2.weight", "2.bias"]
    c = _adam_c_partial(model, sd, [0, 2, 3])
    torch.testing.assert_close(
        an.scores(train, queries), _reference(model, train, queries, c, 1e-3, names), rtol=1e-10, atol=1e-12
    )
    everything = [k for k, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"no state for parameter '0\.bias' \(optimizer index 1\).*params="):
        _analyzer(model, optimizer_state=sd, params=everything, damping=1e-3).fit(train)


def test_optimizer_built_on_a_subset_needs_optimizer_params():
    train = _data(0)
    model = _mlp(0)
    model[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt, train)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"lists 3 parameters .* the model has 4.*optimizer_params"):
        _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train)
    an = _analyzer(
        model, optimizer_state=sd, damping=1e-3, optimizer_params=["0.weight", "2.weight", "2.bias"]
    )
    an.fit(train)


def test_misordered_optimizer_params_name_the_first_mismatch():
    model, sd, train, _ = _adamw_model()
    order = ["2.weight", "0.bias", "0.weight", "2.bias"]
    with pytest.raises(
        ValueError, match=r"parameter index 0 .* shape \(4, 3\) .* '2\.weight', has shape \(2, 4\)"
    ):
        _analyzer(model, optimizer_state=sd, optimizer_params=order).fit(train)


def test_state_of_another_model_is_refused():
    model, sd, train, _ = _adamw_model()
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with pytest.raises(
        ValueError, match=r"parameter index 0 .* shape \(4, 3\) .*'0\.weight', has shape \(5, 3\)"
    ):
        _analyzer(other, optimizer_state=sd).fit(train)


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_nonfinite_or_negative_entries_name_the_parameter(bad):
    model, sd, train, _ = _sophia_model()
    sd = copy.deepcopy(sd)
    sd["state"][2]["hessian"][0, 1] = float("nan") if bad == "nan" else -1.0
    match = r"'2\.weight' \(optimizer index 2\) has 1 " + ("NaN/Inf" if bad == "nan" else "negative")
    with pytest.raises(ValueError, match=match):
        _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train)


def test_zero_curvature_without_damping_is_refused():
    model, sd, train, _ = _sophia_model()
    sd = copy.deepcopy(sd)
    sd["state"][3]["hessian"].zero_()
    with pytest.raises(ValueError, match=r"'2\.bias' has 2 zero curvature entries .*set damping"):
        _analyzer(model, optimizer_state=sd).fit(train)
    _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train)


# ---- files and options -------------------------------------------------------------------------


class _Custom:
    pass


def test_file_that_needs_pickle_is_refused(tmp_path):
    model, sd, train, _ = _adamw_model()
    sd = dict(sd)
    sd["note"] = _Custom()
    path = tmp_path / "opt.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"opt\.pt.*refused by torch\.load\(weights_only=True\)"):
        _analyzer(model, optimizer_state=str(path))


def test_missing_file_and_wrong_objects():
    model, sd, train, _ = _adamw_model()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        _analyzer(model, optimizer_state="/nonexistent/nope.pt")
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        _analyzer(model, optimizer_state={"exp_avg_sq": torch.ones(3)})
    with pytest.raises(TypeError, match="optimizer_state must be"):
        _analyzer(model, optimizer_state=3)


def test_optimizer_object_is_accepted():
    train = _data(0)
    model = _mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, train)
    a = _analyzer(model, optimizer_state=opt, damping=1e-3).fit(train).scores(train, train)
    b = _analyzer(model, optimizer_state=opt.state_dict(), damping=1e-3).fit(train).scores(train, train)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_errors():
    model, sd, train, _ = _sophia_model()
    with pytest.raises(ValueError, match="needs optimizer_state="):
        InfluenceConfig(solver="optimizer_state")
    with pytest.raises(ValueError, match="used only by solver='optimizer_state'"):
        InfluenceConfig(solver="cg", optimizer_state=sd)
    with pytest.raises(ValueError, match="optimizer_state_rule must be one of"):
        InfluenceConfig(solver="optimizer_state", optimizer_state=sd, optimizer_state_rule="sqrt")
    with pytest.raises(ValueError, match=r"optimizer_state_rule='adam' does not apply to a sophia state"):
        _analyzer(model, optimizer_state=sd, optimizer_state_rule="adam").fit(train)
    stripped = {k: v for k, v in sd.items() if k != "soulkit_sophia"}
    with pytest.raises(ValueError, match="optimizer_state_bias_correction=False"):
        _analyzer(model, optimizer_state=stripped, damping=1e-3).fit(train)


# ---- the factored route (modules=) ------------------------------------------------------------------

SQ_OUTPUT_LOSS = OutputLoss(lambda m, b: m(b[0]), lambda z, b: ((z - b[1]) ** 2).sum(-1))


@pytest.mark.parametrize("which", ["adamw", "sophia"])
def test_factored_route_equals_the_per_example_route(which):
    model, sd, train, queries = _adamw_model() if which == "adamw" else _sophia_model()
    per_example = _analyzer(model, optimizer_state=sd, damping=1e-3).fit(train).scores(train, queries)
    an = InfluenceAnalyzer(
        model,
        SQ_OUTPUT_LOSS,
        solver="optimizer_state",
        optimizer_state=sd,
        modules=["0", "2"],
        damping=1e-3,
        progress=False,
    )
    assert an.factored is not None and an.factored.method == "optimizer_state"
    got = an.fit(train).scores(train, queries)
    torch.testing.assert_close(
        got.double(), per_example, rtol=1e-4, atol=1e-6 * per_example.abs().max().item()
    )
    with pytest.raises(RuntimeError, match="no factors to load"):
        an.load_factors("/nonexistent", train)


def test_factored_route_refuses_a_module_without_state():
    train = _data(0)
    model = _mlp(0)
    model[0].bias.requires_grad_(False)  # frozen while training: no state
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, train)
    model[0].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"no state for parameter '0\.bias' \(optimizer index 1\)"):
        InfluenceAnalyzer(
            model,
            SQ_OUTPUT_LOSS,
            solver="optimizer_state",
            optimizer_state=opt.state_dict(),
            modules=["0", "2"],
            damping=1e-3,
            progress=False,
        )


def test_factored_route_on_gpt2_conv1d_matches_a_hand_reference():
    """GPT-2's Conv1D stores weights [in, out]: the state's diagonal is transposed to the gradient's layout."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from soulkit.influence.modules import tracked_modules

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (6, 8), generator=g)
    train = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    queries = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4, 6)]
    loss = OutputLoss(
        lambda m, b: m(input_ids=b["input_ids"]).logits[:, :-1],
        lambda z, b: F.cross_entropy(z.transpose(1, 2), b["labels"][:, 1:], reduction="none").sum(1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss(model, {"input_ids": ids[:4], "labels": ids[:4]}).mean().backward()
        opt.step()
    sd = opt.state_dict()
    an = InfluenceAnalyzer(
        model, loss, solver="optimizer_state", optimizer_state=sd, modules=None, damping=1e-3, batch_size=4
    )
    assert an.factored is None  # modules=None: the per-example route, as for "identity"
    an = InfluenceAnalyzer(
        model,
        loss,
        solver="optimizer_state",
        optimizer_state=sd,
        modules=[transformers.pytorch_utils.Conv1D],
        damping=1e-3,
        batch_size=4,
        progress=False,
    )
    got = an.fit(train).scores(train, queries)

    tracked = tracked_modules(model, [transformers.pytorch_utils.Conv1D])
    assert tracked and all(t.transposed for t in tracked)
    index = {id(p): k for k, p in enumerate(model.parameters())}
    group = sd["param_groups"][0]

    def c_of(p):
        st = sd["state"][index[id(p)]]
        return (st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))).sqrt() + group["eps"]

    D = (
        torch.cat(
            [
                torch.cat([c_of(t.module.weight).t(), c_of(t.module.bias)[:, None]], 1).flatten()
                for t in tracked
            ]
        )
        + 1e-3
    )

    def grads(example):
        model.zero_grad(set_to_none=True)
        loss(model, {k: v[None] for k, v in example.items()}).sum().backward()
        return torch.cat([t.gradient_matrix().flatten() for t in tracked])

    gt = torch.stack([grads(e) for e in train])
    gq = torch.stack([grads(e) for e in queries])
    model.zero_grad(set_to_none=True)
    want = (gq / D) @ gt.T / len(train)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
