"""Every solver against the exact inverse; LiSSA's auto scale; convergence failures, indefinite and NaN
curvature and the damping advice it gets (a valid bound, or said to be a lower bound), the exact
diagonal's budget, and bad options. (The curvature operator itself: test_hessian.py.)"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from soulkit.influence import (
    ArnoldiSolver,
    CGSolver,
    ConvergenceError,
    ConvergenceWarning,
    DiagonalSolver,
    ExactSolver,
    IdentitySolver,
    LissaSolver,
    OutputLoss,
)
from soulkit.influence.solvers import make_solver

from ._problems import CE, DT, make_op, mlp_problem, ridge_problem

# --------------------------------------------------------------------------- solvers vs exact


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gn_problem():
    model, ds, *_ = mlp_problem()
    op = make_op(model, CE, ds, l2=0.05, damping=0.05, curvature="gauss_newton", batch_size=64)
    exact = ExactSolver().fit(op)
    V = torch.randn(4, op.dim, generator=torch.Generator().manual_seed(7), dtype=DT)
    return op, exact, V, exact.solve(V)


@pytest.mark.parametrize(
    "solver, bound",
    [
        (CGSolver(tol=1e-10), 1e-8),
        (LissaSolver(tol=1e-8), 1e-5),
        (ArnoldiSolver(rank=51, n_iter=51), 1e-8),
    ],
    ids=["cg", "lissa", "arnoldi-full-rank"],
)
def test_iterative_solvers_agree_with_exact(gn_problem, solver, bound):
    op, exact, V, ref = gn_problem
    got = solver.fit(op).solve(V)
    assert _rel(got, ref) < bound, solver.info
    one = solver.solve(V[1])  # a single vector
    assert one.shape == (op.dim,) and _rel(one, ref[1]) < bound


def test_exact_solver_inverts(gn_problem):
    op, exact, V, X = gn_problem
    torch.testing.assert_close(op.matmat(X), V, rtol=1e-9, atol=1e-10)
    assert exact.info["eigenvalue_min"] > 0.05


def test_low_rank_arnoldi_is_the_top_eigenspace_inverse(gn_problem):
    op, exact, V, _ = gn_problem
    A = exact.matrix
    evals, evecs = torch.linalg.eigh(A)
    top = evecs[:, -10:]
    ref = ((V @ top) / evals[-10:]) @ top.T
    arn = ArnoldiSolver(rank=10, n_iter=51).fit(op)
    assert _rel(arn.solve(V), ref) < 1e-8
    torch.testing.assert_close(
        torch.tensor(sorted(arn.info["eigenvalues"]), dtype=DT), evals[-10:], rtol=1e-9, atol=1e-12
    )
    # a smaller Krylov space gives an approximation of the same subspace, with its Ritz residual reported
    arn30 = ArnoldiSolver(rank=10, n_iter=30).fit(op)
    assert arn30.info["ritz_residual"] > 0 and _rel(arn30.solve(V), ref) < 0.3


def test_diagonal_and_identity_solvers(gn_problem):
    op, exact, V, _ = gn_problem
    d = torch.diagonal(exact.matrix)
    got = DiagonalSolver(method="exact").fit(op).solve(V)
    torch.testing.assert_close(got, V / d, rtol=1e-10, atol=1e-12)
    assert torch.equal(IdentitySolver().fit(op).solve(V), V)
    gnb = DiagonalSolver(method="gnb", n_samples=200).fit(op).solve(V)
    hut = DiagonalSolver(method="hutchinson", n_samples=200).fit(op).solve(V)
    assert _rel(gnb, V / d) < 0.1
    assert _rel(hut, V / d) < 0.25


def test_lissa_auto_scale_converges_where_scale_10_diverges():
    # a feature scaled by 8: lambda_max(H) ~ 70, so Koh & Liang's scale=10 (< lambda_max / 2) diverges
    p = ridge_problem(n=60, d=3, l2=1.0, feature_scale=[8.0, 1.0, 1.0])
    loss = OutputLoss(lambda m, b: m(b[0]).squeeze(-1), lambda z, b: 0.5 * (z - b[1]) ** 2)
    op = make_op(p["model"], loss, p["train"], l2=1.0, batch_size=64)
    lam_max = float(torch.linalg.eigvalsh(p["A"])[-1])
    assert lam_max > 20
    V = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    with pytest.raises(ConvergenceError, match="diverged") as err:
        LissaSolver(scale=10.0, depth=2000).fit(op).solve(V)
    assert err.value.solver == "lissa" and err.value.iterations < 2000
    auto = LissaSolver(tol=1e-10, depth=20_000).fit(op)
    assert abs(auto.info["lambda_max_estimate"] - lam_max) / lam_max < 0.01
    assert _rel(auto.solve(V), torch.linalg.solve(p["A"], V.T).T) < 1e-8
    assert auto.info["converged"] and auto.info["relative_residual"] <= 1e-10


def test_stochastic_lissa_is_close():
    p = ridge_problem(n=64, d=3, l2=0.5)
    loss = OutputLoss(lambda m, b: m(b[0]).squeeze(-1), lambda z, b: 0.5 * (z - b[1]) ** 2)
    V = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    ref = torch.linalg.solve(p["A"], V.T).T
    # one batch = the full curvature: the stochastic recursion is the deterministic one
    full = make_op(p["model"], loss, p["train"], l2=0.5, batch_size=64)
    assert _rel(LissaSolver(batches="stochastic", depth=300).fit(full).solve(V), ref) < 1e-10
    # mini-batches of 16: Koh & Liang's noisy estimate, averaged over repeats
    op = make_op(p["model"], loss, p["train"], l2=0.5, batch_size=16)
    solver = LissaSolver(batches="stochastic", depth=200, repeat=8).fit(op)
    got = solver.solve(V)
    assert _rel(got, ref) < 0.35 and solver.info["relative_residual"] < 0.5


# --------------------------------------------------------------------------- failures


def test_cg_non_convergence_raises_or_warns_with_residual(gn_problem):
    op, _, V, _ = gn_problem
    with pytest.raises(
        ConvergenceError, match=r"CG did not converge in 2 iterations: relative residual"
    ) as err:
        CGSolver(max_iter=2).fit(op).solve(V)
    assert err.value.residual > 1e-8 and err.value.iterations == 2
    solver = CGSolver(max_iter=2, on_fail="warn").fit(op)
    with pytest.warns(ConvergenceWarning, match="relative residual"):
        X = solver.solve(V)
    assert (
        torch.isfinite(X).all() and not solver.info["converged"] and solver.info["relative_residual"] > 1e-8
    )


def test_lissa_non_convergence_raises():
    p = ridge_problem(n=40, d=3, l2=0.01)
    loss = OutputLoss(lambda m, b: m(b[0]).squeeze(-1), lambda z, b: 0.5 * (z - b[1]) ** 2)
    op = make_op(p["model"], loss, p["train"], l2=0.01)
    with pytest.raises(ConvergenceError, match="LiSSA did not converge in depth=5"):
        LissaSolver(depth=5).fit(op).solve(torch.ones(4, dtype=DT))


def concave_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).to(DT)
    x = torch.randn(20, 3, dtype=DT)

    def loss(m, b):
        return -(m(b[0]).squeeze(-1) ** 2)  # negative definite Hessian

    return model, loss, TensorDataset(x)


@pytest.mark.parametrize("solver", ["exact", "cg", "arnoldi", "diagonal"])
def test_indefinite_curvature_is_refused(solver):
    model, loss, ds = concave_problem()
    op = make_op(model, loss, ds)
    with pytest.raises(ValueError, match="not positive definite|non-positive"):
        make_solver(solver).fit(op).solve(torch.ones(3, dtype=DT))


def _indefinite_mlp():
    """The 51-parameter MLP, weights scaled by 3 and untrained: cross-entropy Hessian with lambda_min ~ -0.42."""
    model, ds, *_ = mlp_problem(n=40)
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(3.0)
    return model, ds


def _advice(msg, pattern):
    found = re.search(pattern, msg)
    assert found, msg
    return float(found.group(1))


def test_cg_damping_advice_is_a_lower_bound_that_says_so_and_its_suggestion_is_accepted():
    model, ds = _indefinite_mlp()
    lam_min = float(torch.linalg.eigvalsh(make_op(model, CE, ds).dense(progress=False))[0])
    V = torch.randn(2, 51, generator=torch.Generator().manual_seed(1), dtype=DT)
    # advice from the one direction CG met (the old advice): far below what is needed, and it says so
    with pytest.raises(ValueError, match="not positive definite") as err:
        CGSolver(advice_iters=0).fit(make_op(model, CE, ds, damping=0.05)).solve(V)
    msg = str(err.value)
    assert "only a lower bound" in msg and "now 0.05" in msg
    assert 0.05 < _advice(msg, r"damping must be at least ([0-9.e+-]+)") < 0.2 < -lam_min
    # Lanczos from that direction (30 products < p = 51): a lower bound close to the need, said to be one
    with pytest.raises(ValueError, match="not positive definite") as err:
        CGSolver().fit(make_op(model, CE, ds, damping=0.05)).solve(V)
    msg = str(err.value)
    assert "30 Lanczos products from that direction" in msg and "only a lower bound" in msg
    at_least = _advice(msg, r"damping must be at least ([0-9.e+-]+)")
    assert -lam_min - 1e-3 <= at_least <= -lam_min + 1e-3  # 3 significant digits, rounded up
    # following the suggestion once is accepted
    suggested = _advice(msg, r"try damping = ([0-9.e+-]+)")
    solver = CGSolver(tol=1e-10).fit(make_op(model, CE, ds, damping=suggested))
    X = solver.solve(V)
    assert solver.info["converged"]
    ref = ExactSolver().fit(make_op(model, CE, ds, damping=suggested)).solve(V)
    assert _rel(X, ref) < 1e-7


def test_exact_damping_advice_is_a_valid_bound():
    model, ds = _indefinite_mlp()
    V = torch.ones(51, dtype=DT)
    for solver in (ExactSolver(), CGSolver(advice_iters=60), ArnoldiSolver(rank=51, n_iter=51)):
        with pytest.raises(ValueError, match="not positive definite") as err:
            solver.fit(make_op(model, CE, ds)).solve(V)
        msg = str(err.value)
        assert "the smallest eigenvalue is exact" in msg and "lower bound" not in msg, msg
        bound = _advice(msg, r"set damping > ([0-9.e+-]+)")
        ExactSolver().fit(make_op(model, CE, ds, damping=bound))  # the printed bound (rounded up) is accepted
    # the exact diagonal, too
    model, loss, ds = concave_problem()
    with pytest.raises(ValueError, match="non-positive entries") as err:
        DiagonalSolver().fit(make_op(model, loss, ds, damping=0.1))
    bound = _advice(str(err.value), r"set damping > ([0-9.e+-]+) \(now 0.1\)")
    DiagonalSolver().fit(make_op(model, loss, ds, damping=bound))


def test_round_up_never_prints_below_the_value():
    from soulkit.influence.solvers import _round_up

    assert _round_up(0.012941) == "0.013" and _round_up(0.0129) == "0.0129" and _round_up(1.2345) == "1.24"
    assert _round_up(999.5) == "1e+03" and _round_up(0.0) == "0"
    g = torch.Generator().manual_seed(0)
    for x in torch.rand(200, generator=g, dtype=DT) * 10.0 ** torch.randint(-6, 6, (200,), generator=g):
        assert float(_round_up(float(x))) >= float(x)


def test_diagonal_solver_refuses_the_exact_diagonal_above_its_budget():
    model, ds, *_ = mlp_problem(n=40)
    op = make_op(model, CE, ds, l2=0.1, batch_size=16)
    with pytest.raises(ValueError, match=r"needs 153 backward passes \(51 parameters x 3 batches\), above the "
                                         r"budget max_backward=100\. Use an estimate: method='hutchinson'"):
        DiagonalSolver(max_backward=100).fit(op)
    assert DiagonalSolver.max_backward == 20_000
    ok = DiagonalSolver(max_backward=153).fit(op).solve(torch.ones(51, dtype=DT))
    torch.testing.assert_close(ok, DiagonalSolver(max_backward=None).fit(op).solve(torch.ones(51, dtype=DT)))
    DiagonalSolver(method="gnb", n_samples=4, max_backward=1).fit(op)  # estimates have no such cost


def nan_curvature_problem():
    """loss = x.w + |w|^1.5 at w = 0: finite value and gradient, infinite/NaN second derivative."""
    model = nn.Linear(2, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    x = torch.randn(8, 2, dtype=DT)

    def loss(m, b):
        return m(b[0]).squeeze(-1) + m.weight.abs().pow(1.5).sum()

    return model, loss, TensorDataset(x)


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa", "arnoldi", "diagonal"])
def test_nan_curvature_is_an_error(solver):
    model, loss, ds = nan_curvature_problem()
    op = make_op(model, loss, ds, l2=0.1)
    with pytest.raises(FloatingPointError, match="NaN/Inf in the curvature"):
        make_solver(solver).fit(op).solve(torch.ones(2, dtype=DT))


def test_bad_solver_options_and_names():
    with pytest.raises(ValueError, match=r"unknown solver 'newton_schulz'; choose one of \['arnoldi', 'cg'"):
        make_solver("newton_schulz")
    with pytest.raises(TypeError, match="solver must be a name or a Solver"):
        make_solver(3)
    for bad, match in [
        (lambda: CGSolver(tol=-1), "tol must be a finite number > 0"),
        (lambda: CGSolver(max_iter=0), "max_iter must be an integer >= 1"),
        (lambda: CGSolver(on_fail="ignore"), "on_fail must be 'raise' or 'warn'"),
        (lambda: LissaSolver(scale=0.0), "scale must be a finite number > 0"),
        (lambda: LissaSolver(safety=0.5), "safety must be >= 1"),
        (lambda: LissaSolver(batches="mini"), "batches must be 'full' or 'stochastic'"),
        (lambda: ArnoldiSolver(rank=0), "rank must be an integer >= 1"),
        (lambda: ArnoldiSolver(rank=10, n_iter=5), r"n_iter must be >= rank \(10\)"),
        (lambda: DiagonalSolver(method="adam"), "method must be one of"),
        (lambda: ExactSolver(max_dim=0), "max_dim must be an integer >= 1"),
        (lambda: CGSolver(advice_iters=-1), "advice_iters must be an integer >= 0"),
        (lambda: DiagonalSolver(max_backward=0), "max_backward must be an integer >= 1 or None"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(RuntimeError, match="before fit"):
        CGSolver().solve(torch.ones(3))
    model, ds, *_ = mlp_problem()
    op = make_op(model, CE, ds, l2=0.1, curvature="gauss_newton")
    s = CGSolver().fit(op)
    with pytest.raises(ValueError, match=r"V must have shape \[m, 51\]"):
        s.solve(torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="V contains NaN"):
        s.solve(torch.full((51,), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="above max_dim=10"):
        ExactSolver(max_dim=10).fit(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CGSolver().fit(op).solve(torch.ones(51, dtype=DT))  # no warning on success
