"""Sophia: the update rule, the Hessian refresh paths, the torch.optim contract and bad input."""

from __future__ import annotations

import copy
import gc
import inspect
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from soulkit.optim import Sophia, sampled_label_loss

# --------------------------------------------------------------------------- reference


class RefSophia:
    """Float64 re-implementation of the formula in the docstring, independent of soulkit's kernels."""

    def __init__(self, shapes, lr, betas, rho, wd, eps, maximize=False, bias_correction=False):
        self.m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.h = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.lr, (self.b1, self.b2), self.rho, self.wd, self.eps = lr, betas, rho, wd, eps
        self.maximize, self.bc, self.t = maximize, bias_correction, 0

    def refresh(self, est):
        for h, e in zip(self.h, est):
            h.mul_(self.b2).add_((1 - self.b2) * e.double())

    def step(self, params, grads):
        self.t += 1
        out = []
        for p, g, m, h in zip(params, grads, self.m, self.h):
            p, g = p.double().clone(), g.double()
            if self.maximize:
                g = -g
            p *= 1 - self.lr * self.wd
            m.mul_(self.b1).add_((1 - self.b1) * g)
            mh = m / (1 - self.b1**self.t) if self.bc else m
            p -= self.lr * torch.sign(mh) * torch.minimum(mh.abs() / torch.clamp(self.rho * h, min=self.eps), torch.ones_like(mh))
            out.append(p)
        return out


SHAPES = [(1,), (7,), (13, 5), (3, 4, 2)]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_matches_float64_reference_over_steps(foreach, maximize, bias_correction):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, dtype=torch.float64, generator=gen, requires_grad=True) for s in SHAPES]
    hp = dict(lr=0.05, betas=(0.9, 0.95), rho=0.3, wd=0.1, eps=1e-12)
    opt = Sophia(params, lr=hp["lr"], betas=hp["betas"], rho=hp["rho"], weight_decay=hp["wd"], eps=hp["eps"],
                 maximize=maximize, bias_correction=bias_correction, foreach=foreach, hessian_update_interval=3)
    ref = RefSophia(SHAPES, **hp, maximize=maximize, bias_correction=bias_correction)
    ref_params = [p.detach().clone() for p in params]
    for t in range(9):
        grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
        if t % 3 == 0:
            est = [torch.rand(s, dtype=torch.float64, generator=gen) * 4 for s in SHAPES]
            assert opt.hessian_due()
            opt.update_hessian(est)
            ref.refresh(est)
        else:
            assert not opt.hessian_due()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref_params = ref.step(ref_params, grads)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
    for p, r in zip(params, ref.h):
        torch.testing.assert_close(opt.state[p]["hessian"], r, rtol=1e-12, atol=1e-14)


def test_first_step_is_sign_momentum_of_size_lr_and_ema_applied_once():
    # h starts at 0: the first step is lr * sign(m). m must be (1 - beta1) * g after one step, not
    # (1 - beta1)**2 * g (a peer copy applied the beta1 EMA twice per step).
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5], dtype=torch.float64)
    opt = Sophia([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * g)
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(g))
    assert torch.count_nonzero(opt.state[p]["hessian"]) == 0


def test_hessian_only_changes_on_refresh_steps():
    # A peer copy refreshed h every step from squared loss gradients; here h moves only when an
    # estimate is folded, and the gradient itself never enters h.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = Sophia(model.parameters(), lr=1e-2, hessian_update_interval=4)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    seen = []
    for _ in range(8):
        logits = model(x)
        if opt.hessian_due():
            opt.accumulate_gnb(logits)
        F.cross_entropy(logits, y).backward()
        before = opt.state[model.weight]["hessian"].clone() if model.weight in opt.state else None
        opt.step()
        opt.zero_grad()
        after = opt.state[model.weight]["hessian"]
        seen.append(before is None or not torch.equal(before, after))
    assert seen == [True, False, False, False, True, False, False, False]
    assert opt.num_hessian_updates == 2


def test_estimate_is_used_on_the_step_it_is_given():
    # A peer applied its Hessian EMA 9 steps late; here the refresh of step t shapes step t's update.
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = Sophia([p], lr=1.0, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0)
    opt.update_hessian([torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)])
    p.grad = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([0.1, 0.05, 0.025], dtype=torch.float64))


