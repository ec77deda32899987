"""Tests of soulkit.optim.AdaHessian (its update kernels: tests/kernels/test_adahessian_kernels.py)."""

from __future__ import annotations

import copy
import gc
import io
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from soulkit.optim.adahessian import AdaHessian

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")

DT = torch.float64


# ---------------------------------------------------------------------------- independent reference
def reference_run(
    x0, grad_fn, diag_fn, *, steps, lr, betas, eps, wd=0.0, k=1.0, hessian_update_interval=1, maximize=False
):
    """AdaHessian written out from the formulas, float64, one list of tensors; returns the final x."""
    b1, b2 = betas
    x = [t.clone() for t in x0]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    d = None
    for t in range(1, steps + 1):
        g = grad_fn(x)
        if (t - 1) % hessian_update_interval == 0:
            d = diag_fn(x)
        for j in range(len(x)):
            gj = -g[j] if maximize else g[j]
            x[j] = x[j] * (1 - lr * wd)
            m[j] = b1 * m[j] + (1 - b1) * gj
            v[j] = b2 * v[j] + (1 - b2) * d[j] ** 2
            m_hat = m[j] / (1 - b1**t)
            v_hat = v[j] / (1 - b2**t)
            x[j] = x[j] - lr * m_hat / (torch.sqrt(v_hat) ** k + eps)
    return x


def spatial_mean_abs(d):
    return d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d)


# A separable quartic: f(x) = sum(a * x**4 / 4 + b * x**2 / 2); its Hessian is diagonal, so the
# Hutchinson estimate is exact for every Rademacher draw (u_i**2 == 1).
def quartic_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (2, 3, 3, 3)]
    x0 = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    a = [torch.rand(s, generator=gen, dtype=DT) + 0.5 for s in shapes]
    b = [torch.rand(s, generator=gen, dtype=DT) + 0.1 for s in shapes]

    def loss(xs):
        return sum((aj * xj**4 / 4 + bj * xj**2 / 2).sum() for aj, bj, xj in zip(a, b, xs))

    def grad_fn(xs):
        return [aj * xj**3 + bj * xj for aj, bj, xj in zip(a, b, xs)]

    def diag_fn(xs, spatial=True):
        ds = [3 * aj * xj**2 + bj for aj, bj, xj in zip(a, b, xs)]
        return [spatial_mean_abs(dj) if (spatial and dj.dim() == 4) else dj for dj in ds]

    return x0, loss, grad_fn, diag_fn


def run_optimizer(x0, loss_fn, steps, **kw):
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward(create_graph=opt.hessian_due())
        opt.step()
    return [p.detach() for p in params], opt


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4),
        dict(lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05, hessian_power=0.7, hessian_update_interval=3),
        dict(lr=0.1, betas=(0.0, 0.5), eps=1e-4, hessian_power=0.0, hessian_update_interval=2),
    ],
)
def test_trajectory_matches_formula_reference_exact_diagonal(cfg, foreach):
    x0, loss, grad_fn, diag_fn = quartic_problem()
    got, _ = run_optimizer(x0, loss, 8, foreach=foreach, seed=3, **cfg)
    ref = reference_run(
        x0,
        grad_fn,
        diag_fn,
        steps=8,
        lr=cfg["lr"],
        betas=cfg["betas"],
        eps=cfg["eps"],
        wd=cfg.get("weight_decay", 0.0),
        k=cfg.get("hessian_power", 1.0),
        hessian_update_interval=cfg.get("hessian_update_interval", 1),
    )
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_maximize_equals_minimizing_the_negative():
    x0, loss, _, _ = quartic_problem(1)
    a, _ = run_optimizer(x0, loss, 6, seed=0, hessian_update_interval=2, weight_decay=0.01)
    b, _ = run_optimizer(x0, lambda xs: -loss(xs), 6, seed=0, hessian_update_interval=2, weight_decay=0.01, maximize=True)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=1e-13, atol=1e-15)


def make_quadratic(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=gen, dtype=DT)
    a = q @ q.T / n + torch.eye(n, dtype=DT)
    a = a + 0.6 * torch.ones(n, n, dtype=DT)  # strong off-diagonal terms: row sums differ from diag
    return a


