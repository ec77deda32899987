"""Per-example gradients: vmap equals a Python loop (chunked, float32/float64, dict batches, subsets),
flat layout helpers, OutputLoss Jacobians/derivatives (the softmax cross-entropy output Hessian in closed
form), and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from soulkit.influence import OutputLoss, iter_per_example_grads, per_example_grads
from soulkit.influence.gradients import BoundLoss, ParamSpace, flatten_tensors, unflatten_tensor


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def data(n=11, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loop_grads(model, x, y, names=None):
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(
            torch.cat(
                [p.grad.reshape(-1) for k, p in model.named_parameters() if names is None or k in names]
            )
        )
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_vmap_equals_python_loop(dtype, chunk_size):
    model = mlp(dtype)
    x, y = data(dtype=dtype)
    got = per_example_grads(model, ce, (x, y), chunk_size=chunk_size)
    ref = loop_grads(copy.deepcopy(model), x, y)
    assert got.shape == (11, sum(p.numel() for p in model.parameters()))
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_memory_budget_chunks_give_same_result():
    model = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    tiny = per_example_grads(model, ce, (x, y), max_memory_mb=1e-4)  # one example per chunk
    big = per_example_grads(model, ce, (x, y), max_memory_mb=1024)
    torch.testing.assert_close(tiny, big, rtol=0, atol=1e-15)


def test_float64_from_float32_model_and_dict_batches():
    model = mlp(torch.float32)
    x, y = data()
    got = per_example_grads(
        model,
        lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"),
        {"x": x, "y": y},
        dtype=torch.float64,
    )
    assert got.dtype == torch.float64
    ref = loop_grads(copy.deepcopy(model).double(), x.double(), y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    assert next(model.parameters()).dtype == torch.float32  # model untouched


def test_parameter_subset_in_model_order():
    model = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    names = ["2.bias", "0.weight"]  # given out of order: flattened in model order
    got = per_example_grads(model, ce, (x, y), params=names)
    ref = loop_grads(copy.deepcopy(model), x, y, names=set(names))
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    space = ParamSpace.from_model(model, names)
    assert space.names == ("0.weight", "2.bias") and space.dim == 35 + 3


def test_iter_over_dataset_and_loader_matches_one_batch():
    model = mlp(torch.float64)
    x, y = data(n=13, dtype=torch.float64)
    whole = per_example_grads(model, ce, (x, y))
    ds = TensorDataset(x, y)
    a = torch.cat(list(iter_per_example_grads(model, ce, ds, batch_size=4, progress=False)))
    b = torch.cat(list(iter_per_example_grads(model, ce, DataLoader(ds, batch_size=5), progress=False)))
    torch.testing.assert_close(a, whole, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(b, whole, rtol=1e-13, atol=1e-14)


def test_flatten_roundtrip():
    d = {"a": torch.randn(2, 3), "b": torch.randn(4), "c": torch.randn(1, 1, 2)}
    flat = flatten_tensors(d)
    assert flat.shape == (12,)
    back = unflatten_tensor(flat, d)
    for k in d:
        torch.testing.assert_close(back[k], d[k])
    batched = flatten_tensors({k: torch.stack([v, 2 * v]) for k, v in d.items()}, batch_dims=1)
    assert batched.shape == (2, 12)
    torch.testing.assert_close(unflatten_tensor(batched, d)["a"][1], 2 * d["a"])
    with pytest.raises(ValueError, match="last dimension"):
        unflatten_tensor(torch.zeros(5), d)
    with pytest.raises(ValueError, match="tensors is empty"):
        flatten_tensors({})


def test_output_loss_jacobians_and_output_derivatives():
    model = mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    loss = OutputLoss(lambda m, b: m(b[0]), lambda z, b: F.cross_entropy(z, b[1], reduction="none"))
    bound = BoundLoss(model, loss)
    J = bound.jacobians((x, y), 11, 3, chunk_size=3, max_memory_mb=1.0)
    r, lam = bound.output_derivatives((x, y), 11, check=True)
    g = per_example_grads(model, loss, (x, y))
    torch.testing.assert_close(torch.einsum("bkp,bk->bp", J, r), g, rtol=1e-12, atol=1e-13)
    p = torch.softmax(model(x), -1).detach()
    torch.testing.assert_close(
        lam, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], rtol=1e-12, atol=1e-13
    )

    # Jacobian rows against autograd on one example
    def out0(w):
        return torch.func.functional_call(model, {**dict(model.named_parameters()), "2.bias": w}, (x[:1],))[0]

    jb = torch.autograd.functional.jacobian(out0, model[2].bias.detach())
    torch.testing.assert_close(J[0, :, -3:], jb, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- bad input


def test_non_per_example_loss_is_rejected():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\] = \[11\], got shape \(\)"):
        per_example_grads(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    with pytest.raises(ValueError, match=r"got shape \(11, 1\)"):
        per_example_grads(model, lambda m, b: ce(m, b)[:, None], (x, y))

    def mixes(m, b):  # right shape, but each loss depends on the whole batch
        losses = ce(m, b)
        return losses - losses.mean()

    with pytest.raises(ValueError, match="not per-example"):
        per_example_grads(model, mixes, (x, y))


def test_unused_parameter_is_named():
    class WithExtra(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.extra = nn.Linear(2, 2)  # never used by the loss

        def forward(self, x):
            return self.net(x)

    model = WithExtra()
    x, y = data()
    with pytest.raises(ValueError, match=r"does not depend on parameters \['extra.weight', 'extra.bias'\]"):
        per_example_grads(model, ce, (x, y))
    # excluding them works
    names = [k for k, _ in model.named_parameters() if not k.startswith("extra")]
    assert per_example_grads(model, ce, (x, y), params=names).shape == (11, 66)


def test_dropout_in_training_mode_gets_a_clear_error_and_eval_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3))
    x, y = data()
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        per_example_grads(model, ce, (x, y))
    model.eval()
    assert per_example_grads(model, ce, (x, y)).shape == (11, 66)


def test_bad_arguments():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="batch is empty"):
        per_example_grads(model, ce, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="different leading sizes"):
        per_example_grads(model, ce, (x, y[:5]))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_example_grads(lambda z: z, ce, (x, y))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        per_example_grads(model, "ce", (x, y))
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_example_grads(model, ce, (x, y), params=["nope"])
    with pytest.raises(TypeError, match="dtype must be"):
        per_example_grads(model, ce, (x, y), dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_grads(model, ce, (x, y), chunk_size=0)
    with pytest.raises(ValueError, match="max_memory_mb"):
        per_example_grads(model, ce, (x, y), max_memory_mb=-1)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        per_example_grads(model, ce, (x.clone().fill_(float("nan")), y))

    class Empty(Dataset):
        def __len__(self):
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    with pytest.raises(ValueError, match="data is empty"):
        list(iter_per_example_grads(model, ce, Empty(), progress=False))
    with pytest.raises(ValueError, match="shuffles"):
        list(iter_per_example_grads(model, ce, DataLoader(TensorDataset(x, y), shuffle=True), progress=False))
    with pytest.raises(TypeError, match="Dataset or DataLoader"):
        list(iter_per_example_grads(model, ce, [(x, y)], progress=False))


def test_model_is_not_modified():
    model = mlp()
    model.train()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    x, y = data()
    per_example_grads(model, ce, (x, y), dtype=torch.float64)
    list(iter_per_example_grads(model, ce, TensorDataset(x, y), batch_size=3, progress=False))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_projected_gradients_preserve_inner_products():
    from soulkit.influence import projected_per_example_grads
    from soulkit.kernels.projection import rademacher_matrix

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = TensorDataset(torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,)))
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    full = per_example_grads(model, loss, (data.tensors[0], data.tensors[1]))
    k = 2048
    proj = projected_per_example_grads(model, loss, data, k, seed=3, batch_size=5)
    assert proj.shape == (12, k)
    # exactly the full gradients times the seeded matrix, never stored by the projection
    torch.testing.assert_close(proj, full @ rademacher_matrix(full.shape[1], k, 3, dtype=torch.float64))
    gram, approx = full @ full.T, proj @ proj.T
    norms = full.norm(dim=1)
    assert ((approx - gram).abs() <= 5 * (2 / k) ** 0.5 * norms[:, None] * norms[None, :]).all()
    with pytest.raises(ValueError, match="k must"):
        projected_per_example_grads(model, loss, data, 0)


# --------------------------------------------------------------------------- closed-form output Hessian


class _TokenLogits(nn.Module):
    """[B, T, d] features -> [B, T, C] logits (a stand-in for an LM head)."""

    def __init__(self, d=4, c=7, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(d, c).to(dtype)
        with torch.no_grad():
            self.head.weight.mul_(3.0)  # spread the softmax: some confident, some flat positions


def _token_batch(b=3, t=5, d=4, c=7, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b, t), generator=g)
    y[0, :2] = -100  # a masked prompt
    w = torch.rand(b, generator=g, dtype=dtype) + 0.5
    return x, y, w


def _token_ce(z, y):
    return F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-100)  # [B, T]


def _per_dimension(bound, batch, b, monkeypatch):
    """The per-output-dimension route (what every loss got before the closed form)."""
    import soulkit.influence.gradients as gradients

    with monkeypatch.context() as m:
        m.setattr(gradients, "softmax_output_hessian", lambda *a: None)
        return bound.output_derivatives(batch, b)


_TOKEN_LOSSES = {
    "sum": lambda z, bt: _token_ce(z, bt[1]).sum(1),
    "mean_over_unmasked": lambda z, bt: _token_ce(z, bt[1]).sum(1) / (bt[1] >= 0).sum(1),
    "weighted": lambda z, bt: bt[2] * _token_ce(z, bt[1]).mean(1),
}


@pytest.mark.parametrize("reduce", list(_TOKEN_LOSSES))
def test_cross_entropy_output_hessian_is_the_closed_form_of_the_per_dimension_one(reduce, monkeypatch):
    model = _TokenLogits()
    x, y, w = _token_batch()
    loss = OutputLoss(lambda m, bt: m.head(bt[0]), _TOKEN_LOSSES[reduce])
    bound = BoundLoss(model, loss)
    r, lam = bound.output_derivatives((x, y, w), 3, check=True)
    r_ref, lam_ref = _per_dimension(bound, (x, y, w), 3, monkeypatch)
    assert lam.shape == (3, 35, 35)
    torch.testing.assert_close(r, r_ref, rtol=0, atol=0)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-12, atol=1e-13)
    # block diagonal over positions, each block w (diag(p) - p p^T); masked positions are 0
    blocks = lam.reshape(3, 5, 7, 5, 7)
    assert blocks[0, 0].abs().max() == 0 and blocks[1, 0, :, 1].abs().max() == 0


def test_cross_entropy_on_class_vectors_and_float32():
    model = mlp(torch.float32)
    x, y = data(dtype=torch.float32)
    loss = OutputLoss(lambda m, b: m(b[0]), lambda z, b: F.cross_entropy(z, b[1], reduction="none"))
    bound = BoundLoss(model, loss)
    r, lam = bound.output_derivatives((x, y), 11)
    p = torch.softmax(model(x), -1).detach()
    torch.testing.assert_close(lam, torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    torch.testing.assert_close(r, p - F.one_hot(y, 3).float())


def _count_backward(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def test_closed_form_takes_two_backward_passes_not_one_per_dimension(monkeypatch):
    model = _TokenLogits(c=11)
    x, y, w = _token_batch(t=9, c=11)
    bound = BoundLoss(model, OutputLoss(lambda m, bt: m.head(bt[0]), _TOKEN_LOSSES["sum"]))
    calls = _count_backward(monkeypatch)
    bound.output_derivatives((x, y, w), 3)
    assert len(calls) == 2  # the gradient, and one probe that checks the closed form (k = 99 outputs)
    calls.clear()
    mse = OutputLoss(lambda m, bt: m.head(bt[0]), lambda z, bt: 0.5 * (z**2).sum((1, 2)))
    BoundLoss(model, mse).output_derivatives((x, y, w), 3)
    assert len(calls) == 1 + 99  # not a cross-entropy: one backward per output dimension, as before


@pytest.mark.parametrize("kind", ["mse", "label_smoothing", "soft_targets", "temperature", "ce_plus_quadratic"])
def test_losses_that_are_not_a_plain_cross_entropy_keep_the_exact_per_dimension_hessian(kind, monkeypatch):
    model = _TokenLogits()
    x, y, w = _token_batch()
    y = y.clamp_min(0)
    with torch.no_grad():
        z0 = model.head(x)
    q = torch.softmax(torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), -1)
    fns = {
        "mse": lambda z, bt: 0.5 * ((z - 1.0) ** 2).sum((1, 2)),
        "label_smoothing": lambda z, bt: F.cross_entropy(
            z.transpose(1, 2), bt[1], reduction="none", label_smoothing=0.1).sum(1),
        "soft_targets": lambda z, bt: -(q * torch.log_softmax(z, -1)).sum((1, 2)),
        "temperature": lambda z, bt: _token_ce(z / 2.0, bt[1]).sum(1),
        # the gradient at z0 is exactly the cross-entropy's; the Hessian is not (+ I): only the probe sees it
        "ce_plus_quadratic": lambda z, bt: _token_ce(z, bt[1]).sum(1) + 0.5 * ((z - z0) ** 2).sum((1, 2)),
    }
    bound = BoundLoss(model, OutputLoss(lambda m, bt: m.head(bt[0]), fns[kind]))
    r, lam = bound.output_derivatives((x, y, w), 3)
    _, lam_ref = _per_dimension(bound, (x, y, w), 3, monkeypatch)
    torch.testing.assert_close(lam, lam_ref, rtol=0, atol=0)
    # and that is the true output Hessian of each example's loss
    z = z0[1].detach()
    h = torch.autograd.functional.hessian(lambda zz: fns[kind](zz.reshape(1, 5, 7).expand(3, 5, 7), (x, y, w))[1],
                                          z.reshape(-1))
    torch.testing.assert_close(lam[1], h, rtol=1e-10, atol=1e-12)


# ---- categorical_fit on a model sure of its answers (float32 cancellation in p_y - 1) ----------------


def _confident_logits(margin, c=50, dtype=torch.float32):
    """[3, 6, c] logits whose label beats every other class by ``margin`` (+ noise), labels with a mask."""
    g = torch.Generator().manual_seed(int(margin))
    z = 2.0 * torch.randn(3, 6, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (3, 6), generator=g)
    z.scatter_add_(-1, y[..., None], torch.full((3, 6, 1), float(margin), dtype=torch.float64))
    z = z + 10.0  # an offset: real LM logits are not centred
    y[0, :2] = -100
    y[2, 4:] = -100
    return z.to(dtype), y


def _ce_grad(z, y, reduction, **kw):
    z = z.detach().requires_grad_(True)
    ce = F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-100, **kw)  # [3, 6]
    loss = ce.sum(1) if reduction == "sum" else ce.sum(1) / (y != -100).sum(1)
    (r,) = torch.autograd.grad(loss.sum(), z)
    c = z.shape[-1]
    return r.reshape(-1, c), torch.softmax(z.detach(), -1).reshape(-1, c)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("margin", [15, 20, 25, 30])
def test_categorical_fit_accepts_a_float32_cross_entropy_the_model_is_sure_of(margin, reduction):
    # p_y is 1 to within float32 eps: r_y = w (p_y - 1) is pure rounding (~C eps w) while the row's size is
    # ~2 w C exp(-margin); the old relative-only test rejected this at margins 15-25 (C = 50)
    from soulkit.influence.gradients import categorical_fit

    z, y = _confident_logits(margin)
    w, ok = categorical_fit(*_ce_grad(z, y, reduction))
    assert ok
    w64, ok64 = categorical_fit(*_ce_grad(z.double(), y, reduction))
    assert ok64
    torch.testing.assert_close(w.double(), w64, rtol=1e-5, atol=0)  # float32 weights to 1e-5 relative
    n = (y != -100).sum(1, keepdim=True).double()
    want = (y != -100).double() * (1.0 if reduction == "sum" else 1.0 / n)
    torch.testing.assert_close(w64.reshape(3, 6), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("margin", [15, 20, 25, 30])
@pytest.mark.parametrize("smoothing", [0.1, 0.01])
def test_categorical_fit_still_rejects_label_smoothing_at_confident_logits(smoothing, margin):
    from soulkit.influence.factored import _categorical_weights
    from soulkit.influence.gradients import categorical_fit

    z, y = _confident_logits(margin)
    for dtype in (torch.float32, torch.float64):
        r, p = _ce_grad(z.to(dtype), y, "mean", label_smoothing=smoothing)
        assert not categorical_fit(r, p)[1]
        with pytest.raises(ValueError, match="label smoothing"):
            _categorical_weights(r, p)


@pytest.mark.parametrize("margin", [15, 25])
def test_categorical_fit_still_rejects_soft_targets_and_temperatures_at_confident_logits(margin):
    from soulkit.influence.gradients import categorical_fit

    z, y = _confident_logits(margin)
    q = torch.softmax(torch.randn(z.shape, generator=torch.Generator().manual_seed(5)), -1)
    losses = {
        "temperature": lambda zz: F.cross_entropy(zz.transpose(1, 2) / 2.0, y, ignore_index=-100, reduction="sum"),
        "soft_targets": lambda zz: -(q * torch.log_softmax(zz, -1)).sum(),
        "soft_targets_near_one_hot": lambda zz: -((0.999 * F.one_hot(y.clamp_min(0), zz.shape[-1]) + 0.001 * q)
                                                   * torch.log_softmax(zz, -1)).sum(),
    }
    for name, fn in losses.items():
        zz = z.detach().requires_grad_(True)
        (r,) = torch.autograd.grad(fn(zz), zz)
        assert not categorical_fit(r.reshape(-1, 50), torch.softmax(z, -1).reshape(-1, 50))[1], name


def test_categorical_fit_rows_at_rounding_level_are_harmless():
    # margins of 120 (float32): every off-label probability underflows, the gradient row is all zeros --
    # w is unidentifiable, and 0 is harmless (the position's Fisher block is 0 in float32 too)
    from soulkit.influence.gradients import categorical_fit

    z, y = _confident_logits(120, c=7)
    r, p = _ce_grad(z, y, "sum")
    w, ok = categorical_fit(r, p)
    assert ok and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert bool((w[r.abs().sum(-1) == 0] == 0).all())