def test_step_takes_no_batch_size():
    # The paper's code makes users pass a batch size to every step(); B is given once here.
    assert list(inspect.signature(Sophia.step).parameters) == ["self", "closure"]


# --------------------------------------------------------------------------- GNB


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()


def test_update_hessian_from_grad_uses_batch_size_once():
    model = _mlp()
    opt = Sophia(model.parameters(), betas=(0.9, 0.5), hessian_batch_size=32)
    x = torch.randn(32, 6, dtype=torch.float64)
    loss_sum, n = sampled_label_loss(model(x), generator=torch.Generator().manual_seed(1))
    (loss_sum / n).backward()
    grads = [q.grad.clone() for q in model.parameters()]
    opt.update_hessian()
    for q, g in zip(model.parameters(), grads):
        torch.testing.assert_close(opt.state[q]["hessian"], 0.5 * 32 * g * g)
    opt2 = Sophia(model.parameters())
    with pytest.raises(ValueError, match="hessian_batch_size"):
        opt2.update_hessian()
    opt2.update_hessian(batch_size=8)
    torch.testing.assert_close(opt2.state[model[0].weight]["hessian"], 0.01 * 8 * grads[0] ** 2)


def test_gnb_covers_the_whole_accumulated_batch_and_ignores_clipping():
    model = _mlp()
    params = list(model.parameters())
    opt = Sophia(params, betas=(0.9, 0.0), hessian_update_interval=10, seed=7)
    x = torch.randn(20, 6, dtype=torch.float64)
    micro = [x[:8], x[8:]]
    expected_sum = [torch.zeros_like(q) for q in params]
    terms = 0
    for xb in micro:
        logits = model(xb)
        gen = opt._label_generator(logits.device)
        loss_sum, n = sampled_label_loss(logits, generator=gen)
        for acc, g in zip(expected_sum, torch.autograd.grad(loss_sum, params, retain_graph=True)):
            acc += g
        terms += n
        opt.accumulate_gnb(logits)
        (logits.square().mean() / 2).backward()  # the training loss of this micro-batch
    assert opt._pending_terms == 20
    torch.nn.utils.clip_grad_norm_(params, 1e-6)  # aggressive clipping must not touch the estimate
    opt.step()
    for q, s in zip(params, expected_sum):
        torch.testing.assert_close(opt.state[q]["hessian"], s * s / terms)


def test_gnb_from_one_micro_batch_of_an_accumulation_uses_only_its_terms():
    # the cheap refresh: estimate h from the first micro-batch's logits only (half the extra backward)
    model = _mlp()
    params = list(model.parameters())
    opt = Sophia(params, betas=(0.9, 0.0), seed=3)
    x = torch.randn(20, 6, dtype=torch.float64)
    logits = model(x[:8])
    gen = opt._label_generator(logits.device)
    loss_sum, n = sampled_label_loss(logits, generator=gen)
    expected = torch.autograd.grad(loss_sum, params, retain_graph=True)
    assert opt.accumulate_gnb(logits) == 8
    (logits.square().mean() / 2).backward()
    (model(x[8:]).square().mean() / 2).backward()  # second micro-batch: gradient only, no estimate
    assert opt._pending_terms == 8
    opt.step()
    for q, s in zip(params, expected):
        torch.testing.assert_close(opt.state[q]["hessian"], s * s / 8)


def test_gnb_respects_ignore_index():
    model = _mlp()
    opt = Sophia(model.parameters())
    logits = model(torch.randn(2, 5, 6, dtype=torch.float64))  # [batch, seq, vocab]
    labels = torch.tensor([[1, 2, -100, -100, 3], [-100, 0, 1, 2, 3]])
    assert opt.accumulate_gnb(logits, labels=labels) == 7
    with pytest.raises(ValueError, match="no terms"):
        opt.accumulate_gnb(logits, labels=torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="graph"):
        opt.accumulate_gnb(logits.detach())


# --------------------------------------------------------------------------- Hutchinson


def test_hutchinson_estimates_the_diagonal_not_row_sums():
    # A popular collection drew u = randint_like(p, 0, 1) * 2 - 1 == -1 always, which estimates
    # row sums of H. On a quadratic with strong off-diagonal terms the two differ.
    torch.manual_seed(0)
    n = 6
    a = torch.randn(n, n, dtype=torch.float64)
    A = a @ a.T + torch.eye(n, dtype=torch.float64)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = Sophia([x], betas=(0.9, 0.0))
    opt.accumulate_hutchinson(lambda: 0.5 * x @ A @ x + x.sum(), n_samples=4000)
    opt.update_hessian([None])  # nothing folded by this call
    est = opt._take_pending()[x]
    torch.testing.assert_close(est, A.diagonal(), rtol=0, atol=0.1 * A.abs().max().item())
    assert not torch.allclose(est, A.sum(1), atol=0.5)