def test_hutchinson_expectation_is_the_true_diagonal_not_the_row_sum():
    """E[u * (A u)] = diag(A) only for a real Rademacher u; u == -1 everywhere (the
    ``randint_like(p, 0, 1) * 2 - 1`` bug) would give the row sums A @ 1 instead."""
    a = make_quadratic()
    x = torch.nn.Parameter(torch.randn(5, dtype=DT))
    opt = AdaHessian([x], lr=0.0, n_samples=2000, seed=11)
    (0.5 * x @ a @ x).backward(create_graph=True)
    opt.step()
    d = opt.state[x]["hessian_diag"]
    diag, rowsum = torch.diagonal(a), a.sum(1)
    assert (diag - rowsum).abs().min() > 1.0  # the test can tell them apart
    # per-sample std is sqrt(sum_{j != i} A_ij**2) (~2 here): 2000 samples give ~0.05
    torch.testing.assert_close(d, diag, atol=0.25, rtol=0)
    assert ((d - rowsum).abs() > 0.5).all()


def test_the_expectation_test_catches_an_all_minus_one_sampler(monkeypatch):
    """With ``randint_like(p, 0, 1) * 2 - 1`` (always -1) the estimate is exactly the row sums."""
    import soulkit.optim.adahessian as mod

    a = make_quadratic()
    x = torch.nn.Parameter(torch.randn(5, dtype=DT))
    opt = AdaHessian([x], lr=0.0, n_samples=4, seed=11)
    monkeypatch.setattr(mod, "rademacher_like", lambda p, gen=None: torch.randint_like(p, 0, 1) * 2 - 1)
    (0.5 * x @ a @ x).backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(opt.state[x]["hessian_diag"], a.sum(1))


def test_trajectory_with_many_samples_matches_exact_diagonal_reference():
    a = make_quadratic(seed=2)
    x0 = [torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(4))]
    cfg = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-4)
    # one refresh (hessian_update_interval=6 over 6 steps) with many samples, then D is reused
    got, opt = run_optimizer(
        x0, lambda xs: 0.5 * xs[0] @ a @ xs[0], 6, n_samples=2000, hessian_update_interval=6, seed=1, **cfg
    )
    torch.testing.assert_close(
        opt.state[opt.param_groups[0]["params"][0]]["hessian_diag"], torch.diagonal(a), atol=0.2, rtol=0
    )
    ref = reference_run(
        x0, lambda xs: [a @ xs[0]], lambda xs: [torch.diagonal(a).clone()], steps=6, hessian_update_interval=6, **cfg
    )
    assert (got[0] - x0[0]).abs().min() > 0.1  # it moved
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0.05 * (ref[0] - x0[0]).abs().max().item())


# ---------------------------------------------------------------------------- spatial / block averaging
def test_spatial_averaging_of_conv_kernels_and_block_averaging_of_matrices():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, dtype=DT)
    lin = torch.nn.Linear(7, 4, dtype=DT)
    x = torch.randn(4, 2, 5, 5, dtype=DT)

    def estimates(**kw):
        c, l_ = copy.deepcopy(conv), copy.deepcopy(lin)
        opt = AdaHessian([c.weight, l_.weight], lr=0.0, seed=9, **kw)
        h = torch.tanh(c(x)).mean(dim=(2, 3))
        loss = torch.tanh(l_(torch.cat([h, h[:, :1].repeat(1, 4)], 1))).pow(2).sum()
        loss.backward(create_graph=True)
        opt.step()
        return opt.state[c.weight]["hessian_diag"], opt.state[l_.weight]["hessian_diag"]

    raw_c, raw_l = estimates(spatial_average=False)
    avg_c, avg_l = estimates()  # defaults: spatial_average=True, block_size=1
    torch.testing.assert_close(avg_c, spatial_mean_abs(raw_c))
    assert torch.equal(avg_l, raw_l)  # matrices are left element-wise by default
    _, blk_l = estimates(block_size=3)  # 7 columns: blocks [0:3], [3:6], ragged [6:7]
    a = raw_l.abs()
    expect = torch.cat(
        [
            a[:, 0:3].mean(1, keepdim=True).expand(4, 3),
            a[:, 3:6].mean(1, keepdim=True).expand(4, 3),
            a[:, 6:7],
        ],
        1,
    )
    torch.testing.assert_close(blk_l, expect)


