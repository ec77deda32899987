"""CurvatureOperator (soulkit.influence.hessian) against dense float64 references: products by both
engines, the explicit matrix, diagonals (and the exact one's budget), the top and (Lanczos) smallest
eigenvalues; the loop fallback; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from soulkit.influence import OutputLoss
from soulkit.influence.gradients import flatten_tensors, unflatten_tensor
from soulkit.optim import gnvp, hvp

from ._problems import CE, DT, classification_problem, make_op, mlp_problem


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def dense_reference(model, x, y, l2, curvature):
    """``H + l2 I`` of the mean cross-entropy by torch.autograd.functional (Hessian or J^T Lambda J / n)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = flatten_tensors(params)
    p = flat.numel()
    if curvature == "hessian":

        def f(t):
            return F.cross_entropy(torch.func.functional_call(model, unflatten_tensor(t, params), (x,)), y)

        H = torch.autograd.functional.hessian(f, flat)
    else:

        def out(t):
            return torch.func.functional_call(model, unflatten_tensor(t, params), (x,))

        J = torch.autograd.functional.jacobian(out, flat)  # [n, k, p]
        P = torch.softmax(out(flat), -1)
        lam = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
        H = torch.einsum("nkp,nkl,nlq->pq", J, lam, J) / x.shape[0]
    return H + l2 * torch.eye(p, dtype=DT)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_operator_dense_matches_reference(curvature):
    model, ds, x, y = mlp_problem()
    op = make_op(model, CE, ds, l2=0.03, damping=0.02, curvature=curvature)
    ref = dense_reference(model, x, y, 0.03, curvature) + 0.02 * torch.eye(op.dim, dtype=DT)
    torch.testing.assert_close(op.dense(progress=False), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_batched_engine_equals_loop_engine_equals_soulkit_optim(curvature):
    model, ds, x, y = mlp_problem()
    V = torch.randn(5, 51, generator=torch.Generator().manual_seed(3), dtype=DT)
    batched = make_op(model, CE, ds, curvature=curvature, engine="batched").matmat(V)
    loop = make_op(model, CE, ds, curvature=curvature, engine="loop").matmat(V)
    torch.testing.assert_close(batched, loop, rtol=1e-11, atol=1e-13)
    params = {k: v.detach() for k, v in model.named_parameters()}
    v0 = unflatten_tensor(V[0], params)
    if curvature == "hessian":
        ref = hvp(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y), params, v0)
    else:
        ref = gnvp(
            lambda p: torch.func.functional_call(model, p, (x,)), lambda z: F.cross_entropy(z, y), params, v0
        )
    torch.testing.assert_close(batched[0], flatten_tensors(ref), rtol=1e-11, atol=1e-13)