def test_hutchinson_refresh_leaves_no_graph_behind():
    # SophiaH of a peer needs backward(create_graph=True) every step; users report a memory leak.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = Sophia(model.parameters(), lr=1e-3, hessian_update_interval=2)
    refs = []
    for _ in range(4):
        x = torch.randn(8, 4)
        hidden = model[1](model[0](x))  # saved by TanhBackward: alive exactly as long as the graph
        refs.append(weakref.ref(hidden))
        loss = model[2](hidden).square().mean()
        del hidden
        if opt.hessian_due():
            opt.accumulate_hutchinson(loss)
        loss.backward()
        assert all(q.grad.grad_fn is None for q in model.parameters())
        opt.step()
        opt.zero_grad()
        del loss
    gc.collect()
    assert all(r() is None for r in refs), "an autograd graph outlived its step"
    assert opt.num_hessian_updates == 2


# --------------------------------------------------------------------------- torch.optim contract


def _train(opt_factory, steps, model=None, seed=0, start=0, opt=None):
    model = model or _mlp()
    opt = opt or opt_factory(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 6, dtype=torch.float64, generator=gen), torch.randint(0, 5, (16,), generator=gen))
               for _ in range(steps)]
    for x, y in batches[start:]:
        logits = model(x)
        if opt.hessian_due():
            opt.accumulate_gnb(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_param_groups_have_their_own_hyperparameters():
    model = _mlp()
    frozen = [model[0].weight.detach().clone()]
    opt = Sophia([
        {"params": [model[0].weight], "lr": 0.0},
        {"params": [model[0].bias, model[2].weight, model[2].bias], "rho": 0.5},
    ], lr=1e-2)
    _train(None, 3, model=model, opt=opt)
    torch.testing.assert_close(model[0].weight.detach(), frozen[0])
    assert opt.param_groups[1]["rho"] == 0.5 and opt.param_groups[0]["rho"] == 0.04
    assert len(opt.win_rate()) == 2


def test_lr_scheduler_drives_the_step_size():
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Sophia([p], lr=1.0, weight_decay=0.0, betas=(0.0, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moves = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
        sched.step()
        moves.append((before - p.detach()).abs().max().item())  # h = 0: pure sign steps of size lr
    assert moves == [1.0, 0.5, 0.25]


def test_maximize_equals_minimizing_the_negation():
    def run(maximize):
        torch.manual_seed(3)
        p = torch.randn(9, dtype=torch.float64, requires_grad=True)
        opt = Sophia([p], lr=0.1, maximize=maximize)
        for _ in range(5):
            loss = (p.sin() * p).sum()
            (-loss if maximize else loss).backward()
            opt.update_hessian([torch.ones(9, dtype=torch.float64)])
            opt.step()
            opt.zero_grad()
        return p.detach()

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)


def test_step_with_closure_returns_its_loss():
    model = _mlp()
    opt = Sophia(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(20):
        last = opt.step(closure)
    assert torch.is_tensor(first) and last < first


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(state_dtype):
    factory = lambda ps: Sophia(ps, lr=3e-3, hessian_update_interval=3, state_dtype=state_dtype)  # noqa: E731
    full_model, full_opt = _train(factory, 10)
    # run 5 steps, save, load into a fresh model/optimizer, run the remaining 5
    model = _mlp()
    opt = factory(model.parameters())
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, dtype=torch.float64, generator=gen), torch.randint(0, 5, (16,), generator=gen))
               for _ in range(10)]

    def run(m, o, bs):
        for x, y in bs:
            logits = m(x)
            if o.hessian_due():
                o.accumulate_gnb(logits)
            F.cross_entropy(logits, y).backward()
            o.step()
            o.zero_grad()

    run(model, opt, batches[:5])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2 = _mlp()
    model2.load_state_dict(saved_model)
    opt2 = factory(model2.parameters())
    opt2.load_state_dict(saved_opt)
    if state_dtype is not None:
        assert all(opt2.state[q]["exp_avg"].dtype == state_dtype for q in model2.parameters())
    assert opt2.win_rate() == opt.win_rate()  # the last counted win rate survives the resume
    run(model, opt, batches[5:6])
    run(model2, opt2, batches[5:6])  # step 6 is no refresh step: the resumed run must not recount
    assert opt2.win_rate() == opt.win_rate()
    run(model2, opt2, batches[6:])
    for a, b in zip(full_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.num_hessian_updates == full_opt.num_hessian_updates == 4


def test_bf16_params_keep_fp32_state_across_resume():
    torch.manual_seed(0)
    model = nn.Linear(8, 4).to(torch.bfloat16)
    opt = Sophia(model.parameters(), lr=1e-2)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    for _ in range(3):
        logits = model(x)
        if opt.hessian_due():
            opt.accumulate_gnb(logits)
        logits.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    opt2 = Sophia(model.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[model.weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert model.weight.dtype == torch.bfloat16


def test_grad_scaler_skips_inf_steps_and_leaves_state_untouched():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = Sophia(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x = torch.randn(8, 4)
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    opt.update_hessian([torch.ones_like(q) for q in model.parameters()])
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    m_before = opt.state[model.weight]["exp_avg"].clone()
    h_before = opt.state[model.weight]["hessian"].clone()
    w_before = model.weight.detach().clone()
    loss = model(x).square().mean() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(opt.state[model.weight]["exp_avg"], m_before)
    assert torch.equal(opt.state[model.weight]["hessian"], h_before)
    assert torch.equal(model.weight.detach(), w_before)
    assert scaler.get_scale() < 2.0**4


def test_torch_compile_of_a_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    ref = copy.deepcopy(model)
    opt = Sophia(model.parameters(), lr=1e-2, hessian_update_interval=2)
    ref_opt = Sophia(ref.parameters(), lr=1e-2, hessian_update_interval=2)
    x, y = torch.randn(16, 6), torch.randint(0, 5, (16,))

    def train_step(m, o):
        logits = m(x)
        if o.hessian_due():
            o.accumulate_gnb(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(4):
        compiled(model, opt)
        train_step(ref, ref_opt)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- win rate


def test_win_rate_counts_unclipped_coordinates():
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Sophia([p], lr=1e-3, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0)
    opt.update_hessian([torch.tensor([10.0, 10.0, 0.1, 0.1], dtype=torch.float64)])
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # |m|/h: 0.1, 0.1, 10, 10
    opt.step()
    assert opt.win_rate() == [0.5]
    fresh = Sophia([torch.zeros(2, requires_grad=True)])
    assert fresh.win_rate()[0] != fresh.win_rate()[0]  # nan before the first step


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(rho=0.0), "rho"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(hessian_update_interval=0), "hessian_update_interval"),
        (dict(hessian_batch_size=0), "hessian_batch_size"),
        (dict(nonfinite="maybe"), "nonfinite"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sophia([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_group_hyperparameter_is_rejected():
    with pytest.raises(ValueError, match="rho"):
        Sophia([{"params": [torch.zeros(2, requires_grad=True)], "rho": -1}])


def test_sparse_and_complex_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = Sophia(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="complex"):
        Sophia([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


def test_estimate_list_is_validated():
    ps = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    opt = Sophia(ps)
    with pytest.raises(ValueError, match="2 parameters"):
        opt.update_hessian([torch.ones(3)])
    with pytest.raises(ValueError, match=r"estimate\[1\]"):
        opt.update_hessian([torch.ones(3), torch.ones(4)])
    with pytest.raises(TypeError, match=r"estimate\[0\]"):
        opt.update_hessian([torch.ones(3, dtype=torch.int64), torch.ones(2, 2)])
    with pytest.raises(TypeError, match="list"):
        opt.update_hessian(torch.ones(3))


def test_nonfinite_gradient_is_skipped_and_counted():
    p = torch.ones(3, requires_grad=True)
    opt = Sophia([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert opt.skipped_steps == 1 and opt.num_steps == 0
    assert torch.equal(p.detach(), torch.ones(3)) and p not in opt.state
    p.grad = torch.ones(3)
    opt.step()
    assert opt.num_steps == 1 and torch.isfinite(p).all()


def test_huge_but_finite_gradient_is_not_taken_for_nonfinite():
    # the fast 2-norm check overflows on finite values above ~1.8e19 (fp32); the step must still run
    p = torch.ones(3, requires_grad=True)
    opt = Sophia([p], lr=0.1)
    p.grad = torch.tensor([3e30, -1.0, 1.0])
    assert not torch.isfinite(torch.linalg.vector_norm(p.grad))  # the case the exact re-check is for
    opt.step()
    assert opt.skipped_steps == 0 and opt.num_steps == 1
    for bad in (float("nan"), float("inf"), float("-inf")):  # and real non-finite values are still caught
        p.grad = torch.tensor([3e30, bad, 1.0])
        opt.step()
    assert opt.skipped_steps == 3 and opt.num_steps == 1


def test_nonfinite_gradient_raises_when_asked():
    p = torch.ones(3, requires_grad=True)
    opt = Sophia([p], lr=0.1, nonfinite="raise")
    p.grad = torch.tensor([1.0, float("inf"), 1.0])
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_nonfinite_estimate_is_dropped_and_counted():
    p = torch.ones(3, requires_grad=True)
    opt = Sophia([p], lr=0.1)
    opt.update_hessian([torch.ones(3)])
    h = opt.state[p]["hessian"].clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.update_hessian([torch.tensor([1.0, float("nan"), 1.0])]) is False
    assert torch.equal(opt.state[p]["hessian"], h) and opt.skipped_hessian_updates == 1
    strict = Sophia([p], nonfinite="raise")
    with pytest.raises(FloatingPointError):
        strict.update_hessian([torch.full((3,), float("inf"))])


def test_fused_flag():
    with pytest.raises(ValueError, match="fused"):
        Sophia([torch.zeros(2, requires_grad=True)], fused=True, foreach=False)


@pytest.mark.skipif(
    not __import__("soulkit.kernels.sophia_triton", fromlist=["x"]).triton_usable(torch.device("cpu")),
    reason="needs triton (interpreted on CPU)",
)
def test_fused_trajectory_matches_foreach():
    runs = []
    for fused in (True, None):
        model, _ = _train(lambda ps, f=fused: Sophia(ps, lr=1e-2, fused=f, hessian_update_interval=2), 4,
                          model=_mlp())
        runs.append([q.detach().clone() for q in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_hutchinson_on_sdpa_llama_says_how_to_fix_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    from soulkit.optim import differentiable_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 32, (2, 6))
    opt = Sophia(model.parameters())
    loss = model(ids, labels=ids).loss
    try:
        opt.accumulate_hutchinson(loss)
    except RuntimeError as exc:  # CPU SDPA picks a kernel without double backward
        assert "differentiable_attention" in str(exc)
    with differentiable_attention(model):
        loss = model(ids, labels=ids).loss
    opt.accumulate_hutchinson(loss)
    loss.backward()
    opt.step()
    assert opt.num_hessian_updates == 1
    assert all(torch.isfinite(opt.state[q]["hessian"]).all() for q in model.parameters() if q in opt.state)


def test_hessian_bias_correction_divides_h_by_one_minus_beta2_power():
    """With hessian_bias_correction the clip uses h / (1 - beta2**n) after n refreshes; by hand, float64."""
    torch.manual_seed(0)
    p0 = torch.randn(7, dtype=torch.float64)
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(3)]
    hhat = [torch.rand(7, dtype=torch.float64) * 50 for _ in range(3)]
    lr, (b1, b2), rho = 0.01, (0.9, 0.99), 0.04
    finals = {}
    for corrected in (False, True):
        p = p0.clone().requires_grad_(True)
        opt = Sophia([p], lr=lr, betas=(b1, b2), rho=rho, weight_decay=0.0, hessian_update_interval=1,
                     hessian_bias_correction=corrected)
        ref, m, h = p0.clone(), torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
        for n, (g, e) in enumerate(zip(grads, hhat, strict=True), 1):
            p.grad = g.clone()
            opt.update_hessian([e])
            opt.step()
            m = b1 * m + (1 - b1) * g
            h = b2 * h + (1 - b2) * e
            h_used = h / (1 - b2 ** n) if corrected else h
            ref = ref - lr * torch.sign(m) * torch.clamp(m.abs() / torch.clamp(rho * h_used, min=1e-15), max=1.0)
            torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)
        finals[corrected] = p.detach().clone()
    assert not torch.allclose(finals[False], finals[True])  # the correction changes which coordinates clip