# ---------------------------------------------------------------------------- refresh API
def test_hessian_due_schedule_plain_backward_between_refreshes_and_d_reuse():
    x0, loss, _, _ = quartic_problem()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params, lr=0.05, hessian_update_interval=3, seed=0)
    due, d_prev = [], None
    for t in range(7):
        due.append(opt.hessian_due())
        opt.zero_grad()
        v_before = opt.state[params[0]]["exp_hessian_diag_sq"].clone() if t else None
        loss(params).backward(create_graph=due[-1])  # a graph only on refresh steps
        opt.step()
        d = opt.state[params[0]]["hessian_diag"].clone()
        if not due[-1]:
            assert torch.equal(d, d_prev)  # D reused...
            assert not torch.equal(opt.state[params[0]]["exp_hessian_diag_sq"], v_before)  # ...and v updated
        d_prev = d
    assert due == [True, False, False, True, False, False, True]
    assert all(s["step"] == 7 for s in opt.state.values())


def test_refresh_due_without_graph_raises_a_clear_error_and_changes_nothing():
    x0, loss, _, _ = quartic_problem()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params)
    assert opt.hessian_due()
    loss(params).backward()  # forgot create_graph=True
    with pytest.raises(RuntimeError, match=r"create_graph=True.*hessian_due|hessian_due.*create_graph=True"):
        opt.step()
    for p, t in zip(params, x0):
        assert torch.equal(p.detach(), t)
    assert opt.hessian_due() and not opt.state


class _Marker:
    pass


class _Mark(torch.autograd.Function):
    """Identity whose autograd node carries a marker object: alive exactly as long as the graph."""

    @staticmethod
    def forward(ctx, h):
        ctx.marker = _Marker()
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g


def test_grads_are_detached_after_step_and_the_graph_is_freed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = AdaHessian(model.parameters(), hessian_update_interval=2)
    x = torch.randn(5, 4)
    for _ in range(2):  # the second step is not a refresh: only the detach can free that graph
        opt.zero_grad()
        h = _Mark.apply(model[0](x))
        marker = weakref.ref(h.grad_fn.marker)
        loss = model[2](torch.tanh(h)).pow(2).mean()
        del h
        loss.backward(create_graph=True)
        del loss
        gc.collect()
        assert marker() is not None  # the param -> grad -> graph -> param cycle keeps the graph alive
        opt.step()
        assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in model.parameters())
        gc.collect()
        assert marker() is None


def test_closure_follows_the_torch_contract():
    x0, loss, _, _ = quartic_problem()
    manual, _ = run_optimizer(x0, loss, 5, seed=2, hessian_update_interval=2)
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params, seed=2, hessian_update_interval=2)

    def closure():
        opt.zero_grad()
        value = loss(params)
        value.backward(create_graph=opt.hessian_due())
        return value

    for _ in range(5):
        out = opt.step(closure)
        assert isinstance(out, torch.Tensor)
    for p, m in zip(params, manual):
        assert torch.equal(p.detach(), m)


def test_parameter_first_seen_on_a_non_refresh_step():
    a = torch.nn.Parameter(torch.ones(3, dtype=DT))
    b = torch.nn.Parameter(torch.ones(2, dtype=DT))
    opt = AdaHessian([a, b], hessian_update_interval=5)
    (a**4).sum().backward(create_graph=True)
    opt.step()  # b has no gradient: skipped
    assert b not in opt.state or not opt.state[b]
    opt.zero_grad()
    ((a**4).sum() + (b**4).sum()).backward()  # not due, b has no estimate and no graph
    assert not opt.hessian_due()
    with pytest.raises(RuntimeError, match="parameter 1 has a gradient but no Hessian estimate"):
        opt.step()
    opt.zero_grad()
    ((a**4).sum() + (b**4).sum()).backward(create_graph=True)
    opt.step()  # with a graph, b's estimate is made on the spot
    torch.testing.assert_close(opt.state[b]["hessian_diag"], 12 * torch.ones(2, dtype=DT))