def test_products_of_the_shifted_and_data_parts():
    model, ds, x, y = mlp_problem(n=24)
    op = make_op(model, CE, ds, l2=0.3, damping=0.1, batch_size=7)  # batches of 7, 7, 7, 3: weighted by size
    assert op.n == 24 and op.dim == 51 and op.shift == pytest.approx(0.4) and op.dtype == DT
    data = dense_reference(model, x, y, 0.0, "hessian")
    V = torch.randn(3, 51, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(op.matmat(V), V @ data + 0.4 * V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(V, data_only=True), V @ data, rtol=1e-10, atol=1e-12)
    one = op.matvec(V[0])
    assert one.shape == (51,)
    torch.testing.assert_close(one, data @ V[0] + 0.4 * V[0], rtol=1e-10, atol=1e-12)
    assert op.matvecs == 3 + 3 + 1  # vectors pushed through the data, counted for the solvers' cost
    # float32 vectors are taken in the operator's dtype
    assert op.matmat(V.float()).dtype == DT


def test_batch_matmat_is_one_batch_plus_the_shift():
    model, ds, x, y = mlp_problem(n=12)
    op = make_op(model, CE, ds, l2=0.2, batch_size=12)  # one batch: the whole set
    batch, b = next(iter(op.source))
    assert b == 12
    V = torch.randn(2, 51, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = V @ dense_reference(model, x, y, 0.2, "hessian")
    torch.testing.assert_close(op.batch_matmat(batch, V), ref, rtol=1e-10, atol=1e-12)


def test_hessian_diagonal_methods_match_exact():
    p = classification_problem(n=40, d=3, k=3)
    op = make_op(p["model"], p["loss"], p["train"], l2=0.05)
    exact = torch.diagonal(op.dense(progress=False)) - 0.05
    torch.testing.assert_close(op.diagonal("exact"), exact, rtol=1e-10, atol=1e-12)
    hut = op.diagonal("hutchinson", n_samples=500, generator=torch.Generator().manual_seed(0))
    assert _rel(hut, exact) < 0.15


def test_gauss_newton_diagonal_methods_match_exact():
    model, ds, x, y = mlp_problem()
    op = make_op(model, CE, ds, l2=0.05, curvature="gauss_newton")
    exact = torch.diagonal(dense_reference(model, x, y, 0.0, "gauss_newton"))
    torch.testing.assert_close(op.diagonal("exact"), exact, rtol=1e-10, atol=1e-12)
    hut = op.diagonal("hutchinson", n_samples=400, generator=torch.Generator().manual_seed(0))
    assert _rel(hut, exact) < 0.2
    # GNB samples labels from softmax(outputs): an unbiased estimate of the same Gauss-Newton diagonal
    gnb = op.diagonal("gnb", n_samples=400, generator=torch.Generator().manual_seed(0))
    assert _rel(gnb, exact) < 0.2
    assert bool((gnb >= 0).all())


def test_top_eigenvalue_is_the_largest_of_the_dense_matrix():
    model, ds, *_ = mlp_problem()
    op = make_op(model, CE, ds, l2=0.05, curvature="gauss_newton")
    evals = torch.linalg.eigvalsh(op.dense(progress=False))
    assert op.top_eigenvalue(iters=500, tol=1e-10) == pytest.approx(float(evals[-1]), rel=1e-4)


def _indefinite_mlp(n=40):
    """The 51-parameter MLP with its weights scaled by 3, untrained: an indefinite cross-entropy Hessian."""
    model, ds, x, y = mlp_problem(n=n)
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(3.0)
    return model, ds


def test_smallest_eigenvalue_by_lanczos_approaches_from_above():
    model, ds = _indefinite_mlp()
    op = make_op(model, CE, ds, damping=0.01)
    evals = torch.linalg.eigvalsh(op.dense(progress=False))
    assert float(evals[0]) < -0.1  # indefinite
    theta, resid, used = op.smallest_eigenvalue(iters=60)  # the Krylov space spans all 51 dimensions
    assert used == 51 and theta == pytest.approx(float(evals[0]), abs=1e-9) and resid < 1e-6
    start = torch.randn(51, generator=torch.Generator().manual_seed(5), dtype=DT)
    rayleigh = float(start @ op.matvec(start) / (start @ start))
    for iters in (1, 3, 10):
        theta, resid, used = op.smallest_eigenvalue(iters=iters, start=start)
        assert used == iters and float(evals[0]) - 1e-12 <= theta <= rayleigh + 1e-12 and resid >= 0
    assert op.smallest_eigenvalue(iters=1, start=start)[0] == pytest.approx(rayleigh, rel=1e-12)


def test_exact_diagonal_is_refused_above_its_budget_of_backward_passes():
    model, ds, *_ = mlp_problem(n=40)
    op = make_op(model, CE, ds, batch_size=16)  # 3 batches
    assert op.exact_diagonal_cost() == (153, "51 parameters x 3 batches")
    with pytest.raises(ValueError) as err:
        op.diagonal("exact", max_backward=152)
    msg = str(err.value)
    for part in ("needs 153 backward passes (51 parameters x 3 batches)", "max_backward=152",
                 "method='hutchinson' (100 Hessian-vector products per batch, 300 in all)", "method='gnb'",
                 "DiagonalSolver(max_backward=153)"):
        assert part in msg, (part, msg)
    full = op.diagonal("exact", max_backward=153)
    torch.testing.assert_close(op.diagonal("exact", max_backward=None), full, rtol=0, atol=0)
    op.diagonal("hutchinson", n_samples=2, max_backward=1)  # the stochastic methods have no such cost
    gn = make_op(model, CE, ds, curvature="gauss_newton", batch_size=16)
    assert gn.exact_diagonal_cost() == (120, "3 outputs x 40 examples, one Jacobian row each")
    with pytest.raises(ValueError, match=r"exact gauss_newton diagonal needs 120 backward passes .* Gauss-Newton-vector"):
        gn.diagonal("exact", max_backward=100)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_backward must be an integer >= 1 or None"):
            op.diagonal("exact", max_backward=bad)


def test_auto_engine_falls_back_to_the_loop_with_a_warning(monkeypatch):
    model, ds, *_ = mlp_problem(n=16)
    V = torch.randn(3, 51, generator=torch.Generator().manual_seed(4), dtype=DT)
    ref = make_op(model, CE, ds, engine="loop").matmat(V)
    op = make_op(model, CE, ds, engine="auto")

    def no_batching_rule(batch, V):
        raise RuntimeError("vmap: no batching rule for aten::something\nmore detail")

    monkeypatch.setattr(op, "_batched", no_batching_rule)
    with pytest.warns(UserWarning, match=r"batched curvature engine failed \(vmap: no batching rule for aten::something\)"):
        got = op.matmat(V)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    forced = make_op(model, CE, ds, engine="batched")
    monkeypatch.setattr(forced, "_batched", no_batching_rule)
    with pytest.raises(RuntimeError, match="no batching rule"):  # engine="batched" never falls back
        forced.matmat(V)


def test_non_finite_curvature_is_an_error():
    """loss = x.w + |w|^1.5 at w = 0: finite value and gradient, infinite/NaN second derivative."""
    model = nn.Linear(2, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()

    def loss(m, b):
        return m(b[0]).squeeze(-1) + m.weight.abs().pow(1.5).sum()

    op = make_op(model, loss, TensorDataset(torch.randn(8, 2, dtype=DT)), l2=0.1)
    with pytest.raises(FloatingPointError, match="NaN/Inf in the curvature: hessian-vector product on train batch 0"):
        op.matvec(torch.ones(2, dtype=DT))


def test_bad_input():
    model, ds, *_ = mlp_problem(n=8)
    op = make_op(model, CE, ds)
    with pytest.raises(ValueError, match=r"V must have shape \[m, 51\] or \[51\], got \(2, 50\)"):
        op.matmat(torch.zeros(2, 50, dtype=DT))
    with pytest.raises(ValueError, match="V must have shape"):
        op.matmat(torch.zeros(2, 3, 17, dtype=DT))
    with pytest.raises(ValueError, match="curvature must be one of"):
        make_op(model, CE, ds, curvature="fisher")
    with pytest.raises(ValueError, match="engine must be one of"):
        make_op(model, CE, ds, engine="fast")
    with pytest.raises(ValueError, match="diagonal method must be one of"):
        op.diagonal("lanczos")
    with pytest.raises(ValueError, match="above max_dim=10"):
        op.dense(max_dim=10)

    def plain(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    with pytest.raises(TypeError, match="curvature='gauss_newton' needs loss_fn to be an OutputLoss"):
        make_op(model, plain, ds, curvature="gauss_newton")
    with pytest.raises(TypeError, match="'gnb' diagonal needs loss_fn to be an OutputLoss"):
        make_op(model, plain, ds).diagonal("gnb")
    scalar = OutputLoss(lambda m, b: m(b[0])[:, 0], lambda z, b: (z - 1.0) ** 2)
    with pytest.raises(ValueError, match=r"needs outputs \[B, \.\.\., classes>=2\]"):
        make_op(model, scalar, ds).diagonal("gnb")