# ---------------------------------------------------------------------------- explicit estimates
def test_update_hessian_uses_the_given_estimate_without_a_graph():
    x0, loss, grad_fn, diag_fn = quartic_problem()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params, lr=0.05, hessian_update_interval=1)
    for _ in range(4):
        opt.zero_grad()
        opt.update_hessian(diag_fn([p.detach() for p in params], spatial=False))
        assert not opt.hessian_due()
        loss(params).backward()  # no graph needed
        opt.step()
        assert opt.hessian_due()
    ref = reference_run(
        x0, grad_fn, lambda xs: diag_fn(xs, spatial=False), steps=4, lr=0.05, betas=(0.9, 0.999), eps=1e-4
    )
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


def test_update_hessian_none_keeps_the_previous_estimate():
    x0, loss, _, _ = quartic_problem()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params)
    loss(params).backward(create_graph=True)
    opt.step()
    kept = opt.state[params[1]]["hessian_diag"].clone()
    opt.zero_grad()
    opt.update_hessian([torch.ones_like(params[0]), None, torch.ones_like(params[2])])
    loss(params).backward()
    opt.step()
    assert torch.equal(opt.state[params[1]]["hessian_diag"], kept)
    assert torch.equal(opt.state[params[0]]["hessian_diag"], torch.ones_like(params[0]))


def test_update_hessian_validation_names_the_index():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = AdaHessian([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}])
    with pytest.raises(ValueError, match="2 parameters"):
        opt.update_hessian([torch.zeros(3)])
    with pytest.raises(ValueError, match=r"estimate\[1\].*shape"):
        opt.update_hessian([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"estimate\[1\].*NaN or Inf"):
        opt.update_hessian([torch.zeros(3), torch.tensor([[1.0, float("inf")], [0.0, 0.0]])])
    with pytest.raises(ValueError, match=r"estimate\[0\].*dtype"):
        opt.update_hessian([torch.zeros(3, dtype=torch.int64), torch.zeros(2, 2)])
    with pytest.raises(TypeError):
        opt.update_hessian(torch.zeros(3))
    assert opt.hessian_due()  # nothing was recorded


# ---------------------------------------------------------------------------- validation / bad input
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-0.1), "lr"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(hessian_power=1.5), "hessian_power"),
        (dict(hessian_power=-0.1), "hessian_power"),
        (dict(hessian_update_interval=0), "hessian_update_interval"),
        (dict(update_each=0), "hessian_update_interval"),
        (dict(n_samples=0), "n_samples"),
        (dict(block_size=0), "block_size"),
        (dict(hessian_update_interval=1.5), "hessian_update_interval"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaHessian([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_update_each_is_the_older_name_of_the_refresh_interval():
    p = torch.nn.Parameter(torch.zeros(2))
    assert AdaHessian([p], update_each=3).param_groups[0]["hessian_update_interval"] == 3
    q = torch.nn.Parameter(torch.zeros(2))
    opt = AdaHessian([{"params": [q], "update_each": 4}])
    assert opt.param_groups[0]["hessian_update_interval"] == 4 and "update_each" not in opt.param_groups[0]
    assert AdaHessian([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["seed"] == 0  # fixed default


def test_invalid_param_group_override_is_rejected():
    with pytest.raises(ValueError, match="hessian_power"):
        AdaHessian([{"params": [torch.nn.Parameter(torch.zeros(2))], "hessian_power": 2.0}])


def test_complex_parameters_and_sparse_gradients_are_rejected():
    with pytest.raises(ValueError, match="complex"):
        AdaHessian([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 3, sparse=True)
    other = torch.nn.Parameter(torch.ones(3))
    opt = AdaHessian([other, emb.weight])
    (emb(torch.tensor([1, 2])).sum() * other.sum()).backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*parameter 1"):
        opt.step()


def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing():
    x0, loss, _, _ = quartic_problem()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = AdaHessian(params)
    loss(params).backward(create_graph=True)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss(params).backward(create_graph=True)
    params[2].grad = params[2].grad.detach().clone()
    params[2].grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="gradient of parameter 2 contains NaN or Inf"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    after = opt.state_dict()
    for idx, st in state_before["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(after["state"][idx][key], val)
            else:
                assert after["state"][idx][key] == val
    assert after["param_groups"] == state_before["param_groups"]  # global_step not advanced
    assert all(not p.grad.requires_grad for p in params)  # the graph is released even on error


def test_nonfinite_hessian_estimate_raises_naming_the_parameter():
    ok = torch.nn.Parameter(torch.ones(2))
    x = torch.nn.Parameter(torch.tensor([0.0, 1.0]))  # |x|**1.5: finite gradient, NaN Hessian at 0
    opt = AdaHessian([ok, x])
    ((ok**2).sum() + x.abs().pow(1.5).sum()).backward(create_graph=True)
    with pytest.raises(ValueError, match="Hessian estimate of parameter 1 contains NaN or Inf"):
        opt.step()
    assert torch.equal(x.detach(), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------- state_dict round trip
def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 4),
    )


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(n)
    ]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=opt.hessian_due())
        opt.step()


def test_state_dict_round_trip_is_bit_identical():
    cfg = dict(lr=0.05, weight_decay=1e-3, hessian_update_interval=2, n_samples=2)
    data = batches(7)
    full = make_model()
    train(full, AdaHessian(full.parameters(), seed=123, **cfg), data)

    first = make_model()
    opt = AdaHessian(first.parameters(), seed=123, **cfg)
    train(first, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = make_model(seed=99)  # a fresh copy, different init
    resumed.load_state_dict(ckpt["model"])
    opt2 = AdaHessian(resumed.parameters(), seed=7, **cfg)  # seed comes back from the state_dict
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["seed"] == 123 and opt2.param_groups[0]["global_step"] == 3
    assert not opt2.hessian_due()  # step 4 of 7 is not a refresh
    train(resumed, opt2, data[3:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_half_precision_parameters_keep_float32_state_across_load():
    p = torch.nn.Parameter(torch.randn(5).to(torch.bfloat16))
    opt = AdaHessian([p])
    (p.float() ** 4).sum().backward(create_graph=True)
    opt.step()
    assert {opt.state[p][k].dtype for k in ("exp_avg", "exp_hessian_diag_sq", "hessian_diag")} == {
        torch.float32
    }
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdaHessian([q])
    opt2.load_state_dict(opt.state_dict())
    for k in ("exp_avg", "exp_hessian_diag_sq", "hessian_diag"):
        assert opt2.state[q][k].dtype == torch.float32
        assert torch.equal(opt2.state[q][k], opt.state[p][k])


# ---------------------------------------------------------------------------- foreach vs reference optimizer paths
def test_optimizer_foreach_and_reference_paths_agree():
    data = batches(5)
    out = []
    for foreach in (True, False):
        model = make_model().double()
        opt = AdaHessian(
            model.parameters(), lr=0.05, weight_decay=0.01, hessian_power=0.8, foreach=foreach, seed=4
        )
        train(model, opt, [(x.double(), y) for x, y in data])
        out.append([p.detach() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------- training sanity
def test_trains_a_tiny_conv_mlp_on_random_data():
    model = make_model()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 2, 6, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    opt = AdaHessian(model.parameters(), lr=0.05, hessian_update_interval=2, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.5)
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(20):
        train(model, opt, [(x, y)])
        sched.step()
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    assert math.isfinite(last) and last < 0.6 * first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.skipif(
    not __import__("soulkit.kernels._triton_tables", fromlist=["x"]).triton_usable(torch.device("cpu")),
    reason="needs triton (interpreted on CPU)",
)
def test_fused_trajectory_matches_foreach():
    runs = []
    for fused in (True, None):
        model = make_model().double()
        opt = AdaHessian(model.parameters(), lr=0.05, hessian_update_interval=2, seed=0, fused=fused)
        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(8, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen)
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward(create_graph=opt.hessian_due())
            opt.step()
            opt.zero_grad()
        runs.append([q.detach().clone() for q in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="fused"):
        AdaHessian(make_model().parameters(), fused=True, foreach=False)
